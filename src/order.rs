//! Where meshbpf's capture programs run among other programs on the same hooks — a CNI's
//! socket load balancer (Cilium's socket-LB, Calico eBPF) translates a Service VIP to a
//! backend at connect()/sendmsg() from the same cgroup hooks. meshbpf must decide, and record
//! the original destination, on what the application asked for: its connect4/6 and
//! sendmsg4/6 have to run first.
//!
//! The kernel runs a cgroup's effective programs in this order (kernel/bpf/cgroup.c,
//! `compute_effective_progs`): programs attached with `BPF_F_PREORDER` first, the ancestors'
//! before the descendants'; then every other program, the descendants' before the
//! ancestors', and on one cgroup in attach order. So meshbpf attaches its capture programs
//! with `BPF_F_PREORDER` where cgroup links accept it, and they run before every program
//! that is not attached so, wherever and whenever it was attached. On older kernels a fresh
//! attachment to a cgroup whose capture hooks already hold programs goes to the cgroup's
//! kubelet child instead (`kubepods.slice`, `kubepods`): a descendant's programs run before
//! its ancestors'.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use libbpf_rs::libbpf_sys as sys;
use libbpf_rs::{AsRawLibbpf, Link, ProgramMut};

use crate::error::{Context, Error, Result};

/// meshbpf's hooks that decide capture on the destination the application passed: the
/// ones a socket load balancer also uses, with their attach types.
pub(crate) const CAPTURE_HOOKS: [(&str, sys::bpf_attach_type); 4] = [
    ("connect4", sys::BPF_CGROUP_INET4_CONNECT),
    ("connect6", sys::BPF_CGROUP_INET6_CONNECT),
    ("sendmsg4", sys::BPF_CGROUP_UDP4_SENDMSG),
    ("sendmsg6", sys::BPF_CGROUP_UDP6_SENDMSG),
];

/// The children of a node's cgroup that hold kubelet's pods (systemd and cgroupfs drivers).
pub const POD_CGROUPS: [&str; 2] = ["kubepods.slice", "kubepods"];

/// Whether `hook` is one of [`CAPTURE_HOOKS`].
pub(crate) fn is_capture_hook(hook: &str) -> bool {
    CAPTURE_HOOKS.iter().any(|(h, _)| *h == hook)
}

/// Whether cgroup links take `BPF_F_PREORDER` here: since the cgroup mprog work (Linux 6.17,
/// "bpf: Implement mprog API on top of existing cgroup progs"), `cgroup_bpf_link_attach`
/// accepts BPF_F_BEFORE/AFTER/ID/PREORDER; before it refuses any flag with EINVAL.
/// (BPF_F_PREORDER itself came in 6.15, for BPF_PROG_ATTACH only.) Probed without touching
/// a cgroup: a link_create with the flag and a descriptor that is no cgroup fails with
/// EBADF where the flag is known and EINVAL where it is not. `MESHBPF_NO_PREORDER=1` makes
/// it answer no, so that the older kernels' path can be exercised on a newer one.
pub fn preorder_links() -> bool {
    static ANSWER: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if std::env::var_os("MESHBPF_NO_PREORDER").is_some_and(|v| v == "1") {
        return false;
    }
    *ANSWER.get_or_init(|| probe_preorder().unwrap_or(false))
}

/// The probe behind [`preorder_links`], without its override; `None` if the kernel
/// could not be asked.
pub(crate) fn probe_preorder() -> Option<bool> {
    // r0 = 1; exit: allow.
    let insns = [
        sys::bpf_insn {
            code: (sys::BPF_ALU64 | sys::BPF_MOV | sys::BPF_K) as u8,
            _bitfield_align_1: [],
            _bitfield_1: sys::bpf_insn::new_bitfield_1(0, 0),
            off: 0,
            imm: 1,
        },
        sys::bpf_insn {
            code: (sys::BPF_JMP | sys::BPF_EXIT) as u8,
            _bitfield_align_1: [],
            _bitfield_1: sys::bpf_insn::new_bitfield_1(0, 0),
            off: 0,
            imm: 0,
        },
    ];
    let mut opts = sys::bpf_prog_load_opts {
        sz: std::mem::size_of::<sys::bpf_prog_load_opts>() as _,
        expected_attach_type: sys::BPF_CGROUP_INET4_CONNECT,
        ..Default::default()
    };
    // SAFETY: the instructions and options outlive the call; the license is a C string.
    let fd = unsafe {
        sys::bpf_prog_load(
            sys::BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
            std::ptr::null(),
            c"GPL".as_ptr(),
            insns.as_ptr(),
            insns.len() as _,
            &mut opts,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: bpf_prog_load returned a new descriptor that nothing else owns.
    let prog = unsafe { OwnedFd::from_raw_fd(fd) };
    let link_opts = sys::bpf_link_create_opts {
        sz: std::mem::size_of::<sys::bpf_link_create_opts>() as _,
        flags: sys::BPF_F_PREORDER,
        ..Default::default()
    };
    let raw = prog.as_raw_fd();
    // SAFETY: both descriptors are open; the program's own fd is no cgroup, so no link can
    // be made.
    let ret = unsafe { sys::bpf_link_create(raw, raw, sys::BPF_CGROUP_INET4_CONNECT, &link_opts) };
    if ret >= 0 {
        // SAFETY: a descriptor the call returned; closed at once.
        drop(unsafe { OwnedFd::from_raw_fd(ret) });
        return Some(true);
    }
    Some(-ret == nix::libc::EBADF)
}

/// Attaches `prog` to `cgroup`, with `BPF_F_PREORDER` when `preorder` (see
/// [`preorder_links`]).
pub(crate) fn attach_cgroup(
    prog: &ProgramMut<'_>,
    cgroup: &File,
    preorder: bool,
    hook: &str,
) -> Result<Link> {
    if !preorder {
        return prog
            .attach_cgroup(cgroup.as_raw_fd())
            .context(|| format!("attaching {hook}"));
    }
    let opts = sys::bpf_cgroup_opts {
        sz: std::mem::size_of::<sys::bpf_cgroup_opts>() as _,
        flags: sys::BPF_F_PREORDER,
        ..Default::default()
    };
    // SAFETY: the program outlives the call; libbpf returns a new link or NULL with errno.
    let ptr = unsafe {
        sys::bpf_program__attach_cgroup_opts(
            prog.as_libbpf_object().as_ptr(),
            cgroup.as_raw_fd(),
            &opts,
        )
    };
    match NonNull::new(ptr) {
        // SAFETY: a link libbpf just made, owned by nothing else.
        Some(ptr) => Ok(unsafe { Link::from_ptr(ptr) }),
        None => Err(Error::Io {
            context: format!("attaching {hook} with BPF_F_PREORDER"),
            cause: std::io::Error::last_os_error(),
        }),
    }
}

/// Whether another program runs before `link` (meshbpf's, on capture hook `hook` of
/// `cgroup`) for processes in `cgroup`.
pub(crate) fn runs_behind_others(cgroup: &File, hook: &str, link: &Link) -> Result<bool> {
    let Some((_, attach_type)) = CAPTURE_HOOKS.iter().find(|(h, _)| *h == hook) else {
        return Ok(false);
    };
    let ours = link
        .info()
        .context(|| format!("querying the {hook} link"))?
        .prog_id;
    let effective =
        query(cgroup, *attach_type, true).context(|| format!("querying the {hook} programs"))?;
    Ok(effective.first().is_some_and(|first| *first != ours))
}

/// Another program on one of meshbpf's capture hooks, in the cgroup meshbpf is attached to
/// or an ancestor.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct OtherProgram {
    /// The hook, such as `connect4`.
    pub hook: String,
    /// The kernel's id of the program.
    pub prog_id: u32,
    /// Its name, as the kernel holds it (16 bytes at most).
    pub name: String,
    /// The cgroup it is attached to.
    pub cgroup: String,
    /// Whether it runs before meshbpf's program on that hook: then it sees, and may
    /// change, the destination before meshbpf does.
    pub runs_before_meshbpf: bool,
}

/// The other programs on meshbpf's capture hooks, for its own programs `ours` (hook to
/// program id) attached at `cgroup`: every program that processes in `cgroup` run on those
/// hooks (the cgroup's and its ancestors'), in the kernel's order.
pub(crate) fn other_programs(
    cgroup: &Path,
    ours: &BTreeMap<String, u32>,
    cgroup_id: u64,
) -> Result<Vec<OtherProgram>> {
    let mut found = Vec::new();
    let (dir, id) = crate::system::open_cgroup2(cgroup)?;
    if id != cgroup_id {
        return Err(Error::InvalidSetting(format!(
            "{} is not the cgroup meshbpf attached to (cgroup id {cgroup_id}) from this mount \
             namespace: run this where the node's cgroup2 mount is",
            cgroup.display()
        )));
    }
    for (hook, attach_type) in CAPTURE_HOOKS {
        let effective = query(&dir, attach_type, true)
            .context(|| format!("querying the {hook} programs of {}", cgroup.display()))?;
        let ours = ours.get(hook).copied();
        let our_place = effective.iter().position(|id| Some(*id) == ours);
        let owners = attached_along(cgroup, attach_type);
        for (place, id) in effective.iter().enumerate() {
            if Some(*id) == ours {
                continue;
            }
            found.push(OtherProgram {
                hook: hook.into(),
                prog_id: *id,
                name: prog_name(*id).unwrap_or_default(),
                cgroup: owners.get(id).cloned().unwrap_or_default(),
                runs_before_meshbpf: our_place.is_none_or(|ours| place < ours),
            });
        }
    }
    Ok(found)
}

/// The programs attached (not inherited) at `cgroup` and each ancestor on the same cgroup2
/// mount, program id to the cgroup's path.
fn attached_along(cgroup: &Path, attach_type: sys::bpf_attach_type) -> BTreeMap<u32, String> {
    let mut owners = BTreeMap::new();
    let mut at = Some(cgroup);
    while let Some(dir) = at {
        if crate::system::open_cgroup2(dir).is_err() {
            break;
        }
        if let Ok(file) = File::open(dir) {
            for id in query(&file, attach_type, false).unwrap_or_default() {
                owners
                    .entry(id)
                    .or_insert_with(|| dir.display().to_string());
            }
        }
        at = dir.parent();
    }
    owners
}

/// The program ids on `attach_type` of the cgroup open as `dir`: attached there, or its
/// effective ones (in the order they run).
fn query(
    dir: &File,
    attach_type: sys::bpf_attach_type,
    effective: bool,
) -> std::io::Result<Vec<u32>> {
    // 64 programs per cgroup and hook at most (BPF_CGROUP_MAX_PROGS), times a few levels.
    let mut ids = vec![0u32; 1024];
    let mut opts = sys::bpf_prog_query_opts {
        sz: std::mem::size_of::<sys::bpf_prog_query_opts>() as _,
        query_flags: if effective {
            sys::BPF_F_QUERY_EFFECTIVE
        } else {
            0
        },
        prog_ids: ids.as_mut_ptr(),
        __bindgen_anon_1: sys::bpf_prog_query_opts__bindgen_ty_1 {
            count: ids.len() as u32,
        },
        ..Default::default()
    };
    // SAFETY: `ids` holds `count` entries and outlives the call.
    let ret = unsafe { sys::bpf_prog_query_opts(dir.as_fd().as_raw_fd(), attach_type, &mut opts) };
    if ret < 0 {
        return Err(std::io::Error::from_raw_os_error(-ret));
    }
    // SAFETY: both members of the union are the same u32.
    ids.truncate(unsafe { opts.__bindgen_anon_1.count } as usize);
    Ok(ids)
}

/// The kernel's name of the program with `id`.
fn prog_name(id: u32) -> Option<String> {
    // SAFETY: no pointer arguments; a new descriptor or a negative errno.
    let fd = unsafe { sys::bpf_prog_get_fd_by_id(id) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a descriptor the call returned, owned here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut info = sys::bpf_prog_info::default();
    let mut len = std::mem::size_of::<sys::bpf_prog_info>() as u32;
    // SAFETY: `info` is `len` bytes and outlives the call.
    let ret = unsafe { sys::bpf_prog_get_info_by_fd(fd.as_raw_fd(), &mut info, &mut len) };
    if ret < 0 {
        return None;
    }
    let name: Vec<u8> = info
        .name
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    Some(String::from_utf8_lossy(&name).into_owned())
}

/// Where a fresh attachment asked for `cgroup` goes: `cgroup` itself, unless this kernel's
/// cgroup links cannot run first ([`preorder_links`]) and `cgroup`'s own capture hooks
/// already hold programs (which would run before meshbpf's there) while a kubelet child
/// ([`POD_CGROUPS`]) exists — then that child, where meshbpf's programs run before its
/// parent's for every pod below it.
pub(crate) fn fresh_attach_point(cgroup: &Path) -> Result<Option<PathBuf>> {
    if preorder_links() {
        return Ok(None);
    }
    let dir = File::open(cgroup).context(|| format!("opening cgroup {}", cgroup.display()))?;
    let mut occupied = false;
    for (hook, attach_type) in CAPTURE_HOOKS {
        let here = query(&dir, attach_type, false)
            .context(|| format!("querying the {hook} programs of {}", cgroup.display()))?;
        occupied |= !here.is_empty();
    }
    if !occupied {
        return Ok(None);
    }
    Ok(POD_CGROUPS
        .iter()
        .map(|child| cgroup.join(child))
        .find(|child| child.is_dir()))
}

/// What is wrong when `others` (at meshbpf's `cgroup`) run before meshbpf's capture
/// programs, with the fix; `None` when none does.
pub(crate) fn problem(cgroup: &str, others: &[OtherProgram]) -> Option<String> {
    let before: Vec<String> = others
        .iter()
        .filter(|p| p.runs_before_meshbpf)
        .map(|p| {
            format!(
                "{} {} (prog {}, on {})",
                p.hook, p.name, p.prog_id, p.cgroup
            )
        })
        .collect();
    if before.is_empty() {
        return None;
    }
    let fix = if preorder_links() {
        "re-attach meshbpf (meshbpf detach, then meshbpf attach) so that its programs are \
         attached with BPF_F_PREORDER, or ask the other program's owner not to use \
         BPF_F_PREORDER"
    } else {
        "attach meshbpf to the cgroup that holds the pods below that program's cgroup \
         (kubelet's kubepods.slice or kubepods: meshbpf attach --cgroup CGROUP/kubepods.slice), \
         where its programs run first on this kernel, or run Linux 6.17 or newer"
    };
    Some(format!(
        "programs run before meshbpf's capture programs at {cgroup} and may change the \
         destination before meshbpf sees it (a socket load balancer: the sidecar would learn \
         a backend, not the Service): {}; fix: {fix}",
        before.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lb(hook: &str, before: bool) -> OtherProgram {
        OtherProgram {
            hook: hook.into(),
            prog_id: 42,
            name: format!("lb_{hook}"),
            cgroup: "/sys/fs/cgroup".into(),
            runs_before_meshbpf: before,
        }
    }

    #[test]
    fn programs_after_meshbpf_are_no_problem() {
        assert_eq!(problem("/sys/fs/cgroup", &[]), None);
        assert_eq!(problem("/sys/fs/cgroup", &[lb("connect4", false)]), None);
    }

    #[test]
    fn a_program_before_meshbpf_is_named_with_the_fix() {
        let text = problem(
            "/sys/fs/cgroup (cgroup id 1)",
            &[lb("connect4", true), lb("sendmsg4", false)],
        )
        .unwrap();
        assert!(
            text.contains("connect4 lb_connect4 (prog 42, on /sys/fs/cgroup)"),
            "{text}"
        );
        assert!(!text.contains("lb_sendmsg4"), "{text}");
        assert!(text.contains("fix: "), "{text}");
    }

    #[test]
    fn only_the_capture_hooks_are_ordered() {
        for hook in ["connect4", "connect6", "sendmsg4", "sendmsg6"] {
            assert!(is_capture_hook(hook));
        }
        for hook in ["recvmsg4", "getpeername6", "bind4", "sockops"] {
            assert!(!is_capture_hook(hook));
        }
    }
}
