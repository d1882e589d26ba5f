//! The programs' links: attach order, attaching or replacing through pinned links.

use std::fs;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use libbpf_rs::skel::Skel;
use libbpf_rs::{Link, ProgramType};

use crate::error::{Context, Result};
use crate::skel::MeshbpfSkel;

use super::*;

/// Every hook with a link, in attach order: the hooks that answer (the original
/// destination to the proxy, the peer's address to the application) and keep books first,
/// the hooks that capture last. Detach goes in reverse. `sk_msg` has no link: it hangs on
/// `sock_hash` and is attached before `sockops` fills that map.
pub(crate) const HOOK_ORDER: [&str; 17] = [
    "getsockopt",
    "getpeername4",
    "getpeername6",
    "getsockname4",
    "getsockname6",
    "recvmsg4",
    "recvmsg6",
    "sock_release",
    "post_bind4",
    "post_bind6",
    "sockops",
    "bind4",
    "bind6",
    "sendmsg4",
    "sendmsg6",
    "connect4",
    "connect6",
];

/// Where `hook` comes in [`HOOK_ORDER`]; a hook this build does not know (a newer build's)
/// comes just before the capturing ones, so that detach removes it right after them.
pub(super) fn attach_rank(hook: &str) -> usize {
    let first_capture = HOOK_ORDER.iter().position(|h| *h == "bind4").unwrap_or(0);
    HOOK_ORDER
        .iter()
        .position(|h| *h == hook)
        .map_or(2 * first_capture, |i| 2 * i + 1)
}

/// Attaches every program of `skel` in [`HOOK_ORDER`], or replaces it in place through its
/// link pinned under `links_dir`, and pins the links it creates there. `preorder_before`:
/// the capture hooks' links there were made with `BPF_F_PREORDER` (`META_F_PREORDER`).
/// Returns `META_F_PREORDER` if they are now, else 0.
///
/// The sk_msg program goes first, onto sock_hash (it has no link before Linux 6.10; the
/// map holds it): a socket takes the map's programs when it enters the map, so every
/// socket sockops adds must find sk_msg already there.
pub(crate) fn attach_programs(
    skel: &MeshbpfSkel<'_>,
    cgroup: &fs::File,
    links_dir: &Path,
    options: &AttachOptions,
    preorder_before: bool,
) -> Result<u32> {
    if options.sockmap {
        let sock_hash = skel.maps.sock_hash.as_fd().as_raw_fd();
        skel.progs
            .handle__sk_msg
            .attach_sockmap(sock_hash)
            .context(|| "attaching sk_msg to sock_hash".into())?;
    }
    let mut progs: Vec<_> = skel
        .object()
        .progs_mut()
        .filter(|prog| prog.prog_type() != ProgramType::SkMsg)
        .map(|prog| (hook_name(prog.name()), prog))
        .collect();
    progs.sort_by_key(|(hook, _)| attach_rank(hook));
    // The capture hooks run before other programs on them where the kernel lets them
    // (crate::order): a CNI's socket load balancer must not change the destination first.
    let preorder = crate::order::preorder_links();
    remove_stale_relinks(links_dir)?;
    let mut created = Vec::new();
    let mut relinked = Vec::new();
    // Whether every capture hook's link, once done, is one made with BPF_F_PREORDER.
    let mut all_preorder = true;
    for (hook, prog) in progs {
        let path = links_dir.join(&hook);
        let capture = crate::order::is_capture_hook(&hook);
        let first = preorder && capture;
        match live_link(&path)? {
            Some(old)
                if first
                    && !preorder_before
                    && crate::order::runs_behind_others(cgroup, &hook, &old)? =>
            {
                // An earlier attachment's link, made without BPF_F_PREORDER (an older
                // meshbpf, or a kernel before 6.17), behind another program on its hook: a
                // new link in front of it, pinned over it below, then the old one goes. In
                // between (microseconds) both run; the second sees the sidecar's loopback
                // address and leaves a socket the first captured without its original
                // destination, which the proxy then refuses: closed, never past the sidecar.
                let link = crate::order::attach_cgroup(&prog, cgroup, true, &hook)?;
                relinked.push((path, link, old));
            }
            Some(mut link) => {
                link.update_prog(&prog)
                    .context(|| format!("replacing the {hook} program"))?;
                all_preorder &= !capture || preorder_before;
            }
            None => {
                all_preorder &= !capture || first;
                let link = crate::order::attach_cgroup(&prog, cgroup, first, &hook)?;
                created.push((path, link));
            }
        }
    }
    private_dir(links_dir)?;
    for (path, link) in &mut created {
        link.pin(&*path)
            .context(|| format!("pinning {}", path.display()))?;
    }
    for (path, mut link, old) in relinked {
        let fresh = path.with_file_name(format!(
            "{RELINKED}{}",
            path.file_name().unwrap_or_default().to_string_lossy()
        ));
        link.pin(&fresh)
            .context(|| format!("pinning {}", fresh.display()))?;
        // bpffs renames over the old pin: the hook's pin never goes missing.
        fs::rename(&fresh, &path).context(|| format!("moving {} into place", fresh.display()))?;
        // Its last reference: the kernel detaches it.
        drop(old);
    }
    Ok(if all_preorder {
        crate::abi::META_F_PREORDER
    } else {
        0
    })
}

/// Removes (detaching) the new links of a relink that stopped before it moved them into
/// place: their hooks' pins still hold the old links, which the next relink replaces.
fn remove_stale_relinks(links_dir: &Path) -> Result<()> {
    let Ok(entries) = fs::read_dir(links_dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(RELINKED) {
            let path = entry.path();
            fs::remove_file(&path).context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}

/// The prefix of a new link's pin until it replaces its hook's (bpffs refuses names with a
/// dot).
const RELINKED: &str = "relinked-";

/// The link pinned at `path` if it is still attached to a cgroup. A pin whose link was
/// detached (by a detach that stopped before unpinning it) is removed: its hook needs a
/// new link.
pub(super) fn live_link(path: &Path) -> Result<Option<Link>> {
    live_link_unless(
        path,
        |info| matches!(info, libbpf_rs::query::LinkTypeInfo::Cgroup(c) if c.cgroup_id == 0),
    )
}

/// The link pinned at `path`, unless `detached` says of its info that the kernel detached
/// it; then its pin is removed.
pub(super) fn live_link_unless(
    path: &Path,
    detached: impl Fn(&libbpf_rs::query::LinkTypeInfo) -> bool,
) -> Result<Option<Link>> {
    if fs::symlink_metadata(path).is_err() {
        return Ok(None);
    }
    let link = Link::open(path).context(|| format!("opening link {}", path.display()))?;
    let info = link
        .info()
        .context(|| format!("querying link {}", path.display()))?;
    if detached(&info.info) {
        fs::remove_file(path).context(|| format!("removing {}", path.display()))?;
        return Ok(None);
    }
    Ok(Some(link))
}

#[cfg(test)]
mod tests {
    use std::mem::MaybeUninit;

    use libbpf_rs::skel::{OpenSkel, SkelBuilder};

    use super::*;
    use crate::skel::MeshbpfSkelBuilder;

    #[test]
    fn every_program_has_its_place_in_the_hook_order() {
        let mut object = MaybeUninit::uninit();
        let open = MeshbpfSkelBuilder::default().open(&mut object).unwrap();
        let mut hooks: Vec<String> = open
            .open_object()
            .progs()
            .filter(|p| p.prog_type() != ProgramType::SkMsg)
            .map(|p| hook_name(p.name()))
            .collect();
        hooks.sort();
        let mut known = HOOK_ORDER.map(String::from).to_vec();
        known.sort();
        assert_eq!(hooks, known);
    }

    #[test]
    fn capture_hooks_come_after_every_hook_that_answers_and_unknown_hooks_between() {
        for capture in [
            "bind4", "bind6", "sendmsg4", "sendmsg6", "connect4", "connect6",
        ] {
            for answer in ["getsockopt", "sockops", "getpeername4", "recvmsg6"] {
                assert!(attach_rank(answer) < attach_rank(capture));
            }
            assert!(attach_rank("some_future_hook") < attach_rank(capture));
        }
        assert!(attach_rank("sockops") < attach_rank("some_future_hook"));
    }
}
