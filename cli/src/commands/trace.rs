//! `trace`: every decision the programs take, live.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use meshbpf::Mesh;
use serde::Serialize;

use super::PinDirArg;
use crate::signals::stop_on_signals;

#[derive(clap::Args)]
pub struct TraceArgs {
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

/// Streams the decisions until SIGTERM, SIGINT or SIGHUP, or until stdout's reader goes.
pub fn run(args: TraceArgs) -> anyhow::Result<()> {
    let TraceArgs {
        netns,
        cookie,
        json,
        pin,
    } = args;
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
    tracing::info!("trace: reading slot {}; Ctrl-C ends", tracer.slot());
    let mut out = std::io::stdout().lock();
    'reading: while !stop.load(Ordering::SeqCst) {
        for event in tracer.poll(Duration::from_millis(100))? {
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
        tracing::warn!(
            dropped = lost,
            "trace: {lost} decisions were dropped while this ran (a reader's ring was \
             full: read faster, or narrow it with --netns)"
        );
    }
    Ok(())
}
