//! Detach: draining the sockmap fast path, then removing every link and pin in order.

use std::fs;
use std::path::Path;

use libbpf_rs::{Link, MapCore, MapFlags, MapHandle};

use crate::abi::{self};
use crate::error::{Context, Result};

use super::*;

/// Detaches every program (capture first, answers last) and removes every pin under
/// `pin`, also when the attachment cannot be opened (another layout, a half-finished
/// attach); refuses a directory meshbpf did not create. Returns whether anything was there.
pub(crate) fn detach(pin: &PinDir) -> Result<bool> {
    let lock = pin.lock(true)?;
    let stale = pin.remove_stale_staging(&lock)?;
    if pin.state()? == PinState::Absent {
        return Ok(stale);
    }
    drain_sockmap(pin.path());
    remove_tree(pin.path())?;
    Ok(true)
}

/// How long detach gives the sidecars to read what sk_msg already redirected to them.
pub(super) const DRAIN_GRACE: std::time::Duration = std::time::Duration::from_millis(250);

/// Before the pins go, stop the redirects and give the sidecars a moment to read what is
/// queued: accelerated connections then carry on over the normal stack, behind what was
/// redirected already (a read empties the sockmap queue first). What is still queued is
/// not lost: sock_hash outlives its pin while a socket is in it (each socket's psock holds
/// the sk_msg program, which holds sock_hash) and goes when the last one closes (measured
/// on 6.18, cli/tests/intranode.rs). Best effort: an attachment that cannot be read (another
/// layout) is removed without it.
pub(super) fn drain_sockmap(pin_dir: &Path) {
    let Ok((meta_map, mut meta)) = open_meta(pin_dir) else {
        return;
    };
    let Ok(sock_hash) =
        MapHandle::from_pinned_path(pin_dir.join(MAPS_DIR).join(crate::abi::map::SOCK_HASH))
    else {
        return;
    };
    meta.flags |= abi::META_F_DRAINING;
    let drained = meta_map.update(&0u32.to_ne_bytes(), abi::bytes(&meta), MapFlags::ANY);
    if drained.is_ok() && sock_hash.keys().next().is_some() {
        std::thread::sleep(DRAIN_GRACE);
    }
}

/// Detaches every link pinned under `dir` (capture first, answers last), then removes
/// every pin and directory, with the meta map last. `dir` must be one meshbpf created
/// (checked by the caller): nothing below it follows a symbolic link of someone else's.
pub(crate) fn remove_tree(dir: &Path) -> Result<()> {
    // The pods' sk_lookup links capture inbound: they go first.
    let pods = dir.join(PODS_DIR);
    for name in dir_names(&pods)? {
        let path = pods.join(name);
        if let Ok(link) = Link::open(&path) {
            let _ = link.detach();
        }
        fs::remove_file(&path).context(|| format!("removing {}", path.display()))?;
    }
    remove_dir_if_there(&pods)?;
    let links = dir.join(LINKS_DIR);
    let mut hooks = dir_names(&links)?;
    hooks.sort_by_key(|hook| std::cmp::Reverse(attach_rank(hook)));
    for hook in hooks {
        let path = links.join(&hook);
        if let Ok(link) = Link::open(&path) {
            // Detach even if another process still holds the link open.
            let _ = link.detach();
        }
        fs::remove_file(&path).context(|| format!("removing {}", path.display()))?;
    }
    remove_dir_if_there(&links)?;
    let maps = dir.join(MAPS_DIR);
    let mut names = dir_names(&maps)?;
    names.sort_by_key(|name| name == META_MAP);
    for name in names {
        let path = maps.join(name);
        fs::remove_file(&path).context(|| format!("removing {}", path.display()))?;
    }
    remove_dir_if_there(&maps)?;
    remove_dir_if_there(dir)
}

pub(crate) fn remove_dir_if_there(dir: &Path) -> Result<()> {
    match fs::remove_dir(dir) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(err).context(|| {
            format!(
                "removing {} (does it hold files meshbpf did not create?)",
                dir.display()
            )
        }),
        _ => Ok(()),
    }
}
