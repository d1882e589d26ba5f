//! `register`, `unregister`, `list` and `gc`: the pods in the mesh.

use std::path::PathBuf;

use anyhow::Context;
use meshbpf::{Mesh, PodSettings, RegisterOptions};

use super::{JsonPinArgs, PinDirArg};
use crate::output::print_json;

#[derive(clap::Args)]
pub struct RegisterArgs {
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
}

// One pod's settings, as `register` takes them: a mesh preset, then the pod's Istio
// annotations, then each option given (`meshbpf::PodOptions`, the same names as the CNI
// plugin's conf keys), each overriding the one before. (A comment, not a doc comment:
// clap would take a flattened struct's doc comment for the command's about.)
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

#[derive(clap::Args)]
pub struct UnregisterArgs {
    /// The pod's network namespace.
    #[arg(long, required_unless_present = "cookie", conflicts_with = "cookie")]
    netns: Option<PathBuf>,
    /// The pod's netns cookie, as `list` shows it (works when the namespace is gone).
    #[arg(long)]
    cookie: Option<u64>,
    #[command(flatten)]
    pin: PinDirArg,
}

pub fn register(args: RegisterArgs) -> anyhow::Result<()> {
    let RegisterArgs {
        netns,
        pod,
        allow_host_netns,
        pin,
    } = args;
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
    Ok(())
}

pub fn unregister(UnregisterArgs { netns, cookie, pin }: UnregisterArgs) -> anyhow::Result<()> {
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
    Ok(())
}

pub fn list(JsonPinArgs { json, pin }: JsonPinArgs) -> anyhow::Result<()> {
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
            let listeners: Vec<String> = pod.inbound_listeners.iter().map(u16::to_string).collect();
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
    Ok(())
}

pub fn gc(JsonPinArgs { json, pin }: JsonPinArgs) -> anyhow::Result<()> {
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
    Ok(())
}
