//! `sidecar-resource`: the Istio Sidecar resource that lets stock istiod serve a bind-mode
//! pod.

use std::path::PathBuf;

use meshbpf::Mesh;

use super::PinDirArg;

#[derive(clap::Args)]
pub struct SidecarResourceArgs {
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
pub fn run(args: &SidecarResourceArgs) -> anyhow::Result<()> {
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
        tracing::warn!(
            "no --selector: this Sidecar applies to every workload of its namespace that has \
             no Sidecar of its own"
        );
    }
    out!(no_newline "{resource}");
    Ok(())
}
