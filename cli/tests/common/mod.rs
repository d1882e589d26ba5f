//! The end-to-end harness: "pods" are network namespaces joined by veth to a
//! bridge namespace, each with its own cgroup under a test cgroup that the
//! programs attach to, and processes started inside them with the right uid.
//! Everything a test makes has a unique name and is removed in `Drop`, also
//! when the test fails.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use meshbpf::Mesh;

pub mod envoy;
pub mod k8s;
pub mod manifests;
pub mod socketlb;

/// The attach types bpftool reports for meshbpf's programs, sorted: one program each.
pub const ATTACH_TYPES: [&str; 17] = [
    "cgroup_getsockopt",
    "cgroup_inet4_bind",
    "cgroup_inet4_connect",
    "cgroup_inet4_getpeername",
    "cgroup_inet4_getsockname",
    "cgroup_inet4_post_bind",
    "cgroup_inet6_bind",
    "cgroup_inet6_connect",
    "cgroup_inet6_getpeername",
    "cgroup_inet6_getsockname",
    "cgroup_inet6_post_bind",
    "cgroup_inet_sock_release",
    "cgroup_sock_ops",
    "cgroup_udp4_recvmsg",
    "cgroup_udp4_sendmsg",
    "cgroup_udp6_recvmsg",
    "cgroup_udp6_sendmsg",
];

pub const PROXY_UID: u32 = 1337;
pub const APP_UID: u32 = 1000;
/// How long the harness waits for a process or a condition: a guard against hangs, not a
/// speed goal (see [`scaled`]).
const TIMEOUT: Duration = Duration::from_secs(20);

/// A hang guard stretched by `MESHBPF_TEST_TIMEOUT_SCALE` (a whole number, 1 unless set),
/// for machines that are slow on purpose: vm/run.sh's emulated guest sets it.
pub fn scaled(timeout: Duration) -> Duration {
    static SCALE: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let scale = *SCALE.get_or_init(|| {
        std::env::var("MESHBPF_TEST_TIMEOUT_SCALE")
            .ok()
            .and_then(|s| s.parse().ok())
            .filter(|&s| s >= 1)
            .unwrap_or(1)
    });
    timeout * scale
}

/// How many times smaller the long tests run: `MESHBPF_TEST_SCALE` (a whole number, 1 unless
/// set). vm/guest.sh sets it under emulation, where full sizes do not fit CI's 90 minutes:
/// the same behaviours, checked the same way, on fewer bytes ([`scaled_size`]), fewer
/// connections ([`scaled_count`]) and fewer kill points ([`kill_points`]).
pub fn test_scale() -> u64 {
    static SCALE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *SCALE.get_or_init(|| {
        std::env::var("MESHBPF_TEST_SCALE")
            .ok()
            .and_then(|s| s.parse().ok())
            .filter(|&s| s >= 1)
            .unwrap_or(1)
    })
}

/// A transfer size: `full` divided by [`test_scale`], never below `least` (what the test
/// needs to mean anything: a path that must fill, a transfer still running when it acts).
pub fn scaled_size(full: u64, least: u64) -> u64 {
    (full / test_scale()).max(least.min(full))
}

/// A number of connections or iterations: `full` divided by [`test_scale`], at least 1.
pub fn scaled_count(full: u64) -> u64 {
    (full / test_scale()).max(1)
}

/// The points 1..=`last` a kill loop stops its command at: every one, or, when
/// [`test_scale`] is above 1, every fourth (1, 5, 9, ...) and the last, which still stops
/// it early, halfway and at the end.
pub fn kill_points(last: usize) -> Vec<usize> {
    let every = if test_scale() > 1 { 4 } else { 1 };
    let mut points: Vec<usize> = (1..=last).step_by(every).collect();
    if last > 0 && points.last() != Some(&last) {
        points.push(last);
    }
    points
}

/// Whether privileged tests can run here. Without root they are skipped (and say so), except
/// under CI, where a test that cannot run fails.
#[track_caller]
pub fn privileged() -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root && std::env::var_os("CI").is_some() {
        panic!("this end-to-end test needs root, and CI is set: it must run, not skip");
    }
    if !root {
        skip("needs root");
    }
    root
}

/// Says that the running test is skipped, and why, where it is seen: libtest keeps what a
/// passing test prints with `eprintln!`, so this writes to the process's stderr itself, and
/// a skipped test never shows as a bare `ok`.
pub fn skip(why: &str) {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("this test");
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

/// The directory cargo builds this profile's binaries into (`target/debug`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

/// The test-support workloads (test-support/src/bin/), not examples.
const HELPERS: [&str; 2] = ["netprobe", "stream"];

/// An example binary (`sidecar`: examples/, what a mesh tool would copy), built next to this
/// test binary.
#[track_caller]
pub fn example(name: &str) -> PathBuf {
    assert!(
        !HELPERS.contains(&name),
        "{name} is a test-support binary: helper({name:?})"
    );
    let path = profile_dir().join("examples").join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test` (it builds examples), or first \
         `cargo build --examples -p meshbpf`",
        path.display()
    );
    path
}

/// A workload the tests run in pods (`netprobe`, `stream`: the test-support workspace
/// member), built next to this test binary.
#[track_caller]
pub fn helper(name: &str) -> PathBuf {
    assert!(
        HELPERS.contains(&name),
        "{name} is not a test-support binary"
    );
    let path = profile_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: a plain `cargo test` builds it (test-support/); `cargo test --test \
         NAME` alone does not: run `cargo build -p meshbpf-test-support` once",
        path.display()
    );
    path
}

/// A command that runs `program` through a descriptor opened now (as root) and executed as
/// `/proc/self/fd/N`, from `/`: a process that drops to a non-root uid can then run it even
/// when the checkout sits below a directory only root may enter, such as /root.
#[track_caller]
pub fn command_via_fd(program: &Path) -> Command {
    let exe = File::open(program).unwrap_or_else(|e| panic!("opening {}: {e}", program.display()));
    let fd = exe.as_raw_fd();
    let mut cmd = Command::new(format!("/proc/self/fd/{fd}"));
    // Nor may it enter the working directory it would inherit, the checkout: HAProxy then
    // refuses to start ("Impossible to get back to initial directory"). It starts in `/`,
    // as a container's process would.
    cmd.arg0(program).current_dir("/");
    // SAFETY: one fcntl(2) on a descriptor the closure keeps open; async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            let _keep = &exe;
            // Opened close-on-exec, so no other child inherits it; this one needs it at exec.
            if nix::libc::fcntl(fd, nix::libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// The meshbpf CLI: cargo's for the tests (the cli crate's); for the benchmarks (the
/// library crate's, which share this harness) the one beside them in the target directory,
/// which scripts/bench.sh builds first.
pub fn cli() -> PathBuf {
    match option_env!("CARGO_BIN_EXE_meshbpf") {
        Some(bin) => PathBuf::from(bin),
        None => profile_dir().join("meshbpf"),
    }
}

/// The workspace's root, which holds Cargo.lock: scripts/, deploy/, target/, the git
/// history (the tests are the cli crate's, cli/tests/; the benchmarks the root's).
pub fn repo_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .ancestors()
        .find(|dir| dir.join("Cargo.lock").exists())
        .unwrap_or(manifest_dir)
        .to_path_buf()
}

#[track_caller]
pub fn sh(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[track_caller]
fn ip(args: &[&str]) {
    sh(Command::new("ip").args(args));
}

/// One test's world: a bpffs and a cgroup2 mount of its own, a test cgroup, a bridge
/// namespace, pods, and the processes started in them.
pub struct Env {
    pub id: String,
    pub root: PathBuf,
    pub bpffs: PathBuf,
    pub pin_dir: PathBuf,
    cgroup2: PathBuf,
    pub cgroup: PathBuf,
    bridge_ns: String,
    pods: Vec<String>,
    pod_cgroups: Vec<PathBuf>,
    next_host: u8,
}

impl Env {
    #[track_caller]
    pub fn new() -> Env {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let id = format!(
            "{}x{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let root = PathBuf::from(format!("/tmp/meshbpf-test-{id}"));
        let bpffs = root.join("bpf");
        let cgroup2 = root.join("cg2");
        let mut env = Env {
            cgroup: cgroup2.join(format!("meshbpf-test-{id}")),
            pin_dir: bpffs.join("mesh"),
            bridge_ns: format!("mbt-{id}-br"),
            id,
            root,
            bpffs,
            cgroup2,
            pods: Vec::new(),
            pod_cgroups: Vec::new(),
            next_host: 10,
        };
        fs::create_dir_all(&env.bpffs).unwrap();
        fs::create_dir_all(&env.cgroup2).unwrap();
        sh(Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&env.bpffs));
        // A cgroup2 mount of our own: the same hierarchy as any other, there or not.
        sh(Command::new("mount")
            .args(["-t", "cgroup2", "none"])
            .arg(&env.cgroup2));
        fs::create_dir(&env.cgroup).unwrap();
        ip(&["netns", "add", &env.bridge_ns]);
        env.pods.push(env.bridge_ns.clone());
        ip(&["-n", &env.bridge_ns, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &env.bridge_ns, "link", "set", "br0", "up"]);
        env
    }

    /// Attaches meshbpf to the test cgroup.
    #[track_caller]
    pub fn attach(&self) -> Mesh {
        Mesh::attach(&self.cgroup, &self.pin_dir).expect("attach")
    }

    /// A new pod on the bridge, with an IPv4 and an IPv6 address from documentation ranges,
    /// whose processes run under the test cgroup (where meshbpf attaches).
    #[track_caller]
    pub fn pod(&mut self, name: &str) -> Pod {
        let cgroup = self.cgroup.join(name);
        self.pod_in(name, cgroup)
    }

    /// A cgroup `name` under the test cgroup (kubelet's `kubepods`, say) for pods of its
    /// own ([`Env::pod_under`]); removed after them.
    #[track_caller]
    pub fn sub_cgroup(&mut self, name: &str) -> PathBuf {
        let cgroup = self.cgroup.join(name);
        fs::create_dir(&cgroup).unwrap();
        self.pod_cgroups.push(cgroup.clone());
        cgroup
    }

    /// [`Env::pod`] with its processes in a cgroup under `parent` (a [`Env::sub_cgroup`]).
    #[track_caller]
    pub fn pod_under(&mut self, parent: &Path, name: &str) -> Pod {
        self.pod_in(name, parent.join(name))
    }

    /// A pod whose processes run outside the test cgroup: no meshbpf program ever sees
    /// them, the "without meshbpf" baseline.
    #[track_caller]
    pub fn pod_outside(&mut self, name: &str) -> Pod {
        let cgroup = self
            .cgroup2
            .join(format!("meshbpf-test-{}-outside-{name}", self.id));
        self.pod_in(name, cgroup)
    }

    #[track_caller]
    fn pod_in(&mut self, name: &str, cgroup: PathBuf) -> Pod {
        let host = self.next_host;
        self.next_host += 1;
        let ns = format!("mbt-{}-{name}", self.id);
        ip(&["netns", "add", &ns]);
        self.pods.push(ns.clone());
        let port = format!("p{host}");
        ip(&[
            "link",
            "add",
            "eth0",
            "netns",
            &ns,
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "netns",
            &self.bridge_ns,
        ]);
        ip(&[
            "-n",
            &self.bridge_ns,
            "link",
            "set",
            &port,
            "master",
            "br0",
            "up",
        ]);
        let v4 = Ipv4Addr::new(192, 0, 2, host);
        let v6: Ipv6Addr = format!("2001:db8::{host}").parse().unwrap();
        ip(&["-n", &ns, "addr", "add", &format!("{v4}/24"), "dev", "eth0"]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{v6}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        fs::create_dir(&cgroup).unwrap();
        self.pod_cgroups.push(cgroup.clone());
        Pod {
            netns: PathBuf::from(format!("/run/netns/{ns}")),
            name: ns,
            v4,
            v6,
            cgroup,
            logs: self.root.clone(),
        }
    }

    /// A pod made by someone else (a container runtime): its network namespace at `netns`,
    /// with a new cgroup under the test cgroup for the processes the test puts in it.
    #[track_caller]
    pub fn adopt(&mut self, name: &str, netns: PathBuf, v4: Ipv4Addr) -> Pod {
        let cgroup = self.cgroup.join(name);
        fs::create_dir(&cgroup).unwrap();
        self.pod_cgroups.push(cgroup.clone());
        Pod {
            name: format!("mbt-{}-{name}", self.id),
            netns,
            v4,
            v6: Ipv6Addr::UNSPECIFIED,
            cgroup,
            logs: self.root.clone(),
        }
    }

    /// Runs the meshbpf CLI with `--pin-dir` of this env appended.
    #[track_caller]
    pub fn meshbpf(&self, args: &[&str]) -> Output {
        Command::new(cli())
            .args(args)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .output()
            .expect("run meshbpf")
    }

    /// Hooks bpftool reports attached to the test cgroup (attach type names).
    #[track_caller]
    pub fn attached_hooks(&self) -> Vec<String> {
        let out = sh(Command::new("bpftool")
            .args(["cgroup", "show"])
            .arg(&self.cgroup));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
            .collect()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for cg in self.pod_cgroups.iter().rev() {
            let _ = fs::write(cg.join("cgroup.kill"), "1");
        }
        for cg in self.pod_cgroups.iter().rev() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while fs::remove_dir(cg).is_err() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = meshbpf::detach(&self.pin_dir);
        let _ = fs::remove_dir(&self.cgroup);
        for ns in &self.pods {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        unmount(&self.bpffs);
        unmount(&self.cgroup2);
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// Unmounts this test's own mount at `path`, even while something still has it open: a
/// process of the test that is still exiting made `umount` fail "target is busy" once (on a
/// busy machine), which left the mount behind. Retried for 5 s, then detached lazily (the
/// kernel drops it when its last user goes).
fn unmount(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let Ok(out) = Command::new("umount").arg(path).output() else {
            return;
        };
        let busy = String::from_utf8_lossy(&out.stderr).contains("busy");
        if out.status.success() || !busy {
            return;
        }
        if Instant::now() >= deadline {
            let _ = Command::new("umount").arg("-l").arg(path).status();
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A pod: a network namespace with addresses, and a cgroup for its processes.
pub struct Pod {
    pub name: String,
    pub netns: PathBuf,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
    pub cgroup: PathBuf,
    logs: PathBuf,
}

impl Pod {
    pub fn ip(&self, v6: bool) -> IpAddr {
        if v6 {
            IpAddr::V6(self.v6)
        } else {
            IpAddr::V4(self.v4)
        }
    }

    /// `ip:port` as text, bracketing IPv6.
    pub fn addr(&self, v6: bool, port: u16) -> String {
        std::net::SocketAddr::new(self.ip(v6), port).to_string()
    }

    /// A command that will run inside this pod: in its netns and cgroup, as `uid`.
    #[track_caller]
    pub fn command(&self, uid: u32, program: &Path, args: &[&str]) -> Command {
        let netns = File::open(&self.netns).expect("open netns");
        let procs = fs::OpenOptions::new()
            .write(true)
            .open(self.cgroup.join("cgroup.procs"))
            .expect("open cgroup.procs");
        let mut cmd = command_via_fd(program);
        cmd.args(args);
        let (netns_fd, procs_fd): (RawFd, RawFd) = (netns.as_raw_fd(), procs.as_raw_fd());
        // SAFETY: the closure only makes async-signal-safe system calls (write, setns,
        // setgroups, setresgid, setresuid) on descriptors opened before the fork; `netns` and
        // `procs` are moved into the closure so the descriptors stay open until then.
        unsafe {
            cmd.pre_exec(move || {
                let _keep = (&netns, &procs);
                let me = b"0";
                if nix::libc::write(procs_fd, me.as_ptr().cast(), me.len()) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if nix::libc::setns(netns_fd, nix::libc::CLONE_NEWNET) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if uid != 0
                    && (nix::libc::setgroups(0, std::ptr::null()) < 0
                        || nix::libc::setresgid(uid, uid, uid) < 0
                        || nix::libc::setresuid(uid, uid, uid) < 0)
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// Starts a long-running process in the pod; its stdout goes to a log file.
    #[track_caller]
    pub fn spawn(&self, uid: u32, program: &Path, args: &[&str]) -> Proc {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let log = self.logs.join(format!(
            "{}-{}.log",
            self.name,
            SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        let out = File::create(&log).unwrap();
        let child = self
            .command(uid, program, args)
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", program.display()));
        Proc { child, log }
    }

    /// Runs a process in the pod to completion (killed after a timeout) and returns its output.
    #[track_caller]
    pub fn run(&self, uid: u32, program: &Path, args: &[&str]) -> Output {
        self.run_for(TIMEOUT, uid, program, args)
    }

    /// [`Pod::run`] with a timeout of its own ([`scaled`]), for bounded load loops.
    #[track_caller]
    pub fn run_for(&self, timeout: Duration, uid: u32, program: &Path, args: &[&str]) -> Output {
        let child = self
            .command(uid, program, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", program.display()));
        wait_with_timeout(child, scaled(timeout))
    }

    /// `netprobe connect DEST [extra...]` as the application; returns its `key=value` lines.
    #[track_caller]
    pub fn connect(&self, dest: &str, extra: &[&str]) -> Probe {
        let mut args = vec!["connect", dest];
        args.extend_from_slice(extra);
        let out = self.run(APP_UID, &helper("netprobe"), &args);
        Probe::from_output(&out)
    }

    /// Starts the sidecar stand-in as the proxy uid and waits until it listens.
    #[track_caller]
    pub fn sidecar(&self) -> Proc {
        let proc = self.spawn(PROXY_UID, &example("sidecar"), &[]);
        proc.wait_for("listening dns-udp=[::1]");
        proc
    }

    /// Starts `netprobe serve` on `addrs` as the application and waits until it listens.
    #[track_caller]
    pub fn server(&self, addrs: &[&str]) -> Proc {
        self.server_as(APP_UID, addrs)
    }

    /// Starts `netprobe serve` on `addrs` as `uid` and waits until it listens on all of them.
    #[track_caller]
    pub fn server_as(&self, uid: u32, addrs: &[&str]) -> Proc {
        let mut args = vec!["serve"];
        args.extend_from_slice(addrs);
        let proc = self.spawn(uid, &helper("netprobe"), &args);
        wait_until(
            || proc.lines("listening=").len() == addrs.len(),
            || format!("server did not listen; output:\n{}", proc.output()),
        );
        proc
    }

    /// Starts the byte-exact stream server (`test-support/src/bin/stream.rs`) on port 9000; returns it
    /// and the IPv4 address clients reach it at.
    #[track_caller]
    pub fn stream_server(&self) -> (Proc, String) {
        let proc = self.spawn(APP_UID, &helper("stream"), &["serve", "0.0.0.0:9000"]);
        proc.wait_for("listening=");
        (proc, self.addr(false, 9000))
    }

    /// `netprobe bind ADDR` as `uid`: the address bound (`bound=`) or the error (`bind_error=`).
    #[track_caller]
    pub fn bind(&self, uid: u32, addr: &str) -> String {
        let out = self.run(uid, &helper("netprobe"), &["bind", addr]);
        stdout_of(&out).trim().to_string()
    }
}

/// Polls `done` until it holds; fails the test with `why()` after the harness timeout.
#[track_caller]
pub fn wait_until(mut done: impl FnMut() -> bool, why: impl Fn() -> String) {
    let deadline = Instant::now() + scaled(TIMEOUT);
    while !done() {
        assert!(Instant::now() < deadline, "{}", why());
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[track_caller]
fn wait_with_timeout(mut child: Child, timeout: Duration) -> Output {
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "process timed out; stdout: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// dnsmasq in `pod`, answering `name` with `v4` and `v6` on port 53 of the pod's addresses
/// (`extra`: more of its flags); returned once its sockets are bound (it logs "started").
pub fn dnsmasq(pod: &Pod, name: &str, v4: &str, v6: &str, extra: &[&str]) -> Proc {
    let host_record = format!("--host-record={name},{v4},{v6}");
    let listen4 = format!("--listen-address={}", pod.v4);
    let listen6 = format!("--listen-address={}", pod.v6);
    let mut args = vec![
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--user=root",
        "--pid-file",
        "--log-facility=-",
        &listen4,
        &listen6,
        &host_record,
    ];
    args.extend_from_slice(extra);
    let dnsmasq = pod.spawn(0, Path::new("/usr/sbin/dnsmasq"), &args);
    dnsmasq.wait_for("started, version");
    dnsmasq
}

/// A process started in a pod; killed when dropped.
pub struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    pub fn output(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Lines of output that start with `prefix`.
    pub fn lines(&self, prefix: &str) -> Vec<String> {
        self.output()
            .lines()
            .filter(|l| l.starts_with(prefix))
            .map(str::to_string)
            .collect()
    }

    /// Waits until the output contains `text`; panics with the output after a timeout.
    #[track_caller]
    pub fn wait_for(&self, text: &str) {
        wait_until(
            || self.output().contains(text),
            || format!("timed out waiting for {text:?}; output:\n{}", self.output()),
        );
    }

    /// Waits until the process exits by itself.
    #[track_caller]
    pub fn wait(mut self) -> String {
        let log = self.log.clone();
        wait_until(
            || self.child.try_wait().expect("wait").is_some(),
            || {
                format!(
                    "process did not exit; output:\n{}",
                    fs::read_to_string(&log).unwrap_or_default()
                )
            },
        );
        self.output()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `key=value` lines a netprobe printed.
#[derive(Debug)]
pub struct Probe {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Probe {
    fn from_output(out: &Output) -> Probe {
        Probe {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    #[track_caller]
    pub fn get(&self, key: &str) -> String {
        let prefix = format!("{key}=");
        self.stdout
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| {
                panic!(
                    "no {key}= in output:\n{}\nstderr:\n{}",
                    self.stdout, self.stderr
                )
            })
            .to_string()
    }
}

/// Stdout of a command as text; fails the test with stderr if it did not succeed.
#[track_caller]
pub fn stdout_of(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every way a program moves bytes through a fast path, as `stream run` options: the op,
/// the flag choosing the application's method, and each method.
pub const STREAM_CASES: [(&str, &str, &[&str]); 5] = [
    (
        "upload",
        "--send",
        &["write", "writev", "sendmsg", "sendfile", "splice", "epoll"],
    ),
    (
        "download",
        "--recv",
        &["read", "small", "peek", "splice", "epoll"],
    ),
    (
        "halfclose",
        "--recv",
        &["read", "small", "peek", "splice", "epoll"],
    ),
    (
        "serverfirst",
        "--send",
        &["write", "writev", "sendfile", "splice", "epoll"],
    ),
    ("abort", "--recv", &["read", "splice", "epoll"]),
];

/// Runs every case of [`STREAM_CASES`] at sizes from 1 byte to 4 MB through `stream` (one
/// `stream run` with these options, which must succeed), checking what the stream server
/// `server` received of each serverfirst run; returns how many connections were made.
pub fn every_stream_case(server: &Proc, mut stream: impl FnMut(&[&str]) -> String) -> u64 {
    let (mut serverfirst, mut connections) = (0, 0);
    for (op, flag, methods) in STREAM_CASES {
        for method in methods {
            for size in ["1", "1000", "100000", "4000000"] {
                // Seven-byte reads of megabytes would only take long.
                if *method == "small" && size == "4000000" {
                    continue;
                }
                let out = stream(&["--op", op, "--size", size, flag, method]);
                assert!(out.starts_with("ok "), "{out}");
                connections += 1;
                if op == "serverfirst" {
                    // The server checks what it received after shutting down its side.
                    serverfirst += 1;
                    wait_until(
                        || server.lines("verdict ").len() == serverfirst,
                        || format!("server verdicts:\n{}", server.output()),
                    );
                    let last = server.lines("verdict ").pop().unwrap_or_default();
                    assert_eq!(last, format!("verdict serverfirst ok {size}"));
                }
            }
        }
    }
    connections
}

/// Writes `text` to a file in the env root.
#[track_caller]
pub fn write_file(env: &Env, name: &str, text: &str) -> PathBuf {
    let path = env.root.join(name);
    File::create(&path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .unwrap();
    path
}

/// The value of one counter.
#[track_caller]
pub fn counter(mesh: &Mesh, name: &str) -> u64 {
    mesh.counters()
        .unwrap()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
        .unwrap()
}

/// Runs `netprobe sockopts` as the proxy in `pod` on `listen`, has the application in
/// `client` connect to `dest`, and returns every getsockopt answer on the accepted socket.
#[track_caller]
pub fn probe_accepted(
    pod: &Pod,
    listen: &str,
    client: &Pod,
    dest: &str,
) -> BTreeMap<String, String> {
    let prober = pod.spawn(
        PROXY_UID,
        &helper("netprobe"),
        &["sockopts", "--listen", listen],
    );
    prober.wait_for("listening=");
    let _client = client.spawn(APP_UID, &helper("netprobe"), &["connect", dest]);
    let out = prober.wait();
    let results = probes(&out);
    assert_eq!(results.len(), 8, "{out}");
    results
}

/// `probe NAME=RESULT` lines of a `netprobe sockopts` run.
pub fn probes(output: &str) -> BTreeMap<String, String> {
    output
        .lines()
        .filter_map(|l| l.strip_prefix("probe "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of the `sockaddr_in`/`sockaddr_in6` the kernel ABI defines for `addr`.
pub fn sockaddr_hex(addr: std::net::SocketAddr) -> String {
    let mut out = Vec::new();
    match addr {
        std::net::SocketAddr::V4(v4) => {
            out.extend_from_slice(&2u16.to_ne_bytes());
            out.extend_from_slice(&v4.port().to_be_bytes());
            out.extend_from_slice(&v4.ip().octets());
            out.extend_from_slice(&[0; 8]);
        }
        std::net::SocketAddr::V6(v6) => {
            out.extend_from_slice(&10u16.to_ne_bytes());
            out.extend_from_slice(&v6.port().to_be_bytes());
            out.extend_from_slice(&[0; 4]);
            out.extend_from_slice(&v6.ip().octets());
            out.extend_from_slice(&[0; 4]);
        }
    }
    hex(&out)
}

/// Every TCP socket's receive and send buffer in a pod set up by [`pin_tcp_buffers`], in
/// bytes of kernel memory (payload plus per-packet overhead).
pub const PINNED_BUFFER: u64 = 1 << 20;

/// The largest packet a socket takes past its buffer (the kernel checks the buffer before it
/// takes a packet, not after: a sender fills one more 64 KiB GSO packet, a receiver queues
/// one), and the most one write on the flow-control tests' paths carries (the stream
/// client's and the sidecar stand-in's 64 KiB writes; a stand-in also holds one such read
/// between its two connections).
pub const PACKET: u64 = 64 << 10;

/// Pins every TCP socket's buffers in `pod`'s own netns to [`PINNED_BUFFER`]:
/// net.ipv4.tcp_rmem and tcp_wmem min = default = max, receive-buffer autotuning off. What
/// TCP lets a path hold is then a fixed quantity, not what autotuning grew each buffer to by
/// the time the path filled (that depends on the timing of the transfer, hence on the
/// machine's load).
pub fn pin_tcp_buffers(pod: &Pod) {
    let buf = PINNED_BUFFER;
    stdout_of(&pod.run(
        0,
        Path::new("/sbin/sysctl"),
        &[
            "-qw",
            &format!("net.ipv4.tcp_rmem={buf} {buf} {buf}"),
            &format!("net.ipv4.tcp_wmem={buf} {buf} {buf}"),
            "net.ipv4.tcp_moderate_rcvbuf=0",
        ],
    ));
}

/// The most payload TCP lets a writer queue into a chain of `connections` TCP connections
/// whose last reader reads nothing, every socket on it pinned by [`pin_tcp_buffers`]: each
/// connection's sending socket holds at most its send buffer and its receiving socket its
/// receive buffer, each one [`PACKET`] past it at most, and each relay between two
/// connections one read of [`PACKET`].
pub fn tcp_chain_holds(connections: u64) -> u64 {
    connections * 2 * (PINNED_BUFFER + PACKET) + (connections - 1) * PACKET
}

/// `stream run` arguments of a stalled transfer (`--op stall`): 256 MiB ([`scaled_size`],
/// never below 32 MiB, five times what a pinned path of three connections holds), the server
/// reading nothing until the client found the path full.
pub fn stall_args() -> Vec<String> {
    let size = scaled_size(256 << 20, 32 << 20).to_string();
    ["--op", "stall", "--size", &size]
        .map(String::from)
        .to_vec()
}

/// How long the flow-control tests keep the relay the application writes into (its
/// sidecar) stopped as a transfer starts: the application fills its own socket and the
/// relay's before the relay reads a byte. The first run of a fresh clone did that by itself
/// (cold caches, a loaded machine) and the count stopped at that first EAGAIN (1.26 MB where
/// the path held 6-10 MB); `stream --op stall` must count on (it waits 1 s for a full path).
pub const RELAY_LATE: Duration = Duration::from_millis(500);

/// Runs `f` with `proc` stopped (SIGSTOP) for the first `pause` of it, as if the scheduler
/// had left it off-CPU that long, as a busy machine or a cold first run does.
pub fn with_paused<T>(proc: &Proc, pause: Duration, f: impl FnOnce() -> T) -> T {
    let pid = nix::unistd::Pid::from_raw(proc.child.id() as i32);
    let signal = |s| nix::sys::signal::kill(pid, s).unwrap_or_else(|e| panic!("{s}: {e}"));
    signal(nix::sys::signal::Signal::SIGSTOP);
    std::thread::scope(|scope| {
        // Resumed by this thread even if `f` fails: the scope waits for it.
        scope.spawn(|| {
            std::thread::sleep(pause);
            signal(nix::sys::signal::Signal::SIGCONT);
        });
        f()
    })
}

/// What a stalled transfer's output says the stalled path took in before the client's
/// writes would block (`queued=`).
pub fn stalled_queue(output: &str) -> u64 {
    output
        .split_whitespace()
        .find_map(|word| word.strip_prefix("queued="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no queued= in {output}"))
}
