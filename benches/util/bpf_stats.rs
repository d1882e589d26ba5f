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
