//! Sockmap on versus off, in two places:
//! - `app`: application <-> sidecar <-> server, per message size: request/response rate and
//!   latency (one connection), and bulk throughput. Three pods side by side: sockmap off,
//!   sockmap for every connection, and the default policy (a connection is accelerated when
//!   its first message is at least 16 KiB).
//! - `intranode`: same node, sidecar to sidecar (`register --intra-node`). Two pairs of
//!   pods on one bridge, one pair registered with it and one without; in each pod HAProxy is
//!   the sidecar (outbound in HTTP mode, which keeps its upstream connections, inbound on
//!   15006 as in Istio's redirect mode); nginx serves, wrk loads: req/s with keep-alive and
//!   with a new connection per request, p50/p99, CPU per request (the pair's cgroups),
//!   bulk MB/s (a 4 MiB file), and how many sidecar-to-sidecar connections each request
//!   opened.
//!
//! Prints markdown tables with ratios against the normal stack. Run as root with
//! `scripts/bench.sh sockmap [--only app|intranode] [--quick]` (it builds the sidecar and the
//! test-support workloads in release first).

#[path = "../cli/tests/common/mod.rs"]
mod common;
mod util;

use common::*;
use meshbpf::{Mesh, PodSettings};
use util::http::{self, Stack, Workload};
use util::{cpu_us, field, median, passive_opens, tune, wait_listening};

const SIZES: [u64; 4] = [64, 512, 4096, 65536];
const ROUNDS: usize = 3;
const SECONDS: &str = "1.5";

/// One path's measurements over the rounds.
#[derive(Clone, Default)]
struct Samples {
    rps: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    p999: Vec<f64>,
    mbs: Vec<f64>,
}

fn main() {
    if !privileged() {
        return;
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str);
    let quick = args.iter().any(|a| a == "--quick");
    let mut env = Env::new();
    let mesh = env.attach();
    if only != Some("intranode") {
        app_to_sidecar(&mut env, &mesh);
    }
    if only != Some("app") {
        sidecar_to_sidecar(&mut env, &mesh, quick);
    }
}

fn app_to_sidecar(env: &mut Env, mesh: &Mesh) {
    let server = env.pod("server");
    let (_server, dest) = server.stream_server();
    let mut pods = Vec::new();
    for (name, sockmap, min) in [
        ("normal", false, 0),
        ("sockmap-all", true, 0),
        ("sockmap-policy", true, meshbpf::DEFAULT_SOCKMAP_MIN_BYTES),
    ] {
        let pod = env.pod(name);
        let settings = PodSettings {
            sockmap,
            sockmap_min_bytes: min,
            ..PodSettings::default()
        };
        mesh.register_netns(&pod.netns, &settings).unwrap();
        let sidecar = pod.sidecar();
        pods.push((name, pod, sidecar));
    }
    let run = |pod: &Pod, op: &str, size: u64| -> String {
        let args = [
            "run",
            &dest,
            "--op",
            op,
            "--size",
            &size.to_string(),
            "--duration",
            SECONDS,
        ];
        stdout_of(&pod.run(APP_UID, &helper("stream"), &args))
            .trim()
            .to_string()
    };

    println!("| message | path | req/s | p50 µs | p99 µs | p99.9 µs | MB/s (bulk) |");
    println!("|---:|---|---:|---:|---:|---:|---:|");
    let mut ratios = Vec::new();
    for size in SIZES {
        let mut results: Vec<Samples> = vec![Samples::default(); pods.len()];
        // Interleaved rounds: drift on this machine hits both paths alike.
        for _ in 0..ROUNDS {
            for (i, (_, pod, _)) in pods.iter().enumerate() {
                let pp = run(pod, "pingpong", size);
                let fl = run(pod, "flood", size);
                let r = &mut results[i];
                r.rps.push(field(&pp, "rps"));
                r.p50.push(field(&pp, "p50_us"));
                r.p99.push(field(&pp, "p99_us"));
                r.p999.push(field(&pp, "p999_us"));
                r.mbs.push(field(&fl, "mbytes_per_sec"));
            }
        }
        let mut row = Vec::new();
        for (i, (name, _, _)) in pods.iter().enumerate() {
            let r = &results[i];
            let (rps, p50, p99, p999, mbs) = (
                median(r.rps.clone()),
                median(r.p50.clone()),
                median(r.p99.clone()),
                median(r.p999.clone()),
                median(r.mbs.clone()),
            );
            println!(
                "| {size} B | {name} | {rps:.0} | {p50:.1} | {p99:.1} | {p999:.1} | {mbs:.0} |"
            );
            row.push((rps, p99, mbs));
        }
        for (i, (name, _, _)) in pods.iter().enumerate().skip(1) {
            ratios.push((
                size,
                *name,
                row[i].0 / row[0].0,
                row[i].1 / row[0].1,
                row[i].2 / row[0].2,
            ));
        }
    }
    println!();
    println!("| message | path | req/s ÷ normal | p99 ÷ normal | bulk MB/s ÷ normal |");
    println!("|---:|---|---:|---:|---:|");
    for (size, name, rps, p99, mbs) in ratios {
        println!("| {size} B | {name} | {rps:.2}× | {p99:.2}× | {mbs:.2}× |");
    }
    println!();
    print_counters(mesh, "sockmap");
}

/// Both pods' sidecar: outbound on 127.0.0.1:15001 in HTTP mode to the original destination
/// (keeping upstream connections for reuse, as Envoy's pools do), inbound on 15006 through
/// to the application from 127.0.0.6, as Envoy's virtualInbound does.
const SIDECAR_CFG: &str = "global
    nbthread 1
    maxconn 9000
defaults
    maxconn 9000
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-keep-alive 300s
frontend outbound
    mode http
    bind 127.0.0.1:15001
    default_backend original_dst
backend original_dst
    mode http
    server original_dst 0.0.0.0:0
frontend inbound
    mode tcp
    bind 0.0.0.0:15006
    default_backend passthrough
backend passthrough
    mode tcp
    server original 0.0.0.0:0 source 127.0.0.6
";

/// The bulk body's path and size.
const BULK_PATH: &str = "/4m.bin";
const BULK_BYTES: f64 = 4.0 * 1024.0 * 1024.0;

/// A client pod and a server pod, HAProxy in each, nginx in the server pod.
struct Pair {
    intra_node: bool,
    client: Pod,
    server: Pod,
    url: String,
    _procs: Vec<Proc>,
}

/// One (workload, pair) over the rounds.
#[derive(Clone, Default)]
struct Runs {
    rps: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    cpu_us_per_req: Vec<f64>,
    mbs: Vec<f64>,
    s2s_conns_per_req: Vec<f64>,
    errors: f64,
}

fn sidecar_to_sidecar(env: &mut Env, mesh: &Mesh, quick: bool) {
    let (rounds, seconds) = if quick { (1, 1.0) } else { (3, 3.0) };
    let stack = Stack::new(env);
    std::fs::write(
        env.root.join("http/www").join(&BULK_PATH[1..]),
        vec![0x5au8; BULK_BYTES as usize],
    )
    .unwrap();
    let cfg = write_file(env, "sidecar-to-sidecar.cfg", SIDECAR_CFG);
    let pairs: Vec<Pair> = [false, true]
        .into_iter()
        .map(|intra_node| {
            let tag = if intra_node { "on" } else { "off" };
            let (client, server) = (
                env.pod(&format!("{tag}-client")),
                env.pod(&format!("{tag}-server")),
            );
            let settings = PodSettings {
                intra_node,
                ..PodSettings::default()
            };
            let mut procs = Vec::new();
            for pod in [&client, &server] {
                mesh.register_netns(&pod.netns, &settings).unwrap();
                tune(pod);
                let haproxy = pod.spawn(
                    PROXY_UID,
                    std::path::Path::new("/usr/sbin/haproxy"),
                    &["-db", "-f", cfg.to_str().unwrap()],
                );
                for port in [
                    meshbpf::DEFAULT_OUTBOUND_PORT,
                    meshbpf::DEFAULT_INBOUND_PORT,
                ] {
                    wait_listening(pod, port, 1, || format!("haproxy: {}", haproxy.output()));
                }
                procs.push(haproxy);
            }
            let (nginx, url) = stack.nginx(&server);
            procs.push(nginx);
            Pair {
                intra_node,
                client,
                server,
                url,
                _procs: procs,
            }
        })
        .collect();
    let mut workloads = http::workloads();
    workloads.push(Workload {
        name: "bulk: a 4 MiB body, keep-alive × 4 conn",
        short: "bulk ×4",
        key: "bulk4",
        connections: 4,
        new_connection_per_request: false,
    });
    let counters = |name: &str| counter(mesh, name) as f64;
    let mut runs = vec![vec![Runs::default(); pairs.len()]; workloads.len()];
    let mut redirected = vec![0.0; workloads.len()];
    for round in 0..rounds {
        for (wi, wl) in workloads.iter().enumerate() {
            // Interleaved: drift on this shared machine hits both alike.
            for (pi, pair) in pairs.iter().enumerate() {
                let url = match wl.key {
                    "bulk4" => pair.url.replace(http::PATH, BULK_PATH),
                    _ => pair.url.clone(),
                };
                let pods = [&pair.client, &pair.server];
                let (cpu0, opens0, bytes0) = (
                    cpu_us(&pods),
                    passive_opens(&pair.server),
                    counters("intra_node_bytes_redirected"),
                );
                let r = stack.wrk(&pair.client, &url, wl, seconds);
                let (cpu1, opens1, bytes1) = (
                    cpu_us(&pods),
                    passive_opens(&pair.server),
                    counters("intra_node_bytes_redirected"),
                );
                let e = &mut runs[wi][pi];
                e.rps.push(r.rps());
                e.p50.push(r.p50_us);
                e.p99.push(r.p99_us);
                e.cpu_us_per_req.push((cpu1 - cpu0) / r.requests);
                e.mbs.push(match wl.key {
                    "bulk4" => r.rps() * BULK_BYTES / 1e6,
                    _ => f64::NAN,
                });
                // Each sidecar-to-sidecar connection is accepted twice in the server pod: by
                // its HAProxy from the client's, then by nginx from its HAProxy.
                e.s2s_conns_per_req
                    .push((opens1 - opens0) / 2.0 / r.requests);
                e.errors += r.errors;
                if pair.intra_node {
                    redirected[wi] += bytes1 - bytes0;
                } else {
                    assert_eq!(
                        bytes1, bytes0,
                        "the pair without --intra-node was accelerated"
                    );
                }
                eprintln!(
                    "    round {round} {:<44} intra-node {:<3} {:>8.0} req/s p99 {:>6.0} µs",
                    wl.name,
                    if pair.intra_node { "on" } else { "off" },
                    r.rps(),
                    r.p99_us
                );
            }
        }
    }
    println!();
    println!("### Same node, sidecar to sidecar (HAProxy ⇄ HAProxy, nginx, wrk; {rounds} × {seconds} s, medians)");
    println!();
    println!("| workload | intra-node | req/s | p50 µs | p99 µs | CPU µs/req | MB/s | sidecar conns/req | errors |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for (wi, wl) in workloads.iter().enumerate() {
        for (pi, pair) in pairs.iter().enumerate() {
            let r = &runs[wi][pi];
            let mbs = median(r.mbs.clone());
            println!(
                "| {} | {} | {:.0} | {:.0} | {:.0} | {:.1} | {} | {:.3} | {} |",
                wl.name,
                if pair.intra_node { "on" } else { "off" },
                median(r.rps.clone()),
                median(r.p50.clone()),
                median(r.p99.clone()),
                median(r.cpu_us_per_req.clone()),
                if mbs.is_nan() {
                    "-".to_string()
                } else {
                    format!("{mbs:.0}")
                },
                median(r.s2s_conns_per_req.clone()),
                r.errors
            );
        }
    }
    println!();
    println!(
        "| workload | req/s on ÷ off | p99 on ÷ off | CPU/req on ÷ off | bytes redirected (on) |"
    );
    println!("|---|---:|---:|---:|---:|");
    for (wi, wl) in workloads.iter().enumerate() {
        let (off, on) = (&runs[wi][0], &runs[wi][1]);
        let ratio = |f: fn(&Runs) -> &Vec<f64>| median(f(on).clone()) / median(f(off).clone());
        println!(
            "| {} | {:.2}× | {:.2}× | {:.2}× | {:.0} MB |",
            wl.name,
            ratio(|r| &r.rps),
            ratio(|r| &r.p99),
            ratio(|r| &r.cpu_us_per_req),
            redirected[wi] / 1e6
        );
    }
    println!();
    print_counters(mesh, "intra_node");
}

/// The counters whose name starts with `prefix`, on one line.
fn print_counters(mesh: &Mesh, prefix: &str) {
    let counters = mesh.counters().unwrap();
    let wanted: Vec<_> = counters
        .iter()
        .filter(|(n, _)| n.starts_with(prefix))
        .collect();
    println!("counters: {wanted:?}");
}
