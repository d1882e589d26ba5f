//! Attaching: the one place that decides whether a pin directory gets a fresh attachment,
//! this build's programs in place of the ones there (same layout), or an upgrade of an older
//! layout ([`crate::migrate`]). `pins` provides the primitives it combines.

use std::fs;
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};

use crate::abi::{MeshMeta, LAYOUT_VERSION};
use crate::error::{Context, Error, Result};
use crate::pins::{self, AttachOptions, PinDir, PinState, LINKS_DIR, MAPS_DIR, PODS_DIR};

/// Attaches to the cgroup v2 directory `cgroup` under `pin`, or replaces the programs of
/// the attachment already there in place. Holds the exclusive lock throughout.
pub(crate) fn attach(
    pin: &PinDir,
    cgroup: &Path,
    cgroup_dir: &fs::File,
    cgroup_id: u64,
    options: &AttachOptions,
) -> Result<()> {
    options.sizes.validate()?;
    let lock = pin.lock(true)?;
    pin.remove_stale_staging(&lock)?;
    let state = pin.state()?;
    // Bounds not given keep the pinned maps' (an attachment made with other sizes, or by a
    // build whose defaults differ), else take the defaults.
    let maps_dir = pin.path().join(MAPS_DIR);
    let pinned = |name: &str| {
        (state == PinState::Attached)
            .then(|| libbpf_rs::MapHandle::from_pinned_path(maps_dir.join(name)).ok())
            .flatten()
            .map(|m| libbpf_rs::MapCore::max_entries(&m))
    };
    let options = &AttachOptions {
        sizes: options.sizes.resolve(pinned),
        ..options.clone()
    };
    match state {
        PinState::Remnant => {
            // A detach was interrupted after its last pin (or `reclaim` left the directory
            // empty): empty it, then attach afresh. The directory itself stays until the
            // attachment is renamed over it, so that its name is never free for another
            // user to take in between.
            for sub in [PODS_DIR, LINKS_DIR, MAPS_DIR] {
                pins::remove_dir_if_there(&pin.path().join(sub))?;
            }
            attach_fresh(
                pin,
                cgroup_dir,
                &pins::new_meta(cgroup, cgroup_id, options),
                options,
            )
        }
        PinState::Absent => attach_fresh(
            pin,
            cgroup_dir,
            &pins::new_meta(cgroup, cgroup_id, options),
            options,
        ),
        PinState::Attached => {
            let existing = pins::read_meta_of_any_layout(pin.path())?;
            if existing.cgroup_id != cgroup_id {
                return Err(Error::AttachedElsewhere {
                    pin_dir: pin.path().into(),
                    attached: pins::meta_cgroup_path(&existing),
                });
            }
            // Another layout, or the same with maps of other sizes: the pinned maps cannot be
            // reused as they are, their entries move to new ones.
            if existing.layout_version != LAYOUT_VERSION
                || crate::migrate::resized(pin.path(), options)?
            {
                return crate::migrate::upgrade(pin.path(), cgroup_dir, &existing, options);
            }
            crate::migrate::remove_staging(pin.path())?;
            replace_in_place(pin.path(), cgroup_dir, &existing, options)
        }
    }
}

/// The cgroup an attach asked for `cgroup` goes to: an existing attachment stays where it
/// is (in a kubelet child of `cgroup` if an earlier attach chose it, see
/// [`crate::order::fresh_attach_point`]); a fresh one goes where its capture programs run
/// before the programs already on `cgroup`'s hooks.
pub(crate) fn attach_point(pin: &PinDir, cgroup: &Path) -> Result<PathBuf> {
    if pin.state()? == PinState::Attached {
        let existing = pins::read_meta_of_any_layout(pin.path())?;
        let child = crate::order::POD_CGROUPS
            .iter()
            .map(|child| cgroup.join(child))
            .find(|child| {
                crate::system::open_cgroup2(child).is_ok_and(|(_, id)| id == existing.cgroup_id)
            });
        return Ok(child.unwrap_or_else(|| cgroup.into()));
    }
    Ok(crate::order::fresh_attach_point(cgroup)?.unwrap_or_else(|| cgroup.into()))
}

/// A staging directory that is removed, with every link in it detached, unless kept.
struct Staging {
    path: PathBuf,
    keep: bool,
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.keep {
            let _ = pins::remove_tree(&self.path);
        }
    }
}

/// Attaches into a fresh staging directory next to the pin directory, then renames it into
/// place, so that the pin directory appears complete or not at all.
fn attach_fresh(
    pin: &PinDir,
    cgroup: &fs::File,
    meta: &MeshMeta,
    options: &AttachOptions,
) -> Result<()> {
    let mut staging = Staging {
        path: pins::fresh_dir(pin.parent(), &pin.staging_prefix())?,
        keep: false,
    };
    for dir in [MAPS_DIR, LINKS_DIR] {
        pins::private_dir(&staging.path.join(dir))?;
    }

    let mut open_object = MaybeUninit::uninit();
    let skel = pins::load_in(&mut open_object, &staging.path.join(MAPS_DIR), options)?;
    // On an early return the new links are dropped, which detaches them, and `staging`
    // unpins whatever was pinned already.
    let preorder =
        pins::attach_programs(&skel, cgroup, &staging.path.join(LINKS_DIR), options, false)?;
    // meta_map last: it marks the directory complete.
    let mut meta = *meta;
    meta.flags |= preorder;
    pins::write_meta(&skel, &meta)?;

    fs::rename(&staging.path, pin.path())
        .context(|| format!("moving the attachment to {}", pin.path().display()))?;
    staging.keep = true;
    Ok(())
}

/// Replaces each program of an existing attachment through its pinned link, keeping the
/// pinned maps; attaches and pins any program whose link is missing.
fn replace_in_place(
    pin_dir: &Path,
    cgroup: &fs::File,
    meta: &MeshMeta,
    options: &AttachOptions,
) -> Result<()> {
    let mut open_object = MaybeUninit::uninit();
    // A pinned map of another shape than this build's is a layout mismatch (loadlog).
    let skel = pins::load_in(&mut open_object, &pin_dir.join(MAPS_DIR), options)?;
    let preorder_before = meta.flags & crate::abi::META_F_PREORDER != 0;
    let preorder = pins::attach_programs(
        &skel,
        cgroup,
        &pin_dir.join(LINKS_DIR),
        options,
        preorder_before,
    )?;
    pins::update_pod_programs(pin_dir, &skel)?;
    let mut meta = *meta;
    meta.flags = pins::meta_flags(options) | preorder;
    pins::write_meta(&skel, &meta)
}
