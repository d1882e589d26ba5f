//! `meshbpf`: the node agent's command line over the meshbpf library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use meshbpf::{Error, Mesh, PodSettings, RegisterOptions, DEFAULT_PIN_DIR};
use serde::Serialize;

/// Writes a line to stdout (`out!(no_newline ...)`: without the newline); a reader that went
/// away (`meshbpf status | head -1`) silences the rest instead of failing the command.
macro_rules! out {
    (no_newline $($arg:tt)*) => {
        stdout::write(format_args!($($arg)*), false)?
    };
    ($($arg:tt)*) => {
        stdout::write(format_args!($($arg)*), true)?
    };
}

/// Writes a line to stderr; a closed stderr is no reason to stop (nobody would see why).
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// Standard output that a closed pipe ends quietly. Rust ignores SIGPIPE, so where `head`
/// has read its lines and exited, a write fails with EPIPE, and `println!` would panic
/// (exit 101, a backtrace). Here the first EPIPE silences every later write, and the
/// command finishes as if its output had been read: the exit code is the command's own
/// (0 when it succeeded), whether or not anyone read all of it.
mod stdout {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};

    use anyhow::Context;

    /// Set once a write found the reader gone.
    static CLOSED: AtomicBool = AtomicBool::new(false);

    pub fn write(args: std::fmt::Arguments<'_>, newline: bool) -> anyhow::Result<()> {
        if CLOSED.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut out = std::io::stdout().lock();
        let written = out
            .write_fmt(args)
            .and_then(|()| {
                if newline {
                    out.write_all(b"\n")
                } else {
                    Ok(())
                }
            })
            .and_then(|()| out.flush());
        match written {
            Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => {
                CLOSED.store(true, Ordering::Relaxed);
                Ok(())
            }
            other => other.context("writing to standard output"),
        }
    }
}

/// eBPF traffic capture for service-mesh sidecars, in place of iptables.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct PinDirArg {
    /// bpffs directory holding the attachment's links and maps.
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
}

#[derive(Subcommand)]
// Parsed once per run: the size of the register variant does not matter.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Attach the programs to a cgroup v2 (once per node); re-running replaces them in place.
    Attach {
        /// A cgroup v2 directory: every pod's processes must be in it or below it.
        #[arg(long, default_value = "/sys/fs/cgroup")]
        cgroup: PathBuf,
        /// Do not attach the sockmap fast path: no connection on this node is accelerated.
        #[arg(long)]
        no_sockmap: bool,
        #[command(flatten)]
        pin: PinDirArg,
    },
    /// Detach every program and remove every pin.
    Detach {
        #[command(flatten)]
        pin: PinDirArg,
    },
    /// Put a pod (its network namespace) in the mesh, or update its settings.
    Register {
        /// The pod's network namespace: /proc/PID/ns/net or /run/netns/NAME.
        #[arg(long)]
        netns: PathBuf,
        #[command(flatten)]
        pod: PodArgs,
        /// Register even the host's own network namespace (captures the node's own traffic).
        #[arg(long)]
        allow_host_netns: bool,
        #[command(flatten)]
        pin: PinDirArg,
    },
    /// Take a pod out of the mesh.
    Unregister {
        /// The pod's network namespace.
        #[arg(long, required_unless_present = "cookie", conflicts_with = "cookie")]
        netns: Option<PathBuf>,
        /// The pod's netns cookie, as `list` shows it (works when the namespace is gone).
        #[arg(long)]
        cookie: Option<u64>,
        #[command(flatten)]
        pin: PinDirArg,
    },
    /// List registered pods.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        pin: PinDirArg,
    },
    /// Show attached programs, registered pods and counters.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        pin: PinDirArg,
    },
    /// Unregister pods whose network namespace no longer exists.
    Gc {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        pin: PinDirArg,
    },
    /// Run the node agent (the DaemonSet's process): attach, install the CNI plugin, keep it
    /// in the primary network configuration, gc, serve /healthz and /metrics. Stopping it
    /// never detaches.
    Agent(AgentArgs),
    /// Probe the running kernel for every feature meshbpf uses; if attached, list the other
    /// programs on meshbpf's capture hooks (a CNI's socket load balancer) and fail if one
    /// runs before meshbpf's.
    Check {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        pin: PinDirArg,
    },
    /// Stream, live, every decision the programs take (one line each) until Ctrl-C.
    Trace {
        /// Only this pod's decisions (its network namespace).
        #[arg(long, conflicts_with = "cookie")]
        netns: Option<PathBuf>,
        /// Only this pod's decisions (its netns cookie).
        #[arg(long)]
        cookie: Option<u64>,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        pin: PinDirArg,
    },
    /// What the programs decide for a connection of a registered pod, and the rule that does.
    Explain {
        /// The pod's network namespace.
        #[arg(long)]
        netns: PathBuf,
        /// The destination asked for.
        #[arg(long)]
        dst: SocketAddr,
        /// The caller's uid.
        #[arg(long, default_value_t = 1000)]
        uid: u32,
        /// The caller's gid (its uid when not given).
        #[arg(long)]
        gid: Option<u32>,
        /// tcp or udp.
        #[arg(long, default_value = "tcp")]
        proto: meshbpf::Protocol,
        /// The socket's bound source address (127.0.0.6: Envoy's inbound passthrough).
        #[arg(long)]
        source: Option<std::net::IpAddr>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        pin: PinDirArg,
    },
    /// Print the Istio Sidecar resource that lets stock istiod serve a bind-mode pod.
    ///
    /// One ingress listener per discovered inbound port: captureMode NONE, to 127.0.0.1:PORT.
    SidecarResource(SidecarResourceArgs),
    /// Look up the original destination of a captured connection.
    Origin {
        /// The pod's network namespace.
        #[arg(long)]
        netns: PathBuf,
        /// The application's end of the connection (its local address).
        #[arg(long)]
        client: SocketAddr,
        /// The proxy's end (the outbound listener).
        #[arg(long, default_value = "127.0.0.1:15001")]
        listener: SocketAddr,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        pin: PinDirArg,
    },
}

#[derive(clap::Args)]
struct SidecarResourceArgs {
    /// The pod's network namespace (registered with --inbound-mode bind).
    #[arg(long)]
    netns: PathBuf,
    /// The resource's metadata.name.
    #[arg(long, default_value = meshbpf::istio::DEFAULT_SIDECAR_NAME)]
    name: String,
    /// The resource's metadata.namespace (left out if not given).
    #[arg(long)]
    namespace: Option<String>,
    /// A label of the pod for spec.workloadSelector, KEY=VALUE; repeat for several.
    #[arg(long, value_name = "KEY=VALUE")]
    selector: Vec<String>,
    #[command(flatten)]
    pin: PinDirArg,
}

/// Prints the Sidecar resource as YAML on stdout (and nothing else there).
fn print_sidecar_resource(args: &SidecarResourceArgs) -> anyhow::Result<()> {
    let selector = args
        .selector
        .iter()
        .map(|text| meshbpf::istio::parse_selector(text))
        .collect::<meshbpf::Result<_>>()?;
    let mesh = Mesh::open(&args.pin.pin_dir)?;
    let resource = meshbpf::istio::SidecarResource::for_netns(
        &mesh,
        &args.netns,
        &args.name,
        args.namespace.as_deref(),
        selector,
    )?;
    if resource.selector.is_empty() {
        note!(
            "meshbpf: no --selector: this Sidecar applies to every workload of its namespace \
             that has no Sidecar of its own"
        );
    }
    out!(no_newline "{resource}");
    Ok(())
}

#[derive(clap::Args)]
struct AgentArgs {
    /// A cgroup v2 directory: every pod's processes must be in it or below it.
    #[arg(long, default_value = "/sys/fs/cgroup")]
    cgroup: PathBuf,
    /// Do not attach the sockmap fast path: no connection on this node is accelerated.
    #[arg(long)]
    no_sockmap: bool,
    /// The node's CNI bin dir, where meshbpf-cni is installed.
    #[arg(long, default_value = "/opt/cni/bin")]
    cni_bin_dir: PathBuf,
    /// The node's CNI conf dir: its lexically first .conf/.conflist gets meshbpf-cni's entry.
    #[arg(long, default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    /// The plugin's conf entry (JSON: pin_dir, state_dir, exclude_namespaces, log_file and
    /// every option of `register`); default: Istio's settings, pod annotations on.
    #[arg(long, value_name = "FILE")]
    plugin_conf: Option<PathBuf>,
    /// The meshbpf-cni binary to install (default: the one beside this program).
    #[arg(long, value_name = "PATH")]
    plugin_binary: Option<PathBuf>,
    /// Where to serve /healthz and /metrics ("none": not served).
    #[arg(long, default_value = meshbpf::agent::DEFAULT_LISTEN)]
    listen: String,
    /// Seconds between two gc runs (pods whose network namespace is gone).
    #[arg(long, default_value_t = 60)]
    gc_interval: u64,
    /// Do not look for pods that were running before the agent (sidecar found listening).
    #[arg(long)]
    no_discover: bool,
    /// Remove the plugin and its conflist entry, then detach every program, and exit.
    #[arg(long)]
    uninstall: bool,
    #[command(flatten)]
    pin: PinDirArg,
}

impl AgentArgs {
    fn config(&self) -> anyhow::Result<meshbpf::agent::AgentConfig> {
        let text = match &self.plugin_conf {
            Some(file) => Some(
                std::fs::read_to_string(file)
                    .with_context(|| format!("reading {}", file.display()))?,
            ),
            None => None,
        };
        let plugin_binary = match &self.plugin_binary {
            Some(path) => path.clone(),
            None => std::env::current_exe()
                .context("locating this program")?
                .with_file_name(meshbpf::cni::PLUGIN_TYPE),
        };
        let listen = match self.listen.as_str() {
            "none" => None,
            addr => Some(addr.parse().map_err(|_| {
                Error::InvalidSetting(format!(
                    "--listen {addr:?}: give ADDRESS:PORT, such as 0.0.0.0:9190, or none"
                ))
            })?),
        };
        Ok(meshbpf::agent::AgentConfig {
            cgroup: self.cgroup.clone(),
            pin_dir: self.pin.pin_dir.clone(),
            attach: meshbpf::AttachOptions::with_sockmap(!self.no_sockmap),
            cni_bin_dir: self.cni_bin_dir.clone(),
            cni_conf_dir: self.cni_conf_dir.clone(),
            plugin_binary,
            plugin_entry: meshbpf::agent::plugin_entry(text.as_deref(), &self.pin.pin_dir)?,
            listen,
            gc_interval: std::time::Duration::from_secs(self.gc_interval.max(1)),
            discover: !self.no_discover,
        })
    }
}

/// Runs the agent until SIGTERM, SIGINT or SIGHUP.
fn run_agent(args: &AgentArgs) -> anyhow::Result<()> {
    let config = args.config()?;
    if args.uninstall {
        return Ok(meshbpf::agent::uninstall(&config)?);
    }
    let stop = stop_on_signals()?;
    Ok(meshbpf::agent::run(&config, &stop)?)
}

/// A flag raised at SIGTERM, SIGINT or SIGHUP, which a thread of its own waits for.
fn stop_on_signals() -> anyhow::Result<std::sync::Arc<std::sync::atomic::AtomicBool>> {
    use nix::sys::signal::{SigSet, Signal};
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut signals = SigSet::empty();
    for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        signals.add(signal);
    }
    // Blocked before any other thread starts, so every thread inherits the mask and the
    // waiter alone receives them.
    signals.thread_block().context("blocking signals")?;
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::spawn(move || {
        if let Ok(signal) = signals.wait() {
            note!("meshbpf: {signal}");
        }
        flag.store(true, Ordering::SeqCst);
    });
    Ok(stop)
}

/// One line of `trace --json`: the event, with its protocol, hook and reason in words.
#[derive(Serialize)]
struct TraceLine<'a> {
    time_ns: u64,
    netns_cookie: u64,
    pid: Option<u32>,
    uid: Option<u32>,
    comm: &'a str,
    protocol: String,
    hook: String,
    dst: Option<SocketAddr>,
    to: Option<SocketAddr>,
    captured: bool,
    reason: String,
}

impl<'a> From<&'a meshbpf::TraceEvent> for TraceLine<'a> {
    fn from(event: &'a meshbpf::TraceEvent) -> Self {
        TraceLine {
            time_ns: event.time_ns,
            netns_cookie: event.netns_cookie,
            pid: event.pid,
            uid: event.uid,
            comm: &event.comm,
            protocol: event.protocol.to_string(),
            hook: event.hook.to_string(),
            dst: event.dst,
            to: event.to,
            captured: event.reason.captured(),
            reason: event.reason.to_string(),
        }
    }
}

/// What `explain --json` prints.
#[derive(Serialize)]
struct ExplainLine<'a> {
    dst: SocketAddr,
    protocol: String,
    uid: u32,
    captured: bool,
    reason: String,
    rule: &'a str,
    to: Option<SocketAddr>,
}

/// One pod's settings, as `register` takes them: a mesh preset, then the pod's Istio
/// annotations, then each option given (`meshbpf::PodOptions`, the same names as the CNI
/// plugin's conf keys), each overriding the one before.
#[derive(clap::Args)]
struct PodArgs {
    /// Apply a pod's traffic.sidecar.istio.io/* annotations (a YAML or JSON map).
    #[arg(long, value_name = "FILE")]
    from_annotations: Option<PathBuf>,
    #[command(flatten)]
    options: meshbpf::PodOptions,
}

impl PodArgs {
    fn settings(&self) -> anyhow::Result<PodSettings> {
        let annotations = match &self.from_annotations {
            Some(file) => {
                let text = std::fs::read_to_string(file)
                    .with_context(|| format!("reading {}", file.display()))?;
                Some(meshbpf::parse_annotations(&text)?)
            }
            None => None,
        };
        Ok(self.options.settings(annotations.as_ref())?)
    }
}

/// Exit codes a node agent can act on.
mod exit {
    pub const FAILURE: u8 = 1;
    pub const NOT_ATTACHED: u8 = 3;
    pub const PERMISSION: u8 = 4;
    pub const KERNEL: u8 = 5;
    pub const BAD_INPUT: u8 = 6;
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
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            note!("meshbpf: {err:#}");
            ExitCode::from(exit_code(&err))
        }
    }
}

fn exit_code(err: &anyhow::Error) -> u8 {
    match err.downcast_ref::<Error>() {
        Some(Error::NotAttached { .. }) => exit::NOT_ATTACHED,
        Some(Error::PermissionDenied { .. } | Error::LoadRefused { .. }) => exit::PERMISSION,
        Some(Error::MissingKernelFeature { .. } | Error::VerifierRejected { .. }) => exit::KERNEL,
        Some(
            Error::NetnsNotFound { .. }
            | Error::NotANetns { .. }
            | Error::HostNetns { .. }
            | Error::CgroupNotFound { .. }
            | Error::CgroupNotV2 { .. }
            | Error::BpffsNotMounted { .. }
            | Error::PinDirUnsafe { .. }
            | Error::PinDirTaken { .. }
            | Error::NotOurPinDir { .. }
            | Error::AttachedElsewhere { .. }
            | Error::InvalidSetting(_)
            | Error::NotRegistered { .. }
            | Error::NotBindMode { .. }
            | Error::NoInboundListeners { .. }
            | Error::CniConfig { .. }
            | Error::CniConfigLink { .. },
        ) => exit::BAD_INPUT,
        _ => exit::FAILURE,
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Attach {
            cgroup,
            no_sockmap,
            pin,
        } => {
            let options = meshbpf::AttachOptions::with_sockmap(!no_sockmap);
            let mesh = Mesh::attach_with(&cgroup, &pin.pin_dir, &options)?;
            let status = mesh.status().context("reading the attachment back")?;
            out!(
                "attached {} programs{} to {}, pinned under {}",
                status.programs.len(),
                if status.sockmap {
                    " and the sockmap fast path"
                } else {
                    ""
                },
                status.cgroup_path,
                pin.pin_dir.display()
            );
            // Programs that still run first (a CNI's socket load balancer this kernel cannot
            // be placed before): said now, as `status`, `check` and /healthz say it.
            if let Ok(Some(problem)) = mesh.order_problem() {
                note!("meshbpf attach: warning: {problem}");
            }
        }
        Command::Detach { pin } => {
            if meshbpf::detach(&pin.pin_dir)? {
                out!(
                    "detached; removed every pin under {}",
                    pin.pin_dir.display()
                );
            } else {
                out!("nothing attached under {}", pin.pin_dir.display());
            }
        }
        Command::Register {
            netns,
            pod,
            allow_host_netns,
            pin,
        } => {
            let settings = pod.settings()?;
            // Check the namespace before touching the attachment.
            meshbpf::Netns::open(&netns)?.refuse_host(allow_host_netns)?;
            let mesh = Mesh::open(&pin.pin_dir)?;
            let pod = mesh.register_netns_with(
                &netns,
                &settings,
                &RegisterOptions::with_host_netns(allow_host_netns),
            )?;
            out!(
                "registered {} (netns cookie {})",
                netns.display(),
                pod.netns_cookie
            );
        }
        Command::Unregister { netns, cookie, pin } => {
            let mesh = Mesh::open(&pin.pin_dir)?;
            let (was, what) = match (netns, cookie) {
                (Some(netns), _) => (mesh.unregister_netns(&netns)?, netns.display().to_string()),
                (None, Some(cookie)) => (
                    mesh.unregister_cookie(cookie)?,
                    format!("netns cookie {cookie}"),
                ),
                (None, None) => anyhow::bail!("give --netns PATH or --cookie N"),
            };
            if was {
                out!("unregistered {what}");
            } else {
                out!("{what} was not registered");
            }
        }
        Command::List { json, pin } => {
            let pods = Mesh::open(&pin.pin_dir)?.pods()?;
            if json {
                print_json(&pods)?;
            } else if pods.is_empty() {
                out!("no pods registered");
            } else {
                out!(
                    "{:>12}  {:>9}  {:>8}  INBOUND-LISTENERS",
                    "NETNS-COOKIE",
                    "PROXY-UID",
                    "OUTBOUND"
                );
                for pod in &pods {
                    let listeners: Vec<String> =
                        pod.inbound_listeners.iter().map(u16::to_string).collect();
                    out!(
                        "{:>12}  {:>9}  {:>8}  {}",
                        pod.netns_cookie,
                        pod.settings.proxy_uids.first().copied().unwrap_or_default(),
                        pod.settings.outbound_port,
                        if listeners.is_empty() {
                            "-".to_string()
                        } else {
                            listeners.join(",")
                        }
                    );
                }
            }
        }
        Command::Status { json, pin } => {
            let status = Mesh::open(&pin.pin_dir)?.status()?;
            if json {
                print_json(&status)?;
            } else {
                out!("attached to  {}", status.cgroup_path);
                out!(
                    "pinned under {}  (map layout v{})",
                    status.pin_dir.display(),
                    status.layout_version
                );
                out!("programs:");
                for p in &status.programs {
                    out!("  {:<14} link {:<6} prog {}", p.hook, p.link_id, p.prog_id);
                }
                let sockmap = if status.sockmap {
                    "sk_msg on sock_hash"
                } else {
                    "off (attach --no-sockmap)"
                };
                out!("  {:<14} {sockmap}", "sockmap");
                match status.runs_first {
                    Some(_) => print_other_programs(&status.other_programs)?,
                    None => out!("other programs on meshbpf's hooks: unknown (its cgroup is not reachable from here)"),
                }
                out!("registered pods: {}", status.pods.len());
                out!("counters:");
                for (name, value) in &status.counters {
                    out!("  {name:<22} {value}");
                }
            }
        }
        Command::Gc { json, pin } => {
            let removed = Mesh::open(&pin.pin_dir)?.gc()?;
            if json {
                print_json(&removed)?;
            } else if removed.is_empty() {
                out!("every registered pod's network namespace still exists");
            } else {
                for pod in &removed {
                    out!(
                        "removed netns cookie {} (its network namespace is gone)",
                        pod.netns_cookie
                    );
                }
            }
        }
        Command::Agent(args) => run_agent(&args)?,
        Command::SidecarResource(args) => print_sidecar_resource(&args)?,
        Command::Check { json, pin } => {
            let features = meshbpf::probe();
            // Attached here: the other programs on its capture hooks, and their order.
            let mesh = Mesh::open(&pin.pin_dir).ok();
            let others = match &mesh {
                Some(mesh) => Some(mesh.other_programs()?),
                None => None,
            };
            // JSON: the features as before; `status --json` has the other programs.
            if json {
                print_json(&features)?;
            } else {
                out!("{:<52} {:<28} {:<5} HOW", "FEATURE", "MINIMUM KERNEL", "OK");
                for f in &features {
                    out!(
                        "{:<52} {:<28} {:<5} {}",
                        f.name,
                        f.min_kernel,
                        match (f.available, f.required) {
                            (true, _) => "yes",
                            (false, true) => "NO",
                            (false, false) => "no",
                        },
                        f.how
                    );
                }
            }
            if let (false, Some(others)) = (json, &others) {
                print_other_programs(others)?;
            }
            meshbpf::probe_required()?;
            meshbpf::check_kernel()?;
            if let Some(problem) = mesh.map(|m| m.order_problem()).transpose()?.flatten() {
                anyhow::bail!("{problem}");
            }
        }
        Command::Trace {
            netns,
            cookie,
            json,
            pin,
        } => {
            let mesh = Mesh::open(&pin.pin_dir)?;
            let cookie = match (netns, cookie) {
                (Some(netns), _) => Some(meshbpf::Netns::open(&netns)?.cookie()),
                (None, cookie) => cookie,
            };
            let stop = stop_on_signals()?;
            let dropped = || -> anyhow::Result<u64> {
                let counters = mesh.counters()?;
                Ok(counters
                    .iter()
                    .find(|(name, _)| *name == "trace_dropped")
                    .map_or(0, |(_, n)| *n))
            };
            let dropped_before = dropped()?;
            let mut tracer = mesh.trace(cookie)?;
            note!("meshbpf trace: reading slot {}; Ctrl-C ends", tracer.slot());
            let mut out = std::io::stdout().lock();
            'reading: while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                for event in tracer.poll(std::time::Duration::from_millis(100))? {
                    use std::io::Write;
                    let line = if json {
                        serde_json::to_string(&TraceLine::from(&event))?
                    } else {
                        event.to_string()
                    };
                    match writeln!(out, "{line}").and_then(|()| out.flush()) {
                        // Its reader went away (`meshbpf trace | head`): done.
                        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => break 'reading,
                        other => other?,
                    }
                }
            }
            // Counted for every reader together: some may have been another reader's.
            let lost = dropped()?.saturating_sub(dropped_before);
            if lost > 0 {
                note!(
                    "meshbpf trace: {lost} decisions were dropped while this ran (a reader's ring \
                     was full: read faster, or narrow it with --netns)"
                );
            }
        }
        Command::Explain {
            netns,
            dst,
            uid,
            gid,
            proto,
            source,
            json,
            pin,
        } => {
            let mesh = Mesh::open(&pin.pin_dir)?;
            let cookie = meshbpf::Netns::open(&netns)?.cookie();
            let query = meshbpf::Query {
                dst,
                protocol: proto,
                uid,
                gid: gid.unwrap_or(uid),
                source,
            };
            let explained = mesh.explain(cookie, &query)?;
            if json {
                print_json(&ExplainLine {
                    dst,
                    protocol: proto.to_string(),
                    uid,
                    captured: explained.reason.captured(),
                    reason: explained.reason.to_string(),
                    rule: &explained.rule,
                    to: explained.to,
                })?;
            } else {
                out!("{explained}");
            }
        }
        Command::Origin {
            netns,
            client,
            listener,
            json,
            pin,
        } => {
            let mesh = Mesh::open(&pin.pin_dir)?;
            let cookie = meshbpf::Netns::open(&netns)?.cookie();
            let origin = mesh.lookup_origin_dst(cookie, client, listener)?;
            match (json, origin) {
                (true, original_dst) => print_json(&Origin {
                    client,
                    listener,
                    original_dst,
                })?,
                (false, Some(addr)) => out!("{addr}"),
                (false, None) => anyhow::bail!(
                    "no captured connection from {client} to {listener} in {}",
                    netns.display()
                ),
            }
        }
    }
    Ok(())
}

/// The other programs on meshbpf's capture hooks, and whether each runs before it.
fn print_other_programs(others: &[meshbpf::OtherProgram]) -> anyhow::Result<()> {
    if others.is_empty() {
        out!("other programs on meshbpf's hooks: none (its capture programs run first)");
        return Ok(());
    }
    out!("other programs on meshbpf's hooks (its cgroup and ancestors):");
    for p in others {
        out!(
            "  {:<14} prog {:<6} {:<16} on {}  {}",
            p.hook,
            p.prog_id,
            p.name,
            p.cgroup,
            if p.runs_before_meshbpf {
                "RUNS BEFORE meshbpf: the sidecar may learn a translated destination"
            } else {
                "runs after meshbpf (right)"
            }
        );
    }
    Ok(())
}

/// What `origin --json` prints.
#[derive(Serialize)]
struct Origin {
    client: SocketAddr,
    listener: SocketAddr,
    original_dst: Option<SocketAddr>,
}

/// Prints `value` as one line of JSON.
fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    out!("{}", serde_json::to_string(value)?);
    Ok(())
}
