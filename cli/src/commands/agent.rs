//! `agent`: the node agent (the DaemonSet's process), whose work is the crate's library
//! (`meshbpf_cli::agent`); here, its options.

use std::path::PathBuf;

use anyhow::Context;
use meshbpf::Error;
use meshbpf_cli::agent::{self, AgentConfig};

use super::{NodeArgs, PinDirArg};
use crate::signals::stop_on_signals;

#[derive(clap::Args)]
pub struct AgentArgs {
    /// A cgroup v2 directory: every pod's processes must be in it or below it.
    #[arg(long, default_value = "/sys/fs/cgroup")]
    cgroup: PathBuf,
    #[command(flatten)]
    node: NodeArgs,
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
    /// Where to serve /livez (alive), /healthz (ready) and /metrics, unauthenticated: the
    /// node's IP for a Prometheus off the node (every pod on the node can read them then),
    /// or "none": not served.
    #[arg(long, default_value = agent::DEFAULT_LISTEN)]
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
    fn config(&self) -> anyhow::Result<AgentConfig> {
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
                .with_file_name(meshbpf_cni::PLUGIN_TYPE),
        };
        let listen = match self.listen.as_str() {
            "none" => None,
            addr => Some(addr.parse().map_err(|_| {
                Error::InvalidSetting(format!(
                    "--listen {addr:?}: give ADDRESS:PORT, such as 127.0.0.1:9190 or the \
                     node's IP and a port, or none"
                ))
            })?),
        };
        Ok(AgentConfig {
            cgroup: self.cgroup.clone(),
            pin_dir: self.pin.pin_dir.clone(),
            attach: self.node.options(),
            cni_bin_dir: self.cni_bin_dir.clone(),
            cni_conf_dir: self.cni_conf_dir.clone(),
            plugin_binary,
            plugin_entry: agent::plugin_entry(text.as_deref(), &self.pin.pin_dir)?,
            listen,
            gc_interval: std::time::Duration::from_secs(self.gc_interval.max(1)),
            discover: !self.no_discover,
        })
    }
}

/// Runs the agent until SIGTERM, SIGINT or SIGHUP (or, with --uninstall, uninstalls).
pub fn run(args: &AgentArgs) -> anyhow::Result<()> {
    let config = args.config()?;
    if args.uninstall {
        return Ok(agent::uninstall(&config)?);
    }
    let stop = stop_on_signals()?;
    Ok(agent::run(&config, &stop)?)
}
