//! meshbpf against istio-iptables, in four modes, each client in a pod of its own (so
//! conntrack exists only in the pod with the iptables rules):
//! - `direct`: no sidecar at all (the floor);
//! - `istio-iptables`: the exact nat rules istio-iptables installs in REDIRECT mode;
//! - `meshbpf`: `meshbpf attach` and `register` with their defaults;
//! - `meshbpf --sockmap`: `register --sockmap` (sockmap acceleration, opt-in per pod), in an
//!   attachment of its own.
//!
//! Phases (`--only a,b`), in order:
//! - `proxy`: a production proxy as the sidecar — HAProxy in transparent mode, nginx as the
//!   server, wrk as the application (64-byte HTTP, keep-alive and a new connection per
//!   request): req/s, p50/p99, CPU per request (the pods' cgroups);
//! - `standin`: the same with the sidecar stand-in (`examples/sidecar.rs`) and the stream
//!   load (`test-support/src/bin/stream.rs`): request/response sizes, connections, bulk;
//! - `bpf`: per-program cost from `kernel.bpf_stats_enabled` (restored afterwards) under the
//!   HTTP workloads: calls and ns per request, ns per call;
//! - `scale`: connect() of pods not registered, and with 1 to 10,000 pods registered;
//! - `memory`: map memory per attachment, per live connection (10,000 held open through
//!   HAProxy) and per registered pod (16,384 empty network namespaces), with the time of
//!   `register` and `list` at that scale.
//!
//! Writes docs/bench-compare.{md,json,svg} (with `--quick` or `--only`, target/bench-compare/
//! instead). Run as root: `scripts/bench.sh compare [--quick] [--only PHASES]`.

#[path = "../cli/tests/common/mod.rs"]
mod common;
mod util;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use libbpf_rs::MapCore;
use meshbpf::{AttachOptions, Mesh, PodSettings};
use serde_json::{json, Value};
use util::bpf_stats::{self, ProgCost};
use util::http::{self, Stack};
use util::memory;
use util::plot::{self, Bar, Panel};
use util::{cpu_us, field, median, passive_opens, tune, Machine};

const MODES: [&str; 4] = ["direct", "istio-iptables", "meshbpf", "meshbpf --sockmap"];
const IPT: usize = 1;
const PHASES: [&str; 5] = ["proxy", "standin", "bpf", "scale", "memory"];

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

/// How long and how big: the full run, or `--quick` (seconds per mode, to check that
/// everything works end to end).
struct Config {
    quick: bool,
    phases: Vec<&'static str>,
    http_rounds: usize,
    http_seconds: f64,
    standin_rounds: usize,
    standin_seconds: f64,
    bpf_seconds: f64,
    connections: usize,
    pods: usize,
    /// How long registering the pods may take before the benchmark stops there and says so.
    register_budget: Duration,
    /// How long one `meshbpf list` / `status` / `register` may take at that scale.
    cli_timeout: Duration,
}

impl Config {
    fn from_args(args: &[String]) -> Config {
        let quick = args.iter().any(|a| a == "--quick");
        let only = args
            .iter()
            .position(|a| a == "--only")
            .and_then(|i| args.get(i + 1));
        let phases = match only {
            None => PHASES.to_vec(),
            Some(list) => {
                let wanted: Vec<&str> = list.split(',').collect();
                for w in &wanted {
                    assert!(
                        PHASES.contains(w),
                        "unknown phase {w:?}; phases: {}",
                        PHASES.join(",")
                    );
                }
                PHASES
                    .iter()
                    .copied()
                    .filter(|p| wanted.contains(p))
                    .collect()
            }
        };
        let full = !quick;
        Config {
            quick,
            phases,
            // Short rounds, many: a burst of other work on the machine spoils one round, and the
            // median leaves it out.
            http_rounds: if full { 5 } else { 1 },
            http_seconds: if full { 3.0 } else { 1.0 },
            standin_rounds: if full { 3 } else { 1 },
            standin_seconds: if full { 1.5 } else { 0.3 },
            bpf_seconds: if full { 5.0 } else { 1.0 },
            connections: if full { 10_000 } else { 600 },
            pods: if full {
                meshbpf::MAX_PODS as usize
            } else {
                300
            },
            register_budget: Duration::from_secs(if full { 1200 } else { 60 }),
            cli_timeout: Duration::from_secs(if full { 60 } else { 30 }),
        }
    }

    fn has(&self, phase: &str) -> bool {
        self.phases.contains(&phase)
    }

    /// docs/ for a full run; target/bench-compare/ for a partial or quick one.
    fn out_dir(&self) -> PathBuf {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        if self.quick || self.phases.len() < PHASES.len() {
            root.join("target/bench-compare")
        } else {
            root.join("docs")
        }
    }
}

/// Detaches an attachment of the benchmark's own when dropped (the env detaches its own).
struct Detach(PathBuf);

impl Drop for Detach {
    fn drop(&mut self) {
        let _ = meshbpf::detach(&self.0);
    }
}

/// The pods, one client pod per mode, and the attachments.
struct World<'a> {
    env: &'a Env,
    server: &'a Pod,
    clients: [&'a Pod; 4],
    /// The attachment each client pod is under (none for direct and istio-iptables).
    meshes: [Option<&'a Mesh>; 4],
    stack: &'a Stack,
    url: String,
    stream_dest: String,
    /// A pod in the attached cgroup that is never registered, one outside every attachment,
    /// and one registered for the scale measurement.
    unregistered: &'a Pod,
    bare: &'a Pod,
    scaled: &'a Pod,
    /// The cgroup the many-pods attachment goes to.
    pods_cgroup: &'a Path,
    /// An istio-iptables pod that no run used before the memory phase.
    ipt_fresh: &'a Pod,
}

impl World<'_> {
    /// Starts the sidecars of the modes that have one (HAProxy or the stand-in).
    fn sidecars(&self, haproxy: bool) -> Vec<Proc> {
        self.clients[IPT..]
            .iter()
            .map(|pod| match haproxy {
                true => self.stack.haproxy(pod, 0),
                false => pod.sidecar(),
            })
            .collect()
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("hold") {
        memory::hold_main(&args[1..]);
        return;
    }
    if !privileged() {
        return;
    }
    let cfg = Config::from_args(&args);
    let nofile = util::raise_nofile();
    let machine = Machine::here();
    let mut env = Env::new();
    let mesh = env.attach();

    // The server and the baselines outside every attachment: no meshbpf program ever sees them.
    let server = env.pod_outside("server");
    let direct = env.pod_outside("direct");
    let ipt = env.pod_outside("iptables");
    istio_iptables(&env, &ipt);
    // A second one for the memory phase, with no conntrack entries from the runs before.
    let ipt_fresh = env.pod_outside("iptables-mem");
    istio_iptables(&env, &ipt_fresh);
    // meshbpf's attach holds the test cgroup; the --sockmap pod has an attachment of its own on
    // its own cgroup, so each mode's programs (and their bpf_stats) are its own.
    let default = env.pod("meshbpf");
    mesh.register_netns(&default.netns, &PodSettings::default())
        .expect("register");
    let sockmap = env.pod_outside("sockmap");
    let sockmap_pins = env.bpffs.join("mesh-sockmap");
    let sockmap_mesh = Mesh::attach_with(&sockmap.cgroup, &sockmap_pins, &AttachOptions::default())
        .expect("attach");
    let _detach = Detach(sockmap_pins.clone());
    let with_sockmap = PodSettings {
        sockmap: true,
        ..PodSettings::default()
    };
    sockmap_mesh
        .register_netns(&sockmap.netns, &with_sockmap)
        .expect("register --sockmap");
    let unregistered = env.pod("unregistered");
    let bare = env.pod_outside("bare");
    let scaled = env.pod("scale");
    let pods = env.pod_outside("pods");
    for pod in [
        &server,
        &direct,
        &ipt,
        &ipt_fresh,
        &default,
        &sockmap,
        &unregistered,
        &bare,
        &scaled,
    ] {
        tune(pod);
    }

    let stack = Stack::new(&env);
    let (_nginx, url) = stack.nginx(&server);
    let (_stream, stream_dest) = server.stream_server();
    let world = World {
        env: &env,
        server: &server,
        clients: [&direct, &ipt, &default, &sockmap],
        meshes: [None, None, Some(&mesh), Some(&sockmap_mesh)],
        stack: &stack,
        url,
        stream_dest,
        unregistered: &unregistered,
        bare: &bare,
        scaled: &scaled,
        pods_cgroup: &pods.cgroup,
        ipt_fresh: &ipt_fresh,
    };

    let mut report = Report {
        machine: Some(machine),
        versions: [
            util::tool_version("haproxy", "-v"),
            util::tool_version("nginx", "-v"),
            util::tool_version("wrk", "-v"),
        ]
        .iter()
        .map(|v| short_version(v))
        .collect(),
        ..Report::default()
    };
    let started = Instant::now();
    if cfg.has("proxy") {
        eprintln!("==> proxy: HAProxy, nginx, wrk");
        (report.proxy, report.conntrack) = proxy_phase(&world, &cfg);
    }
    if cfg.has("standin") {
        eprintln!("==> standin: the sidecar stand-in, stream load");
        report.standin = standin_phase(&world, &cfg);
    }
    if cfg.has("bpf") {
        eprintln!("==> bpf: per-program cost");
        report.bpf = bpf_phase(&world, &cfg);
    }
    if cfg.has("scale") {
        eprintln!("==> scale: pods not registered, registered pods");
        report.scale = Some(scale_phase(&world, &mesh, &cfg));
    }
    if cfg.has("memory") {
        eprintln!("==> memory: maps, connections, pods");
        report.memory = Some(memory_phase(&world, &cfg, nofile));
    }
    report.seconds = started.elapsed().as_secs_f64();
    report.write(&cfg);
}

/// Installs the istio-iptables rules in the pod's network namespace.
fn istio_iptables(env: &Env, pod: &Pod) {
    let rules = write_file(env, "istio-iptables.rules", ISTIO_IPTABLES);
    let restore = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ip netns exec {} iptables-restore < {}",
            pod.name,
            rules.display()
        ))
        .status()
        .expect("iptables-restore");
    assert!(
        restore.success(),
        "installing the istio-iptables rules failed"
    );
}

/// `HAProxy 2.6.12-1+deb12u4`, `nginx 1.22.1`, `wrk 4.1.0-3+b2`.
fn short_version(line: &str) -> String {
    let line = line
        .replace("nginx version: nginx/", "nginx ")
        .replace("HAProxy version", "HAProxy")
        .replace("wrk debian/", "wrk ");
    line.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------------------
// The production proxy

/// One (workload, mode) over the rounds.
#[derive(Clone, Default)]
struct Runs {
    rps: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    p999: Vec<f64>,
    mbs: Vec<f64>,
    cpu_us_per_req: Vec<f64>,
    errors: Vec<f64>,
    upstream_conns_per_req: Vec<f64>,
}

/// Medians of one (workload, mode).
#[derive(Clone, Copy, Default, Debug)]
struct Figures {
    rps: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    mbs: f64,
    cpu_us_per_req: f64,
    errors: f64,
    upstream_conns_per_req: f64,
}

impl Runs {
    fn figures(&self) -> Figures {
        Figures {
            rps: median(self.rps.clone()),
            p50: median(self.p50.clone()),
            p99: median(self.p99.clone()),
            p999: median(self.p999.clone()),
            mbs: median(self.mbs.clone()),
            cpu_us_per_req: median(self.cpu_us_per_req.clone()),
            errors: self.errors.iter().sum(),
            upstream_conns_per_req: median(self.upstream_conns_per_req.clone()),
        }
    }
}

type Table = Vec<(String, [Figures; 4])>;

/// Each workload's figures in every mode, from the runs keyed (workload, mode).
fn table(names: impl Iterator<Item = String>, runs: &BTreeMap<(usize, usize), Runs>) -> Table {
    names
        .enumerate()
        .map(|(wi, name)| (name, std::array::from_fn(|mi| runs[&(wi, mi)].figures())))
        .collect()
}

fn proxy_phase(w: &World, cfg: &Config) -> (Table, Vec<(String, u64)>) {
    let _sidecars = w.sidecars(true);
    let workloads = http::workloads();
    let mut runs: BTreeMap<(usize, usize), Runs> = BTreeMap::new();
    for round in 0..cfg.http_rounds {
        for (wi, wl) in workloads.iter().enumerate() {
            // Interleaved: drift on this shared machine hits every mode alike.
            for (mi, pod) in w.clients.iter().enumerate() {
                let (cpu0, opens0) = (cpu_us(&[pod, w.server]), passive_opens(w.server));
                let r = w.stack.wrk(pod, &w.url, wl, cfg.http_seconds);
                let (cpu1, opens1) = (cpu_us(&[pod, w.server]), passive_opens(w.server));
                let e = runs.entry((wi, mi)).or_default();
                e.rps.push(r.rps());
                e.p50.push(r.p50_us);
                e.p99.push(r.p99_us);
                e.p999.push(r.p999_us);
                e.cpu_us_per_req.push((cpu1 - cpu0) / r.requests);
                e.errors.push(r.errors);
                e.upstream_conns_per_req
                    .push((opens1 - opens0) / r.requests);
                eprintln!(
                    "    round {round} {:<44} {:<22} {:>8.0} req/s p99 {:>6.0} µs",
                    wl.name,
                    MODES[mi],
                    r.rps(),
                    r.p99_us
                );
            }
        }
    }
    // Conntrack must exist only where the iptables rules are.
    let conntrack = w
        .clients
        .iter()
        .zip(MODES)
        .map(|(pod, mode)| (mode.to_string(), memory::conntrack_entries(pod)))
        .chain([("server".to_string(), memory::conntrack_entries(w.server))])
        .collect();
    (
        table(workloads.iter().map(|w| w.name.to_string()), &runs),
        conntrack,
    )
}

// ---------------------------------------------------------------------------------------
// The sidecar stand-in

#[derive(Clone)]
struct StreamWorkload {
    name: String,
    short: String,
    op: &'static str,
    size: u64,
    parallel: usize,
}

fn stream_workloads() -> Vec<StreamWorkload> {
    let mut w = Vec::new();
    for parallel in [1, 8, 64] {
        for size in [64, 1024, 16384] {
            w.push(StreamWorkload {
                name: format!("req/resp {size} B × {parallel} conn"),
                short: format!("{size} B ×{parallel}"),
                op: "pingpong",
                size,
                parallel,
            });
        }
    }
    w.push(StreamWorkload {
        name: "new connection per request, 64 B × 8".into(),
        short: "new conn 64 B ×8".into(),
        op: "shortconn",
        size: 64,
        parallel: 8,
    });
    w.push(StreamWorkload {
        name: "bulk 64 KiB writes".into(),
        short: "bulk 64 KiB".into(),
        op: "flood",
        size: 65536,
        parallel: 1,
    });
    w
}

/// One `stream run` as the application in `pod`; its summary line.
fn stream_run(pod: &Pod, dest: &str, w: &StreamWorkload, seconds: f64) -> String {
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
        &seconds.to_string(),
    ];
    let out = pod.run_for(Duration::from_secs(60), APP_UID, &helper("stream"), &args);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stream {args:?} in pod {} failed:\n{text}{}",
        pod.name,
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .find(|l| l.starts_with("summary "))
        .unwrap_or_else(|| panic!("no summary: {text}"))
        .to_string()
}

fn standin_phase(w: &World, cfg: &Config) -> Table {
    let _sidecars = w.sidecars(false);
    let workloads = stream_workloads();
    let mut runs: BTreeMap<(usize, usize), Runs> = BTreeMap::new();
    for _ in 0..cfg.standin_rounds {
        for (wi, wl) in workloads.iter().enumerate() {
            for (mi, pod) in w.clients.iter().enumerate() {
                let cpu0 = cpu_us(&[pod, w.server]);
                let line = stream_run(pod, &w.stream_dest, wl, cfg.standin_seconds);
                let cpu1 = cpu_us(&[pod, w.server]);
                // CPU per request; for bulk, per MB moved.
                let units = if wl.op == "flood" {
                    field(&line, "mbytes_per_sec") * cfg.standin_seconds
                } else {
                    field(&line, "requests")
                }
                .max(1.0);
                let e = runs.entry((wi, mi)).or_default();
                e.rps.push(field(&line, "rps"));
                e.p50.push(field(&line, "p50_us"));
                e.p99.push(field(&line, "p99_us"));
                e.p999.push(field(&line, "p999_us"));
                e.mbs.push(field(&line, "mbytes_per_sec"));
                e.cpu_us_per_req.push((cpu1 - cpu0) / units);
            }
        }
    }
    table(workloads.into_iter().map(|w| w.name), &runs)
}

// ---------------------------------------------------------------------------------------
// BPF program cost

struct BpfRun {
    mode: &'static str,
    workload: String,
    rps: f64,
    progs: Vec<ProgCost>,
}

impl BpfRun {
    fn ns_per_request(&self) -> f64 {
        self.progs.iter().map(|p| p.ns_per_request).sum()
    }
}

/// One row: wrk through the pod's sidecar while bpf_stats counts `progs`.
fn measured(
    w: &World,
    pod: &Pod,
    wl: &http::Workload,
    cfg: &Config,
    mode: &'static str,
    progs: &[(String, u32)],
) -> BpfRun {
    let before = bpf_stats::snapshot(progs);
    let r = w.stack.wrk(pod, &w.url, wl, cfg.bpf_seconds);
    let after = bpf_stats::snapshot(progs);
    BpfRun {
        mode,
        workload: wl.name.to_string(),
        rps: r.rps(),
        progs: bpf_stats::costs(progs, &before, &after, r.requests),
    }
}

fn bpf_phase(w: &World, cfg: &Config) -> Vec<BpfRun> {
    let _sidecars = w.sidecars(true);
    let _stats = bpf_stats::StatsEnabled::new();
    let mut out = Vec::new();
    for wl in http::workloads() {
        for (mi, pod) in w.clients.iter().enumerate() {
            let Some(mesh) = w.meshes[mi] else { continue };
            let progs = bpf_stats::programs(mesh);
            out.push(measured(w, pod, &wl, cfg, MODES[mi], &progs));
            if mi == 2 {
                out.push(traced_run(w, mesh, pod, &wl, cfg, &progs));
                out.push(floor_run(w, pod, &wl, cfg));
                out.push(storage_run(w, w.clients[0], &wl, cfg));
            }
        }
    }
    out
}

/// The default mode again, with a `meshbpf trace` of the pod reading every decision
/// (issue 17: what tracing costs while it runs; the rows without it are what it costs when
/// nobody traces).
fn traced_run(
    w: &World,
    mesh: &Mesh,
    pod: &Pod,
    wl: &http::Workload,
    cfg: &Config,
    progs: &[(String, u32)],
) -> BpfRun {
    use std::sync::atomic::{AtomicBool, Ordering};
    let cookie = meshbpf::Netns::open(&pod.netns)
        .expect("pod netns")
        .cookie();
    let pin_dir = mesh.pin_dir().to_path_buf();
    let stop = AtomicBool::new(false);
    let (ready, is_ready) = std::sync::mpsc::channel();
    let (r, before, after, events) = std::thread::scope(|scope| {
        // A Tracer stays on the thread that made it.
        let reader = scope.spawn(|| {
            let mesh = Mesh::open(&pin_dir).expect("open the attachment");
            let mut tracer = mesh.trace(Some(cookie)).expect("meshbpf trace");
            ready.send(()).expect("bench thread");
            let mut events = 0usize;
            while !stop.load(Ordering::SeqCst) {
                events += tracer
                    .poll(Duration::from_millis(100))
                    .map_or(0, |e| e.len());
            }
            events
        });
        is_ready.recv().expect("trace reader started");
        let before = bpf_stats::snapshot(progs);
        let r = w.stack.wrk(pod, &w.url, wl, cfg.bpf_seconds);
        let after = bpf_stats::snapshot(progs);
        stop.store(true, Ordering::SeqCst);
        (r, before, after, reader.join().expect("trace reader"))
    });
    eprintln!(
        "    trace read {events} decisions ({:.1} per request)",
        events as f64 / r.requests.max(1.0)
    );
    BpfRun {
        mode: "meshbpf, `meshbpf trace` reading",
        workload: wl.name.to_string(),
        rps: r.rps(),
        progs: bpf_stats::costs(progs, &before, &after, r.requests),
    }
}

/// The hooks a proxied TCP/IPv4 request runs, each once more with a program that does
/// nothing, beside meshbpf's: what `bpf_stats` charges a call by itself (two clock reads),
/// the floor under the rows above, times the calls the kernel makes.
fn floor_run(w: &World, pod: &Pod, wl: &http::Workload, cfg: &Config) -> BpfRun {
    const HOOKS: [&str; 6] = [
        "sockops",
        "connect4",
        "getsockopt",
        "sock_release",
        "getpeername4",
        "getsockname4",
    ];
    let empty = bpf_stats::EmptyPrograms::attach(&pod.cgroup, &HOOKS);
    measured(w, pod, wl, cfg, FLOOR_MODE, &empty.programs())
}

/// The bpf phase's row of programs that do nothing.
const FLOOR_MODE: &str = "programs that do nothing, at the same hooks (the floor)";

/// In the pod with no sidecar, a connect4 program that only creates the socket's storage
/// (benches/util/storage_probe.bpf.c): what the one allocation meshbpf makes per captured
/// connection costs on its own, a part of every meshbpf row no program change removes.
fn storage_run(w: &World, pod: &Pod, wl: &http::Workload, cfg: &Config) -> BpfRun {
    let probe = bpf_stats::StorageProbe::attach(&pod.cgroup);
    measured(w, pod, wl, cfg, STORAGE_MODE, &probe.programs())
}

/// The bpf phase's row of the socket-storage allocation alone.
const STORAGE_MODE: &str =
    "`direct` with one program: connect4 creating the socket's storage, nothing else";

// ---------------------------------------------------------------------------------------
// Pods not registered; many pods registered

struct Scale {
    unregistered_us: f64,
    bare_us: f64,
    registered: Vec<(u64, f64, f64)>,
}

fn scale_phase(w: &World, mesh: &Mesh, cfg: &Config) -> Scale {
    // Overhead on pods that are not registered: connect latency with meshbpf attached
    // (the hooks run, find no cookie, return) against no program at all.
    let dest = w.stream_dest.as_str();
    let shortconn = StreamWorkload {
        name: String::new(),
        short: String::new(),
        op: "shortconn",
        size: 64,
        parallel: 1,
    };
    let seconds = cfg.standin_seconds;
    let (mut inside, mut outside) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let line = stream_run(w.unregistered, dest, &shortconn, seconds);
        inside.push(field(&line, "connect_p50_us"));
        let line = stream_run(w.bare, dest, &shortconn, seconds);
        outside.push(field(&line, "connect_p50_us"));
    }

    // Connect cost in a registered pod with 1, 100 and 10,000 pods registered.
    let cookie_map =
        libbpf_rs::MapHandle::from_pinned_path(mesh.pin_dir().join("maps/cookie_map")).unwrap();
    let scaled = w.scaled;
    mesh.register_netns(&scaled.netns, &PodSettings::default())
        .unwrap();
    let _sidecar = scaled.sidecar();
    let cookie = meshbpf::Netns::open(&scaled.netns).unwrap().cookie();
    let value = cookie_map
        .lookup(&cookie.to_ne_bytes(), libbpf_rs::MapFlags::ANY)
        .unwrap()
        .unwrap();
    let mut registered = Vec::new();
    let mut count = cookie_map.keys().count() as u64;
    let mut fake = 0u64;
    for target in [1u64, 100, 10_000] {
        // Stand-in cookies far above any real one: the programs only ever look them up.
        while count < target {
            cookie_map
                .update(
                    &(u64::MAX - fake).to_ne_bytes(),
                    &value,
                    libbpf_rs::MapFlags::ANY,
                )
                .unwrap();
            fake += 1;
            count += 1;
        }
        let line = stream_run(scaled, dest, &shortconn, seconds);
        registered.push((
            count,
            field(&line, "connect_p50_us"),
            field(&line, "p50_us"),
        ));
    }
    for i in 0..fake {
        let _ = cookie_map.delete(&(u64::MAX - i).to_ne_bytes());
    }
    Scale {
        unregistered_us: median(inside),
        bare_us: median(outside),
        registered,
    }
}

// ---------------------------------------------------------------------------------------
// Memory

struct ConnMemory {
    mode: &'static str,
    connections: usize,
    map_bytes: (u64, u64),
    option_bytes: (u64, u64),
    sockets: (u64, u64),
    conntrack: (u64, u64),
    tracked: usize,
    accelerated: usize,
}

struct PodMemory {
    target: usize,
    registered: usize,
    map_bytes: (u64, u64),
    /// Library `register_netns` time (ms): median of the first and of the last 100.
    register_first_ms: f64,
    register_last_ms: f64,
    register_total_s: f64,
    /// CLI at that scale (s); None: did not finish within the timeout.
    cli_register_s: Option<f64>,
    cli_list_s: Option<f64>,
    cli_status_s: Option<f64>,
    listed: Option<usize>,
}

struct Memory {
    fixed: [BTreeMap<String, memory::MapMemory>; 2],
    conns: Vec<ConnMemory>,
    conntrack_entry_bytes: Option<u64>,
    pods: PodMemory,
}

fn memory_phase(w: &World, cfg: &Config, nofile: u64) -> Memory {
    let fixed = [
        memory::maps(w.meshes[2].unwrap().pin_dir()),
        memory::maps(w.meshes[3].unwrap().pin_dir()),
    ];
    let mut conns = Vec::new();
    let dest = w.server.addr(false, http::SERVER_PORT);
    // HAProxy processes sharing the listener: each may hold ~9,000 connections within the
    // descriptor limit (client and server side).
    let proxies = cfg.connections.div_ceil(3000).max(1);
    for mi in [IPT, 2, 3] {
        let pod = match mi {
            IPT => w.ipt_fresh,
            _ => w.clients[mi],
        };
        let mut sidecars = Vec::new();
        for i in 0..proxies {
            sidecars.push(w.stack.haproxy(pod, i));
        }
        let pins = w.meshes[mi].map(|m| m.pin_dir().to_path_buf());
        let maps = |p: &Option<PathBuf>| p.as_ref().map_or(0, |p| memory::total(&memory::maps(p)));
        let (maps0, (socks0, opt0), ct0) = (
            maps(&pins),
            memory::socket_option_memory(pod),
            memory::conntrack_entries(pod),
        );
        let holder = memory::hold(pod, &dest, http::PATH, cfg.connections);
        let (maps1, (socks1, opt1), ct1) = (
            maps(&pins),
            memory::socket_option_memory(pod),
            memory::conntrack_entries(pod),
        );
        let (tracked, accelerated) = w.meshes[mi].map_or((0, 0), |m| {
            (m.tracked_connections(), m.accelerated_sockets())
        });
        eprintln!(
            "    {}: {} connections held, {} sockets, maps {} → {} B",
            MODES[mi], cfg.connections, socks1, maps0, maps1
        );
        conns.push(ConnMemory {
            mode: MODES[mi],
            connections: cfg.connections,
            map_bytes: (maps0, maps1),
            option_bytes: (opt0, opt1),
            sockets: (socks0, socks1),
            conntrack: (ct0, ct1),
            tracked,
            accelerated,
        });
        drop(holder);
        drop(sidecars);
    }
    Memory {
        fixed,
        conns,
        conntrack_entry_bytes: memory::conntrack_entry_bytes(),
        pods: pods_memory(w, cfg, nofile),
    }
}

/// Runs the CLI with a timeout; its wall time, or None if it did not finish in time.
fn timed_cli(args: &[&str], timeout: Duration) -> (Option<f64>, String) {
    let start = Instant::now();
    let mut child = Command::new(cli())
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("running meshbpf");
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
        s
    });
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let elapsed = start.elapsed().as_secs_f64();
            let out = reader.join().unwrap_or_default();
            assert!(status.success(), "meshbpf {args:?} failed: {out}");
            return (Some(elapsed), out);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return (None, String::new());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Many pods on one attachment of their own: empty network namespaces registered through
/// the library, then `register`, `list` and `status` through the CLI at that scale.
fn pods_memory(w: &World, cfg: &Config, nofile: u64) -> PodMemory {
    let pins = w.env.bpffs.join("mesh-pods");
    let mesh = Mesh::attach(w.pods_cgroup, &pins).expect("attach for the pods");
    let _detach = Detach(pins.clone());
    // One descriptor per namespace: stay within the open-file limit.
    let target = cfg.pods.min(nofile.saturating_sub(1000) as usize);
    let before = memory::total(&memory::maps(&pins));
    let netns = memory::empty_netns(target);
    let mut times = Vec::with_capacity(target);
    let start = Instant::now();
    // The last one goes through the CLI below.
    for fd in &netns[..target - 1] {
        let t = Instant::now();
        mesh.register_netns(memory::fd_path(fd), &PodSettings::default())
            .expect("register an empty netns");
        times.push(t.elapsed().as_secs_f64() * 1e3);
        if start.elapsed() > cfg.register_budget {
            break;
        }
    }
    let register_total_s = start.elapsed().as_secs_f64();
    let pins_arg = pins.to_str().unwrap();
    let last = memory::fd_path(&netns[target - 1]);
    let (cli_register_s, _) = if times.len() == target - 1 {
        timed_cli(
            &["register", "--netns", &last, "--pin-dir", pins_arg],
            cfg.cli_timeout,
        )
    } else {
        (None, String::new())
    };
    let registered = times.len() + cli_register_s.map_or(0, |_| 1);
    let after = memory::total(&memory::maps(&pins));
    let (cli_list_s, listed) =
        timed_cli(&["list", "--json", "--pin-dir", pins_arg], cfg.cli_timeout);
    let listed = cli_list_s.map(|_| {
        serde_json::from_str::<Value>(&listed)
            .ok()
            .and_then(|v| {
                v.as_array()
                    .map(|a| a.len())
                    .or_else(|| v["pods"].as_array().map(|a| a.len()))
            })
            .unwrap_or(0)
    });
    let (cli_status_s, _) = timed_cli(
        &["status", "--json", "--pin-dir", pins_arg],
        cfg.cli_timeout,
    );
    eprintln!("    {registered} pods registered in {register_total_s:.1} s; list {cli_list_s:?} s");
    let n = times.len();
    let first = times[..n.min(100)].to_vec();
    let last100 = times[n.saturating_sub(100)..].to_vec();
    drop(netns);
    PodMemory {
        target,
        registered,
        map_bytes: (before, after),
        register_first_ms: median(first),
        register_last_ms: median(last100),
        register_total_s,
        cli_register_s,
        cli_list_s,
        cli_status_s,
        listed,
    }
}

// ---------------------------------------------------------------------------------------
// The report

#[derive(Default)]
struct Report {
    machine: Option<Machine>,
    versions: Vec<String>,
    seconds: f64,
    proxy: Table,
    /// Conntrack entries in each pod after the proxy runs.
    conntrack: Vec<(String, u64)>,
    standin: Table,
    bpf: Vec<BpfRun>,
    scale: Option<Scale>,
    memory: Option<Memory>,
}

fn kib(bytes: f64) -> String {
    if bytes.abs() >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", bytes / 1024.0 / 1024.0)
    } else {
        format!("{:.1} KiB", bytes / 1024.0)
    }
}

fn secs(s: Option<f64>, timeout: Duration) -> String {
    match s {
        Some(s) if s < 1.0 => format!("{:.0} ms", s * 1e3),
        Some(s) => format!("{s:.2} s"),
        None => format!("> {} s (stopped)", timeout.as_secs()),
    }
}

impl Report {
    fn machine(&self) -> &Machine {
        self.machine.as_ref().expect("machine")
    }

    fn write(&self, cfg: &Config) {
        let out = cfg.out_dir();
        std::fs::create_dir_all(&out).unwrap();
        let md = self.markdown(cfg);
        std::fs::write(out.join("bench-compare.md"), &md).unwrap();
        std::fs::write(
            out.join("bench-compare.json"),
            serde_json::to_string_pretty(&self.json(cfg)).unwrap() + "\n",
        )
        .unwrap();
        self.plot(&out.join("bench-compare.svg"));
        println!("{md}");
        println!("wrote {}/bench-compare.{{md,json,svg}}", out.display());
    }

    fn caption(&self) -> String {
        let m = self.machine();
        format!(
            "scripts/bench.sh compare · {} · {} · {}",
            m.date,
            m.describe(),
            self.versions.join(", ")
        )
    }

    fn plot(&self, path: &Path) {
        let mut rows = Vec::new();
        if !self.proxy.is_empty() {
            let labels: Vec<&str> = http::workloads().iter().map(|w| w.short).collect();
            let panel =
                |title: &str, f: &dyn Fn(&Figures) -> f64, note: &dyn Fn(f64) -> String| Panel {
                    title: title.into(),
                    axis: "× istio-iptables".into(),
                    groups: self
                        .proxy
                        .iter()
                        .zip(&labels)
                        .map(|((_, figs), l)| {
                            let bars = figs
                                .iter()
                                .map(|x| Bar::ratio(f(x) / f(&figs[IPT]), note(f(x))))
                                .collect();
                            (l.to_string(), bars)
                        })
                        .collect(),
                };
            rows.push(vec![
                panel("HAProxy: req/s (higher is better)", &|x| x.rps, &|v| {
                    format!("{v:.0}/s")
                }),
                panel("HAProxy: p99 latency (lower is better)", &|x| x.p99, &|v| {
                    format!("{:.2} ms", v / 1e3)
                }),
                panel(
                    "HAProxy: CPU per request (lower is better)",
                    &|x| x.cpu_us_per_req,
                    &|v| format!("{v:.0} µs"),
                ),
            ]);
        }
        if !self.standin.is_empty() {
            let labels: Vec<String> = stream_workloads().into_iter().map(|w| w.short).collect();
            let panel = |title: &str, f: &dyn Fn(&Figures, bool) -> f64| Panel {
                title: title.into(),
                axis: "× istio-iptables".into(),
                groups: self
                    .standin
                    .iter()
                    .zip(&labels)
                    .map(|((_, figs), l)| {
                        let bulk = l.starts_with("bulk");
                        let bars = figs
                            .iter()
                            .map(|x| Bar::ratio(f(x, bulk) / f(&figs[IPT], bulk), String::new()))
                            .collect();
                        (l.clone(), bars)
                    })
                    .collect(),
            };
            rows.push(vec![
                panel(
                    "Sidecar stand-in: throughput (higher is better)",
                    &|x, bulk| if bulk { x.mbs } else { x.rps },
                ),
                panel(
                    "Sidecar stand-in: CPU per request (lower is better)",
                    &|x, _| x.cpu_us_per_req,
                ),
            ]);
        }
        if rows.is_empty() {
            return;
        }
        plot::draw(
            path,
            "meshbpf vs istio-iptables (1.0 = istio-iptables, dashed)",
            &self.caption(),
            &MODES,
            &rows,
        )
        .expect("drawing the plot");
    }

    fn markdown(&self, cfg: &Config) -> String {
        let m = self.machine();
        let mut md = String::new();
        let _ = writeln!(md, "# meshbpf vs istio-iptables\n");
        let _ = writeln!(
            md,
            "`scripts/bench.sh compare{}`, {}, {}; {}. Took {:.0} s.\n",
            if cfg.quick { " --quick" } else { "" },
            m.date,
            m.describe(),
            self.versions.join(", "),
            self.seconds
        );
        let _ = writeln!(md, "Modes, each client in a pod of its own: `direct` (no sidecar), `istio-iptables` (the nat rules istio-iptables installs, REDIRECT mode; conntrack only in that pod), `meshbpf` (`attach` and `register` with their defaults), `meshbpf --sockmap` (`register --sockmap`: sockmap acceleration, opt-in per pod, in an attachment of its own). Interleaved rounds; each figure is the median over the rounds. CPU is the user+system time of the client pod's and the server pod's cgroups (application, sidecar, server, and the softirq work done in their context), so other work on the machine does not count.\n");
        let _ = writeln!(md, "![plot](bench-compare.svg)\n");
        if !self.proxy.is_empty() {
            self.md_proxy(&mut md, cfg);
        }
        if !self.bpf.is_empty() {
            self.md_bpf(&mut md, cfg);
        }
        if let Some(mem) = &self.memory {
            md_memory(&mut md, mem, cfg);
        }
        if !self.standin.is_empty() {
            self.md_standin(&mut md, cfg);
        }
        if let Some(s) = &self.scale {
            let _ = writeln!(md, "## Pods not registered, and many pods registered\n");
            let _ = writeln!(md, "connect() p50 of a pod in the attached cgroup but not registered: {:.1} µs; of a pod no program sees: {:.1} µs; overhead {:+.1} %.\n", s.unregistered_us, s.bare_us, (s.unregistered_us / s.bare_us - 1.0) * 100.0);
            let _ = writeln!(md, "| pods registered | connect p50 µs | request p50 µs (new connection) |\n|---:|---:|---:|");
            for (n, c, r) in &s.registered {
                let _ = writeln!(md, "| {n} | {c:.1} | {r:.1} |");
            }
            md.push('\n');
        }
        md
    }

    fn md_proxy(&self, md: &mut String, cfg: &Config) {
        let _ = writeln!(md, "## Production proxy: HAProxy as the sidecar\n");
        let _ = writeln!(md, "HAProxy in transparent mode as the sidecar (uid 1337, `bind :15001`, `server 0.0.0.0:0`: each connection goes to its original destination, which HAProxy asks with `getsockopt(SO_ORIGINAL_DST)`; HTTP mode, one thread), nginx (one worker) serving a 64-byte body in a server pod, wrk (one thread) as the application. {} round(s) of {} s per figure. `Connection: close` makes wrk open a new connection per request; \"upstream conn/req\" is how many connections the server pod accepted per request (HAProxy may reuse its upstream connections).\n", cfg.http_rounds, cfg.http_seconds);
        let _ = writeln!(md, "| workload | mode | req/s | × istio-iptables | p50 µs | p99 µs | p99 × istio-iptables | p99.9 µs | CPU µs/req | CPU × istio-iptables | upstream conn/req | errors |");
        let _ = writeln!(
            md,
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for (name, figs) in &self.proxy {
            let ipt = figs[IPT];
            for (mi, f) in figs.iter().enumerate() {
                let _ = writeln!(md, "| {name} | {} | {:.0} | {:.2} | {:.0} | {:.0} | {:.2} | {:.0} | {:.1} | {:.2} | {:.2} | {:.0} |",
                    MODES[mi], f.rps, f.rps / ipt.rps, f.p50, f.p99, f.p99 / ipt.p99, f.p999,
                    f.cpu_us_per_req, f.cpu_us_per_req / ipt.cpu_us_per_req, f.upstream_conns_per_req, f.errors);
            }
        }
        let ct: Vec<String> = self
            .conntrack
            .iter()
            .map(|(pod, n)| format!("{pod} {n}"))
            .collect();
        let _ = writeln!(
            md,
            "\nConntrack entries in each pod's network namespace after these runs: {}.",
            ct.join(", ")
        );
        let _ = writeln!(
            md,
            "\n### Against the goals of issue 15 (production proxy)\n"
        );
        let _ = writeln!(
            md,
            "| figure | meshbpf | meshbpf --sockmap | goal |\n|---|---:|---:|---:|"
        );
        let row = |md: &mut String, label: &str, f: &dyn Fn(&Figures) -> f64, goal: &str| {
            let mut cells = Vec::new();
            for mi in [2, 3] {
                let vals: Vec<String> = self
                    .proxy
                    .iter()
                    .map(|(_, figs)| format!("{:.2}×", f(&figs[mi]) / f(&figs[IPT])))
                    .collect();
                cells.push(vals.join(" / "));
            }
            let _ = writeln!(md, "| {label} | {} | {} | {goal} |", cells[0], cells[1]);
        };
        let names: Vec<&str> = http::workloads().iter().map(|w| w.short).collect();
        let names = names.join(" / ");
        row(
            md,
            &format!("req/s ÷ istio-iptables ({names})"),
            &|x| x.rps,
            "≥ 1.3×",
        );
        row(
            md,
            &format!("p99 ÷ istio-iptables ({names})"),
            &|x| x.p99,
            "≤ 0.7×",
        );
        row(
            md,
            &format!("CPU per request ÷ istio-iptables ({names})"),
            &|x| x.cpu_us_per_req,
            "≤ 0.7×",
        );
        let sockmap: Vec<String> = self
            .proxy
            .iter()
            .map(|(_, figs)| format!("{:.2}×", figs[3].rps / figs[2].rps))
            .collect();
        let _ = writeln!(
            md,
            "| `--sockmap` ÷ default req/s ({names}) | | {} | ≥ 0.97× |\n",
            sockmap.join(" / ")
        );
    }

    fn md_bpf(&self, md: &mut String, cfg: &Config) {
        let _ = writeln!(md, "## BPF programs: cost per request\n");
        let _ = writeln!(md, "`kernel.bpf_stats_enabled=1` (restored afterwards) while wrk runs {} s through HAProxy per row; the kernel's `run_time_ns` and `run_cnt` of every program of the pod's attachment, divided by the requests wrk completed. Stats cost a little themselves (two clock reads per run), so req/s here is not comparable with the table above. The row \"{FLOOR_MODE}\" measures that cost: programs that only `return 1`, attached beside meshbpf's in the default pod at the hooks a request runs, cost what the stats charge any program per call, times the calls the kernel makes per request (each meshbpf row includes it). \"above the floor\" is a row's cost less the floor's for the same workload: what meshbpf's programs do. The row \"{STORAGE_MODE}\" (benches/util/storage_probe.bpf.c, in the pod with no sidecar, where the client's connect is the request's only one) measures the one allocation meshbpf's connect4 makes per captured connection, the socket's storage that holds its original destination: with the floor, a bound below which no change to the programs brings a new-connection request.\n", cfg.bpf_seconds);
        let _ = writeln!(md, "| workload | mode | BPF µs/request | above the floor | req/s | programs (calls/request × ns/call) |\n|---|---|---:|---:|---:|---|");
        for r in &self.bpf {
            let progs: Vec<String> = r
                .progs
                .iter()
                .map(|p| format!("{} {:.2}×{:.0}", p.hook, p.calls_per_request, p.ns_per_call))
                .collect();
            let floor = self
                .bpf
                .iter()
                .find(|f| f.mode == FLOOR_MODE && f.workload == r.workload);
            let above = match floor {
                Some(f) if r.mode != FLOOR_MODE && r.mode != STORAGE_MODE => {
                    format!("{:.2}", (r.ns_per_request() - f.ns_per_request()) / 1e3)
                }
                _ => String::new(),
            };
            let _ = writeln!(
                md,
                "| {} | {} | {:.2} | {} | {:.0} | {} |",
                r.workload,
                r.mode,
                r.ns_per_request() / 1e3,
                above,
                r.rps,
                progs.join(", ")
            );
        }
        md.push('\n');
    }

    fn md_standin(&self, md: &mut String, cfg: &Config) {
        let _ = writeln!(md, "## Sidecar stand-in\n");
        let _ = writeln!(md, "The sidecar stand-in (`examples/sidecar.rs`: a thread per connection relaying with read/write) and the stream load (`test-support/src/bin/stream.rs`) to a server pod over veth. {} round(s) of {} s per figure. CPU per request (bulk: per MB).\n", cfg.standin_rounds, cfg.standin_seconds);
        let _ = writeln!(md, "| workload | mode | req/s (bulk: MB/s) | × istio-iptables | × direct | p50 µs | p99 µs | p99.9 µs | CPU µs/req | CPU × istio-iptables |");
        let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for (name, figs) in &self.standin {
            let bulk = name.starts_with("bulk");
            let main = |f: &Figures| if bulk { f.mbs } else { f.rps };
            let lat = |v: f64| {
                if bulk {
                    "–".to_string()
                } else {
                    format!("{v:.0}")
                }
            };
            for (mi, f) in figs.iter().enumerate() {
                let _ = writeln!(
                    md,
                    "| {name} | {} | {:.0}{} | {:.2} | {:.2} | {} | {} | {} | {:.1} | {:.2} |",
                    MODES[mi],
                    main(f),
                    if bulk { " MB/s" } else { "" },
                    main(f) / main(&figs[IPT]),
                    main(f) / main(&figs[0]),
                    lat(f.p50),
                    lat(f.p99),
                    lat(f.p999),
                    f.cpu_us_per_req,
                    f.cpu_us_per_req / figs[IPT].cpu_us_per_req
                );
            }
        }
        md.push('\n');
    }

    fn json(&self, cfg: &Config) -> Value {
        let m = self.machine();
        let figs = |t: &Table| -> Vec<Value> {
            t.iter()
                .flat_map(|(name, figs)| {
                    figs.iter().enumerate().map(move |(mi, f)| {
                        let ipt = figs[IPT];
                        json!({"workload": name, "mode": MODES[mi], "rps": f.rps, "mbytes_per_sec": f.mbs,
                            "p50_us": f.p50, "p99_us": f.p99, "p999_us": f.p999, "cpu_us_per_request": f.cpu_us_per_req,
                            "errors": f.errors, "upstream_connections_per_request": f.upstream_conns_per_req,
                            "vs_istio_iptables": {"rps": f.rps / ipt.rps, "mbytes_per_sec": f.mbs / ipt.mbs,
                                "p99": f.p99 / ipt.p99, "cpu_per_request": f.cpu_us_per_req / ipt.cpu_us_per_req}})
                    })
                })
                .collect()
        };
        let bpf: Vec<Value> = self.bpf.iter().map(|r| json!({
            "workload": r.workload, "mode": r.mode, "rps": r.rps, "bpf_ns_per_request": r.ns_per_request(),
            "programs": r.progs.iter().map(|p| json!({"program": p.hook, "calls_per_request": p.calls_per_request,
                "ns_per_call": p.ns_per_call, "ns_per_request": p.ns_per_request})).collect::<Vec<_>>()
        })).collect();
        let scale = self.scale.as_ref().map(|s| json!({
            "unregistered_connect_p50_us": {"attached": s.unregistered_us, "nothing_attached": s.bare_us},
            "registered": s.registered.iter().map(|(n, c, r)| json!({"pods": n, "connect_p50_us": c, "request_p50_us": r})).collect::<Vec<_>>()
        }));
        let memory = self.memory.as_ref().map(|mem| {
            let maps = |f: &BTreeMap<String, memory::MapMemory>| -> Vec<Value> {
                f.values().map(|m| json!({"map": m.name, "type": m.kind, "max_entries": m.max_entries, "bytes": m.bytes})).collect()
            };
            json!({
                "maps_meshbpf": maps(&mem.fixed[0]), "maps_sockmap": maps(&mem.fixed[1]),
                "conntrack_entry_bytes": mem.conntrack_entry_bytes,
                "connections": mem.conns.iter().map(|c| json!({"mode": c.mode, "connections": c.connections,
                    "map_bytes": [c.map_bytes.0, c.map_bytes.1], "socket_option_bytes": [c.option_bytes.0, c.option_bytes.1],
                    "established_sockets": [c.sockets.0, c.sockets.1], "conntrack_entries": [c.conntrack.0, c.conntrack.1],
                    "origin_dst_map_entries": c.tracked, "sock_hash_entries": c.accelerated})).collect::<Vec<_>>(),
                "pods": {"target": mem.pods.target, "registered": mem.pods.registered,
                    "map_bytes": [mem.pods.map_bytes.0, mem.pods.map_bytes.1],
                    "register_ms_first_100_median": mem.pods.register_first_ms, "register_ms_last_100_median": mem.pods.register_last_ms,
                    "register_total_s": mem.pods.register_total_s, "cli_register_s": mem.pods.cli_register_s,
                    "cli_list_s": mem.pods.cli_list_s, "cli_status_s": mem.pods.cli_status_s, "listed": mem.pods.listed,
                    "cli_timeout_s": cfg.cli_timeout.as_secs()},
            })
        });
        json!({
            "date": m.date, "machine": m.describe(), "kernel": m.kernel, "cpus": m.cpus, "versions": self.versions,
            "quick": cfg.quick, "phases": cfg.phases, "seconds": self.seconds, "modes": MODES,
            "proxy": {"rounds": cfg.http_rounds, "seconds_per_run": cfg.http_seconds, "results": figs(&self.proxy),
                "conntrack_entries_after": self.conntrack.iter().map(|(p, n)| (p.clone(), json!(n))).collect::<serde_json::Map<_, _>>()},
            "standin": {"rounds": cfg.standin_rounds, "seconds_per_run": cfg.standin_seconds, "results": figs(&self.standin)},
            "bpf": bpf, "scale": scale, "memory": memory,
        })
    }
}

fn md_memory(md: &mut String, mem: &Memory, cfg: &Config) {
    let _ = writeln!(md, "## Memory\n");
    let _ = writeln!(md, "Map memory is the `memlock` the kernel charges each map (its fdinfo; since Linux 6.4 the map's own estimate of its usage). Preallocated maps (hash, LRU hash, arrays) cost their full bound from `attach` on, whatever the load.\n");
    let _ = writeln!(
        md,
        "| map | type | max entries | meshbpf | meshbpf --sockmap |\n|---|---|---:|---:|---:|"
    );
    for (name, m) in &mem.fixed[0] {
        let other = mem.fixed[1].get(name).map_or(0, |o| o.bytes);
        let _ = writeln!(
            md,
            "| `{name}` | {} | {} | {} | {} |",
            m.kind,
            m.max_entries,
            kib(m.bytes as f64),
            kib(other as f64)
        );
    }
    let _ = writeln!(
        md,
        "| all | | | {} | {} |\n",
        kib(memory::total(&mem.fixed[0]) as f64),
        kib(memory::total(&mem.fixed[1]) as f64)
    );
    let _ = writeln!(md, "### Per connection\n");
    let _ = writeln!(md, "{} connections held open at once through HAProxy (one 64-byte HTTP request each, then idle, keep-alive): what the maps, the sockets' option memory (where socket-local storage is charged) and conntrack grew by, per connection. A conntrack entry is {} bytes here (the `nf_conntrack` slab object).\n",
        mem.conns.first().map_or(0, |c| c.connections), mem.conntrack_entry_bytes.map_or("?".into(), |b| b.to_string()));
    let _ = writeln!(md, "| mode | established sockets / conn | map bytes / conn | socket option bytes / conn | conntrack entries / conn | conntrack bytes / conn | total: maps + option memory + conntrack, bytes / conn | `origin_dst_map` entries | `sock_hash` entries |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for c in &mem.conns {
        let n = c.connections as f64;
        let maps = (c.map_bytes.1 as f64 - c.map_bytes.0 as f64) / n;
        let opt = (c.option_bytes.1 as f64 - c.option_bytes.0 as f64) / n;
        let ct = (c.conntrack.1 as f64 - c.conntrack.0 as f64) / n;
        let ct_bytes = ct * mem.conntrack_entry_bytes.unwrap_or(0) as f64;
        let socks = (c.sockets.1 as f64 - c.sockets.0 as f64) / n;
        let _ = writeln!(
            md,
            "| {} | {socks:.2} | {maps:.0} | {opt:.0} | {ct:.2} | {ct_bytes:.0} | {:.0} | {} | {} |",
            c.mode,
            maps + opt + ct_bytes,
            c.tracked,
            c.accelerated
        );
    }
    let p = &mem.pods;
    let _ = writeln!(md, "\n### Per pod\n");
    let _ = writeln!(md, "{} empty network namespaces registered with the default settings on an attachment of their own ({} asked), through the library (the last one through `meshbpf register`).\n", p.registered, p.target);
    let _ = writeln!(md, "| figure | value |\n|---|---:|");
    let _ = writeln!(
        md,
        "| map memory with 0 pods | {} |",
        kib(p.map_bytes.0 as f64)
    );
    let _ = writeln!(
        md,
        "| map memory with {} pods | {} |",
        p.registered,
        kib(p.map_bytes.1 as f64)
    );
    let _ = writeln!(
        md,
        "| map memory per pod | {:.0} bytes |",
        (p.map_bytes.1 as f64 - p.map_bytes.0 as f64) / p.registered.max(1) as f64
    );
    let _ = writeln!(
        md,
        "| `register_netns` median, first 100 pods | {:.2} ms |",
        p.register_first_ms
    );
    let _ = writeln!(
        md,
        "| `register_netns` median, last 100 pods | {:.2} ms |",
        p.register_last_ms
    );
    let _ = writeln!(
        md,
        "| registering them all (library) | {:.1} s{} |",
        p.register_total_s,
        match p.registered + 1 < p.target {
            true => format!(
                " (stopped at the {} s budget)",
                cfg.register_budget.as_secs()
            ),
            false => String::new(),
        }
    );
    let _ = writeln!(
        md,
        "| `meshbpf register` (CLI, the last pod) | {} |",
        match p.registered + 1 < p.target {
            true => "not run: registering stopped first".to_string(),
            false => secs(p.cli_register_s, cfg.cli_timeout),
        }
    );
    let _ = writeln!(
        md,
        "| `meshbpf list --json` | {} ({} pods listed) |",
        secs(p.cli_list_s, cfg.cli_timeout),
        p.listed.map_or("–".into(), |n| n.to_string())
    );
    let _ = writeln!(
        md,
        "| `meshbpf status --json` | {} |\n",
        secs(p.cli_status_s, cfg.cli_timeout)
    );
}
