//! The generated libbpf-rs skeleton of the linked BPF object (built by build.rs).
#![allow(
    clippy::all,
    missing_docs,
    non_camel_case_types,
    non_upper_case_globals,
    dead_code
)]

include!(concat!(env!("OUT_DIR"), "/meshbpf.skel.rs"));

/// The per-pod sk_lookup program (`lookup.bpf.c`), loaded once per registered pod.
pub mod lookup {
    include!(concat!(env!("OUT_DIR"), "/lookup.skel.rs"));
}
