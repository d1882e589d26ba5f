//! `origin`: the original destination of a captured connection, from the maps.

use std::net::SocketAddr;
use std::path::PathBuf;

use meshbpf::Mesh;
use serde::Serialize;

use super::PinDirArg;
use crate::output::print_json;

#[derive(clap::Args)]
pub struct OriginArgs {
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
}

/// What `origin --json` prints.
#[derive(Serialize)]
struct Origin {
    client: SocketAddr,
    listener: SocketAddr,
    original_dst: Option<SocketAddr>,
}

pub fn run(args: OriginArgs) -> anyhow::Result<()> {
    let OriginArgs {
        netns,
        client,
        listener,
        json,
        pin,
    } = args;
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
    Ok(())
}
