//! The agent's `/metrics`: the OpenMetrics text exposition (prometheus-client), one unit per
//! metric. Every family and its labels are listed in the book's metrics page
//! (docs/src/metrics.md); a family added here goes there too.

use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use super::Stats;
use meshbpf::Mesh;

/// The content type of [`render`]'s text.
pub(super) const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(&'static str, String)>;

/// The exposition: build info, the attachment's counters, pods and maps, the agent's own
/// counters and the process's.
pub(super) fn render(pin_dir: &Path, stats: &Stats) -> String {
    let mut registry = Registry::default();
    registry.register(
        "meshbpf_build",
        "The agent's version and the map layout it attaches",
        Info::new(vec![
            ("version", env!("CARGO_PKG_VERSION").to_string()),
            ("layout", meshbpf::LAYOUT_VERSION.to_string()),
        ]),
    );
    let mesh = Mesh::open(pin_dir).ok();
    registry.register(
        "meshbpf_attached",
        "Whether meshbpf's programs are attached (1) or not (0)",
        gauge(u64::from(mesh.is_some())),
    );
    if let Some(mesh) = &mesh {
        attachment(&mut registry, mesh);
    }
    agent(&mut registry, stats);
    process(&mut registry);
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &registry);
    out
}

/// The programs' counters, split by unit, the registered pods and every map's fill.
fn attachment(registry: &mut Registry, mesh: &Mesh) {
    let events = Family::<Labels, Counter>::default();
    let bytes = Family::<Labels, Counter>::default();
    for (name, value) in mesh.counters().unwrap_or_default() {
        match redirected_bytes_path(name) {
            Some(path) => bytes.get_or_create(&vec![("path", path.into())]),
            None => events.get_or_create(&vec![("reason", name.into())]),
        }
        .inc_by(value);
    }
    registry.register(
        "meshbpf_events",
        "Decisions and events of the BPF programs, by reason (as `meshbpf status` shows them)",
        events,
    );
    registry.register_with_unit(
        "meshbpf_redirected",
        "Bytes the sk_msg fast paths moved from socket to socket, by path (sockmap: \
         application and sidecar of one pod; intra_node: sidecars of two pods on the node)",
        Unit::Bytes,
        bytes,
    );
    // Socket storage has no count: left out.
    let usage: Vec<_> = mesh
        .map_usage()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|u| Some((u.name, u.entries?, u.capacity)))
        .collect();
    let pods = usage
        .iter()
        .find(|(name, ..)| *name == meshbpf::REGISTRATIONS_MAP)
        .map_or(0, |(_, entries, _)| *entries);
    registry.register(
        "meshbpf_capture_runs_first",
        "Whether meshbpf's connect/sendmsg programs run before every other program on those \
         hooks at its cgroup and its ancestors (1), such as a CNI's socket load balancer, or \
         not (0: /healthz and `meshbpf status` name them)",
        gauge(u64::from(matches!(mesh.order_problem(), Ok(None)))),
    );
    registry.register(
        "meshbpf_registered_pods",
        "Pods (network namespaces) in the mesh",
        gauge(pods),
    );
    let entries = Family::<Labels, Gauge>::default();
    let capacity = Family::<Labels, Gauge>::default();
    for (name, now, most) in usage {
        let labels = vec![("map", name.to_string())];
        entries.get_or_create(&labels).set(saturate(now));
        capacity.get_or_create(&labels).set(saturate(most));
    }
    registry.register(
        "meshbpf_map_entries",
        "Entries in each pinned map now",
        entries,
    );
    registry.register(
        "meshbpf_map_capacity",
        "The most entries each pinned map holds",
        capacity,
    );
}

/// The path of a counter of redirected bytes (`sockmap_bytes_redirected` → `sockmap`); none
/// for a counter of events. Every counter whose name has `bytes` in it counts bytes.
fn redirected_bytes_path(counter: &str) -> Option<&str> {
    counter.strip_suffix("_bytes_redirected")
}

/// The agent's own work.
fn agent(registry: &mut Registry, stats: &Stats) {
    let counters: [(&str, &str, &AtomicU64); 5] = [
        (
            "meshbpf_agent_conflist_writes",
            "Times the agent wrote its entry into the primary CNI network configuration",
            &stats.conflist_writes,
        ),
        (
            "meshbpf_agent_plugin_installs",
            "Times the agent copied meshbpf-cni into the CNI bin dir",
            &stats.plugin_installs,
        ),
        (
            "meshbpf_agent_gc_unregistered",
            "Pods the agent's periodic gc unregistered (network namespace gone)",
            &stats.gc_unregistered,
        ),
        (
            "meshbpf_agent_discovered_pods",
            "Pods found running with a sidecar and registered by the agent",
            &stats.discovered,
        ),
        (
            "meshbpf_agent_http_connections_evicted",
            "Connections to this endpoint closed unanswered to make room for a newer one \
             (more than the endpoint's bound were open)",
            &stats.http_evicted,
        ),
    ];
    for (name, help, value) in counters {
        registry.register(name, help, counter(value.load(Ordering::Relaxed)));
    }
}

/// The process metrics every Prometheus client library exports, from /proc/self.
fn process(registry: &mut Registry) {
    let Some(stat) = ProcStat::read() else {
        return;
    };
    let cpu = Counter::<f64, AtomicU64>::default();
    cpu.inc_by(stat.cpu_seconds);
    registry.register_with_unit(
        "process_cpu",
        "Total user and system CPU time spent",
        Unit::Seconds,
        cpu,
    );
    registry.register_with_unit(
        "process_resident_memory",
        "Resident memory size",
        Unit::Bytes,
        gauge(stat.resident_bytes),
    );
    registry.register_with_unit(
        "process_virtual_memory",
        "Virtual memory size",
        Unit::Bytes,
        gauge(stat.virtual_bytes),
    );
    let start = Gauge::<f64, AtomicU64>::default();
    start.set(stat.start_time_seconds);
    registry.register_with_unit(
        "process_start_time",
        "Start time of the process since the Unix epoch",
        Unit::Seconds,
        start,
    );
    registry.register(
        "process_threads",
        "Threads of the process",
        gauge(stat.threads),
    );
    if let Ok(fds) = fs::read_dir("/proc/self/fd") {
        registry.register(
            "process_open_fds",
            "Open file descriptors",
            gauge(fds.count() as u64),
        );
    }
    if let Some(max) = max_open_files() {
        registry.register(
            "process_max_fds",
            "The most file descriptors the process may open",
            gauge(max),
        );
    }
}

/// What /proc/self/stat and /proc/stat say about this process.
struct ProcStat {
    cpu_seconds: f64,
    resident_bytes: u64,
    virtual_bytes: u64,
    start_time_seconds: f64,
    threads: u64,
}

impl ProcStat {
    fn read() -> Option<ProcStat> {
        let text = fs::read_to_string("/proc/self/stat").ok()?;
        // The command name (field 2) may hold spaces and parentheses: fields count from the
        // last ')'. fields[0] is field 3 (state) of proc(5).
        let fields: Vec<&str> = text
            .get(text.rfind(')')? + 1..)?
            .split_whitespace()
            .collect();
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        // SAFETY: sysconf only reads a configuration value.
        let ticks = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) };
        // SAFETY: as above.
        let page = unsafe { nix::libc::sysconf(nix::libc::_SC_PAGESIZE) };
        let (ticks, page) = (u64::try_from(ticks).ok()?, u64::try_from(page).ok()?);
        let boot_time: u64 = fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())?;
        Some(ProcStat {
            cpu_seconds: (field(14)? + field(15)?) as f64 / ticks as f64,
            start_time_seconds: boot_time as f64 + field(22)? as f64 / ticks as f64,
            virtual_bytes: field(23)?,
            resident_bytes: field(24)? * page,
            threads: field(20)?,
        })
    }
}

/// The soft limit on open files, from /proc/self/limits.
fn max_open_files() -> Option<u64> {
    fs::read_to_string("/proc/self/limits")
        .ok()?
        .lines()
        .find_map(|l| {
            l.strip_prefix("Max open files")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
}

fn saturate(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn gauge(value: u64) -> Gauge {
    let gauge = Gauge::default();
    gauge.set(saturate(value));
    gauge
}

fn counter(value: u64) -> Counter {
    let counter = Counter::default();
    counter.inc_by(value);
    counter
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_that_counts_bytes_is_a_redirected_bytes_path() {
        for name in meshbpf::COUNTER_NAMES {
            let counts_bytes = name.split('_').any(|word| word == "bytes");
            assert_eq!(
                redirected_bytes_path(name).is_some(),
                counts_bytes,
                "{name}: a counter of bytes needs its own family in metrics.rs"
            );
        }
        assert_eq!(
            redirected_bytes_path("intra_node_bytes_redirected"),
            Some("intra_node")
        );
    }

    #[test]
    fn the_process_metrics_are_read_from_proc() {
        let stat = ProcStat::read().expect("/proc/self/stat");
        assert!(stat.threads >= 1);
        assert!(stat.resident_bytes > 0 && stat.virtual_bytes >= stat.resident_bytes);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            stat.start_time_seconds <= now + 1.0 && stat.start_time_seconds > now - 86400.0 * 365.0
        );
        assert!(max_open_files().is_some_and(|n| n > 0));
    }
}
