//! What each BPF program costs: the kernel's own counters (`run_time_ns`, `run_cnt`), kept
//! while `kernel.bpf_stats_enabled` is 1 and read with `BPF_OBJ_GET_INFO_BY_FD` (libbpf-rs'
//! program info), as `bpftool prog show` shows them.

use std::collections::BTreeMap;

use libbpf_rs::query::{ProgInfoIter, ProgInfoQueryOptions};
use libbpf_rs::{MapCore, MapHandle, ProgramType};
use meshbpf::Mesh;

const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// `kernel.bpf_stats_enabled=1` while alive; the value found is put back when dropped
/// (scripts/bench.sh also puts it back should the benchmark be killed).
pub struct StatsEnabled {
    old: String,
}

impl StatsEnabled {
    pub fn new() -> StatsEnabled {
        let old = std::fs::read_to_string(SYSCTL)
            .expect("reading kernel.bpf_stats_enabled")
            .trim()
            .to_string();
        std::fs::write(SYSCTL, "1").expect("setting kernel.bpf_stats_enabled=1");
        StatsEnabled { old }
    }
}

impl Drop for StatsEnabled {
    fn drop(&mut self) {
        let _ = std::fs::write(SYSCTL, &self.old);
    }
}

/// The programs of one attachment: (hook, program id), the sk_msg program included (it is
/// attached to sock_hash, with no link before Linux 6.10, so `status` does not list it).
pub fn programs(mesh: &Mesh) -> Vec<(String, u32)> {
    let mut progs: Vec<(String, u32)> = mesh
        .status()
        .expect("meshbpf status")
        .programs
        .into_iter()
        .map(|p| (p.hook, p.prog_id))
        .collect();
    let sock_hash = MapHandle::from_pinned_path(mesh.pin_dir().join("maps/sock_hash"))
        .expect("opening sock_hash");
    let sock_hash_id = sock_hash.info().expect("sock_hash info").info.id;
    let opts = ProgInfoQueryOptions::default().include_map_ids(true);
    for info in ProgInfoIter::with_query_opts(opts) {
        if info.ty == ProgramType::SkMsg && info.map_ids.contains(&sock_hash_id) {
            progs.push(("sk_msg".into(), info.id));
        }
    }
    progs
}

/// (run_time_ns, run_cnt) of each program id, now.
pub fn snapshot(progs: &[(String, u32)]) -> BTreeMap<u32, (u64, u64)> {
    let ids: Vec<u32> = progs.iter().map(|(_, id)| *id).collect();
    ProgInfoIter::default()
        .filter(|info| ids.contains(&info.id))
        .map(|info| (info.id, (info.run_time_ns, info.run_cnt)))
        .collect()
}

/// One program's cost over a run.
#[derive(Clone, Debug)]
pub struct ProgCost {
    pub hook: String,
    pub calls_per_request: f64,
    pub ns_per_call: f64,
    pub ns_per_request: f64,
}

/// Per-program cost between two snapshots, over `requests`; programs that never ran are
/// left out. Sorted by cost per request, highest first.
pub fn costs(
    progs: &[(String, u32)],
    before: &BTreeMap<u32, (u64, u64)>,
    after: &BTreeMap<u32, (u64, u64)>,
    requests: f64,
) -> Vec<ProgCost> {
    let mut out: Vec<ProgCost> = progs
        .iter()
        .filter_map(|(hook, id)| {
            let (ns0, n0) = before.get(id).copied().unwrap_or_default();
            let (ns1, n1) = after.get(id).copied()?;
            let (ns, n) = (ns1.saturating_sub(ns0) as f64, n1.saturating_sub(n0) as f64);
            (n > 0.0).then(|| ProgCost {
                hook: hook.clone(),
                calls_per_request: n / requests,
                ns_per_call: ns / n,
                ns_per_request: ns / requests,
            })
        })
        .collect();
    out.sort_by(|a, b| b.ns_per_request.total_cmp(&a.ns_per_request));
    out
}

/// Programs that do nothing (`return 1`), attached beside an attachment's at the hooks a
/// proxied request runs: what `bpf_stats` charges a program for running at all (its two clock
/// reads and the call), the floor under every ns/call of the real programs. Detached when
/// dropped.
pub struct EmptyPrograms {
    cgroup: std::fs::File,
    attached: Vec<(
        String,
        std::os::fd::OwnedFd,
        libbpf_rs::libbpf_sys::bpf_attach_type,
    )>,
}

impl EmptyPrograms {
    /// At `hooks` (the names `meshbpf status` uses) of `cgroup`, beside what is there.
    pub fn attach(cgroup: &std::path::Path, hooks: &[&str]) -> EmptyPrograms {
        use libbpf_rs::libbpf_sys as sys;
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let file = std::fs::File::open(cgroup).expect("opening the pod's cgroup");
        // r0 = 1; exit
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
        let mut attached = Vec::new();
        for hook in hooks {
            let (prog_type, attach_type) = match *hook {
                "sockops" => (sys::BPF_PROG_TYPE_SOCK_OPS, sys::BPF_CGROUP_SOCK_OPS),
                "connect4" => (
                    sys::BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
                    sys::BPF_CGROUP_INET4_CONNECT,
                ),
                "getpeername4" => (
                    sys::BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
                    sys::BPF_CGROUP_INET4_GETPEERNAME,
                ),
                "getsockname4" => (
                    sys::BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
                    sys::BPF_CGROUP_INET4_GETSOCKNAME,
                ),
                "getsockopt" => (
                    sys::BPF_PROG_TYPE_CGROUP_SOCKOPT,
                    sys::BPF_CGROUP_GETSOCKOPT,
                ),
                "sock_release" => (
                    sys::BPF_PROG_TYPE_CGROUP_SOCK,
                    sys::BPF_CGROUP_INET_SOCK_RELEASE,
                ),
                other => panic!("no empty program for hook {other}"),
            };
            let mut opts = sys::bpf_prog_load_opts {
                sz: std::mem::size_of::<sys::bpf_prog_load_opts>() as _,
                expected_attach_type: attach_type,
                ..Default::default()
            };
            let name = std::ffi::CString::new("empty").unwrap();
            let license = std::ffi::CString::new("GPL").unwrap();
            // SAFETY: the instructions, name and license outlive the call; opts is sized.
            let fd = unsafe {
                sys::bpf_prog_load(
                    prog_type,
                    name.as_ptr(),
                    license.as_ptr(),
                    insns.as_ptr(),
                    insns.len() as _,
                    &mut opts,
                )
            };
            assert!(fd >= 0, "loading an empty {hook} program: errno {}", -fd);
            // SAFETY: a new descriptor this process owns from here on.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: both descriptors are open.
            let rc = unsafe {
                sys::bpf_prog_attach(
                    fd.as_raw_fd(),
                    file.as_raw_fd(),
                    attach_type,
                    sys::BPF_F_ALLOW_MULTI,
                )
            };
            assert_eq!(rc, 0, "attaching an empty {hook} program");
            attached.push((hook.to_string(), fd, attach_type));
        }
        EmptyPrograms {
            cgroup: file,
            attached,
        }
    }

    /// (hook, program id) of each, as [`programs`] lists an attachment's.
    pub fn programs(&self) -> Vec<(String, u32)> {
        use std::os::fd::AsFd;
        self.attached
            .iter()
            .map(|(hook, fd, _)| (hook.clone(), prog_id(fd.as_fd())))
            .collect()
    }
}

/// The kernel's id of a loaded program.
fn prog_id(fd: std::os::fd::BorrowedFd<'_>) -> u32 {
    use libbpf_rs::libbpf_sys as sys;
    use std::os::fd::AsRawFd;
    let mut info = sys::bpf_prog_info::default();
    let mut len = std::mem::size_of::<sys::bpf_prog_info>() as u32;
    // SAFETY: info is as large as len says.
    let rc = unsafe { sys::bpf_prog_get_info_by_fd(fd.as_raw_fd(), &mut info, &mut len) };
    assert_eq!(rc, 0, "reading a program's id");
    info.id
}

impl Drop for EmptyPrograms {
    fn drop(&mut self) {
        use libbpf_rs::libbpf_sys as sys;
        use std::os::fd::AsRawFd;
        for (_, fd, attach_type) in &self.attached {
            // SAFETY: both descriptors are open.
            unsafe { sys::bpf_prog_detach2(fd.as_raw_fd(), self.cgroup.as_raw_fd(), *attach_type) };
        }
    }
}

/// `storage_probe.bpf.c`'s connect4 program, which only creates the connecting socket's
/// storage, attached to a cgroup while alive.
pub struct StorageProbe {
    _link: libbpf_rs::Link,
    _object: libbpf_rs::Object,
    id: u32,
}

impl StorageProbe {
    pub fn attach(cgroup: &std::path::Path) -> StorageProbe {
        use std::os::fd::{AsFd, AsRawFd};
        static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/storage_probe.bpf.o"));
        let object = libbpf_rs::ObjectBuilder::default()
            .open_memory(OBJECT)
            .and_then(|o| o.load())
            .expect("loading the storage probe");
        let file = std::fs::File::open(cgroup).expect("opening the pod's cgroup");
        let (link, id) = {
            let prog = object
                .progs_mut()
                .next()
                .expect("the storage probe's program");
            let link = prog
                .attach_cgroup(file.as_raw_fd())
                .expect("attaching the storage probe");
            (link, prog_id(prog.as_fd()))
        };
        StorageProbe {
            _link: link,
            _object: object,
            id,
        }
    }

    /// (hook, program id), as [`programs`] lists an attachment's.
    pub fn programs(&self) -> Vec<(String, u32)> {
        vec![("connect4".to_string(), self.id)]
    }
}
