//! `meshbpf`: the node agent's command line over the meshbpf library. This file holds the
//! command tree and the dispatch; each subject's options and work are a module of
//! `commands/`, what they print goes through `output`, and `exit` maps errors to codes.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

// First: its macros (`out!`, `note!`) are used by the modules below.
#[macro_use]
mod output;
mod commands;
mod exit;
mod logs;
mod signals;

use commands::agent::AgentArgs;
use commands::attachment::{AttachArgs, DetachArgs};
use commands::check::CheckArgs;
use commands::explain::ExplainArgs;
use commands::origin::OriginArgs;
use commands::pods::{RegisterArgs, UnregisterArgs};
use commands::sidecar_resource::SidecarResourceArgs;
use commands::trace::TraceArgs;
use commands::JsonPinArgs;

/// eBPF traffic capture for service-mesh sidecars, in place of iptables.
#[derive(Parser)]
// The library's description, as before the workspace split (a bare `about` would print this
// crate's, meshbpf-cli's).
#[command(
    version,
    about = "eBPF cgroup socket hooks that replace a service-mesh sidecar's iptables traffic capture"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// The least severe log lines written to stderr.
    #[arg(long, global = true, value_enum, default_value = "info")]
    log_level: logs::Level,
    /// Log lines on stderr as text or as JSON objects, one a line (a failed command's
    /// error too).
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: logs::Format,
}

#[derive(Subcommand)]
// Parsed once per run: the size of the register variant does not matter.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Attach the programs to a cgroup v2 (once per node); re-running replaces them in place.
    Attach(AttachArgs),
    /// Detach every program and remove every pin.
    Detach(DetachArgs),
    /// Put a pod (its network namespace) in the mesh, or update its settings.
    Register(RegisterArgs),
    /// Take a pod out of the mesh.
    Unregister(UnregisterArgs),
    /// List registered pods.
    List(JsonPinArgs),
    /// Show attached programs, registered pods and counters.
    Status(JsonPinArgs),
    /// Unregister pods whose network namespace no longer exists.
    Gc(JsonPinArgs),
    /// Run the node agent (the DaemonSet's process): attach, install the CNI plugin, keep it
    /// in the primary network configuration, gc, serve /livez, /healthz and /metrics.
    /// Stopping it never detaches.
    Agent(AgentArgs),
    /// Probe the running kernel for every feature meshbpf uses; if attached, list the other
    /// programs on meshbpf's capture hooks (a CNI's socket load balancer) and fail if one
    /// runs before meshbpf's.
    Check(CheckArgs),
    /// Stream, live, every decision the programs take (one line each) until Ctrl-C.
    Trace(TraceArgs),
    /// What the programs decide for a connection of a registered pod, and the rule that does.
    Explain(ExplainArgs),
    /// Print the Istio Sidecar resource that lets stock istiod serve a bind-mode pod.
    ///
    /// One ingress listener per discovered inbound port: captureMode NONE, to 127.0.0.1:PORT.
    SidecarResource(SidecarResourceArgs),
    /// Look up the original destination of a captured connection.
    Origin(OriginArgs),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // A value its parser refused is bad input, like any other setting: exit 6, not clap's
        // usage error 2.
        Err(err)
            if matches!(
                err.kind(),
                clap::error::ErrorKind::ValueValidation | clap::error::ErrorKind::InvalidValue
            ) =>
        {
            let _ = err.print();
            return ExitCode::from(exit::BAD_INPUT);
        }
        Err(err) => err.exit(),
    };
    logs::init(cli.log_level, cli.log_format);
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let code = exit::code(&err);
            // A person reads the plain line; a log collector asked for JSON gets JSON.
            match cli.log_format {
                logs::Format::Text => note!("meshbpf: {err:#}"),
                logs::Format::Json => tracing::error!(exit_code = code, "{err:#}"),
            }
            ExitCode::from(code)
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    use commands::*;
    match command {
        Command::Attach(args) => attachment::attach(args),
        Command::Detach(args) => attachment::detach(args),
        Command::Register(args) => pods::register(args),
        Command::Unregister(args) => pods::unregister(args),
        Command::List(args) => pods::list(args),
        Command::Status(args) => status::run(args),
        Command::Gc(args) => pods::gc(args),
        Command::Agent(args) => agent::run(&args),
        Command::Check(args) => check::run(args),
        Command::Trace(args) => trace::run(args),
        Command::Explain(args) => explain::run(args),
        Command::SidecarResource(args) => sidecar_resource::run(&args),
        Command::Origin(args) => origin::run(args),
    }
}
