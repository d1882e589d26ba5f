//! One module per subject, each with its subcommands' arguments and what they do.

use std::path::PathBuf;

use meshbpf::DEFAULT_PIN_DIR;

pub mod agent;
pub mod attachment;
pub mod check;
pub mod explain;
pub mod origin;
pub mod pods;
pub mod sidecar_resource;
pub mod status;
pub mod trace;

// The pin directory, an option of every command that reaches the attachment.
#[derive(clap::Args)]
pub struct PinDirArg {
    /// bpffs directory holding the attachment's links and maps.
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}

/// Node-wide choices of `attach` and `agent`.
#[derive(clap::Args)]
pub struct NodeArgs {
    /// Do not attach the sockmap fast path: no connection on this node is accelerated.
    #[arg(long)]
    no_sockmap: bool,
    /// Live captured connections the node can track (origin_dst_map, 136 bytes each;
    /// default 262144, or what the attachment has). When full, the oldest entry goes.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32)
        .range(i64::from(meshbpf::MIN_CONNECTIONS)..=i64::from(meshbpf::MAX_CONNECTIONS_LIMIT)))]
    max_connections: Option<u32>,
    /// Pods the node can register (cookie_map, and the per-pod maps in proportion;
    /// default 16384, or what the attachment has).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32)
        .range(1..=i64::from(meshbpf::MAX_PODS_LIMIT)))]
    max_pods: Option<u32>,
}

impl NodeArgs {
    pub fn options(&self) -> meshbpf::AttachOptions {
        meshbpf::AttachOptions::with_sockmap(!self.no_sockmap).with_sizes(meshbpf::MapSizes {
            max_connections: self.max_connections,
            max_pods: self.max_pods,
        })
    }
}

// `--json` and the pin directory: the options of `list`, `status` and `gc`.
#[derive(clap::Args)]
pub struct JsonPinArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub pin: PinDirArg,
}
