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

// `--json` and the pin directory: the options of `list`, `status` and `gc`.
#[derive(clap::Args)]
pub struct JsonPinArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub pin: PinDirArg,
}
