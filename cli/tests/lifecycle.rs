//! attach / detach: idempotent, all or nothing, and leaving nothing behind.

mod common;

use std::fs;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};

use common::*;
use libbpf_rs::libbpf_sys;

fn sorted_hooks(env: &Env) -> Vec<String> {
    let mut hooks = env.attached_hooks();
    hooks.sort();
    hooks
}

fn bpffs_entries(env: &Env) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(&env.bpffs)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.retain(|n| n != "maps.debug" && n != "progs.debug");
    names
}

#[test]
fn detach_stops_capture_and_removes_every_pin() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    let mesh = env.attach();
    let client = env.pod("client");
    let server = env.pod("server");
    let _server = server.server(&["0.0.0.0:8080"]);
    mesh.register_netns(&client.netns, &meshbpf::PodSettings::default())
        .unwrap();
    let sidecar = client.sidecar();
    let dest = server.addr(false, 8080);
    assert!(client
        .connect(&dest, &[])
        .get("local")
        .starts_with("127.0.0.1:"));
    assert_eq!(sorted_hooks(&env), ATTACH_TYPES);

    let out = env.meshbpf(&["detach"]);
    assert!(stdout_of(&out).contains("detached"));

    assert!(!env.pin_dir.exists());
    assert!(bpffs_entries(&env).is_empty(), "{:?}", bpffs_entries(&env));
    assert!(
        env.attached_hooks().is_empty(),
        "{:?}",
        env.attached_hooks()
    );
    let after = client.connect(&dest, &[]);
    assert!(
        after.get("local").starts_with(&client.v4.to_string()),
        "{after:?}"
    );
    assert_eq!(sidecar.lines("outbound ").len(), 1);
    // Detaching again is not an error: there is nothing left to do.
    assert!(stdout_of(&env.meshbpf(&["detach"])).contains("nothing attached"));
}

#[test]
fn attach_twice_keeps_one_set_of_programs_and_the_registered_pods() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    let cgroup = env.cgroup.to_str().unwrap().to_string();
    stdout_of(&env.meshbpf(&["attach", "--cgroup", &cgroup]));
    let client = env.pod("client");
    let server = env.pod("server");
    let _server = server.server(&["0.0.0.0:8080"]);
    stdout_of(&env.meshbpf(&["register", "--netns", client.netns.to_str().unwrap()]));
    let before = meshbpf::Mesh::open(&env.pin_dir).unwrap().status().unwrap();

    stdout_of(&env.meshbpf(&["attach", "--cgroup", &cgroup]));

    assert_eq!(sorted_hooks(&env), ATTACH_TYPES);
    let after = meshbpf::Mesh::open(&env.pin_dir).unwrap().status().unwrap();
    assert_eq!(after.pods, before.pods);
    for (old, new) in before.programs.iter().zip(&after.programs) {
        assert_eq!(
            old.link_id, new.link_id,
            "{} got a new link instead of an in-place update",
            old.hook
        );
        assert_ne!(old.prog_id, new.prog_id, "{} was not replaced", old.hook);
    }
    let sidecar = client.sidecar();
    assert_eq!(
        client.connect(&server.addr(false, 8080), &[]).get("peer"),
        server.addr(false, 8080)
    );
    assert_eq!(sidecar.lines("outbound ").len(), 1);
}

#[test]
fn attach_to_another_cgroup_with_the_same_pin_dir_is_refused() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    let _mesh = env.attach();
    let other = env.pod("other");
    let err = meshbpf::Mesh::attach(&other.cgroup, &env.pin_dir).unwrap_err();
    assert!(
        matches!(err, meshbpf::Error::AttachedElsewhere { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("detach it first"), "{err}");
}

/// Loads `r0 = 1; exit` as a cgroup/connect6 program and attaches it exclusively (no
/// BPF_F_ALLOW_MULTI): every later attach to that hook of that cgroup fails.
struct ExclusiveConnect6 {
    prog_fd: i32,
    cgroup: fs::File,
}

impl ExclusiveConnect6 {
    fn attach(cgroup: &std::path::Path) -> Self {
        let cgroup = fs::File::open(cgroup).unwrap();
        let insns = [
            // BPF_ALU64 | BPF_MOV | BPF_K, dst r0, imm 1
            libbpf_sys::bpf_insn {
                code: 0xb7,
                _bitfield_align_1: [],
                _bitfield_1: libbpf_sys::bpf_insn::new_bitfield_1(0, 0),
                off: 0,
                imm: 1,
            },
            // BPF_JMP | BPF_EXIT
            libbpf_sys::bpf_insn {
                code: 0x95,
                _bitfield_align_1: [],
                _bitfield_1: libbpf_sys::bpf_insn::new_bitfield_1(0, 0),
                off: 0,
                imm: 0,
            },
        ];
        let mut opts = libbpf_sys::bpf_prog_load_opts {
            sz: std::mem::size_of::<libbpf_sys::bpf_prog_load_opts>() as _,
            expected_attach_type: libbpf_sys::BPF_CGROUP_INET6_CONNECT,
            ..Default::default()
        };
        // SAFETY: the instruction array and options outlive the call; names are NUL-terminated.
        let prog_fd = unsafe {
            libbpf_sys::bpf_prog_load(
                libbpf_sys::BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
                c"blocker".as_ptr(),
                c"GPL".as_ptr(),
                insns.as_ptr(),
                insns.len() as _,
                &mut opts,
            )
        };
        assert!(prog_fd >= 0, "loading the blocker: {prog_fd}");
        // SAFETY: both descriptors are valid; flags 0 = exclusive attach.
        let ret = unsafe {
            libbpf_sys::bpf_prog_attach(
                prog_fd,
                cgroup.as_raw_fd(),
                libbpf_sys::BPF_CGROUP_INET6_CONNECT,
                0,
            )
        };
        assert_eq!(ret, 0, "attaching the blocker");
        ExclusiveConnect6 { prog_fd, cgroup }
    }
}

impl Drop for ExclusiveConnect6 {
    fn drop(&mut self) {
        // SAFETY: detaching and closing descriptors this struct owns.
        unsafe {
            libbpf_sys::bpf_prog_detach2(
                self.prog_fd,
                self.cgroup.as_raw_fd(),
                libbpf_sys::BPF_CGROUP_INET6_CONNECT,
            );
            nix::libc::close(self.prog_fd);
        }
    }
}

#[test]
fn a_failure_halfway_through_attach_leaves_nothing_attached_or_pinned() {
    if !privileged() {
        return;
    }
    let env = Env::new();
    let blocker = ExclusiveConnect6::attach(&env.cgroup);
    assert_eq!(env.attached_hooks(), ["cgroup_inet6_connect"]);

    let out = env.meshbpf(&["attach", "--cgroup", env.cgroup.to_str().unwrap()]);

    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("attaching connect6"), "{stderr}");
    // connect4 was attached before connect6 failed: it must be gone again, and nothing pinned.
    assert_eq!(env.attached_hooks(), ["cgroup_inet6_connect"]);
    assert!(bpffs_entries(&env).is_empty(), "{:?}", bpffs_entries(&env));
    drop(blocker);
    // With the obstacle gone the same command succeeds.
    stdout_of(&env.meshbpf(&["attach", "--cgroup", env.cgroup.to_str().unwrap()]));
    assert_eq!(sorted_hooks(&env), ATTACH_TYPES);
}

/// A registered pod with its sidecar, and a stream server in another pod.
struct Loaded {
    env: Env,
    mesh: meshbpf::Mesh,
    pod: Pod,
    sidecar: Proc,
    dest: String,
    _server: Proc,
}

fn loaded() -> Loaded {
    let mut env = Env::new();
    let mesh = env.attach();
    let pod = env.pod("app");
    let server_pod = env.pod("server");
    let (server, dest) = server_pod.stream_server();
    mesh.register_netns(&pod.netns, &meshbpf::PodSettings::default())
        .unwrap();
    let sidecar = pod.sidecar();
    Loaded {
        dest,
        env,
        mesh,
        pod,
        sidecar,
        _server: server,
    }
}

#[test]
fn upgrading_under_load_fails_no_connection_and_lets_none_escape() {
    if !privileged() {
        return;
    }
    let l = loaded();
    let cgroup = l.env.cgroup.to_str().unwrap().to_string();
    let load = l.pod.spawn(
        APP_UID,
        &helper("stream"),
        &[
            "run",
            &l.dest,
            "--op",
            "upload",
            "--size",
            "2000",
            "--parallel",
            "4",
            "--count",
            "400",
        ],
    );
    // Replace every program in place, repeatedly, while connections keep coming.
    for _ in 0..6 {
        stdout_of(&l.env.meshbpf(&["attach", "--cgroup", &cgroup]));
    }
    let out = load.wait();
    assert_eq!(
        out.lines()
            .filter(|l| l.ends_with("connections=400"))
            .count(),
        4,
        "{out}"
    );
    assert!(!out.contains("fail"), "{out}");
    // Every one of the 1,600 connections went through the sidecar.
    assert_eq!(counter(&l.mesh, "connect_redirected"), 1600);
    assert_eq!(l.sidecar.lines("outbound ").len(), 1600);
    let mut hooks = l.env.attached_hooks();
    hooks.sort();
    assert_eq!(hooks, ATTACH_TYPES);
}

#[test]
fn an_attachment_of_another_map_layout_is_refused_with_the_fix() {
    if !privileged() {
        return;
    }
    let env = Env::new();
    let _mesh = env.attach();
    // Pretend an older meshbpf pinned these maps.
    let meta = libbpf_rs::MapHandle::from_pinned_path(env.pin_dir.join("maps/meta_map")).unwrap();
    use libbpf_rs::MapCore;
    let mut value = meta
        .lookup(&0u32.to_ne_bytes(), libbpf_rs::MapFlags::ANY)
        .unwrap()
        .unwrap();
    value[..4].copy_from_slice(&1u32.to_ne_bytes());
    meta.update(&0u32.to_ne_bytes(), &value, libbpf_rs::MapFlags::ANY)
        .unwrap();

    let out = env.meshbpf(&["attach", "--cgroup", env.cgroup.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("map layout 1") && stderr.contains("meshbpf detach"),
        "{stderr}"
    );
    // detach still cleans it all up.
    stdout_of(&env.meshbpf(&["detach"]));
    assert!(bpffs_entries(&env).is_empty());
    assert!(env.attached_hooks().is_empty());
}

#[test]
fn a_pinned_map_of_another_shape_is_refused_by_name_and_the_programs_stay() {
    if !privileged() {
        return;
    }
    let env = Env::new();
    let mesh = env.attach();
    let links_before = mesh.status().unwrap().programs;
    // Same layout number, one map of another shape: what a build with other maps leaves.
    let map = env.pin_dir.join("maps/origin_dst_map");
    fs::remove_file(&map).unwrap();
    sh(Command::new("bpftool")
        .args(["map", "create"])
        .arg(&map)
        .args([
            "type", "hash", "key", "4", "value", "4", "entries", "1", "name", "other",
        ]));

    let out = env.meshbpf(&["attach", "--cgroup", env.cgroup.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("origin_dst_map differs") && stderr.contains("meshbpf detach"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("CAP_BPF") && !stderr.contains("verifier"),
        "{stderr}"
    );
    // Nothing was replaced.
    assert_eq!(mesh.status().unwrap().programs, links_before);
    stdout_of(&env.meshbpf(&["detach"]));
    assert!(env.attached_hooks().is_empty());
}

#[test]
fn killing_attach_register_or_detach_at_any_moment_leaves_a_state_the_next_call_repairs() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    let pod = env.pod("pod");
    let cgroup = env.cgroup.to_str().unwrap().to_string();
    let netns = pod.netns.to_str().unwrap().to_string();
    for i in 0u64..18 {
        // Attach, register or detach, killed after 0 to 50 ms (spread, not random: repeatable).
        let verb: Vec<&str> = match i % 3 {
            0 => vec!["attach", "--cgroup", &cgroup],
            1 => vec!["register", "--netns", &netns],
            _ => vec!["detach"],
        };
        let mut child = Command::new(cli())
            .args(&verb)
            .arg("--pin-dir")
            .arg(&env.pin_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis((i * 37) % 51));
        let _ = child.kill();
        let _ = child.wait();

        // The next attach repairs whatever was left: one set of programs, all pinned.
        stdout_of(&env.meshbpf(&["attach", "--cgroup", &cgroup]));
        assert_eq!(sorted_hooks(&env), ATTACH_TYPES, "after killing {verb:?}");
        meshbpf::Mesh::open(&env.pin_dir).unwrap().status().unwrap();
        if i % 2 == 1 {
            stdout_of(&env.meshbpf(&["detach"]));
            assert!(
                bpffs_entries(&env).is_empty(),
                "after killing {verb:?}: {:?}",
                bpffs_entries(&env)
            );
            assert!(env.attached_hooks().is_empty());
        }
    }
}

#[test]
fn detach_leaves_existing_connections_working() {
    if !privileged() {
        return;
    }
    let l = loaded();
    // Both kinds of live connection: on the normal stack, and on the sockmap fast path.
    let fast = meshbpf::PodSettings {
        sockmap: true,
        sockmap_min_bytes: 0,
        ..Default::default()
    };
    let run = |size: &str| {
        let args = [
            "run",
            &l.dest,
            "--op",
            "pingpong",
            "--size",
            size,
            "--parallel",
            "4",
            "--duration",
            "3",
        ];
        l.pod.spawn(APP_UID, &helper("stream"), &args)
    };
    let plain = run("100");
    // Registered again: connections from now on take the fast path.
    wait_until(
        || counter(&l.mesh, "connect_redirected") >= 4,
        || "no plain connection yet".into(),
    );
    l.mesh.register_netns(&l.pod.netns, &fast).unwrap();
    let accelerated = run("100");
    // Detach while both runs are under way (however slow this machine is to start them).
    wait_until(
        || counter(&l.mesh, "sockmap_msg_redirected") > 0,
        || "nothing accelerated yet".into(),
    );
    stdout_of(&l.env.meshbpf(&["detach"]));
    for out in [plain.wait(), accelerated.wait()] {
        assert!(
            out.contains("summary op=pingpong") && !out.contains("fail"),
            "{out}"
        );
    }
    // New connections are no longer captured.
    let probe = l.pod.connect(&l.dest, &[]);
    assert!(
        probe.stdout.contains(&format!("local={}:", l.pod.v4)),
        "{probe:?}"
    );
}

#[test]
fn gc_drops_pods_whose_netns_is_gone_and_a_recreated_netns_registers_anew() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    let mesh = env.attach();
    let keep = env.pod("keep");
    let gone = env.pod("gone");
    mesh.register_netns(&keep.netns, &meshbpf::PodSettings::default())
        .unwrap();
    let old = mesh
        .register_netns(&gone.netns, &meshbpf::PodSettings::default())
        .unwrap();
    // Nothing runs in `gone`: deleting its name is the end of the namespace.
    sh(Command::new("ip").args(["netns", "del", &gone.name]));

    let out: serde_json::Value =
        serde_json::from_str(&stdout_of(&env.meshbpf(&["gc", "--json"]))).unwrap();
    assert_eq!(out.as_array().unwrap().len(), 1, "{out}");
    assert_eq!(out[0]["netns_cookie"], old.netns_cookie);
    let pods = mesh.pods().unwrap();
    assert_eq!(pods.len(), 1);
    assert_eq!(
        pods[0].netns_inode,
        meshbpf::Netns::open(&keep.netns).unwrap().inode().unwrap()
    );
    // Nothing else is dead: a second gc removes nothing.
    assert!(mesh.gc().unwrap().is_empty());

    sh(Command::new("ip").args(["netns", "add", &gone.name]));
    let new = mesh
        .register_netns(&gone.netns, &meshbpf::PodSettings::default())
        .unwrap();
    assert_ne!(new.netns_cookie, old.netns_cookie);
    assert_eq!(mesh.pods().unwrap().len(), 2);
}

#[test]
fn concurrent_registrations_from_separate_processes_lose_nothing() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    let mesh = env.attach();
    let pods: Vec<Pod> = (0..16).map(|i| env.pod(&format!("p{i}"))).collect();
    // Runs one CLI process per argument list, all at once; every one must succeed.
    let all_at_once = |commands: Vec<Vec<String>>| {
        std::thread::scope(|s| {
            let running: Vec<_> = commands
                .into_iter()
                .map(|args| {
                    s.spawn(|| {
                        Command::new(cli())
                            .args(args)
                            .arg("--pin-dir")
                            .arg(&env.pin_dir)
                            .output()
                    })
                })
                .collect();
            for run in running {
                let out = run.join().unwrap().unwrap();
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        })
    };
    let register = |p: &Pod, port: &str| -> Vec<String> {
        let netns = p.netns.to_str().unwrap().to_string();
        [
            "register",
            "--netns",
            &netns,
            "--exclude-outbound-ports",
            port,
        ]
        .map(String::from)
        .to_vec()
    };
    all_at_once(pods.iter().map(|p| register(p, "9999")).collect());
    assert_eq!(mesh.pods().unwrap().len(), 16);
    // Half unregister while the other half re-register with other settings, all at once.
    all_at_once(
        pods.iter()
            .enumerate()
            .map(|(i, p)| match i % 2 {
                0 => ["unregister", "--netns", p.netns.to_str().unwrap()]
                    .map(String::from)
                    .to_vec(),
                _ => register(p, "8888"),
            })
            .collect(),
    );
    let left = mesh.pods().unwrap();
    assert_eq!(left.len(), 8);
    assert!(
        left.iter()
            .all(|p| p.settings.exclude_outbound_ports == [8888].into()),
        "{left:?}"
    );
}

#[test]
fn pins_are_readable_by_root_only() {
    if !privileged() {
        return;
    }
    let env = Env::new();
    let _mesh = env.attach();
    let mut seen = 0;
    let mut stack = vec![env.pin_dir.clone()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            use std::os::unix::fs::MetadataExt;
            assert_eq!(
                meta.mode() & 0o077,
                0,
                "{} is open to others: {:o}",
                entry.path().display(),
                meta.mode()
            );
            assert_eq!(meta.uid(), 0);
            if meta.is_dir() {
                stack.push(entry.path());
            }
            seen += 1;
        }
    }
    assert!(seen > 10, "{seen}");
}

#[test]
fn a_pod_cannot_read_another_pod_s_original_destination() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    let mesh = env.attach();
    let a = env.pod("a");
    let b = env.pod("b");
    let server = env.pod("server");
    let _srv = server.server(&["0.0.0.0:8080"]);
    for p in [&a, &b] {
        mesh.register_netns(&p.netns, &meshbpf::PodSettings::default())
            .unwrap();
    }
    // Pod A: a captured connection 127.0.0.1:40000 -> 127.0.0.1:15001, held open.
    let holder = a.spawn(
        PROXY_UID,
        &helper("netprobe"),
        &["sockopts", "--listen", "127.0.0.1:15001", "--hold"],
    );
    holder.wait_for("listening=");
    let _app = a.spawn(
        APP_UID,
        &helper("netprobe"),
        &[
            "connect",
            &server.addr(false, 8080),
            "--bind",
            "0.0.0.0:40000",
        ],
    );
    holder.wait_for("probes done");
    assert!(
        holder.output().contains("probe original_dst=ok:"),
        "{}",
        holder.output()
    );
    // Pod B: the very same 4-tuple, not captured; its proxy asks for the original destination.
    let prober = b.spawn(
        PROXY_UID,
        &helper("netprobe"),
        &["sockopts", "--listen", "127.0.0.1:15001"],
    );
    prober.wait_for("listening=");
    let _direct = b.spawn(
        APP_UID,
        &helper("netprobe"),
        &["connect", "127.0.0.1:15001", "--bind", "0.0.0.0:40000"],
    );
    let out = prober.wait();
    assert!(out.contains("accepted peer=127.0.0.1:40000"), "{out}");
    assert!(
        out.contains("probe original_dst=err:"),
        "pod B learned pod A's destination:\n{out}"
    );
}

/// A registered pod with its sidecar, and a server answering on 8080 and 8081.
struct TwoPorts {
    env: Env,
    mesh: meshbpf::Mesh,
    pod: Pod,
    server: Pod,
    _server: Proc,
    _sidecar: Proc,
}

fn two_ports() -> TwoPorts {
    let mut env = Env::new();
    let mesh = env.attach();
    let pod = env.pod("app");
    let server = env.pod("server");
    let server_proc = server.server(&["0.0.0.0:8080", "0.0.0.0:8081"]);
    let sidecar = pod.sidecar();
    TwoPorts {
        env,
        mesh,
        pod,
        server,
        _server: server_proc,
        _sidecar: sidecar,
    }
}

impl TwoPorts {
    fn register_excluding(&self, port: &str) -> Vec<String> {
        [
            "register",
            "--netns",
            self.pod.netns.to_str().unwrap(),
            "--exclude-outbound-ports",
            port,
        ]
        .map(String::from)
        .to_vec()
    }

    /// Which of 8080 and 8081 a new connection is captured to, and which port the pod's
    /// listed exclusion is: one list is in force, never a mix of two.
    fn excluded_port(&self, when: &str) -> u16 {
        let captured = |port: u16| {
            let probe = self.pod.connect(&self.server.addr(false, port), &[]);
            assert!(probe.ok, "{when}: {probe:?}");
            probe.get("local").starts_with("127.0.0.1:")
        };
        let pods = self.mesh.pods().unwrap();
        assert_eq!(pods.len(), 1, "{when}");
        let listed: Vec<u16> = pods[0]
            .settings
            .exclude_outbound_ports
            .iter()
            .copied()
            .collect();
        let seen = match (captured(8080), captured(8081)) {
            (false, true) => 8080,
            (true, false) => 8081,
            other => panic!("{when}: captured (8080, 8081) = {other:?}: a mix of two lists"),
        };
        assert_eq!(
            listed,
            [seen],
            "{when}: the data path and the listing disagree"
        );
        seen
    }
}

#[test]
fn a_register_killed_at_any_point_leaves_the_old_lists_or_the_new_never_a_mix() {
    if !privileged() {
        return;
    }
    let w = two_ports();
    stdout_of(
        &w.env.meshbpf(
            &w.register_excluding("8080")
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        ),
    );
    // How many bpf(2) calls one re-register makes.
    let calls = bpf_calls(&w, &w.register_excluding("8080"));
    assert!(calls > 5, "{calls}");

    let mut from = "8080";
    for k in kill_points(calls) {
        let to = if from == "8080" { "8081" } else { "8080" };
        let when = format!("re-register {from}->{to} killed at bpf #{k}");
        killed_at(&w, &w.register_excluding(to), k, &when);
        let now = w.excluded_port(&when);
        from = if now == 8080 { "8080" } else { "8081" };
    }
    // Whatever the kills left behind is unused, and goes with the next register or gc.
    stdout_of(
        &w.env.meshbpf(
            &w.register_excluding("8081")
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        ),
    );
    assert_eq!(w.excluded_port("at the end"), 8081);
}

/// The bpf(2) calls `meshbpf ARGS` makes, counted with strace.
fn bpf_calls(w: &TwoPorts, args: &[String]) -> usize {
    let log = w.env.root.join("calls.strace");
    sh(Command::new("strace")
        .args(["-f", "-qq", "-e", "trace=bpf", "-o"])
        .arg(&log)
        .arg(cli())
        .args(args)
        .arg("--pin-dir")
        .arg(&w.env.pin_dir));
    fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter(|l| l.contains("bpf("))
        .count()
}

/// `meshbpf ARGS` killed at its `k`th bpf(2) call.
fn killed_at(w: &TwoPorts, args: &[String], k: usize, when: &str) {
    let out = Command::new("strace")
        .args(["-f", "-qq", "-o", "/dev/null", "-e", "trace=bpf", "-e"])
        .arg(format!("inject=bpf:signal=KILL:when={k}"))
        .arg(cli())
        .args(args)
        .arg("--pin-dir")
        .arg(&w.env.pin_dir)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{when}: not stopped");
}

/// A pod registered for the first time skips the pass over the list maps that a
/// re-register makes (register's time must not grow with the pods registered): what a
/// first register or an unregister stopped half-way left must still be found and removed,
/// or the leftovers of the lists' first generation would apply to the next one.
#[test]
fn a_first_register_or_an_unregister_killed_at_any_point_leaves_nothing_the_next_register_applies()
{
    if !privileged() {
        return;
    }
    let w = two_ports();
    let netns = w.pod.netns.to_str().unwrap().to_string();
    let unregister: Vec<String> = ["unregister", "--netns", &netns].map(String::from).to_vec();
    let register = |port: &str| {
        let args = w.register_excluding(port);
        stdout_of(
            &w.env
                .meshbpf(&args.iter().map(String::as_str).collect::<Vec<_>>()),
        );
    };
    let unregistered = || {
        stdout_of(
            &w.env
                .meshbpf(&unregister.iter().map(String::as_str).collect::<Vec<_>>()),
        );
    };
    let first_register = bpf_calls(&w, &w.register_excluding("8080"));
    let unregister_calls = bpf_calls(&w, &unregister);
    assert!(
        first_register > 5 && unregister_calls > 3,
        "{first_register} {unregister_calls}"
    );
    for k in kill_points(first_register) {
        let when = format!("a first register killed at bpf #{k}, then a register");
        killed_at(&w, &w.register_excluding("8080"), k, &when);
        register("8081");
        assert_eq!(w.excluded_port(&when), 8081, "{when}");
        unregistered();
    }
    for k in kill_points(unregister_calls) {
        let when = format!("an unregister killed at bpf #{k}, then a register");
        register("8080");
        killed_at(&w, &unregister, k, &when);
        register("8081");
        assert_eq!(w.excluded_port(&when), 8081, "{when}");
        unregistered();
    }
}

#[test]
fn concurrent_registers_of_one_pod_leave_one_of_their_lists() {
    if !privileged() {
        return;
    }
    let w = two_ports();
    std::thread::scope(|s| {
        for port in ["8080", "8081"] {
            let w = &w;
            s.spawn(move || {
                for _ in 0..25 {
                    let out = Command::new(cli())
                        .args(w.register_excluding(port))
                        .arg("--pin-dir")
                        .arg(&w.env.pin_dir)
                        .output()
                        .unwrap();
                    assert!(
                        out.status.success(),
                        "{}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            });
        }
    });
    w.excluded_port("after 50 concurrent registers");
}
