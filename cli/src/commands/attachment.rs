//! `attach` and `detach`: the node's attachment to its cgroup.

use std::path::PathBuf;

use anyhow::Context;
use meshbpf::Mesh;

use super::{NodeArgs, PinDirArg};

#[derive(clap::Args)]
pub struct AttachArgs {
    /// A cgroup v2 directory: every pod's processes must be in it or below it.
    #[arg(long, default_value = "/sys/fs/cgroup")]
    cgroup: PathBuf,
    #[command(flatten)]
    node: NodeArgs,
    #[command(flatten)]
    pin: PinDirArg,
}

#[derive(clap::Args)]
pub struct DetachArgs {
    #[command(flatten)]
    pin: PinDirArg,
}

pub fn attach(args: AttachArgs) -> anyhow::Result<()> {
    let AttachArgs { cgroup, node, pin } = args;
    let options = node.options();
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
    // Programs that still run first (a CNI's socket load balancer this kernel cannot be
    // placed before): said now, as `status`, `check` and /healthz say it.
    if let Ok(Some(problem)) = mesh.order_problem() {
        note!("meshbpf attach: warning: {problem}");
    }
    Ok(())
}

pub fn detach(DetachArgs { pin }: DetachArgs) -> anyhow::Result<()> {
    if meshbpf::detach(&pin.pin_dir)? {
        out!(
            "detached; removed every pin under {}",
            pin.pin_dir.display()
        );
    } else {
        out!("nothing attached under {}", pin.pin_dir.display());
    }
    Ok(())
}
