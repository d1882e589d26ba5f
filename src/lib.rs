//! meshbpf: a service-mesh sidecar's traffic capture done with eBPF cgroup
//! socket hooks instead of iptables.
//!
//! Programs attach once per node to a cgroup v2 ([`Mesh::attach`]); a pod
//! joins the mesh when its network namespace is registered
//! ([`Mesh::register_netns`]). Inside a registered pod, outbound TCP
//! connections go to the sidecar's outbound listener, and the sidecar learns
//! where they were headed with the same `getsockopt(SO_ORIGINAL_DST)` it uses
//! behind iptables ([`original_dst`]).
//!
//! ```no_run
//! use meshbpf::{Mesh, PodSettings, DEFAULT_PIN_DIR};
//! # fn main() -> meshbpf::Result<()> {
//! let mesh = Mesh::attach("/sys/fs/cgroup", DEFAULT_PIN_DIR)?;
//! let pod = mesh.register_netns("/proc/4242/ns/net", &PodSettings::default())?;
//! println!("pod {} is in the mesh", pod.netns_cookie);
//! # Ok(()) }
//! ```
//!
//! Features: `cli` (default) builds the `meshbpf` and `meshbpf-cni` binaries and the modules
//! only they need ([`cni`], [`agent`], [`PodOptions`], [`parse_annotations`]), with clap,
//! anyhow and serde_json; `serde` (part of `cli`) makes the public types `Serialize`;
//! `static` links libelf and zlib statically. A mesh tool that only registers pods needs
//! none: `default-features = false`.

#![warn(missing_docs)]

mod abi;
#[cfg(feature = "cli")]
pub mod agent;
mod attach;
mod cidr;
#[cfg(feature = "cli")]
pub mod cni;
mod error;
pub mod istio;
mod loadlog;
mod mapio;
mod mesh;
mod migrate;
mod netns;
mod order;
mod origin;
mod pins;
mod pod;
mod probe;
mod skel;
mod system;
mod trace;

pub use abi::{COUNTER_NAMES, LAYOUT_VERSION, MAX_PODS};
pub use cidr::Cidr;
pub use error::{Error, Result};
pub use mesh::{
    detach, AttachedProgram, MapUsage, Mesh, Pod, RegisterOptions, Status, DEFAULT_PIN_DIR,
};
pub use netns::{current_cookie, Netns};
pub use order::{preorder_links, OtherProgram, POD_CGROUPS};
pub use origin::{dns_query_original_dst, original_dst, SO_ORIGINAL_DST};
pub use pins::AttachOptions;
#[cfg(feature = "cli")]
pub use pod::options::PodOptions;
#[cfg(feature = "cli")]
pub use pod::presets::parse_annotations;
pub use pod::presets::{apply_istio_annotations, MeshPreset};
pub use pod::settings::{
    parse_cidr_list, parse_id_list, parse_port_list, Cidrs, InboundMode, PodSettings, Ports,
    Selection, DEFAULT_DNS_PORT, DEFAULT_INBOUND_PORT, DEFAULT_OUTBOUND_PORT, DEFAULT_PROXY_UID,
    DEFAULT_SOCKMAP_MIN_BYTES, MAX_ENTRIES_PER_LIST, MESH_INBOUND_EXCLUDES,
};
pub use probe::{probe, require_features as probe_required, Feature};
pub use system::{check_kernel, mounts_of_type, MIN_KERNEL};
pub use trace::{
    explain, Explanation, Hook, Protocol, Query, Reason, TraceEvent, Tracer, TRACE_DRAIN,
    TRACE_SLOTS,
};
