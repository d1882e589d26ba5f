//! `meshbpf agent`, the DaemonSet's process, run for real: it keeps meshbpf-cni's entry in
//! the primary network configuration (real files, rewritten by "another CNI"), serves
//! Prometheus metrics, keeps capture going across restarts under load, and registers the
//! pods it finds running with a sidecar.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;

use common::k8s::*;
use common::*;
use nix::sys::signal::Signal;
use serde_json::{json, Value};

/// Every test but discovery's: other tests' pods, running sidecars on this machine at the
/// same time, are not this test's to register.
const NO_DISCOVER: &[&str] = &["--no-discover"];
/// ... and no gc within a test (gc also reconciles the conflist): a rewrite of the primary
/// conflist is then seen by the inotify watch or not at all.
const WATCH_ONLY: &[&str] = &["--no-discover", "--gc-interval", "3600"];

const KINDNET: &str = r#"{
  "cniVersion": "0.4.0",
  "name": "kindnet",
  "plugins": [
    {"type": "ptp", "ipMasq": false, "ipam": {"type": "host-local", "ranges": [[{"subnet": "192.0.2.0/24"}]]}, "mtu": 1500},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
"#;

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

fn plugin_types(conf: &Value) -> Vec<String> {
    conf["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap().to_string())
        .collect()
}

/// The names in `dir`.
fn file_names(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Runs `meshbpf agent --uninstall` (the agent stopped) and requires it to succeed.
fn uninstall(env: &Env, dirs: &CniDirs, plugin_conf: &str) {
    let out = agent_command(env, dirs, plugin_conf)
        .arg("--uninstall")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// Waits until `path` is JSON whose plugins are `types`.
fn wait_for_plugins(path: &Path, types: &[&str]) {
    wait_until(
        || {
            fs::read_to_string(path)
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .is_some_and(|c| plugin_types(&c) == types)
        },
        || {
            format!(
                "{} never had plugins {types:?}:\n{}",
                path.display(),
                fs::read_to_string(path).unwrap_or_default()
            )
        },
    );
}

#[test]
fn the_agent_keeps_its_entry_in_the_primary_conflist_and_uninstall_removes_everything() {
    if !privileged() {
        return;
    }
    let env = Env::new();
    let dirs = CniDirs::new(&env.root);
    let primary = dirs.conf.join("10-kindnet.conflist");
    let other = dirs.conf.join("20-other.conflist");
    fs::write(&primary, KINDNET).unwrap();
    fs::write(&other, KINDNET.replace("kindnet", "other")).unwrap();
    let plugin_conf = json!({
        "capabilities": {"io.kubernetes.cri.pod-annotations": true},
        "exclude_namespaces": ["kube-system", "istio-system"],
        "state_dir": env.root.join("cni-state"),
    });
    let agent = Agent::start(&env, &dirs, &plugin_conf.to_string(), WATCH_ONLY);

    // Inserted last, as given, with the agent's pin dir; the other file untouched.
    wait_for_plugins(&primary, &["ptp", "portmap", "meshbpf-cni"]);
    let conf = read_json(&primary);
    let mut expected = plugin_conf.clone();
    expected["type"] = json!("meshbpf-cni");
    expected["pin_dir"] = json!(env.pin_dir);
    assert_eq!(conf["plugins"][2], expected);
    assert_eq!(conf["plugins"][0], read_json(&other)["plugins"][0]);
    assert_eq!(
        fs::read_to_string(&other).unwrap(),
        KINDNET.replace("kindnet", "other")
    );
    // The plugin is installed, executable, and answers.
    let installed = dirs.bin.join("meshbpf-cni");
    assert_eq!(
        fs::read(&installed).unwrap(),
        fs::read(cni_plugin()).unwrap()
    );
    let out = std::process::Command::new(&installed)
        .env("CNI_COMMAND", "VERSION")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("supportedVersions"));

    // "Another CNI" rewrites its file, in place and by rename: the entry comes back.
    fs::write(&primary, KINDNET).unwrap();
    wait_for_plugins(&primary, &["ptp", "portmap", "meshbpf-cni"]);
    let tmp = dirs.conf.join("kindnet.tmp");
    fs::write(&tmp, KINDNET).unwrap();
    fs::rename(&tmp, &primary).unwrap();
    wait_for_plugins(&primary, &["ptp", "portmap", "meshbpf-cni"]);
    let (code, body) = agent.get("/healthz");
    assert_eq!((code, body.as_str()), (200, "ok\n"));

    // A restart finds everything in place and writes nothing; the programs stayed attached
    // while the agent was down.
    let settled = fs::read_to_string(&primary).unwrap();
    let (clean, log) = agent.stop(Signal::SIGTERM);
    assert!(clean, "{log}");
    assert!(log.contains("programs stay attached"), "{log}");
    assert_eq!(env.attached_hooks().len(), ATTACH_TYPES.len());
    let agent = Agent::start(&env, &dirs, &plugin_conf.to_string(), WATCH_ONLY);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(fs::read_to_string(&primary).unwrap(), settled);
    assert!(!agent.log().contains("inserted"), "{}", agent.log());
    drop(agent);

    // Uninstall: the entry leaves every file, the binary goes, every program is detached.
    uninstall(&env, &dirs, &plugin_conf.to_string());
    assert_eq!(plugin_types(&read_json(&primary)), ["ptp", "portmap"]);
    assert_eq!(
        read_json(&primary),
        serde_json::from_str::<Value>(KINDNET).unwrap()
    );
    assert!(!installed.exists());
    assert!(env.attached_hooks().is_empty());
    assert!(!env.pin_dir.exists());
}

#[test]
fn a_conf_primary_is_wrapped_into_a_conflist_again_after_each_rewrite_and_put_back_at_uninstall() {
    if !privileged() {
        return;
    }
    let env = Env::new();
    let dirs = CniDirs::new(&env.root);
    let agent = Agent::start(&env, &dirs, "{}", WATCH_ONLY);
    // No network configuration yet: not ready, and it says why.
    let (code, body) = agent.get("/healthz");
    assert_eq!(code, 503);
    assert!(body.contains("no network configuration"), "{body}");

    let flannel = r#"{"cniVersion":"0.3.1","name":"cbr0","type":"flannel","delegate":{"hairpinMode":true,"isDefaultGateway":true}}"#;
    let conf = dirs.conf.join("10-flannel.conf");
    let list = dirs.conf.join("10-flannel.conflist");
    for _ in 0..2 {
        // The primary CNI writes (then rewrites) its .conf.
        fs::write(&conf, flannel).unwrap();
        wait_for_plugins(&list, &["flannel", "meshbpf-cni"]);
        wait_until(|| !conf.exists(), || "the .conf stayed".into());
        let wrapped = read_json(&list);
        assert_eq!(wrapped["name"], "cbr0");
        assert_eq!(wrapped["cniVersion"], "0.3.1");
        assert_eq!(
            wrapped["plugins"][0],
            json!({"type":"flannel","delegate":{"hairpinMode":true,"isDefaultGateway":true}})
        );
    }
    assert_eq!(agent.get("/healthz").0, 200);
    assert_eq!(
        file_names(&dirs.conf),
        ["10-flannel.conflist"],
        "no temporary file left"
    );

    // Uninstall puts the primary's .conf back as it wrote it, and the wrap goes.
    let (clean, log) = agent.stop(Signal::SIGTERM);
    assert!(clean, "{log}");
    uninstall(&env, &dirs, "{}");
    assert!(!list.exists(), "the wrap stayed");
    assert_eq!(
        read_json(&conf),
        serde_json::from_str::<Value>(flannel).unwrap()
    );
}

/// The primary CNI's revision `n` of its conflist (KINDNET, marked).
fn kindnet_revision(n: u64) -> String {
    let mut conf: Value = serde_json::from_str(KINDNET).unwrap();
    conf["revision"] = json!(n);
    serde_json::to_string_pretty(&conf).unwrap()
}

/// The primary CNI writing revisions `revisions` of `path`, each through a temporary file
/// (in `tmp_dir`) renamed into place, 10-50 ms apart (a spread drawn from `seed`).
fn rewrite_revisions(path: &Path, tmp_dir: &Path, revisions: std::ops::Range<u64>, seed: u64) {
    let tmp = tmp_dir.join(".kindnet.tmp");
    let mut state = seed | 1;
    for n in revisions {
        // xorshift: a spread of intervals without a dependency.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        std::thread::sleep(std::time::Duration::from_millis(10 + state % 41));
        fs::write(&tmp, kindnet_revision(n)).unwrap();
        fs::rename(&tmp, path).unwrap();
    }
}

/// The revision `path` holds, and whether it holds meshbpf-cni's entry last.
fn revision_and_entry(path: &Path) -> (Option<u64>, bool) {
    let conf: Value = fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let last = conf["plugins"]
        .as_array()
        .and_then(|p| p.last())
        .map(|p| p["type"] == "meshbpf-cni");
    (conf["revision"].as_u64(), last == Some(true))
}

#[test]
fn the_primary_cni_s_newest_write_survives_the_agent_reinserting_while_it_rewrites() {
    if !privileged() {
        return;
    }
    let env = Env::new();
    let dirs = CniDirs::new(&env.root);
    let primary = dirs.conf.join("10-kindnet.conflist");
    fs::write(&primary, kindnet_revision(0)).unwrap();
    let agent = Agent::start(&env, &dirs, "{}", WATCH_ONLY);
    wait_for_plugins(&primary, &["ptp", "portmap", "meshbpf-cni"]);

    let (rounds, per_round) = (24, 6);
    let mut lost = Vec::new();
    for round in 0..rounds {
        let first = 1 + round * per_round;
        let newest = first + per_round - 1;
        rewrite_revisions(&primary, &dirs.conf, first..newest + 1, newest);
        // The agent answers the last write within a few of its 50 ms rounds; an older
        // revision with the entry is never rewritten again (the entry is there).
        let deadline = std::time::Instant::now() + scaled(std::time::Duration::from_secs(3));
        let mut seen = revision_and_entry(&primary);
        while seen != (Some(newest), true) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
            seen = revision_and_entry(&primary);
        }
        if seen != (Some(newest), true) {
            lost.push(format!("round {round}: {seen:?}, newest {newest}"));
        }
    }
    assert!(
        lost.is_empty(),
        "the primary's newest revision was undone in {} of {rounds} rounds: {lost:?}\n{}",
        lost.len(),
        agent.log()
    );
    assert_eq!(agent.get("/healthz").0, 200, "{}", agent.log());
}

#[test]
fn a_symlinked_primary_conflist_keeps_its_link_and_its_rewrites_where_it_leads_are_seen() {
    if !privileged() {
        return;
    }
    let env = Env::new();
    let dirs = CniDirs::new(&env.root);
    // The administrator keeps the primary's file elsewhere and links it into the conf dir.
    let kept = env.root.join("cni-kept");
    fs::create_dir(&kept).unwrap();
    let target = kept.join("kindnet.conflist");
    fs::write(&target, kindnet_revision(1)).unwrap();
    let link = dirs.conf.join("10-kindnet.conflist");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let agent = Agent::start(&env, &dirs, "{}", WATCH_ONLY);

    wait_for_plugins(&link, &["ptp", "portmap", "meshbpf-cni"]);
    assert_eq!(fs::read_link(&link).unwrap(), target);
    // The primary rewrites its file where the link leads, by rename: seen there, the entry
    // comes back, the link stays.
    rewrite_revisions(&target, &kept, 2..3, 1);
    wait_until(
        || revision_and_entry(&link) == (Some(2), true),
        || format!("{:?}\n{}", revision_and_entry(&link), agent.log()),
    );
    assert_eq!(fs::read_link(&link).unwrap(), target);
    assert_eq!(
        file_names(&kept),
        ["kindnet.conflist"],
        "no temporary file left"
    );

    let (clean, log) = agent.stop(Signal::SIGTERM);
    assert!(clean, "{log}");
    uninstall(&env, &dirs, "{}");
    assert_eq!(fs::read_link(&link).unwrap(), target);
    assert_eq!(
        read_json(&target),
        serde_json::from_str::<Value>(&kindnet_revision(2)).unwrap()
    );
}

/// A child process stopped (SIGTERM, then waited for) when dropped.
struct Stopped(std::process::Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, Signal::SIGTERM);
        let _ = self.0.wait();
    }
}

#[test]
fn the_agent_keeps_working_when_its_log_reader_has_gone() {
    if !privileged() {
        return;
    }
    let env = Env::new();
    let dirs = CniDirs::new(&env.root);
    let primary = dirs.conf.join("10-kindnet.conflist");
    fs::write(&primary, KINDNET).unwrap();
    // A port free now, for the agent to serve on.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    // Its stdout and stderr: a pipe nobody reads any more (a log collector that died).
    let (reader, writer) = nix::unistd::pipe().unwrap();
    drop(reader);
    let mut agent = Stopped(
        agent_command(&env, &dirs, "{}")
            .arg("--cgroup")
            .arg(&env.cgroup)
            .arg("--plugin-binary")
            .arg(cni_plugin())
            .args(["--listen", &addr.to_string()])
            .args(WATCH_ONLY)
            .stdout(writer.try_clone().unwrap())
            .stderr(writer)
            .spawn()
            .unwrap(),
    );
    let healthz = || -> Option<String> {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(addr).ok()?;
        write!(stream, "GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n").ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        Some(response)
    };
    wait_until(
        || healthz().is_some_and(|r| r.starts_with("HTTP/1.1 200")),
        || format!("the agent never answered on {addr}"),
    );
    // It logs each change it makes: none of those lines stops it.
    fs::write(&primary, KINDNET).unwrap();
    wait_for_plugins(&primary, &["ptp", "portmap", "meshbpf-cni"]);
    assert!(agent.0.try_wait().unwrap().is_none(), "the agent exited");
    assert!(healthz().is_some_and(|r| r.starts_with("HTTP/1.1 200")));
}

/// One sample of a Prometheus text exposition.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the Prometheus text format; fails the test on a line it cannot read, or on a
/// sample whose family has no `# TYPE`.
fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut types = BTreeMap::new();
    let mut samples = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            types.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let inner = rest.strip_suffix('}').unwrap_or_else(|| panic!("{line}"));
                let labels = inner
                    .split(',')
                    .map(|pair| {
                        let (k, v) = pair.split_once('=').unwrap_or_else(|| panic!("{line}"));
                        (k.to_string(), v.trim_matches('"').to_string())
                    })
                    .collect();
                (name.to_string(), labels)
            }
            None => (series.to_string(), BTreeMap::new()),
        };
        let kind = types
            .get(&name)
            .unwrap_or_else(|| panic!("no # TYPE for {name}"));
        assert!(
            (kind == "counter") == name.ends_with("_total"),
            "{name} is a {kind}"
        );
        samples.push(Sample {
            name,
            labels,
            value: value.parse().unwrap_or_else(|_| panic!("{line}")),
        });
    }
    samples
}

fn value(samples: &[Sample], name: &str, label: Option<(&str, &str)>) -> f64 {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && label.is_none_or(|(k, v)| s.labels.get(k).map(String::as_str) == Some(v))
        })
        .unwrap_or_else(|| panic!("no {name} {label:?} in {samples:?}"))
        .value
}

/// A node with a primary CNI conflist and the agent running on it (attached), and the
/// attachment it made.
fn running_agent(env: &Env) -> (CniDirs, Agent, meshbpf::Mesh) {
    let dirs = CniDirs::new(&env.root);
    fs::write(dirs.conf.join("10-kindnet.conflist"), KINDNET).unwrap();
    let agent = Agent::start(env, &dirs, "{}", NO_DISCOVER);
    let mesh = meshbpf::Mesh::open(&env.pin_dir).unwrap();
    (dirs, agent, mesh)
}

#[test]
fn metrics_give_every_counter_the_pods_and_every_map_s_entries_and_capacity() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    let (_dirs, agent, mesh) = running_agent(&env);
    let app = env.pod("app");
    let server = env.pod("server");
    let _server = server.server(&["0.0.0.0:8080"]);
    mesh.register_netns(&app.netns, &meshbpf::PodSettings::default())
        .unwrap();
    let _sidecar = app.sidecar();
    for _ in 0..3 {
        assert!(app.connect(&server.addr(false, 8080), &[]).ok);
    }

    let (code, text) = agent.get("/metrics");
    assert_eq!(code, 200);
    let samples = parse_metrics(&text);
    assert_eq!(value(&samples, "meshbpf_attached", None), 1.0);
    for (reason, count) in mesh.counters().unwrap() {
        assert_eq!(
            value(&samples, "meshbpf_events_total", Some(("reason", reason))),
            count as f64,
            "{reason}"
        );
    }
    assert_eq!(
        value(
            &samples,
            "meshbpf_events_total",
            Some(("reason", "connect_redirected"))
        ),
        3.0
    );
    assert_eq!(value(&samples, "meshbpf_registered_pods", None), 1.0);
    let maps: Vec<String> = fs::read_dir(env.pin_dir.join("maps"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "sk_storage_map")
        .collect();
    assert!(maps.len() >= 8, "{maps:?}");
    for map in &maps {
        let entries = value(&samples, "meshbpf_map_entries", Some(("map", map)));
        let capacity = value(&samples, "meshbpf_map_capacity", Some(("map", map)));
        assert!(capacity > 0.0 && entries <= capacity, "{map}");
    }
    assert_eq!(
        value(&samples, "meshbpf_map_entries", Some(("map", "cookie_map"))),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            "meshbpf_map_capacity",
            Some(("map", "cookie_map"))
        ),
        f64::from(meshbpf::MAX_PODS)
    );
    assert_eq!(
        value(&samples, "meshbpf_agent_conflist_writes_total", None),
        1.0
    );
    assert_eq!(
        value(&samples, "meshbpf_agent_plugin_installs_total", None),
        1.0
    );
    assert_eq!(agent.get("/nowhere").0, 404);
}

#[test]
fn the_agent_unregisters_pods_whose_netns_is_gone_and_keeps_the_live_ones() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    let (_dirs, agent, mesh) = running_agent(&env);
    let gone = env.pod("gone");
    let live = env.pod("live");
    let settings = meshbpf::PodSettings::default();
    let gone_cookie = mesh
        .register_netns(&gone.netns, &settings)
        .unwrap()
        .netns_cookie;
    let live_cookie = mesh
        .register_netns(&live.netns, &settings)
        .unwrap()
        .netns_cookie;
    // The pod is deleted without a CNI DEL (a crashed runtime, a node agent that missed it):
    // no process and no mount keeps its namespace.
    sh(Command::new("ip").args(["netns", "del", &gone.name]));
    let cookies = || -> Vec<u64> {
        mesh.pods()
            .unwrap()
            .iter()
            .map(|p| p.netns_cookie)
            .collect()
    };
    // The map changes first, then the agent logs and counts it: wait for all three.
    let gc_logged = format!("gc: unregistered netns cookie {gone_cookie}");
    let gc_counted = || {
        value(
            &parse_metrics(&agent.get("/metrics").1),
            "meshbpf_agent_gc_unregistered_total",
            None,
        ) == 1.0
    };
    wait_until(
        || cookies() == [live_cookie] && agent.log().contains(&gc_logged) && gc_counted(),
        || format!("registered: {:?}\n{}", cookies(), agent.log()),
    );
    let samples = parse_metrics(&agent.get("/metrics").1);
    assert_eq!(value(&samples, "meshbpf_registered_pods", None), 1.0);
    // The live pod is still captured.
    let server = env.pod("server");
    let _server = server.server(&["0.0.0.0:8080"]);
    let _sidecar = live.sidecar();
    assert!(live.connect(&server.addr(false, 8080), &[]).ok);
    assert_eq!(counter(&mesh, "connect_redirected"), 1);
}

#[test]
fn restarting_the_agent_under_load_fails_no_connection_and_capture_never_stops() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    let dirs = CniDirs::new(&env.root);
    fs::write(dirs.conf.join("10-kindnet.conflist"), KINDNET).unwrap();
    let mut agent = Some(Agent::start(&env, &dirs, "{}", NO_DISCOVER));
    let mesh = meshbpf::Mesh::open(&env.pin_dir).unwrap();
    let app = env.pod("app");
    let server_pod = env.pod("server");
    let (_server, dest) = server_pod.stream_server();
    mesh.register_netns(&app.netns, &meshbpf::PodSettings::default())
        .unwrap();
    let sidecar = app.sidecar();
    let parallel = 4;
    let load = |count: usize| {
        app.spawn(
            APP_UID,
            &helper("stream"),
            &[
                "run",
                &dest,
                "--op",
                "upload",
                "--size",
                "2000",
                "--parallel",
                &parallel.to_string(),
                "--count",
                &count.to_string(),
            ],
        )
    };
    // Every connection of a batch succeeded, byte for byte.
    let check = |out: &str, count: usize| {
        assert!(!out.contains("fail"), "{out}");
        let done = format!("connections={count}");
        assert_eq!(
            out.lines().filter(|l| l.ends_with(&done)).count(),
            parallel,
            "{out}"
        );
    };
    let mut total = 0;
    // Stopped by SIGTERM, then killed outright, then stopped again: each time a batch runs
    // while nothing but the pinned programs is there, and batches run while the agent starts
    // again over them (attaching in place).
    for signal in [Signal::SIGTERM, Signal::SIGKILL, Signal::SIGTERM] {
        let (_, log) = agent.take().unwrap().stop(signal);
        assert_eq!(
            env.attached_hooks().len(),
            ATTACH_TYPES.len(),
            "detached on {signal}: {log}"
        );
        check(&load(100).wait(), 100);
        total += parallel * 100;

        // Batches back to back for as long as the agent takes to start.
        agent = Some(std::thread::scope(|scope| {
            let starting = scope.spawn(|| Agent::start(&env, &dirs, "{}", NO_DISCOVER));
            let mut batches = 0;
            while batches == 0 || !starting.is_finished() {
                check(&load(50).wait(), 50);
                total += parallel * 50;
                batches += 1;
            }
            starting.join().unwrap()
        }));
    }
    assert_eq!(counter(&mesh, "connect_redirected"), total as u64);
    assert_eq!(sidecar.lines("outbound ").len(), total);
    assert_eq!(mesh.pods().unwrap().len(), 1);
}

#[test]
fn pods_running_before_the_agent_are_found_by_their_sidecar_and_registered() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    let dirs = CniDirs::new(&env.root);
    fs::write(dirs.conf.join("10-kindnet.conflist"), KINDNET).unwrap();
    // An outbound port nothing else on this machine uses: the host gets a listener of the
    // proxy uid on it too, which must not make the agent register the host.
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let port_text = port.to_string();
    let server_pod = env.pod("server");
    let _server = server_pod.server(&["0.0.0.0:8080"]);
    let running = env.pod("running");
    let running_sidecar = running.spawn(
        PROXY_UID,
        &example("sidecar"),
        &["--outbound-port", &port_text, "--dns-port", "15053"],
    );
    running_sidecar.wait_for("listening dns-udp=[::1]");
    // An application listening on that port is not a sidecar.
    let not_sidecar = env.pod("appport");
    let _app_listener = not_sidecar.server(&[&format!("127.0.0.1:{port}")]);
    let mut host_listener = command_via_fd(&helper("netprobe"));
    host_listener.args(["serve", &format!("127.0.0.1:{port}")]);
    // SAFETY: setresgid/setresuid between fork and exec, async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut host_listener, || {
            if nix::libc::setresgid(PROXY_UID, PROXY_UID, PROXY_UID) < 0
                || nix::libc::setresuid(PROXY_UID, PROXY_UID, PROXY_UID) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut host_listener = host_listener
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // A pod the plugin registered already, with its own settings, keeps them.
    let annotated = env.pod("annotated");
    let _annotated_sidecar = annotated.spawn(
        PROXY_UID,
        &example("sidecar"),
        &["--outbound-port", &port_text, "--dns-port", "15054"],
    );
    let own = meshbpf::PodSettings {
        outbound_port: port,
        exclude_outbound_ports: [3306].into(),
        ..Default::default()
    };
    meshbpf::Mesh::attach(&env.cgroup, &env.pin_dir)
        .unwrap()
        .register_netns(&annotated.netns, &own)
        .unwrap();
    wait_until(
        || {
            fs::read_to_string(format!("/proc/{}/net/tcp", host_listener.id()))
                .is_ok_and(|t| t.contains(&format!(":{port:04X} 00000000:0000 0A")))
        },
        || "the host listener never listened".into(),
    );

    let agent = Agent::start(
        &env,
        &dirs,
        &json!({"outbound_port": port}).to_string(),
        &[],
    );
    agent.wait_for("registered running pod");
    let _ = host_listener.kill();
    let _ = host_listener.wait();

    let mesh = meshbpf::Mesh::open(&env.pin_dir).unwrap();
    let pods = mesh.pods().unwrap();
    let mut found: Vec<u64> = pods.iter().map(|p| p.netns_cookie).collect();
    found.sort();
    let mut expected = vec![cookie(&running.netns), cookie(&annotated.netns)];
    expected.sort();
    assert_eq!(found, expected, "{}", agent.log());
    let settings_of = |pod: &Pod| {
        let c = cookie(&pod.netns);
        pods.iter()
            .find(|p| p.netns_cookie == c)
            .unwrap()
            .settings
            .clone()
    };
    let conf_settings = meshbpf::PodSettings {
        outbound_port: port,
        ..Default::default()
    };
    assert_eq!(settings_of(&running), conf_settings);
    assert_eq!(settings_of(&annotated), own);
    // The running pod's traffic now reaches its sidecar.
    let dest = server_pod.addr(false, 8080);
    assert!(running.connect(&dest, &[]).ok);
    let events = running_sidecar.lines("outbound ");
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(events[0].contains(&format!("original_dst={dest}")));
    let (_, text) = agent.get("/metrics");
    assert!(
        text.contains("meshbpf_agent_discovered_pods_total 1\n"),
        "{text}"
    );
}
