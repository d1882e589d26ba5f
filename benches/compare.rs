//! meshbpf against iptables: the same sidecar stand-in behind the exact rule set
//! istio-iptables installs (REDIRECT mode), behind meshbpf without and with
//! sockmap, and no sidecar at all (direct, the floor) — interleaved in one run.
//!
//! Prints a markdown report; writes it, a JSON file with every figure and an SVG
//! plot to `target/bench-compare/`. Run as root: `scripts/bench.sh compare`.

#[path = "../tests/common/mod.rs"]
mod common;
mod util;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;

use common::*;
use libbpf_rs::MapCore;
use meshbpf::PodSettings;
use serde_json::json;
use util::{field, median};

const ROUNDS: usize = 2;
const SECONDS: &str = "1.5";
const MODES: [&str; 4] = ["direct", "iptables", "meshbpf", "meshbpf+sockmap"];

/// The nat rules istio-iptables installs for a pod in REDIRECT mode with its defaults
/// (proxy uid/gid 1337, outbound 15001, inbound 15006, mesh ports excluded inbound).
const ISTIO_IPTABLES: &str = "*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:ISTIO_INBOUND - [0:0]
:ISTIO_IN_REDIRECT - [0:0]
:ISTIO_OUTPUT - [0:0]
:ISTIO_REDIRECT - [0:0]
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
";

#[derive(Clone)]
struct Workload {
    name: String,
    op: &'static str,
    size: u64,
    parallel: usize,
}

fn workloads() -> Vec<Workload> {
    let mut w = Vec::new();
    for parallel in [1, 8, 64] {
        for size in [64, 1024, 16384] {
            w.push(Workload {
                name: format!("req/resp {size} B × {parallel} conn"),
                op: "pingpong",
                size,
                parallel,
            });
        }
    }
    w.push(Workload {
        name: "new connection per request, 64 B × 8".into(),
        op: "shortconn",
        size: 64,
        parallel: 8,
    });
    w.push(Workload {
        name: "bulk 64 KiB writes".into(),
        op: "flood",
        size: 65536,
        parallel: 1,
    });
    w
}

/// Whole-machine CPU time so far, user and system (incl. irq and softirq), in seconds.
fn cpu_seconds() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let hz = 100.0; // USER_HZ
    let get = |i: usize| f.get(i).copied().unwrap_or(0.0);
    ((get(0) + get(1)) / hz, (get(2) + get(5) + get(6)) / hz)
}

#[derive(Default, Clone)]
struct Result {
    rps: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    p999: Vec<f64>,
    mbs: Vec<f64>,
    connect_p50: Vec<f64>,
    user_per_k: Vec<f64>,
    sys_per_k: Vec<f64>,
}

/// Per-pod sysctls (this pod's netns only) so that tens of thousands of short connections
/// do not run out of ephemeral ports: every mode gets the same.
fn tune(pod: &Pod) {
    for kv in [
        "net.ipv4.ip_local_port_range=1024 65000",
        "net.ipv4.tcp_tw_reuse=1",
    ] {
        stdout_of(&pod.run(0, std::path::Path::new("/sbin/sysctl"), &["-qw", kv]));
    }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn run(pod: &Pod, dest: &str, w: &Workload) -> (String, f64, f64) {
    let (u0, s0) = cpu_seconds();
    let args = [
        "run",
        dest,
        "--op",
        w.op,
        "--size",
        &w.size.to_string(),
        "--parallel",
        &w.parallel.to_string(),
        "--duration",
        SECONDS,
    ];
    let out = stdout_of(&pod.run_for(
        std::time::Duration::from_secs(60),
        APP_UID,
        &example("stream"),
        &args,
    ));
    let (u1, s1) = cpu_seconds();
    let summary = out
        .lines()
        .find(|l| l.starts_with("summary "))
        .unwrap_or_else(|| panic!("no summary: {out}"))
        .to_string();
    (summary, u1 - u0, s1 - s0)
}

fn main() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    let mesh = env.attach();
    let server = env.pod("server");
    let (_server, dest) = server.stream_server();

    // The four client pods: the two baselines outside the attached cgroup, so no meshbpf
    // program ever runs for them.
    let direct = env.pod_outside("direct");
    let ipt = env.pod_outside("iptables");
    let rules = write_file(&env, "istio-iptables.rules", ISTIO_IPTABLES);
    let restore = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ip netns exec {} iptables-restore < {}",
            ipt.name,
            rules.display()
        ))
        .status()
        .unwrap();
    assert!(
        restore.success(),
        "installing the istio-iptables rules failed"
    );
    let plain = env.pod("meshbpf");
    let accel = env.pod("sockmap");
    mesh.register_netns(
        &plain.netns,
        &PodSettings {
            sockmap: false,
            ..PodSettings::default()
        },
    )
    .unwrap();
    mesh.register_netns(&accel.netns, &PodSettings::default())
        .unwrap();
    let _sidecars: Vec<Proc> = [&ipt, &plain, &accel].iter().map(|p| p.sidecar()).collect();
    let pods: [&Pod; 4] = [&direct, &ipt, &plain, &accel];
    for pod in pods {
        tune(pod);
    }

    let workloads = workloads();
    let mut results: BTreeMap<(usize, usize), Result> = BTreeMap::new();
    for _ in 0..ROUNDS {
        for (wi, w) in workloads.iter().enumerate() {
            // Interleaved: machine drift hits every mode alike.
            for (mi, pod) in pods.iter().enumerate() {
                let (line, user, sys) = run(pod, &dest, w);
                let r = results.entry((wi, mi)).or_default();
                // CPU per 1,000 requests; for bulk, per GB moved.
                let requests = if w.op == "flood" {
                    field(&line, "mbytes_per_sec") * SECONDS.parse::<f64>().unwrap()
                } else {
                    field(&line, "requests")
                }
                .max(1.0);
                r.rps.push(field(&line, "rps"));
                r.p50.push(field(&line, "p50_us"));
                r.p99.push(field(&line, "p99_us"));
                r.p999.push(field(&line, "p999_us"));
                r.mbs.push(field(&line, "mbytes_per_sec"));
                r.connect_p50.push(field(&line, "connect_p50_us"));
                r.user_per_k.push(user / requests * 1000.0);
                r.sys_per_k.push(sys / requests * 1000.0);
            }
        }
    }

    // Overhead on pods that are not registered: connect latency with meshbpf attached
    // (the hooks run, find no cookie, return) against no program at all.
    // Fresh pods: no TIME_WAIT history from the runs above.
    let unreg_in = env.pod("unregistered");
    let unreg_out = env.pod_outside("bare");
    tune(&unreg_in);
    tune(&unreg_out);
    let shortconn = Workload {
        name: String::new(),
        op: "shortconn",
        size: 64,
        parallel: 1,
    };
    let (mut inside, mut outside) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        inside.push(field(
            &run(&unreg_in, &dest, &shortconn).0,
            "connect_p50_us",
        ));
        outside.push(field(
            &run(&unreg_out, &dest, &shortconn).0,
            "connect_p50_us",
        ));
    }
    let (inside, outside) = (median(inside), median(outside));

    // Scale: connect cost in a registered pod with 1, 100 and 10,000 pods registered.
    let cookie_map =
        libbpf_rs::MapHandle::from_pinned_path(env.pin_dir.join("maps/cookie_map")).unwrap();
    for pod in [&plain, &accel] {
        mesh.unregister_cookie(meshbpf::Netns::open(&pod.netns).unwrap().cookie())
            .unwrap();
    }
    let scaled = env.pod("scale");
    tune(&scaled);
    mesh.register_netns(&scaled.netns, &PodSettings::default())
        .unwrap();
    let _scaled_sidecar = scaled.sidecar();
    let value = cookie_map
        .lookup(
            &meshbpf::Netns::open(&scaled.netns)
                .unwrap()
                .cookie()
                .to_ne_bytes(),
            libbpf_rs::MapFlags::ANY,
        )
        .unwrap()
        .unwrap();
    let mut scale = Vec::new();
    let mut registered = 1u64; // `scaled` alone
    for target in [1u64, 100, 10_000] {
        // Stand-in cookies far above any real one: the programs only ever look them up.
        while registered < target {
            cookie_map
                .update(
                    &(u64::MAX - registered).to_ne_bytes(),
                    &value,
                    libbpf_rs::MapFlags::ANY,
                )
                .unwrap();
            registered += 1;
        }
        let line = run(&scaled, &dest, &shortconn).0;
        scale.push((
            target,
            field(&line, "connect_p50_us"),
            field(&line, "p50_us"),
        ));
    }

    report(&workloads, &results, (inside, outside), &scale);
}

fn report(
    workloads: &[Workload],
    results: &BTreeMap<(usize, usize), Result>,
    unreg: (f64, f64),
    scale: &[(u64, f64, f64)],
) {
    let out_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-compare");
    std::fs::create_dir_all(&out_dir).unwrap();
    let machine = format!(
        "{} vCPU, Linux {}, {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(
                |c| c.lines().find(|l| l.starts_with("model name")).map(|l| l
                    .split(':')
                    .nth(1)
                    .unwrap_or("")
                    .trim()
                    .to_string())
            )
            .unwrap_or_default()
    );
    let mut md = String::new();
    let _ = writeln!(md, "# meshbpf vs istio-iptables\n\nMachine: {machine}. {ROUNDS} interleaved rounds of {SECONDS} s per figure (mean); latency percentiles over every request.\n");
    let _ = writeln!(md, "| workload | mode | req/s | ×iptables | ×direct | p50 µs | p99 µs | p99.9 µs | user+sys CPU s / 1k req (bulk: / GB) | ×iptables |");
    let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut rows = Vec::new();
    for (wi, w) in workloads.iter().enumerate() {
        let ipt = &results[&(wi, 1)];
        let dir = &results[&(wi, 0)];
        for (mi, mode) in MODES.iter().enumerate() {
            let r = &results[&(wi, mi)];
            let cpu = mean(&r.user_per_k) + mean(&r.sys_per_k);
            let ipt_cpu = mean(&ipt.user_per_k) + mean(&ipt.sys_per_k);
            let (rps, p50, p99, p999) = (mean(&r.rps), mean(&r.p50), mean(&r.p99), mean(&r.p999));
            let lat = |v: f64| {
                if w.op == "flood" {
                    "–".to_string()
                } else {
                    format!("{v:.0}")
                }
            };
            let main = if w.op == "flood" { mean(&r.mbs) } else { rps };
            let main_ipt = if w.op == "flood" {
                mean(&ipt.mbs)
            } else {
                mean(&ipt.rps)
            };
            let main_dir = if w.op == "flood" {
                mean(&dir.mbs)
            } else {
                mean(&dir.rps)
            };
            let unit = if w.op == "flood" { " MB/s" } else { "" };
            let _ = writeln!(
                md,
                "| {} | {mode} | {main:.0}{unit} | {:.2} | {:.2} | {} | {} | {} | {cpu:.3} | {:.2} |",
                w.name,
                main / main_ipt,
                main / main_dir,
                lat(p50),
                lat(p99),
                lat(p999),
                cpu / ipt_cpu
            );
            rows.push(json!({
                "workload": w.name, "op": w.op, "size": w.size, "connections": w.parallel, "mode": mode,
                "rps": rps, "mbytes_per_sec": mean(&r.mbs), "p50_us": p50, "p99_us": p99, "p999_us": p999,
                "connect_p50_us": mean(&r.connect_p50),
                "user_cpu_s_per_1k": mean(&r.user_per_k), "sys_cpu_s_per_1k": mean(&r.sys_per_k),
                "vs_iptables": {"throughput": main / main_ipt, "p99": p99 / mean(&ipt.p99), "cpu_per_req": cpu / ipt_cpu},
                "vs_direct": {"throughput": main / main_dir, "p99": p99 / mean(&dir.p99)},
            }));
        }
    }
    let _ = writeln!(md, "\n## Pods not registered\n\nconnect() p50 of a pod in the attached cgroup but not registered: {:.1} µs; of a pod no program sees: {:.1} µs; overhead {:+.1} %.\n", unreg.0, unreg.1, (unreg.0 / unreg.1 - 1.0) * 100.0);
    let _ = writeln!(md, "## Registered pods on the node\n\n| pods registered | connect p50 µs | request p50 µs (new connection) |\n|---:|---:|---:|");
    for (n, c, r) in scale {
        let _ = writeln!(md, "| {n} | {c:.1} | {r:.1} |");
    }
    let json = json!({"machine": machine, "rounds": ROUNDS, "seconds_per_run": SECONDS, "results": rows,
        "unregistered_connect_p50_us": {"attached": unreg.0, "nothing_attached": unreg.1},
        "scale": scale.iter().map(|(n, c, r)| json!({"pods": n, "connect_p50_us": c, "request_p50_us": r})).collect::<Vec<_>>()});
    std::fs::write(out_dir.join("report.md"), &md).unwrap();
    std::fs::write(
        out_dir.join("results.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
    std::fs::write(out_dir.join("throughput.svg"), svg(workloads, results)).unwrap();
    println!("{md}");
    println!("wrote {}", out_dir.display());
}

/// Throughput of each mode relative to iptables, one group of bars per workload.
fn svg(workloads: &[Workload], results: &BTreeMap<(usize, usize), Result>) -> String {
    let colors = ["#9e9e9e", "#e07b39", "#3b7dd8", "#2a9d5c"];
    let (row, bar, left, width) = (34.0, 7.0, 260.0, 420.0);
    let max = 2.0f64;
    let height = 60.0 + row * workloads.len() as f64;
    let mut s = format!("<svg xmlns='http://www.w3.org/2000/svg' width='{}' height='{height}' font-family='sans-serif' font-size='11'>\n", left + width + 20.0);
    s += "<text x='10' y='16' font-size='13'>Throughput relative to istio-iptables (1.0 = iptables)</text>\n";
    for (mi, mode) in MODES.iter().enumerate() {
        s += &format!("<rect x='{}' y='24' width='10' height='10' fill='{}'/><text x='{}' y='33'>{mode}</text>\n", 10.0 + mi as f64 * 120.0, colors[mi], 24.0 + mi as f64 * 120.0);
    }
    let one = left + width / max;
    s += &format!(
        "<line x1='{one}' y1='40' x2='{one}' y2='{}' stroke='black' stroke-dasharray='3,3'/>\n",
        height - 10.0
    );
    for (wi, w) in workloads.iter().enumerate() {
        let y = 44.0 + wi as f64 * row;
        s += &format!("<text x='10' y='{}'>{}</text>\n", y + 16.0, w.name);
        let ipt = &results[&(wi, 1)];
        let base = if w.op == "flood" {
            mean(&ipt.mbs)
        } else {
            mean(&ipt.rps)
        };
        for (mi, _) in MODES.iter().enumerate() {
            let r = &results[&(wi, mi)];
            let v = if w.op == "flood" {
                mean(&r.mbs)
            } else {
                mean(&r.rps)
            } / base;
            s += &format!("<rect x='{left}' y='{}' width='{:.1}' height='{bar}' fill='{}'><title>{:.2}</title></rect>\n", y + mi as f64 * bar, (v.min(max) / max * width).max(1.0), colors[mi], v);
        }
    }
    s += "</svg>\n";
    s
}
