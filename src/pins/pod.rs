//! Per-pod programs: each registered pod's sk_lookup program, linked to its netns.

use std::fs;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use libbpf_rs::skel::{OpenSkel, Skel, SkelBuilder};
use libbpf_rs::{Link, MapCore};

use crate::error::{Context, Error, Result};
use crate::skel::MeshbpfSkel;

use super::*;

/// The pinned sk_lookup link of the pod with `netns_cookie`.
pub(super) fn pod_link_path(pin_dir: &Path, netns_cookie: u64) -> PathBuf {
    pin_dir.join(PODS_DIR).join(netns_cookie.to_string())
}

/// The pod's link, if pinned and still attached (a link whose network namespace is gone is
/// detached by the kernel; its pin is removed here).
pub(super) fn live_pod_link(path: &Path) -> Result<Option<Link>> {
    live_link_unless(
        path,
        |info| matches!(info, libbpf_rs::query::LinkTypeInfo::NetNs(n) if n.ino == 0),
    )
}

/// Loads the sk_lookup program for the pod with `netns_cookie` (its own copy: the program
/// type cannot ask for its netns cookie), with the attachment's pinned maps.
///
/// `maps_of`: a loaded attachment object whose maps it shares, by name; during an upgrade,
/// the new object's (some of them not pinned yet, still in staging). Without it, the
/// pinned maps.
pub(super) fn load_pod_program<'obj>(
    open_object: &'obj mut MaybeUninit<libbpf_rs::OpenObject>,
    pin_dir: &Path,
    netns_cookie: u64,
    maps_of: Option<&MeshbpfSkel<'_>>,
) -> Result<crate::skel::lookup::LookupSkel<'obj>> {
    let mut open = crate::skel::lookup::LookupSkelBuilder::default()
        .open(open_object)
        .context(|| "opening the per-pod BPF object".into())?;
    if let Some(rodata) = open.maps.rodata_data.as_deref_mut() {
        rodata.pod_cookie = netns_cookie;
    }
    for mut map in open.open_object_mut().maps_mut() {
        let name = map.name().to_string_lossy().into_owned();
        if name.contains('.') {
            continue;
        }
        if let Some(main) = maps_of {
            let shared = main
                .object()
                .maps()
                .find(|m| m.name().to_string_lossy() == name)
                .ok_or_else(|| {
                    Error::MigrationFailed(format!("the attachment has no map {name}"))
                })?;
            map.reuse_fd(shared.as_fd())
                .context(|| format!("sharing {name} with the pod's program"))?;
            continue;
        }
        let path = pin_dir.join(MAPS_DIR).join(&name);
        if fs::symlink_metadata(&path).is_err() {
            // Not pinned: a map new in the layout an upgrade is migrating to, which this
            // program does not use. Made here, it would pass for one already migrated.
            map.set_autocreate(false)
                .context(|| format!("leaving out {name}"))?;
            continue;
        }
        // Its fd, not its pin path: libbpf reuses a pinned map only if its bound is the
        // object's, and the attachment's are sized to the node (`attach --max-pods`).
        let pinned = libbpf_rs::MapHandle::from_pinned_path(&path)
            .context(|| format!("opening {}", path.display()))?;
        map.reuse_fd(pinned.as_fd())
            .context(|| format!("sharing {name} with the pod's program"))?;
    }
    load_skel(open, "loading the pod's sk_lookup program")
}

/// Attaches the pod's sk_lookup program to its network namespace (`netns`, an open nsfs
/// file) and pins the link, unless it is there already.
pub(crate) fn attach_pod(
    pin_dir: &Path,
    _lock: &PinLock,
    netns_cookie: u64,
    netns: &fs::File,
) -> Result<()> {
    let path = pod_link_path(pin_dir, netns_cookie);
    if live_pod_link(&path)?.is_some() {
        return Ok(());
    }
    let mut open_object = MaybeUninit::uninit();
    let skel = load_pod_program(&mut open_object, pin_dir, netns_cookie, None)?;
    let mut link = skel
        .progs
        .handle__sk_lookup
        .attach_netns(netns.as_raw_fd())
        .context(|| "attaching sk_lookup to the pod's network namespace".into())?;
    private_dir(&pin_dir.join(PODS_DIR))?;
    link.pin(&path)
        .context(|| format!("pinning {}", path.display()))
}

/// Detaches and unpins the pod's sk_lookup link; returns whether there was one.
pub(crate) fn detach_pod(pin_dir: &Path, _lock: &PinLock, netns_cookie: u64) -> Result<bool> {
    let path = pod_link_path(pin_dir, netns_cookie);
    if fs::symlink_metadata(&path).is_err() {
        return Ok(false);
    }
    if let Ok(link) = Link::open(&path) {
        let _ = link.detach();
    }
    fs::remove_file(&path).context(|| format!("removing {}", path.display()))?;
    Ok(true)
}

/// The cookies of the pods with a pinned sk_lookup link.
pub(crate) fn pods_with_links(pin_dir: &Path) -> Result<Vec<u64>> {
    Ok(dir_names(&pin_dir.join(PODS_DIR))?
        .iter()
        .filter_map(|name| name.parse().ok())
        .collect())
}

/// Replaces every pod's sk_lookup program with this build's, in place, sharing the maps of
/// `maps_of` (the attachment object just loaded: during an upgrade, the new layout's maps).
pub(crate) fn update_pod_programs(pin_dir: &Path, maps_of: &MeshbpfSkel<'_>) -> Result<()> {
    for cookie in pods_with_links(pin_dir)? {
        let Some(mut link) = live_pod_link(&pod_link_path(pin_dir, cookie))? else {
            continue;
        };
        let mut open_object = MaybeUninit::uninit();
        let skel = load_pod_program(&mut open_object, pin_dir, cookie, Some(maps_of))?;
        link.update_prog(&skel.progs.handle__sk_lookup)
            .context(|| format!("replacing the sk_lookup program of pod {cookie}"))?;
    }
    Ok(())
}
