//! `meshbpf check`: what the running kernel offers of each feature meshbpf uses,
//! probed where the kernel can be asked (libbpf's program, map and helper
//! probes load tiny programs) and read from its version where it cannot.

use std::path::Path;

use libbpf_rs::libbpf_sys as sys;
use libbpf_rs::{MapType, ProgramType};

use crate::error::{Error, Result};
use crate::system;

/// One feature and whether this kernel has it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Feature {
    /// What meshbpf uses.
    #[cfg_attr(feature = "serde", serde(rename = "feature"))]
    pub name: &'static str,
    /// The first kernel that has it (`≤ 5.15`: present in 5.15, meshbpf's floor, and not
    /// pinned to an earlier release here).
    pub min_kernel: &'static str,
    /// Whether it is there.
    pub available: bool,
    /// How that was found: `probed` (there), `absent` (probed: not there), `probe failed: …`
    /// (the kernel could not be asked), `version`, or what is missing.
    pub how: String,
    /// Whether `attach` refuses without it. Optional features are probed again at each
    /// load: without them meshbpf does less (the feature's name says what), not wrong. The
    /// mounts are checked where they are used, with the fix in the error.
    pub required: bool,
}

/// What libbpf's probe of a program type, map type or helper found: `Err` when the probe
/// itself failed (no privilege, out of memory), which says nothing about the feature.
type Probe = std::result::Result<bool, libbpf_rs::Error>;

fn prog_type(t: ProgramType) -> Probe {
    t.is_supported()
}

fn map_type(t: MapType) -> Probe {
    t.is_supported()
}

fn helper(t: ProgramType, h: sys::bpf_func_id) -> Probe {
    t.is_helper_supported(h)
}

/// Every helper of `helpers` from program type `t`: a failed probe wins over an absent helper.
fn helpers(t: ProgramType, helpers: &[sys::bpf_func_id]) -> Probe {
    helpers
        .iter()
        .try_fold(true, |all, &h| Ok(helper(t, h)? && all))
}

/// Whether cgroup/getsockopt programs may read the calling task's system call arguments
/// (`bpf_get_current_task_btf` and `bpf_task_pt_regs` there): where they may, an
/// SO_ORIGINAL_DST asked with a NULL buffer fails with EFAULT, as behind iptables.
pub(crate) fn syscall_args_readable() -> bool {
    syscall_args_probe().unwrap_or(false)
}

fn syscall_args_probe() -> Probe {
    helpers(
        ProgramType::CgroupSockopt,
        &[
            sys::BPF_FUNC_get_current_task_btf,
            sys::BPF_FUNC_task_pt_regs,
        ],
    )
}

/// Whether sock_addr programs may find an MPTCP subflow's parent socket
/// (`bpf_skc_to_mptcp_sock`, Linux 5.19): where they may, getpeername() of an MPTCP socket
/// names the original destination.
pub(crate) fn mptcp_readable() -> bool {
    helper(ProgramType::CgroupSockAddr, sys::BPF_FUNC_skc_to_mptcp_sock).unwrap_or(false)
}

/// Whether sk_msg programs may read kernel memory (`bpf_probe_read_kernel`: there since
/// before 6.1 for CAP_PERFMON, gone under lockdown=confidentiality): where they may, a
/// sockmap receiver that falls behind by its receive buffer sends its sender back to TCP
/// (sockmap.bpf.c's flow control).
pub(crate) fn receivers_readable() -> bool {
    helper(ProgramType::SkMsg, sys::BPF_FUNC_probe_read_kernel).unwrap_or(false)
}

/// Whether the pods' sk_lookup program can load here (the program type: Linux 5.9).
pub(crate) fn sk_lookup_usable() -> bool {
    prog_type(ProgramType::SkLookup).unwrap_or(false)
}

/// Every feature meshbpf uses, checked on this kernel.
pub fn probe() -> Vec<Feature> {
    let version = system::kernel_version();
    let since = |name: &'static str, min: &'static str, at: (u32, u32)| Feature {
        name,
        min_kernel: min,
        available: version >= at,
        how: "version".into(),
        required: true,
    };
    let probed = |name: &'static str, min: &'static str, probe: Probe| Feature {
        name,
        min_kernel: min,
        available: matches!(probe, Ok(true)),
        how: match probe {
            Ok(true) => "probed".into(),
            Ok(false) => "absent".into(),
            Err(err) => format!("probe failed: {err}"),
        },
        required: true,
    };
    // Optional: what is lost without it is said where it is missing.
    let optional = |feature: Feature, without: &str| Feature {
        required: false,
        how: match feature.available {
            true => feature.how,
            false => format!("{}; optional: {without}", feature.how),
        },
        ..feature
    };
    let cgroup2 = system::mounts_of_type("cgroup2");
    let bpffs = system::mounts_of_type("bpf");
    vec![
        Feature {
            name: "BTF of the running kernel (CO-RE)",
            min_kernel: "5.4 (CONFIG_DEBUG_INFO_BTF)",
            available: Path::new("/sys/kernel/btf/vmlinux").exists(),
            how: "/sys/kernel/btf/vmlinux".into(),
            required: true,
        },
        Feature {
            name: "a cgroup v2 mount",
            min_kernel: "4.5",
            available: !cgroup2.is_empty(),
            how: cgroup2
                .first()
                .map_or("none mounted: mount -t cgroup2 none DIR".into(), |p| {
                    p.display().to_string()
                }),
            required: false,
        },
        Feature {
            name: "a bpffs mount",
            min_kernel: "4.4",
            available: !bpffs.is_empty(),
            how: bpffs
                .first()
                .map_or("none mounted: mount -t bpf bpf /sys/fs/bpf".into(), |p| {
                    p.display().to_string()
                }),
            required: false,
        },
        probed(
            "cgroup/connect, bind, sendmsg programs (sock_addr)",
            "4.17",
            prog_type(ProgramType::CgroupSockAddr),
        ),
        probed(
            "cgroup/post_bind, sock_release programs (sock)",
            "4.17",
            prog_type(ProgramType::CgroupSock),
        ),
        probed("sockops programs", "4.13", prog_type(ProgramType::SockOps)),
        probed(
            "cgroup/getsockopt programs",
            "5.3",
            prog_type(ProgramType::CgroupSockopt),
        ),
        probed("sk_msg programs", "4.17", prog_type(ProgramType::SkMsg)),
        probed("sk_storage maps", "5.2", map_type(MapType::SkStorage)),
        probed("sockhash maps", "4.18", map_type(MapType::Sockhash)),
        probed("LPM trie maps", "4.11", map_type(MapType::LpmTrie)),
        probed(
            "sk_storage from sock_addr hooks",
            "≤ 5.15",
            helper(ProgramType::CgroupSockAddr, sys::BPF_FUNC_sk_storage_get),
        ),
        probed(
            "sk_storage from sockops",
            "≤ 5.15",
            helper(ProgramType::SockOps, sys::BPF_FUNC_sk_storage_get),
        ),
        probed(
            "sk_storage from getsockopt hooks",
            "5.3",
            helper(ProgramType::CgroupSockopt, sys::BPF_FUNC_sk_storage_get),
        ),
        probed(
            "sk_storage from sk_msg",
            "≤ 5.15",
            helper(ProgramType::SkMsg, sys::BPF_FUNC_sk_storage_get),
        ),
        probed(
            "sk_storage from sock hooks",
            "≤ 5.15",
            helper(ProgramType::CgroupSock, sys::BPF_FUNC_sk_storage_get),
        ),
        probed(
            "netns cookie in sock_addr hooks",
            "5.7",
            helper(ProgramType::CgroupSockAddr, sys::BPF_FUNC_get_netns_cookie),
        ),
        probed(
            "netns cookie in sockops",
            "5.15",
            helper(ProgramType::SockOps, sys::BPF_FUNC_get_netns_cookie),
        ),
        probed(
            "netns cookie in sk_msg",
            "5.15",
            helper(ProgramType::SkMsg, sys::BPF_FUNC_get_netns_cookie),
        ),
        // Added with "bpf: Allow bpf_get_netns_cookie in BPF_PROG_TYPE_CGROUP_SOCKOPT"
        // (Linux 5.15): 5.10.223 refuses it (vm/run.sh 5.10), which an earlier "5.8" here
        // did not say.
        probed(
            "netns cookie in getsockopt hooks",
            "5.15",
            helper(ProgramType::CgroupSockopt, sys::BPF_FUNC_get_netns_cookie),
        ),
        probed(
            "caller's uid in sock_addr hooks",
            "≤ 5.15",
            helper(
                ProgramType::CgroupSockAddr,
                sys::BPF_FUNC_get_current_uid_gid,
            ),
        ),
        probed(
            "UDP socket lookup in sock_addr hooks",
            "5.2",
            helper(ProgramType::CgroupSockAddr, sys::BPF_FUNC_sk_lookup_udp),
        ),
        probed(
            "sockhash redirect from sk_msg",
            "4.18",
            helper(ProgramType::SkMsg, sys::BPF_FUNC_msg_redirect_hash),
        ),
        since("cgroup recvmsg4/6 hooks", "5.2", (5, 2)),
        since(
            "cgroup links and link update (replace in place)",
            "5.7",
            (5, 7),
        ),
        since("cgroup getpeername4/6 hooks", "5.8", (5, 8)),
        since("cgroup sock_release hook", "5.9", (5, 9)),
        since(
            "bind skipping CAP_NET_BIND_SERVICE (return 3)",
            "5.12",
            (5, 12),
        ),
        since("SO_NETNS_COOKIE", "5.14", (5, 14)),
        optional(
            probed(
                "sk_lookup programs (inbound redirect mode)",
                "5.9",
                prog_type(ProgramType::SkLookup),
            ),
            "pods register in the bind model only",
        ),
        optional(
            probed(
                "MPTCP parent socket from sock_addr hooks",
                "5.19",
                helper(ProgramType::CgroupSockAddr, sys::BPF_FUNC_skc_to_mptcp_sock),
            ),
            "getpeername() of a captured MPTCP connection names the sidecar",
        ),
        optional(
            probed(
                "kernel memory from sk_msg (sockmap flow control)",
                "5.5",
                helper(ProgramType::SkMsg, sys::BPF_FUNC_probe_read_kernel),
            ),
            "a sockmap receiver that stops reading lets its sender queue without bound",
        ),
        optional(
            probed(
                "cgroup links with BPF_F_PREORDER (run before a CNI's socket LB)",
                "6.17",
                crate::order::probe_preorder()
                    .ok_or_else(|| std::io::Error::last_os_error().into()),
            ),
            "beside programs attached first on the same connect/sendmsg hooks (a CNI's \
             socket load balancer), attach goes to the cgroup's kubepods child",
        ),
        optional(
            probed(
                "caller's registers from getsockopt hooks",
                "after 6.1",
                syscall_args_probe(),
            ),
            "SO_ORIGINAL_DST cannot tell a NULL buffer (EFAULT behind iptables)",
        ),
    ]
}

/// Probes, and refuses with what is missing (mounts aside) when anything is.
pub fn require_features() -> Result<()> {
    let missing: Vec<String> = probe()
        .into_iter()
        .filter(|f| f.required && !f.available)
        .map(|f| format!("{} (Linux {}; {})", f.name, f.min_kernel, f.how))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(Error::MissingKernelFeature {
        feature: format!("{} feature(s)", missing.len()),
        detail: format!(
            "missing: {}; run `meshbpf check` for the full table",
            missing.join("; ")
        ),
    })
}
