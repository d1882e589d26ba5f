//! `explain`: what the programs decide for a connection, and the rule that does.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use meshbpf::Mesh;
use serde::Serialize;

use super::PinDirArg;
use crate::output::print_json;

#[derive(clap::Args)]
pub struct ExplainArgs {
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
    source: Option<IpAddr>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    pin: PinDirArg,
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

pub fn run(args: ExplainArgs) -> anyhow::Result<()> {
    let ExplainArgs {
        netns,
        dst,
        uid,
        gid,
        proto,
        source,
        json,
        pin,
    } = args;
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
    Ok(())
}
