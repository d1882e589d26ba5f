//! The headline: a request through Istio's data plane, Envoy as the sidecar in both pods
//! (tests/common/envoy.rs: `virtualOutbound` 15001 and `virtualInbound` 15006 with the
//! `original_dst` listener filter, ORIGINAL_DST passthrough clusters, inbound upstream from
//! 127.0.0.6, uid 1337, `--concurrency 1`), nginx serving 64 bytes in the server pod, wrk
//! (`-t1 -c16`, uid 1000) as the application in the client pod. One pod pair per mode, all on
//! one bridge:
//! - `direct`: wrk to nginx, no Envoy (what the application alone costs);
//! - `limit`: the capture-free limit, the same two Envoys with no capture at all: wrk dials
//!   its Envoy on a static listener, which routes statically to the server's Envoy, which
//!   routes to nginx as Istio's inbound does (from 127.0.0.6 to the pod's address) — what
//!   any capture method can at best reach;
//! - `istio-iptables`: both pods behind istio-iptables' rules (IPv4 and IPv6);
//! - `meshbpf`: both pods registered with the defaults;
//! - `--sockmap`: both registered with `--sockmap`;
//! - `--intra-node`: both registered with `--intra-node`.
//!
//! Workloads: keep-alive and a new connection per request (16 connections each); req/s,
//! p50/p99, CPU per request (user + system of both pods' cgroups: wrk, Envoys, nginx). Rounds
//! are interleaved mode by mode, the figures are medians, and the load average is printed
//! beside them: on a shared machine a round that other work spoiled is left out by the median,
//! not by the reader. Run as root: `scripts/bench.sh envoy [--quick] [--rounds N] [--seconds S]`;
//! a full run writes docs/src/bench-envoy.md, `--quick` target/bench-envoy/.

#[path = "../cli/tests/common/mod.rs"]
mod common;
mod util;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use common::envoy::{self, Envoy};
use common::*;
use meshbpf::{Mesh, PodSettings};
use util::bpf_stats::{self, StatsEnabled};
use util::http::{self, Stack, Workload, WrkResult};
use util::{cpu_us, median, tune, wait_listening, Machine};

/// The modes, in the order of the tables.
const MODES: [&str; 6] = [
    "direct",
    "limit",
    "istio-iptables",
    "meshbpf",
    "--sockmap",
    "--intra-node",
];
const LIMIT: usize = 1;
const IPT: usize = 2;
const DEFAULT: usize = 3;

/// The ratios the report prints, as (numerator, denominator) modes: the issue's goals.
const RATIOS: [(usize, usize); 8] = [
    (DEFAULT, IPT),
    (DEFAULT, LIMIT),
    (IPT, LIMIT),
    (4, LIMIT),
    (5, LIMIT),
    (4, DEFAULT),
    (5, DEFAULT),
    (5, IPT),
];

/// The static listeners of the `limit` mode: the client's Envoy listens where the
/// application dials it, the server's where the client's Envoy sends to.
const LIMIT_OUT_PORT: u16 = 15101;
const LIMIT_IN_PORT: u16 = 15106;

/// The `limit` mode's Envoy: one static listener with a tcp_proxy to one static endpoint,
/// the same access log as the Istio-like one (one line per connection), so that the modes
/// differ by the capture only.
fn static_bootstrap(port: u16, to: &str, to_port: u16, source: Option<&str>, log: &Path) -> String {
    let bind = source.map_or(String::new(), |s| {
        format!(
            "\n    upstream_bind_config:\n      source_address: {{ address: {s}, port_value: 0 }}"
        )
    });
    format!(
        r#"static_resources:
  listeners:
  - name: static
    address:
      socket_address: {{ address: 0.0.0.0, port_value: {port} }}
    filter_chains:
    - filters:{filter}
  clusters:
  - name: static
    type: STATIC
    connect_timeout: 10s{bind}
    load_assignment:
      cluster_name: static
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: "{to}", port_value: {to_port} }}
"#,
        filter = envoy::tcp_proxy("static", "static", &log.display().to_string())
    )
}

/// The `limit` mode's Envoy in `pod`, as the proxy uid, listening on `port`.
fn static_envoy(env: &Env, pod: &Pod, binary: &Path, config: String, port: u16) -> Proc {
    let dir = env.root.join(format!("envoy-static-{}", pod.name));
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(PROXY_UID), Some(PROXY_UID)).unwrap();
    let file = dir.join("envoy.yaml");
    std::fs::write(&file, config).unwrap();
    let proc = pod.spawn(
        PROXY_UID,
        binary,
        &[
            "-c",
            file.to_str().unwrap(),
            "--disable-hot-restart",
            "--concurrency",
            "1",
            "--file-flush-interval-msec",
            "20",
            "--log-level",
            "warning",
        ],
    );
    wait_listening(pod, port, 1, || format!("envoy: {}", proc.output()));
    proc
}

/// What keeps a mode's pods serving: its Envoys (either kind) and nginx.
#[allow(dead_code)]
enum Running {
    Envoy(Envoy),
    Proc(Proc),
}

/// One mode's pod pair.
struct Pair {
    client: Pod,
    server: Pod,
    /// What wrk loads.
    url: String,
    _running: Vec<Running>,
}

/// One (workload, mode) over the rounds: what wrk saw, and the pods' CPU per request.
#[derive(Clone, Default)]
struct Runs(Vec<(WrkResult, f64)>);

impl Runs {
    /// The median over the rounds of `f` of each.
    fn median(&self, f: impl Fn(&WrkResult, f64) -> f64) -> f64 {
        median(self.0.iter().map(|(r, cpu)| f(r, *cpu)).collect())
    }

    fn errors(&self) -> f64 {
        self.0.iter().map(|(r, _)| r.errors).sum()
    }
}

struct Config {
    quick: bool,
    rounds: usize,
    seconds: f64,
    /// Rounds of the BPF cost phase (0: left out, `--no-bpf`).
    bpf_rounds: usize,
}

impl Config {
    fn from_args(args: &[String]) -> Config {
        let quick = args.iter().any(|a| a == "--quick");
        let value = |flag: &str| {
            args.iter()
                .position(|a| a == flag)
                .and_then(|i| args.get(i + 1))
                .map(|v| {
                    v.parse::<f64>()
                        .unwrap_or_else(|_| panic!("{flag} {v}: give a number"))
                })
        };
        Config {
            quick,
            rounds: value("--rounds").map_or(if quick { 1 } else { 5 }, |v| v.max(1.0) as usize),
            seconds: value("--seconds").unwrap_or(if quick { 1.0 } else { 3.0 }),
            bpf_rounds: if args.iter().any(|a| a == "--no-bpf") {
                0
            } else if quick {
                1
            } else {
                3
            },
        }
    }

    fn out_dir(&self) -> PathBuf {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        if self.quick {
            root.join("target/bench-envoy")
        } else {
            root.join("docs/src")
        }
    }
}

/// The 1-minute load average now.
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

fn main() {
    if !privileged() {
        return;
    }
    let Some(binary) = envoy::binary() else {
        return;
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cfg = Config::from_args(&args);
    util::raise_nofile();
    let machine = Machine::here();
    let mut env = Env::new();
    let mesh = env.attach();
    let stack = Stack::new(&env);

    let mut pairs = Vec::new();
    for (i, mode) in MODES.iter().enumerate() {
        let tag = format!("m{i}");
        let (client, server) = match i {
            IPT => (
                envoy::istio_iptables_pod(&mut env, &format!("{tag}-client")),
                envoy::istio_iptables_pod(&mut env, &format!("{tag}-server")),
            ),
            DEFAULT.. => (
                env.pod(&format!("{tag}-client")),
                env.pod(&format!("{tag}-server")),
            ),
            _ => (
                env.pod_outside(&format!("{tag}-client")),
                env.pod_outside(&format!("{tag}-server")),
            ),
        };
        let settings = PodSettings {
            sockmap: *mode == "--sockmap",
            intra_node: *mode == "--intra-node",
            ..PodSettings::default()
        };
        for pod in [&client, &server] {
            tune(pod);
            if i >= DEFAULT {
                mesh.register_netns(&pod.netns, &settings)
                    .unwrap_or_else(|e| panic!("register {mode}: {e}"));
            }
        }
        let (nginx, url) = stack.nginx(&server);
        let mut running = vec![Running::Proc(nginx)];
        let url = match i {
            0 => url,
            LIMIT => {
                let server_ip = server.v4.to_string();
                let logs = env.root.join(format!("limit-{tag}"));
                std::fs::create_dir_all(&logs).unwrap();
                std::os::unix::fs::chown(&logs, Some(PROXY_UID), Some(PROXY_UID)).unwrap();
                let inbound = static_bootstrap(
                    LIMIT_IN_PORT,
                    &server_ip,
                    http::SERVER_PORT,
                    Some("127.0.0.6"),
                    &logs.join("server.log"),
                );
                let outbound = static_bootstrap(
                    LIMIT_OUT_PORT,
                    &server_ip,
                    LIMIT_IN_PORT,
                    None,
                    &logs.join("client.log"),
                );
                running.push(Running::Proc(static_envoy(
                    &env,
                    &server,
                    &binary,
                    inbound,
                    LIMIT_IN_PORT,
                )));
                running.push(Running::Proc(static_envoy(
                    &env,
                    &client,
                    &binary,
                    outbound,
                    LIMIT_OUT_PORT,
                )));
                format!("http://127.0.0.1:{LIMIT_OUT_PORT}{}", http::PATH)
            }
            _ => {
                running.push(Running::Envoy(Envoy::start(&env, &server, &binary)));
                running.push(Running::Envoy(Envoy::start(&env, &client, &binary)));
                url
            }
        };
        pairs.push(Pair {
            client,
            server,
            url,
            _running: running,
        });
    }

    let workloads: Vec<Workload> = http::workloads()
        .into_iter()
        .filter(|w| w.connections == 16)
        .collect();
    let mut runs = vec![vec![Runs::default(); MODES.len()]; workloads.len()];
    let mut loads = Vec::new();
    for round in 0..cfg.rounds {
        for (wi, wl) in workloads.iter().enumerate() {
            for (mi, pair) in pairs.iter().enumerate() {
                let pods = [&pair.client, &pair.server];
                let cpu0 = cpu_us(&pods);
                let r = stack.wrk(&pair.client, &pair.url, wl, cfg.seconds);
                let cpu1 = cpu_us(&pods);
                let (rps, p99) = (r.rps(), r.p99_us);
                runs[wi][mi].0.push((r.clone(), (cpu1 - cpu0) / r.requests));
                let load = load_average();
                loads.push(load);
                eprintln!(
                    "    round {round} {:<44} {:<15} {:>8.0} req/s p99 {:>6.0} µs  load {load:.2}",
                    wl.name, MODES[mi], rps, p99
                );
            }
        }
    }
    let bpf = bpf_phase(&cfg, &stack, &workloads, &pairs, &mesh);
    let mut report = report(&cfg, &machine, &workloads, &runs, &loads, &mesh);
    report.push_str(&bpf);
    print!("{report}");
    let dir = cfg.out_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bench-envoy.md");
    std::fs::write(&file, &report).unwrap();
    eprintln!("==> wrote {}", file.display());
}

fn report(
    cfg: &Config,
    machine: &Machine,
    workloads: &[Workload],
    runs: &[Vec<Runs>],
    loads: &[f64],
    mesh: &Mesh,
) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Through Envoy in both pods (measured)\n");
    let _ = writeln!(
        md,
        "{}, {} vCPU {}, Linux {}; Envoy as Istio's sidecar in both pods (`--concurrency 1`, \
         uid 1337), nginx 64 B, wrk `-t1 -c16` as uid 1000; {} round(s) of {} s per figure, \
         interleaved mode by mode, medians. Load average (1 min) during the rounds: median \
         {:.2}, from {:.2} to {:.2}{}. Written by `scripts/bench.sh envoy` (benches/envoy.rs).\n",
        machine.date,
        machine.cpus,
        machine.cpu_model,
        machine.kernel,
        cfg.rounds,
        cfg.seconds,
        median(loads.to_vec()),
        loads.iter().copied().fold(f64::INFINITY, f64::min),
        loads.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        if median(loads.to_vec()) > 1.0 {
            " — a busy machine: other work shares the two CPUs, the figures are noisy"
        } else {
            ""
        }
    );
    let _ = writeln!(
        md,
        "| req/s (medians) | keep-alive | new connection per request |"
    );
    let _ = writeln!(md, "|---|---:|---:|");
    let rps = |wi: usize, mi: usize| runs[wi][mi].median(|r, _| r.rps());
    for (a, b) in RATIOS {
        let cells: Vec<String> = (0..workloads.len())
            .map(|wi| format!("{:.2}×", rps(wi, a) / rps(wi, b)))
            .collect();
        let _ = writeln!(
            md,
            "| {} ÷ {} | {} |",
            label(a),
            label(b),
            cells.join(" | ")
        );
    }
    let _ = writeln!(md);
    let _ = writeln!(
        md,
        "| workload | mode | req/s | p50 µs | p99 µs | CPU µs/req | errors |"
    );
    let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|");
    for (wi, wl) in workloads.iter().enumerate() {
        for (mi, mode) in MODES.iter().enumerate() {
            let r = &runs[wi][mi];
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} | {:.0} | {:.0} | {:.1} | {} |",
                wl.name,
                mode,
                r.median(|r, _| r.rps()),
                r.median(|r, _| r.p50_us),
                r.median(|r, _| r.p99_us),
                r.median(|_, cpu| cpu),
                r.errors()
            );
        }
    }
    let _ = writeln!(md);
    let counters: Vec<String> = mesh
        .counters()
        .map(|c| {
            c.into_iter()
                .filter(|(n, v)| {
                    *v > 0 && (n.starts_with("sockmap") || n.starts_with("intra_node"))
                })
                .map(|(n, v)| format!("`{n}` {v}"))
                .collect()
        })
        .unwrap_or_default();
    let _ = writeln!(
        md,
        "Acceleration counters over the run: {}.",
        if counters.is_empty() {
            "none".to_string()
        } else {
            counters.join(", ")
        }
    );
    md
}

/// BPF time per request of each meshbpf mode (`kernel.bpf_stats_enabled`, put back
/// afterwards): the programs of the one attachment, while only that mode's wrk runs, as
/// medians over the rounds; the three programs that cost most, by name.
fn bpf_phase(
    cfg: &Config,
    stack: &Stack,
    workloads: &[Workload],
    pairs: &[Pair],
    mesh: &Mesh,
) -> String {
    let mut md = String::new();
    if cfg.bpf_rounds == 0 {
        return md;
    }
    let progs = bpf_stats::programs(mesh);
    let _stats = StatsEnabled::new();
    // (workload, mode) → per round: total ns per request, and per program.
    let mut totals = vec![vec![Vec::new(); MODES.len()]; workloads.len()];
    let mut per_prog: Vec<Vec<std::collections::BTreeMap<String, Vec<f64>>>> =
        vec![vec![Default::default(); MODES.len()]; workloads.len()];
    for _ in 0..cfg.bpf_rounds {
        for (wi, wl) in workloads.iter().enumerate() {
            for mi in DEFAULT..MODES.len() {
                let pair = &pairs[mi];
                let before = bpf_stats::snapshot(&progs);
                let r = stack.wrk(&pair.client, &pair.url, wl, cfg.seconds);
                let after = bpf_stats::snapshot(&progs);
                let costs = bpf_stats::costs(&progs, &before, &after, r.requests);
                totals[wi][mi].push(costs.iter().map(|c| c.ns_per_request).sum::<f64>());
                for c in costs {
                    per_prog[wi][mi]
                        .entry(c.hook)
                        .or_default()
                        .push(c.ns_per_request);
                }
            }
        }
    }
    let _ = writeln!(
        md,
        "\nBPF µs per request (`kernel.bpf_stats_enabled`, which charges each program call two \
         clock reads; {} round(s) of {} s, medians; the programs of both pods):\n",
        cfg.bpf_rounds, cfg.seconds
    );
    let _ = writeln!(
        md,
        "| workload | mode | BPF µs/req | ÷ default | costliest programs (µs/req) |"
    );
    let _ = writeln!(md, "|---|---|---:|---:|---|");
    for (wi, wl) in workloads.iter().enumerate() {
        let default = median(totals[wi][DEFAULT].clone());
        for mi in DEFAULT..MODES.len() {
            let total = median(totals[wi][mi].clone());
            let mut progs: Vec<(String, f64)> = per_prog[wi][mi]
                .iter()
                .map(|(hook, v)| (hook.clone(), median(v.clone())))
                .collect();
            progs.sort_by(|a, b| b.1.total_cmp(&a.1));
            let top: Vec<String> = progs
                .iter()
                .take(3)
                .map(|(hook, ns)| format!("{hook} {:.2}", ns / 1e3))
                .collect();
            let _ = writeln!(
                md,
                "| {} | {} | {:.2} | {:.2}× | {} |",
                wl.name,
                MODES[mi],
                total / 1e3,
                total / default,
                top.join(", ")
            );
        }
    }
    md
}

/// A mode's name in the ratio table.
fn label(mode: usize) -> String {
    match mode {
        LIMIT => "capture-free limit".into(),
        DEFAULT => "meshbpf default".into(),
        4 => "`register --sockmap`".into(),
        5 => "`register --intra-node`".into(),
        _ => MODES[mode].into(),
    }
}
