//! meshbpf's command line (the `meshbpf` binary, `src/main.rs`) and its node agent
//! (`meshbpf agent`), built on the meshbpf library and the meshbpf-cni plugin crate. The
//! agent is a library module so that the end-to-end tests (`tests/`) reach it.

#![warn(missing_docs)]

pub mod agent;
