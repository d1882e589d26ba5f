//! Loading the programs with their maps pinned (or reused) where the caller says.

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};

use libbpf_rs::skel::{OpenSkel, Skel, SkelBuilder};
use libbpf_rs::{MapCore, MapHandle};

use crate::error::{Context, Error, Result};
use crate::skel::{MeshbpfSkel, MeshbpfSkelBuilder};

use super::*;

/// The hook a program serves, from its name: `handle__connect4` → `connect4`.
pub(super) fn hook_name(prog_name: &std::ffi::OsStr) -> String {
    let name = prog_name.to_string_lossy();
    name.strip_prefix(PROG_PREFIX).unwrap_or(&name).to_string()
}

/// Opens the skeleton, sizes the maps as `options.sizes` says (resolved: every bound set),
/// pins (or reuses) every map where `pin_path` says, and loads it.
pub(crate) fn load<'obj>(
    open_object: &'obj mut MaybeUninit<libbpf_rs::OpenObject>,
    options: &AttachOptions,
    mut pin_path: impl FnMut(&str, &libbpf_rs::OpenMapMut<'_>) -> Result<PathBuf>,
) -> Result<MeshbpfSkel<'obj>> {
    let mut open = MeshbpfSkelBuilder::default()
        .open(open_object)
        .context(|| "opening the BPF object".into())?;
    if let Some(rodata) = open.maps.rodata_data.as_deref_mut() {
        rodata.sockmap_enabled = options.sockmap;
        rodata.syscall_args_readable = crate::probe::syscall_args_readable();
        rodata.mptcp_readable = crate::probe::mptcp_readable();
        rodata.receivers_readable = crate::probe::receivers_readable();
    }
    for mut map in open.open_object_mut().maps_mut() {
        let name = map.name().to_string_lossy().into_owned();
        if name.contains('.') {
            continue; // .rodata and friends belong to this load only
        }
        if let Some(entries) = options.sizes.entries_of(&name) {
            map.set_max_entries(entries)
                .context(|| format!("sizing {name} to {entries} entries"))?;
        }
        let path = pin_path(&name, &map)?;
        map.set_pin_path(path)
            .context(|| format!("setting the pin path of {name}"))?;
    }
    load_skel(open, "loading the BPF programs")
}

/// Loads an opened skeleton; a failure is reported by its cause (the verifier's log, a
/// pinned map of another shape, a refusal), as libbpf's messages tell it.
pub(super) fn load_skel<'obj, T: OpenSkel<'obj>>(open: T, what: &str) -> Result<T::Output> {
    let (loaded, log) = crate::loadlog::capturing(|| open.load());
    match loaded {
        Ok(skel) => {
            crate::loadlog::pass_on(&log);
            Ok(skel)
        }
        Err(cause) => Err(crate::loadlog::load_error(what, cause, &log)),
    }
}

/// Opens the skeleton with every map pinned (or reused) under `maps_dir`, and loads it.
pub(crate) fn load_in<'obj>(
    open_object: &'obj mut MaybeUninit<libbpf_rs::OpenObject>,
    maps_dir: &Path,
    options: &AttachOptions,
) -> Result<MeshbpfSkel<'obj>> {
    load(open_object, options, |name, _| Ok(maps_dir.join(name)))
}

/// A map of a loaded skeleton, by name.
pub(crate) fn skel_map(skel: &MeshbpfSkel<'_>, name: &str) -> Result<MapHandle> {
    let map = skel
        .object()
        .maps()
        .find(|m| m.name() == name)
        .ok_or_else(|| Error::MigrationFailed(format!("the new object has no map {name}")))?;
    MapHandle::try_from(&map).context(|| format!("opening {name}"))
}
