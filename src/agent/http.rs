//! The agent's HTTP endpoint: `/healthz` and Prometheus `/metrics`, served by a few lines
//! over `std::net` (one short-lived thread per connection; GET only).

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::Stats;
use crate::mesh::Mesh;

/// Serves `listener` on a thread of its own, for as long as the process runs.
pub(super) fn serve(listener: TcpListener, pin_dir: &Path, stats: Arc<Stats>) {
    let pin_dir = pin_dir.to_path_buf();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (pin_dir, stats) = (pin_dir.clone(), stats.clone());
            std::thread::spawn(move || answer(stream, &pin_dir, &stats));
        }
    });
}

fn answer(mut stream: TcpStream, pin_dir: &Path, stats: &Stats) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let line = String::from_utf8_lossy(&request);
    let mut words = line.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, body) = match (method, path) {
        ("GET", "/metrics") => ("200 OK", metrics(pin_dir, stats)),
        ("GET", "/healthz") => match [stats.problems(), order_problem(pin_dir)].concat() {
            problems if problems.is_empty() => ("200 OK", "ok\n".to_string()),
            problems => ("503 Service Unavailable", problems.join("\n") + "\n"),
        },
        ("GET", _) => ("404 Not Found", "try /metrics or /healthz\n".into()),
        _ => ("405 Method Not Allowed", "GET only\n".into()),
    };
    let content_type = if path == "/metrics" {
        "text/plain; version=0.0.4; charset=utf-8"
    } else {
        "text/plain; charset=utf-8"
    };
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// Other programs that run before meshbpf's capture programs, as a /healthz problem.
fn order_problem(pin_dir: &Path) -> Vec<String> {
    Mesh::open(pin_dir)
        .and_then(|mesh| mesh.order_problem())
        .ok()
        .flatten()
        .into_iter()
        .collect()
}

/// One metric family in the Prometheus text format.
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, u64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

fn label(key: &str, value: &str) -> String {
    let escaped = value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    format!("{{{key}=\"{escaped}\"}}")
}

/// The Prometheus text exposition: the attachment's counters, pods and maps, and the
/// agent's own counters.
pub(super) fn metrics(pin_dir: &Path, stats: &Stats) -> String {
    let mut out = String::new();
    let mesh = Mesh::open(pin_dir).ok();
    family(
        &mut out,
        "meshbpf_attached",
        "gauge",
        "Whether meshbpf's programs are attached (1) or not (0).",
        &[(String::new(), u64::from(mesh.is_some()))],
    );
    if let Some(mesh) = &mesh {
        let counters: Vec<(String, u64)> = mesh
            .counters()
            .unwrap_or_default()
            .into_iter()
            .map(|(reason, value)| (label("reason", reason), value))
            .collect();
        family(
            &mut out,
            "meshbpf_events_total",
            "counter",
            "Decisions and events of the BPF programs, by reason (as `meshbpf status` shows).",
            &counters,
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
            .find(|(name, ..)| *name == crate::abi::map::COOKIE_MAP)
            .map_or(0, |(_, entries, _)| *entries);
        family(
            &mut out,
            "meshbpf_capture_runs_first",
            "gauge",
            "Whether meshbpf's connect/sendmsg programs run before every other program on \
             those hooks at its cgroup and its ancestors (1), such as a CNI's socket load \
             balancer, or not (0: /healthz and `meshbpf status` name them).",
            &[(
                String::new(),
                u64::from(matches!(mesh.order_problem(), Ok(None))),
            )],
        );
        family(
            &mut out,
            "meshbpf_registered_pods",
            "gauge",
            "Pods (network namespaces) in the mesh.",
            &[(String::new(), pods)],
        );
        let by_map = |pick: fn(&(&str, u64, u64)) -> u64| -> Vec<(String, u64)> {
            usage.iter().map(|m| (label("map", m.0), pick(m))).collect()
        };
        family(
            &mut out,
            "meshbpf_map_entries",
            "gauge",
            "Entries in each pinned map now.",
            &by_map(|m| m.1),
        );
        family(
            &mut out,
            "meshbpf_map_capacity",
            "gauge",
            "The most entries each pinned map holds.",
            &by_map(|m| m.2),
        );
    }
    for (name, help, counter) in [
        (
            "meshbpf_agent_conflist_writes_total",
            "Times the agent wrote its entry into the primary CNI network configuration.",
            &stats.conflist_writes,
        ),
        (
            "meshbpf_agent_plugin_installs_total",
            "Times the agent copied meshbpf-cni into the CNI bin dir.",
            &stats.plugin_installs,
        ),
        (
            "meshbpf_agent_gc_unregistered_total",
            "Pods the agent's periodic gc unregistered (network namespace gone).",
            &stats.gc_unregistered,
        ),
        (
            "meshbpf_agent_discovered_pods_total",
            "Pods found running with a sidecar and registered by the agent.",
            &stats.discovered,
        ),
    ] {
        family(
            &mut out,
            name,
            "counter",
            help,
            &[(String::new(), counter.load(Ordering::Relaxed))],
        );
    }
    out
}
