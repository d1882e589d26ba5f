//! Upgrades across map layouts: `meshbpf attach` of this build over an attachment made by
//! the previous layout's build (built from this repository's history) migrates it with no
//! capture gap, keeps every registration and live connection, and a kill at any point
//! leaves a state the next `attach` completes.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

use common::*;

/// The last commit of each earlier layout this build upgrades from: the previous one, and
/// the one before (its migration chains two steps).
const PREVIOUS: Layout = Layout(9, "1ff9e3a6bb798999184c96dbfe3fed4ee73ab0af");
const TWO_BACK: Layout = Layout(8, "74767c7766c920e52d3bcef3ed30baa773567284");

#[derive(Clone, Copy)]
struct Layout(u32, &'static str);

/// Whether this checkout can build the earlier layouts: they come from its git history, so
/// a source tarball, a shallow clone or a machine without `git` cannot. Says why where the
/// test is seen, and fails under CI (scripts/deps.sh installs git; CI clones whole).
#[track_caller]
fn history() -> bool {
    let root = &repo_root();
    let git = |args: &[&str]| Command::new("git").arg("-C").arg(root).args(args).output();
    let missing: Vec<String> = match git(&["--version"]) {
        Err(e) => vec![format!(
            "`git` cannot run ({e}): install it with `apt-get install git`"
        )],
        Ok(_) => [PREVIOUS, TWO_BACK]
            .iter()
            .filter(|Layout(_, commit)| {
                !git(&["cat-file", "-e", &format!("{commit}^{{commit}}")])
                    .is_ok_and(|out| out.status.success())
            })
            .map(|Layout(layout, commit)| {
                format!("layout {layout} (commit {commit}) is not in this checkout's history")
            })
            .collect(),
    };
    if missing.is_empty() {
        return true;
    }
    let why = format!(
        "the upgrade tests build the earlier layouts from this checkout's git history: {}; \
         run them from a full `git clone` (not a source tarball or a shallow clone) with git installed",
        missing.join("; ")
    );
    if std::env::var_os("CI").is_some() {
        panic!("{why}");
    }
    skip(&why);
    false
}

/// That layout's `meshbpf`, built once from `git archive` of its commit into
/// `target/previous-layout/` and kept there.
fn meshbpf_of(Layout(layout, commit): Layout) -> PathBuf {
    static BUILT: Mutex<Vec<(&str, PathBuf)>> = Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, bin)) = built.iter().find(|(c, _)| *c == commit) {
        return bin.clone();
    }
    let root = &repo_root();
    let dir = root.join("target/previous-layout").join(&commit[..12]);
    let bin = dir.join("target/debug/meshbpf");
    if !bin.exists() {
        let src = dir.join("src");
        let _ = fs::remove_dir_all(&src);
        fs::create_dir_all(&src).unwrap();
        let archive = Command::new("git")
            .arg("-C")
            .arg(root)
            .args(["archive", "--format=tar", commit])
            .output()
            .expect("git");
        assert!(
            archive.status.success(),
            "this test builds layout {layout} from commit {commit}, which this checkout's \
             history lacks (a shallow clone?): {}",
            String::from_utf8_lossy(&archive.stderr)
        );
        let mut tar = Command::new("tar")
            .arg("-x")
            .arg("-C")
            .arg(&src)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        tar.stdin
            .take()
            .unwrap()
            .write_all(&archive.stdout)
            .unwrap();
        assert!(tar.wait().unwrap().success());
        let out = Command::new(env!("CARGO"))
            .args(["build", "--quiet", "--bin", "meshbpf", "--manifest-path"])
            .arg(src.join("Cargo.toml"))
            .env("CARGO_TARGET_DIR", dir.join("target"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "building layout {layout}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    built.push((commit, bin.clone()));
    bin
}

/// Runs a meshbpf binary with `--pin-dir` of `env` appended.
fn run(bin: &Path, env: &Env, args: &[&str]) -> Output {
    Command::new(bin)
        .args(args)
        .arg("--pin-dir")
        .arg(&env.pin_dir)
        .output()
        .unwrap()
}

/// The settings registered with the previous build: non-default lists of every kind.
const LISTS: [&str; 8] = [
    "--proxy-uid",
    "1337,2000",
    "--exclude-outbound-ports",
    "9100,9101",
    "--exclude-outbound-cidrs",
    "198.51.100.0/24,2001:db8:ffff::/48",
    "--exclude-inbound-ports",
    "7000",
];

/// A node attached by the previous build, with a registered pod (its sidecar, a server in
/// another pod), a second registered pod with other lists, and an unregistered one.
/// Where the live connection of [`Old::live_connection`] goes: in `other`'s included CIDRs,
/// never reached (its proxy only asks).
const LATE_DEST: &str = "192.0.2.77:8080";

struct Old {
    layout: Layout,
    env: Env,
    app: Pod,
    other: Pod,
    dest: String,
    _server: Proc,
    sidecar: Proc,
}

fn attached_by(layout: Layout) -> Old {
    let old = meshbpf_of(layout);
    let mut env = Env::new();
    let cgroup = env.cgroup.to_str().unwrap().to_string();
    stdout_of(&run(&old, &env, &["attach", "--cgroup", &cgroup]));
    let app = env.pod("app");
    let other = env.pod("other");
    let server_pod = env.pod("server");
    let (server, dest) = server_pod.stream_server();
    register_both(&old, &env, &app, &other, &[]);
    let sidecar = app.sidecar();
    Old {
        layout,
        env,
        app,
        other,
        dest,
        _server: server,
        sidecar,
    }
}

/// Registers `app` with [`LISTS`] and `other` with other lists, with `extra` options each.
fn register_both(bin: &Path, env: &Env, app: &Pod, other: &Pod, extra: &[&str]) {
    let mut args = vec!["register", "--netns", app.netns.to_str().unwrap()];
    args.extend_from_slice(&LISTS);
    args.extend_from_slice(extra);
    stdout_of(&run(bin, env, &args));
    let mut args = vec![
        "register",
        "--netns",
        other.netns.to_str().unwrap(),
        "--include-outbound-cidrs",
        "192.0.2.0/24",
        "--include-outbound-ports",
        "8443",
        "--no-dns",
    ];
    args.extend_from_slice(extra);
    stdout_of(&run(bin, env, &args));
}

/// `meshbpf list --json` of this build, each pod's settings only (the volatile fields out).
fn listed(env: &Env) -> Vec<serde_json::Value> {
    let out = stdout_of(&env.meshbpf(&["list", "--json"]));
    let mut pods: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    for p in &mut pods {
        let p = p.as_object_mut().unwrap();
        for volatile in [
            "netns_cookie",
            "netns_inode",
            "inbound_listeners",
            "addresses",
        ] {
            p.remove(volatile);
        }
    }
    // In a stable order (by cookie, the namespaces' creation order, differs between runs).
    pods.sort_by_key(|p| p.to_string());
    pods
}

/// What this build lists for the same registrations made by itself with `layout`'s
/// defaults: pods keep what they had. Before layout 9, the bind model (the only one) and
/// sockmap acceleration (on by default then).
fn registered_afresh(Layout(layout, _): Layout) -> Vec<serde_json::Value> {
    let mut env = Env::new();
    let _mesh = env.attach();
    let (app, other) = (env.pod("app"), env.pod("other"));
    let defaults: &[&str] = if layout < 9 {
        &["--inbound-mode", "bind", "--sockmap"]
    } else {
        &[]
    };
    register_both(&cli(), &env, &app, &other, defaults);
    listed(&env)
}

impl Old {
    /// A connection made now in `other`, whose proxy (a probe on its outbound port) has
    /// accepted it and asks SO_ORIGINAL_DST only when [`Old::assert_still_answered`] tells it.
    fn live_connection(&self) -> (Proc, Proc) {
        let ask = self.env.root.join("ask");
        let _ = fs::remove_file(&ask);
        let late = self.other.spawn(
            PROXY_UID,
            &helper("netprobe"),
            &[
                "sockopts",
                "--listen",
                "127.0.0.1:15001",
                "--wait-for",
                ask.to_str().unwrap(),
            ],
        );
        late.wait_for("listening=");
        let app = self
            .other
            .spawn(APP_UID, &helper("netprobe"), &["connect", LATE_DEST]);
        late.wait_for("accepted");
        (late, app)
    }

    /// The connection of [`Old::live_connection`] still gets its original destination.
    #[track_caller]
    fn assert_still_answered(&self, (late, _app): (Proc, Proc), when: &str) {
        fs::write(self.env.root.join("ask"), "").unwrap();
        let told = probes(&late.wait());
        assert_eq!(
            told["original_dst"],
            format!("ok:{}", sockaddr_hex(LATE_DEST.parse().unwrap())),
            "{when}: a connection made before lost its original destination"
        );
    }

    fn attach_current(&self) -> Output {
        let cgroup = self.env.cgroup.to_str().unwrap().to_string();
        self.env.meshbpf(&["attach", "--cgroup", &cgroup])
    }

    fn lists(&self) -> Vec<serde_json::Value> {
        listed(&self.env)
    }

    /// A new connection from the registered pod reaches its destination through its
    /// sidecar, and one to an excluded port goes straight.
    fn assert_capture_works(&self, when: &str) {
        let before = self.sidecar.lines("outbound ").len();
        let probe = self.app.connect(&self.dest, &[]);
        assert!(probe.ok, "{when}: {probe:?}");
        assert!(
            probe.get("local").starts_with("127.0.0.1:"),
            "{when}: escaped: {probe:?}"
        );
        assert_eq!(probe.get("peer"), self.dest, "{when}");
        assert_eq!(self.sidecar.lines("outbound ").len(), before + 1, "{when}");
    }

    fn assert_upgraded(&self, lists_before: &[serde_json::Value], when: &str) {
        let status: serde_json::Value =
            serde_json::from_str(&stdout_of(&self.env.meshbpf(&["status", "--json"]))).unwrap();
        assert_eq!(status["layout_version"], meshbpf::LAYOUT_VERSION, "{when}");
        assert_eq!(self.lists(), lists_before, "{when}: registrations changed");
        let mut maps: Vec<String> = fs::read_dir(self.env.pin_dir.join("maps"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        maps.sort();
        let fresh = Env::new();
        let _mesh = fresh.attach();
        let mut expected: Vec<String> = fs::read_dir(fresh.pin_dir.join("maps"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        expected.sort();
        assert_eq!(maps, expected, "{when}: pins of another layout remain");
        let mut top: Vec<String> = fs::read_dir(&self.env.pin_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        top.sort();
        // Pods registered with inbound capture by layout 9 on have their sk_lookup link
        // under pods/ (updated to this build's program); earlier pods keep the bind model
        // they had, without one.
        let expected: &[&str] = if self.layout.0 >= 9 {
            &["links", "maps", "pods"]
        } else {
            &["links", "maps"]
        };
        assert_eq!(top, expected, "{when}");
        // Each pod's sk_lookup program is this build's, and uses only the maps pinned now
        // (not the previous layout's, nor a staging copy).
        let pinned: Vec<u32> = map_ids(&self.env).into_iter().map(|(_, id)| id).collect();
        for pod in fs::read_dir(self.env.pin_dir.join("pods"))
            .into_iter()
            .flatten()
        {
            let path = pod.unwrap().path();
            let link = libbpf_rs::Link::open(&path).unwrap();
            let prog_id = link.info().unwrap().prog_id;
            let opts = libbpf_rs::query::ProgInfoQueryOptions::default().include_map_ids(true);
            let prog = libbpf_rs::query::ProgInfoIter::with_query_opts(opts)
                .find(|p| p.id == prog_id)
                .unwrap_or_else(|| panic!("{when}: {} runs no program", path.display()));
            // Its own read-only data (the pod's cookie) is no pinned map.
            let internal = |id: u32| {
                libbpf_rs::query::MapInfoIter::default()
                    .any(|m| m.id == id && m.name.to_string_lossy().contains('.'))
            };
            for id in prog.map_ids.iter().filter(|id| !internal(**id)) {
                assert!(
                    pinned.contains(id),
                    "{when}: {}'s program uses map {id}, not pinned: {:?}",
                    path.display(),
                    map_ids(&self.env)
                );
            }
        }
        let mut hooks = self.env.attached_hooks();
        hooks.sort();
        assert_eq!(hooks, ATTACH_TYPES, "{when}");
        self.assert_capture_works(when);
        // The lists are in force: an excluded port goes straight.
        let (ip, _) = self.dest.rsplit_once(':').unwrap();
        let probe = self.app.connect(&format!("{ip}:9100"), &[]);
        assert!(
            !probe.stdout.contains("local=127.0.0.1"),
            "{when}: {probe:?}"
        );
    }
}

/// Ids of the maps pinned now, by name.
fn map_ids(env: &Env) -> Vec<(String, u32)> {
    let mut ids: Vec<(String, u32)> = fs::read_dir(env.pin_dir.join("maps"))
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            let map = libbpf_rs::MapHandle::from_pinned_path(&path).unwrap();
            use libbpf_rs::MapCore;
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, map.info().unwrap().info.id)
        })
        .collect();
    ids.sort();
    ids
}

#[test]
fn the_previous_layout_upgrades_under_load_with_no_failed_or_escaped_connection() {
    if !privileged() || !history() {
        return;
    }
    let o = attached_by(PREVIOUS);
    let late = o.live_connection();

    // Long-lived connections through the sidecar, and new ones all along.
    let long = o.app.spawn(
        APP_UID,
        &helper("stream"),
        &[
            "run",
            &o.dest,
            "--op",
            "pingpong",
            "--size",
            "100",
            "--parallel",
            "2",
            "--duration",
            "6",
        ],
    );
    let load = o.app.spawn(
        APP_UID,
        &helper("stream"),
        &[
            "run",
            &o.dest,
            "--op",
            "upload",
            "--size",
            "2000",
            "--parallel",
            "4",
            "--count",
            "300",
        ],
    );
    wait_until(
        || o.sidecar.lines("outbound ").len() > 50,
        || "no load yet".into(),
    );
    let old_ids = map_ids(&o.env);

    let out = o.attach_current();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    o.assert_still_answered(late, "after the upgrade");
    let out = load.wait();
    assert_eq!(
        out.lines()
            .filter(|l| l.ends_with("connections=300"))
            .count(),
        4,
        "{out}"
    );
    assert!(!out.contains("fail"), "{out}");
    let long = long.wait();
    assert!(
        long.contains("summary op=pingpong") && !long.contains("fail"),
        "{long}"
    );
    // Every connection of the load went through the sidecar: none escaped.
    let sidecar_seen = o.sidecar.lines("outbound ").len();
    assert_eq!(sidecar_seen, 1200 + 2, "{}", o.sidecar.output());
    // Counts made by the previous build's programs are carried.
    let mesh = meshbpf::Mesh::open(&o.env.pin_dir).unwrap();
    assert_eq!(counter(&mesh, "connect_redirected"), 1200 + 2 + 1);

    // Registrations, lists, layout, pins.
    let lists = o.lists();
    assert_eq!(lists, registered_afresh(PREVIOUS));
    o.assert_upgraded(&lists, "after the upgrade");
    // The maps the upgrade replaced are gone from the kernel, not only unpinned.
    for (name, id) in old_ids {
        if map_ids(&o.env).iter().any(|(n, i)| *n == name && *i == id) {
            continue; // reused
        }
        let gone = Command::new("bpftool")
            .args(["map", "show", "id", &id.to_string()])
            .output()
            .unwrap();
        assert!(
            !gone.status.success(),
            "the old {name} (id {id}) is still loaded"
        );
    }

    // Downgrade: refused by the previous build, before anything changes.
    let ids = map_ids(&o.env);
    let cgroup = o.env.cgroup.to_str().unwrap().to_string();
    let out = run(
        &meshbpf_of(PREVIOUS),
        &o.env,
        &["attach", "--cgroup", &cgroup],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains(&format!("layout {}", meshbpf::LAYOUT_VERSION)),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(map_ids(&o.env), ids);
    o.assert_capture_works("after a refused downgrade");
}

/// How many times `syscall` is called by `attach` of this build over a fresh attachment of
/// the previous one.
fn syscalls_of_an_upgrade(syscall: &str) -> usize {
    let o = attached_by(PREVIOUS);
    let cgroup = o.env.cgroup.to_str().unwrap().to_string();
    let log = o.env.root.join("strace.log");
    let out = Command::new("strace")
        .args(["-f", "-qq", "-e"])
        .arg(format!("trace={syscall}"))
        .arg("-o")
        .arg(&log)
        .arg(cli())
        .args(["attach", "--cgroup", &cgroup, "--pin-dir"])
        .arg(&o.env.pin_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter(|l| l.contains(&format!("{syscall}(")))
        .count()
}

#[test]
fn an_upgrade_killed_at_any_point_is_completed_by_the_next_attach() {
    if !privileged() || !history() {
        return;
    }
    let bpf_calls = syscalls_of_an_upgrade("bpf");
    let renames = syscalls_of_an_upgrade("rename");
    assert!(
        bpf_calls > 20 && renames >= 1,
        "{bpf_calls} bpf, {renames} rename"
    );
    // Killed at its k-th bpf(2) call, spread over the whole upgrade, and at each rename of
    // its commit.
    let mut kills: Vec<(String, usize)> = (1..=12)
        .map(|i| ("bpf".to_string(), i * bpf_calls / 13))
        .collect();
    kills.extend((1..=renames).map(|k| ("rename".to_string(), k)));
    let expected = registered_afresh(PREVIOUS);
    for (syscall, k) in kills {
        let o = attached_by(PREVIOUS);
        let cgroup = o.env.cgroup.to_str().unwrap().to_string();
        let when = format!("killed at {syscall} #{k}");
        let late = o.live_connection();
        let out = Command::new("strace")
            .args(["-f", "-qq", "-o", "/dev/null", "-e"])
            .arg(format!("trace={syscall}"))
            .arg("-e")
            .arg(format!("inject={syscall}:signal=KILL:when={k}"))
            .arg(cli())
            .args(["attach", "--cgroup", &cgroup, "--pin-dir"])
            .arg(&o.env.pin_dir)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{when}: the upgrade was not stopped");
        // The old attachment or the new one is working meanwhile.
        o.assert_capture_works(&when);
        stdout_of(&o.attach_current());
        o.assert_upgraded(&expected, &when);
        o.assert_still_answered(late, &format!("{when}, then attached again"));
    }
}

#[test]
fn a_layout_two_back_upgrades_through_each_step() {
    if !privileged() || !history() {
        return;
    }
    let o = attached_by(TWO_BACK);
    o.assert_capture_works(&format!("attached by layout {}", TWO_BACK.0));
    stdout_of(&o.attach_current());
    o.assert_upgraded(
        &registered_afresh(TWO_BACK),
        &format!("after upgrading from layout {}", TWO_BACK.0),
    );
}

#[test]
fn the_previous_layout_upgrades_to_maps_sized_to_the_node_keeping_live_connections() {
    if !privileged() || !history() {
        return;
    }
    let o = attached_by(PREVIOUS);
    let late = o.live_connection();
    let cgroup = o.env.cgroup.to_str().unwrap().to_string();
    let sized = [
        "attach",
        "--cgroup",
        &cgroup,
        "--max-connections",
        "4096",
        "--max-pods",
        "110",
    ];
    stdout_of(&o.env.meshbpf(&sized));
    let when = format!("after upgrading from layout {} with sizes", PREVIOUS.0);
    o.assert_upgraded(&registered_afresh(PREVIOUS), &when);
    let bounds = |env: &Env| -> Vec<(String, u64)> {
        let usage = meshbpf::Mesh::open(&env.pin_dir)
            .unwrap()
            .map_usage()
            .unwrap();
        ["origin_dst_map", "cookie_map", "pod_addrs"]
            .iter()
            .map(|name| {
                let map = usage.iter().find(|m| m.name == *name).unwrap();
                (name.to_string(), map.capacity)
            })
            .collect()
    };
    let expected = vec![
        ("origin_dst_map".to_string(), 4096),
        ("cookie_map".to_string(), 110),
        ("pod_addrs".to_string(), 220),
    ];
    assert_eq!(bounds(&o.env), expected, "{when}");
    o.assert_still_answered(late, &when);
    // A later attach without sizes (the agent restarted by an older manifest) keeps them.
    stdout_of(&o.attach_current());
    assert_eq!(bounds(&o.env), expected, "attached again without sizes");
    o.assert_capture_works("attached again without sizes");
}
