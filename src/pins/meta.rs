//! `meta_map`: the attachment's layout version, cgroup and flags, written last and read
//! first.

use std::fs;
use std::path::Path;

use libbpf_rs::{MapCore, MapFlags, MapHandle};

use crate::abi::{self, MeshMeta, LAYOUT_VERSION};
use crate::error::{Context, Error, Result};
use crate::skel::MeshbpfSkel;

use super::*;

/// `meta_map` flags for an attachment made with `options`.
pub(crate) fn meta_flags(options: &AttachOptions) -> u32 {
    if options.sockmap {
        abi::META_F_SOCKMAP
    } else {
        0
    }
}

pub(crate) fn new_meta(cgroup: &Path, cgroup_id: u64, options: &AttachOptions) -> MeshMeta {
    let mut meta = MeshMeta {
        layout_version: LAYOUT_VERSION,
        flags: meta_flags(options),
        cgroup_id,
        ..Default::default()
    };
    let path = fs::canonicalize(cgroup).unwrap_or_else(|_| cgroup.into());
    let bytes = path.as_os_str().as_encoded_bytes();
    // Keep the last byte a NUL; a longer path is cut (the id is what identifies the cgroup).
    let len = bytes.len().min(meta.cgroup_path.len() - 1);
    for (dst, src) in meta.cgroup_path.iter_mut().zip(&bytes[..len]) {
        *dst = *src as _;
    }
    meta
}

/// The cgroup an attachment belongs to, as text for messages.
pub(crate) fn meta_cgroup_path(meta: &MeshMeta) -> String {
    format!(
        "{} (cgroup id {})",
        meta_cgroup_dir(meta).display(),
        meta.cgroup_id
    )
}

/// The cgroup directory the attachment was made to, as given at attach.
pub(crate) fn meta_cgroup_dir(meta: &MeshMeta) -> std::path::PathBuf {
    let bytes: Vec<u8> = meta
        .cgroup_path
        .iter()
        .take_while(|&&b| b != 0)
        .map(|&b| b as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned().into()
}

pub(crate) fn read_meta(pin_dir: &Path) -> Result<MeshMeta> {
    open_meta(pin_dir).map(|(_, meta)| meta)
}

/// The pinned `meta_map` and its value, refused unless written by this layout.
pub(crate) fn open_meta(pin_dir: &Path) -> Result<(MapHandle, MeshMeta)> {
    let (map, meta) = open_meta_of_any_layout(pin_dir)?;
    if meta.layout_version != LAYOUT_VERSION {
        return Err(Error::LayoutMismatch {
            pin_dir: pin_dir.into(),
            found: meta.layout_version.to_string(),
            expected: LAYOUT_VERSION,
            oldest_upgradable: crate::abi::OLDEST_UPGRADABLE_LAYOUT,
        });
    }
    Ok((map, meta))
}

pub(crate) fn read_meta_of_any_layout(pin_dir: &Path) -> Result<MeshMeta> {
    open_meta_of_any_layout(pin_dir).map(|(_, meta)| meta)
}

/// The pinned `meta_map` and its value, whichever layout wrote it (its shape never changes).
pub(super) fn open_meta_of_any_layout(pin_dir: &Path) -> Result<(MapHandle, MeshMeta)> {
    let path = pin_dir.join(MAPS_DIR).join(META_MAP);
    if fs::symlink_metadata(&path).is_err() {
        return Err(Error::NotAttached {
            pin_dir: pin_dir.into(),
        });
    }
    let map =
        MapHandle::from_pinned_path(&path).context(|| format!("opening {}", path.display()))?;
    let value = map
        .lookup(&0u32.to_ne_bytes(), MapFlags::ANY)
        .context(|| format!("reading {}", path.display()))?;
    match value.as_deref().and_then(abi::from_bytes::<MeshMeta>) {
        Some(meta) => Ok((map, meta)),
        None => Err(Error::LayoutMismatch {
            pin_dir: pin_dir.into(),
            found: format!("unknown ({} bytes of meta)", value.map_or(0, |v| v.len())),
            expected: LAYOUT_VERSION,
            oldest_upgradable: crate::abi::OLDEST_UPGRADABLE_LAYOUT,
        }),
    }
}

pub(crate) fn write_meta(skel: &MeshbpfSkel<'_>, meta: &MeshMeta) -> Result<()> {
    skel.maps
        .meta_map
        .update(&0u32.to_ne_bytes(), abi::bytes(meta), MapFlags::ANY)
        .context(|| "writing meta_map".into())
}
