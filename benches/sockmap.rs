//! Sockmap on versus off, application <-> sidecar <-> server, per message size:
//! request/response rate and latency (one connection), and bulk throughput.
//! Three pods side by side: sockmap off, sockmap for every connection, and the
//! default policy (a connection is accelerated when its first message is at
//! least 16 KiB). Prints markdown tables with ratios against the normal stack.
//!
//! Run as root with `scripts/bench.sh sockmap` (it builds the sidecar and the test-support workloads in release first).

#[path = "../tests/common/mod.rs"]
mod common;
mod util;

use common::*;
use meshbpf::PodSettings;
use util::{field, median};

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
    let mut env = Env::new();
    let mesh = env.attach();
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
    println!(
        "counters: {:?}",
        mesh.counters()
            .unwrap()
            .into_iter()
            .filter(|(n, _)| n.starts_with("sockmap"))
            .collect::<Vec<_>>()
    );
}
