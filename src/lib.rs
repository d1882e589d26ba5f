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
//! This crate is the library alone (no feature by default). The `meshbpf` command line and
//! node agent are the crate meshbpf-cli, the CNI plugin `meshbpf-cni` the crate meshbpf-cni.
//! Features: `cli`, which those ask for, adds `PodOptions` (clap) and
//! `parse_annotations` (serde_json); `serde` (part of `cli`) makes the public types
//! `Serialize`; `static` links libelf and zlib statically; `bench` compiles the benchmarks'
//! probe program (scripts/bench.sh). A mesh tool that only registers pods needs none. No
//! libbpf-rs type is part of the API: a failed BPF operation's cause is a [`BoxedError`].
//!
//! # Architecture
//!
//! The modules form layers; a lower one never imports a higher one, and a type two layers
//! share lives in the lower one (`cli/tests/layers.rs` fails on an import cycle):
//!
//! ```text
//!  crates meshbpf-cli (the `meshbpf` binary, agent/) and meshbpf-cni (the plugin: conf,
//!  routes, state, commands): parse, call this library, print; no BPF logic
//!  istio                                    Sidecar resources for registered pods
//!  mesh: register · lists · status · gc     a pod's registration, through the pinned maps
//!  trace: reason · tracer · explain         why a connection was, or was not, captured
//!  attach                                   the only place choosing fresh | in place | upgrade
//!  migrate (layout steps)                   uses pins only
//!  pins: dir · lock · reclaim · load · meta · links · pod · remove   primitives only
//!  pod: settings · options · presets        what register stores, from flags/annotations
//!  netns · probe · mapio · loadlog · origin
//!  abi (generated from meshbpf.h) · cidr · error · system · skel    the ground floor
//! ```
//!
//! Where a change belongs, by subject:
//!
//! - `src/bpf/`: the BPF C, one `*.bpf.c` per concern, `meshbpf.h` the ABI with Rust;
//!   `build/` compiles, links and generates the skeleton and `abi_gen.rs` from it.
//! - `abi`: the map structs and constants, from the skeleton's types; `cidr`: IP prefixes;
//!   `error`: every failure with its fix; `system`: kernel, capabilities, mounts, cgroups.
//! - `pins/`: the pin directory in bpffs: `dir` (its safety checks and state), `lock`,
//!   `reclaim` (its name taken back), `load` (the programs and their maps), `meta`
//!   (`meta_map`), `links` (attach order and links), `pod` (per-pod sk_lookup programs),
//!   `remove` (drain and detach).
//! - `attach`: fresh attach, replace in place or upgrade; `migrate`: one step per layout.
//! - `pod/`: `settings` (a pod's capture settings and their wire form), `options` (the same
//!   as flags), `presets` (Istio's annotations).
//! - `mesh/`: [`Mesh`]: `register` (register, unregister, addresses), `lists` (list
//!   generations), `status` (pods, counters, map usage), `gc`.
//! - `trace/`: `reason` (the words of a decision), `tracer` ([`Tracer`]), `explain`.
//! - `netns`, `probe` (kernel features), `mapio` (map reads), `loadlog` (libbpf's load
//!   messages), `origin` (`SO_ORIGINAL_DST` for the sidecar).
//! - `istio`: Istio `Sidecar` resources for registered pods.
//! - The other crates of the workspace: `cli/` (the `meshbpf` binary in `main.rs`, the node
//!   agent in `agent/`, the end-to-end tests in `tests/`), `cni/` (`meshbpf-cni`: `conf`,
//!   `routes`, `state`, `commands`), `test-support/` (the workloads tests run in pods).

#![warn(missing_docs)]

mod abi;
mod attach;
mod cidr;
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

pub use abi::{COUNTER_NAMES, LAYOUT_VERSION, MAX_PODS, REGISTRATIONS_MAP};
pub use cidr::Cidr;
pub use error::{BoxedError, Error, Result};
pub use mesh::{
    detach, AttachedProgram, MapUsage, Mesh, Pod, RegisterOptions, Status, DEFAULT_PIN_DIR,
};
pub use netns::{current_cookie, Netns};
pub use order::{preorder_links, OtherProgram, POD_CGROUPS};
pub use origin::{dns_query_original_dst, original_dst, SO_ORIGINAL_DST};
pub use pins::reclaim::reclaim as reclaim_pin_dir;
pub use pins::{
    AttachOptions, MapSizes, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_PODS, MAX_CONNECTIONS_LIMIT,
    MAX_PODS_LIMIT, MIN_CONNECTIONS,
};
#[cfg(feature = "cli")]
pub use pod::options::PodOptions;
#[cfg(feature = "cli")]
pub use pod::presets::parse_annotations;
pub use pod::presets::{
    apply_istio_annotations, read_istio_annotations, IstioAnnotations, MeshPreset,
};
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
