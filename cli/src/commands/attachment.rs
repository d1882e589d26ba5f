//! `attach` and `detach`: the node's attachment to its cgroup.

use std::path::PathBuf;

use anyhow::Context;
use meshbpf::Mesh;

use super::PinDirArg;

#[derive(clap::Args)]
pub struct AttachArgs {
    /// A cgroup v2 directory: every pod's processes must be in it or below it.
    #[arg(long, default_value = "/sys/fs/cgroup")]
    cgroup: PathBuf,
    /// Do not attach the sockmap fast path: no connection on this node is accelerated.
    #[arg(long)]
    no_sockmap: bool,
    #[command(flatten)]
    pin: PinDirArg,
}

#[derive(clap::Args)]
pub struct DetachArgs {
    #[command(flatten)]
    pin: PinDirArg,
}

pub fn attach(args: AttachArgs) -> anyhow::Result<()> {
    let AttachArgs {
        cgroup,
        no_sockmap,
        pin,
    } = args;
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
