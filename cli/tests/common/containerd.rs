//! A real containerd (Debian's, with its CRI plugin) as a test's private container runtime,
//! driven through the Kubernetes CRI (`runtime.v1`) over gRPC as the kubelet drives it.
//!
//! Everything it keeps lives under the test's directory: its config (`version = 2`), root,
//! state, gRPC socket, CNI conf and plugin directories, IPAM state, and the sandbox image,
//! which the test builds from busybox-static and imports (nothing is pulled). containerd's
//! shims use `/run/containerd/s` and libcni caches results in `/var/lib/cni` whatever the
//! config says, so containerd runs in a mount namespace of its own with tmpfs over `/run`
//! and `/var/lib` (the network namespaces it makes under `/var/run/netns` are then only
//! visible there: the test reaches a pod's through its sandbox process), and in a network
//! namespace of its own (the node's), where the CNI bridge plugin makes its bridge. runc
//! (cgroupfs driver) makes each sandbox's and container's cgroup at the same path in every
//! hierarchy, this machine's v1 controllers and the cgroup2 one alike; the sandboxes' cgroup
//! parent is below the test cgroup meshbpf attaches to, so their sockets are the programs'
//! to see. Dropping the guard removes every sandbox through the CRI, ends containerd by
//! pid, then ends whatever it left (its shims: their command line names its socket and
//! they share its mount namespace; processes in the sandboxes' cgroups), and removes those
//! cgroups and the node's netns: also when the test fails. With no process left in it,
//! containerd's mount namespace, its tmpfs and the pods' netns mounts are gone too.
//!
//! Only tests/containerd.rs includes this file (`#[path]`), so the other test binaries do
//! not compile the gRPC client.

use std::collections::HashMap;
use std::fs::{self, File};
use std::future::Future;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerState, ContainerStatusRequest,
    CreateContainerRequest, ImageSpec, LinuxPodSandboxConfig, ListPodSandboxRequest,
    PodSandboxConfig, PodSandboxMetadata, PodSandboxStatusRequest, RemovePodSandboxRequest,
    RunPodSandboxRequest, StartContainerRequest, StopPodSandboxRequest,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use tonic::transport::{Channel, Endpoint};

use crate::common::{scaled, sh, skip, wait_until, Env};

/// The image containerd runs as every sandbox's pause container (`sandbox_image`).
pub const SANDBOX_IMAGE: &str = "meshbpf.test/pause:1";

/// Whether containerd, ctr, runc, the CNI plugins and busybox-static are here. Without them
/// the test skips, except under CI, where it fails.
pub fn containerd_available() -> bool {
    let ok = ["containerd", "ctr", "runc", "unshare", "tar"]
        .iter()
        .all(|tool| {
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        && Path::new("/usr/lib/cni/bridge").exists()
        && Path::new("/bin/busybox").exists();
    if !ok && std::env::var_os("CI").is_some() {
        panic!("containerd, runc, containernetworking-plugins or busybox-static is missing, and CI is set: run scripts/deps.sh");
    }
    if !ok {
        skip("needs containerd, runc, containernetworking-plugins and busybox-static (scripts/deps.sh installs them)");
    }
    ok
}

/// What containerd uses whatever its config says: its shims' sockets, libcni's cache.
pub const HOST_DIRS: [&str; 2] = ["/run/containerd", "/var/lib/cni"];

/// Which of [`HOST_DIRS`] the host has (seen from the test, outside containerd's mount
/// namespace).
pub fn host_dirs() -> Vec<bool> {
    HOST_DIRS.iter().map(|p| Path::new(p).exists()).collect()
}

/// A pod sandbox as the CRI reports it.
#[derive(Debug)]
pub struct Sandbox {
    pub id: String,
    /// The pause process, which holds the pod's network namespace.
    pub pid: u32,
    /// When it started (`/proc/PID/stat`), which tells it from a later process that got its
    /// pid.
    start_time: Option<u64>,
    /// The pod's IP address the CNI result gave.
    pub ip: std::net::Ipv4Addr,
    /// The network namespace path containerd handed the CNI plugins (`CNI_NETNS`), as seen
    /// in containerd's mount namespace.
    pub netns_path: String,
}

impl Sandbox {
    /// The pod's network namespace, reachable from the test.
    pub fn netns(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.pid))
    }

    /// Whether its pause process still runs.
    pub fn running(&self) -> bool {
        start_time(self.pid).is_some() && start_time(self.pid) == self.start_time
    }
}

/// A process's start time in clock ticks after boot (`/proc/PID/stat` field 22), if it runs.
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command, which may hold spaces, in parentheses: state is field 3.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// What one containerd may leave on the host, and what finds it: its process, its shims
/// (their command line names its socket, and they share its mount namespace), the
/// sandboxes' cgroups, the node's netns, mounts under its directory.
pub struct Footprint {
    /// containerd's pid and start time.
    pid: u32,
    start_time: Option<u64>,
    pub dir: PathBuf,
    socket: PathBuf,
    /// The network namespace containerd runs in (`ip netns` name).
    pub node_netns: String,
    /// The cgroupfs parent of every sandbox's cgroups.
    pub cgroup_parent: String,
    /// Which of [`HOST_DIRS`] the host had before containerd started.
    pub host_dirs_before: Vec<bool>,
    /// containerd's mount namespace, where its tmpfs over /run and /var/lib and the pods'
    /// netns mounts live, held open while this lives: nsfs inode numbers are reused at
    /// once, so once it is freed a process of another test's containerd may show the same
    /// `mnt:[INODE]` (a guard that looked for it by number killed a parallel test's
    /// `runc init`).
    mount_ns: Option<(File, PathBuf)>,
}

impl Footprint {
    /// Whether containerd still runs.
    pub fn containerd_running(&self) -> bool {
        start_time(self.pid).is_some() && start_time(self.pid) == self.start_time
    }

    /// containerd's mount namespace (`mnt:[INODE]`).
    pub fn mount_ns(&self) -> Option<&Path> {
        self.mount_ns.as_ref().map(|(_, id)| id.as_path())
    }

    /// Processes containerd left: its shims and whatever runs in the sandboxes' cgroups.
    pub fn processes(&self) -> Vec<u32> {
        let address = self.socket.to_string_lossy().into_owned();
        let mut pids: Vec<u32> = fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .filter(|pid: &u32| {
                fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&address))
                    || fs::read_link(format!("/proc/{pid}/ns/mnt"))
                        .is_ok_and(|ns| Some(ns.as_path()) == self.mount_ns())
            })
            .collect();
        for cgroup in self.cgroups() {
            let procs = fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
            pids.extend(procs.lines().filter_map(|l| l.parse::<u32>().ok()));
        }
        pids.sort();
        pids.dedup();
        pids
    }

    /// The cgroups runc made for the sandboxes still present in this machine's cgroup
    /// hierarchies, deepest first. In a cgroup v1 hierarchy runc made the whole parent
    /// path, the test cgroup's name included; in the cgroup2 one that is the test cgroup
    /// meshbpf attaches to, which [`Env`] owns, and only what is below it is runc's.
    pub fn cgroups(&self) -> Vec<PathBuf> {
        let mut found = Vec::new();
        let relative = self.cgroup_parent.trim_start_matches('/');
        let top = relative.split('/').next().unwrap_or(relative);
        for (hierarchy, cgroup2) in cgroup_hierarchies() {
            collect_dirs(
                &hierarchy.join(if cgroup2 { relative } else { top }),
                &mut found,
            );
        }
        found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        found
    }

    /// Whether the node's netns is still there.
    pub fn node_netns_exists(&self) -> bool {
        Path::new("/run/netns").join(&self.node_netns).exists()
    }

    /// The test's mounts under containerd's directory (`/proc/self/mountinfo` lines).
    pub fn mounts(&self) -> Vec<String> {
        let dir = self.dir.to_string_lossy().into_owned();
        fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&dir))
            .map(str::to_string)
            .collect()
    }

    /// A second handle on the same footprint, which keeps the mount namespace open too.
    fn try_clone(&self) -> Footprint {
        Footprint {
            pid: self.pid,
            start_time: self.start_time,
            dir: self.dir.clone(),
            socket: self.socket.clone(),
            node_netns: self.node_netns.clone(),
            cgroup_parent: self.cgroup_parent.clone(),
            host_dirs_before: self.host_dirs_before.clone(),
            mount_ns: self
                .mount_ns
                .as_ref()
                .map(|(file, id)| (file.try_clone().expect("mount ns descriptor"), id.clone())),
        }
    }
}

/// containerd running for one test; cleaned up when dropped.
pub struct Containerd {
    pub dir: PathBuf,
    footprint: Footprint,
    process: Option<Child>,
    runtime: tokio::runtime::Runtime,
    client: Option<RuntimeServiceClient<Channel>>,
    /// Each sandbox's config, which CreateContainer repeats.
    configs: HashMap<String, PodSandboxConfig>,
}

impl Containerd {
    /// Starts containerd for `env` with `conflist` as its only CNI network, imports the
    /// sandbox image and connects a CRI client.
    #[track_caller]
    pub fn start(env: &Env, conflist: &Value) -> Containerd {
        let dir = env.root.join("containerd");
        let cni_bin = dir.join("cni-bin");
        let conf_dir = dir.join("net.d");
        for d in [&cni_bin, &conf_dir, &dir.join("image")] {
            fs::create_dir_all(d).unwrap();
        }
        let plugins = ["bridge", "host-local", "loopback"]
            .map(|name| (name, Path::new("/usr/lib/cni").join(name)));
        for (name, binary) in plugins
            .into_iter()
            .chain([("meshbpf-cni", crate::common::k8s::cni_plugin())])
        {
            std::os::unix::fs::symlink(binary, cni_bin.join(name)).unwrap();
        }
        fs::write(conf_dir.join("10-mesh.conflist"), conflist.to_string()).unwrap();
        let image = sandbox_image(&dir.join("image"));
        let socket = dir.join("containerd.sock");
        // runc (cgroupfs driver) makes each sandbox's and container's cgroups at the same
        // path in every hierarchy, the unified one (cgroup2) included: below the attached
        // test cgroup, meshbpf sees their sockets.
        let attached = env
            .cgroup
            .file_name()
            .expect("test cgroup")
            .to_string_lossy();
        let cgroup_parent = format!("/{attached}/cri");
        let d = dir.display();
        fs::write(
            dir.join("config.toml"),
            format!(
                r#"version = 2
root = "{d}/root"
state = "{d}/state"
# Snapshotters that cannot work here (no btrfs, zfs, aufs or device mapper) stay quiet.
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
# Its default, /opt/containerd, is the host's.
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{SANDBOX_IMAGE}"
  systemd_cgroup = false
  # Without it runc fails: "nsexec: failed to update /proc/self/oom_score_adj".
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
    default_runtime_name = "runc"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
    SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{d}/cni-bin"
    conf_dir = "{d}/net.d"
"#
            ),
        )
        .unwrap();

        let mut guard = Containerd {
            footprint: Footprint {
                pid: 0,
                start_time: None,
                dir: dir.clone(),
                socket,
                node_netns: format!("mbt-{}-node", env.id),
                cgroup_parent,
                host_dirs_before: host_dirs(),
                mount_ns: None,
            },
            process: None,
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime"),
            client: None,
            configs: HashMap::new(),
            dir,
        };
        // Made once the guard exists, which deletes it.
        sh(Command::new("ip").args(["netns", "add", &guard.footprint.node_netns]));
        sh(Command::new("ip").args(["-n", &guard.footprint.node_netns, "link", "set", "lo", "up"]));
        guard.spawn();
        guard.ctr(&[
            "images",
            "import",
            "--snapshotter",
            "native",
            image.to_str().unwrap(),
        ]);
        let endpoint =
            Endpoint::from_shared(format!("unix://{}", guard.footprint.socket.display()))
                .expect("endpoint")
                .timeout(scaled(Duration::from_secs(60)));
        guard.client = Some(
            guard
                .runtime
                .block_on(endpoint.connect())
                .map(RuntimeServiceClient::new)
                .expect("connect to containerd's CRI socket"),
        );
        guard
    }

    /// Starts containerd in the node's netns and a mount namespace of its own, and waits
    /// for its socket.
    #[track_caller]
    fn spawn(&mut self) {
        let netns =
            File::open(format!("/run/netns/{}", self.footprint.node_netns)).expect("node netns");
        let log = File::create(self.dir.join("containerd.log")).unwrap();
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(
                "mount -t tmpfs -o mode=755 meshbpf-test /run && \
                 mount -t tmpfs -o mode=755 meshbpf-test /var/lib && \
                 exec containerd --config \"$1\"",
            )
            .arg("sh")
            .arg(self.dir.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log));
        let fd = netns.as_raw_fd();
        // SAFETY: one setns(2) on a descriptor the closure keeps open; async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                let _keep = &netns;
                if nix::libc::setns(fd, nix::libc::CLONE_NEWNET) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start containerd");
        // unshare and sh exec: the child's pid is containerd's.
        self.footprint.pid = child.id();
        self.footprint.start_time = start_time(child.id());
        self.process = Some(child);
        let (socket, log) = (
            self.footprint.socket.clone(),
            self.dir.join("containerd.log"),
        );
        wait_until(
            || socket.exists() || !self.running(),
            || {
                format!(
                    "containerd never served; log:\n{}",
                    fs::read_to_string(&log).unwrap_or_default()
                )
            },
        );
        assert!(self.running(), "containerd exited; log:\n{}", self.log());
        let ns = format!("/proc/{}/ns/mnt", self.footprint.pid);
        self.footprint.mount_ns = Some((
            File::open(&ns).expect("containerd's mount ns"),
            fs::read_link(&ns).expect("containerd's mount ns"),
        ));
    }

    /// containerd's pid.
    pub fn pid(&self) -> u32 {
        self.footprint.pid
    }

    /// What this containerd may leave behind, to look for after the guard is gone.
    pub fn footprint(&self) -> Footprint {
        self.footprint.try_clone()
    }

    /// Whether the containerd process is still running.
    pub fn running(&mut self) -> bool {
        self.process
            .as_mut()
            .is_some_and(|p| p.try_wait().ok().flatten().is_none())
    }

    /// containerd's log.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// `ctr` against this containerd, in the CRI's namespace; must succeed.
    #[track_caller]
    pub fn ctr(&self, args: &[&str]) -> String {
        let out = sh(Command::new("ctr")
            .arg("--address")
            .arg(&self.footprint.socket)
            .args(["--namespace", "k8s.io"])
            .args(args));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn client(&self) -> RuntimeServiceClient<Channel> {
        self.client.clone().expect("CRI client")
    }

    /// Runs one CRI call to completion: its response, or the error containerd answered.
    fn call<T>(
        &self,
        rpc: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, tonic::Status> {
        self.runtime.block_on(rpc).map(tonic::Response::into_inner)
    }

    /// RunPodSandbox for pod `name` of Kubernetes namespace `namespace` with `annotations`;
    /// the sandbox id, or the error containerd answered.
    pub fn run_pod(
        &mut self,
        name: &str,
        namespace: &str,
        annotations: &[(&str, &str)],
    ) -> Result<String, tonic::Status> {
        let config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.into(),
                uid: format!("uid-{name}"),
                namespace: namespace.into(),
                attempt: 0,
            }),
            hostname: name.into(),
            log_directory: self.dir.join("logs").join(name).to_string_lossy().into(),
            annotations: annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>(),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: self.footprint.cgroup_parent.clone(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let request = RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        };
        let mut client = self.client();
        let id = self.call(client.run_pod_sandbox(request))?.pod_sandbox_id;
        self.configs.insert(id.clone(), config);
        Ok(id)
    }

    /// Runs `command` in a container `name` of sandbox `sandbox` (the sandbox image, as
    /// root) until it exits: its exit code and its stdout.
    #[track_caller]
    pub fn run_container(&self, sandbox: &str, name: &str, command: &[&str]) -> (i32, String) {
        let mut client = self.client();
        let log_path = format!("{name}.log");
        let request = CreateContainerRequest {
            pod_sandbox_id: sandbox.into(),
            config: Some(ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: name.into(),
                    attempt: 0,
                }),
                image: Some(ImageSpec {
                    image: SANDBOX_IMAGE.into(),
                    ..Default::default()
                }),
                command: command.iter().map(|c| c.to_string()).collect(),
                log_path: log_path.clone(),
                ..Default::default()
            }),
            sandbox_config: self.configs.get(sandbox).cloned(),
        };
        let id = self
            .call(client.create_container(request))
            .unwrap_or_else(|status| panic!("CreateContainer {name}: {status}"))
            .container_id;
        self.call(client.start_container(StartContainerRequest {
            container_id: id.clone(),
        }))
        .unwrap_or_else(|status| {
            panic!(
                "StartContainer {name}: {status}\ncontainerd's log:\n{}",
                self.log()
            )
        });
        let mut exit_code = None;
        wait_until(
            || {
                let status = self
                    .call(client.container_status(ContainerStatusRequest {
                        container_id: id.clone(),
                        verbose: false,
                    }))
                    .ok()
                    .and_then(|r| r.status);
                exit_code = status
                    .filter(|s| s.state == ContainerState::ContainerExited as i32)
                    .map(|s| s.exit_code);
                exit_code.is_some()
            },
            || format!("container {name} never exited"),
        );
        let log = self.configs.get(sandbox).map_or_else(PathBuf::new, |c| {
            Path::new(&c.log_directory).join(&log_path)
        });
        // The CRI log format: `TIMESTAMP STREAM TAG TEXT` per line.
        let stdout = fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut fields = l.splitn(4, ' ');
                let stream = fields.nth(1)?;
                let text = fields.nth(1)?;
                (stream == "stdout").then(|| format!("{text}\n"))
            })
            .collect();
        (exit_code.unwrap_or(-1), stdout)
    }

    /// PodSandboxStatus (verbose): the sandbox's pause process, IP and netns path.
    #[track_caller]
    pub fn sandbox(&self, id: &str) -> Sandbox {
        let mut client = self.client();
        let response = self
            .call(client.pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: id.into(),
                verbose: true,
            }))
            .expect("PodSandboxStatus");
        let info: Value =
            serde_json::from_str(response.info.get("info").expect("verbose status has info"))
                .expect("info is JSON");
        let netns_path = info["runtimeSpec"]["linux"]["namespaces"]
            .as_array()
            .and_then(|all| all.iter().find(|ns| ns["type"] == "network"))
            .and_then(|ns| ns["path"].as_str())
            .unwrap_or_else(|| panic!("no network namespace in {info}"))
            .to_string();
        let ip = response
            .status
            .and_then(|s| s.network)
            .map(|n| n.ip)
            .unwrap_or_default();
        let pid = info["pid"].as_u64().expect("pid") as u32;
        Sandbox {
            id: id.into(),
            pid,
            start_time: start_time(pid),
            ip: ip.parse().unwrap_or_else(|_| panic!("pod IP {ip:?}")),
            netns_path,
        }
    }

    /// StopPodSandbox (tears the pod's network down: CNI DEL).
    pub fn stop_pod(&self, id: &str) -> Result<(), tonic::Status> {
        let mut client = self.client();
        self.call(client.stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: id.into(),
        }))
        .map(drop)
    }

    /// RemovePodSandbox.
    pub fn remove_pod(&self, id: &str) -> Result<(), tonic::Status> {
        let mut client = self.client();
        self.call(client.remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: id.into(),
        }))
        .map(drop)
    }

    /// ListPodSandbox: every sandbox's id.
    pub fn pods(&self) -> Result<Vec<String>, tonic::Status> {
        let mut client = self.client();
        self.call(client.list_pod_sandbox(ListPodSandboxRequest { filter: None }))
            .map(|r| r.items.into_iter().map(|p| p.id).collect())
    }

    /// Removes every sandbox, ends containerd and what it left, and removes the sandboxes'
    /// cgroups and the node's netns. Safe to call again.
    pub fn shut_down(&mut self) {
        if self.client.is_some() && self.running() {
            for id in self.pods().unwrap_or_default() {
                let _ = self.stop_pod(&id);
                let _ = self.remove_pod(&id);
            }
        }
        self.client = None;
        if let Some(mut child) = self.process.take() {
            let pid = Pid::from_raw(child.id() as i32);
            let _ = kill(pid, Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // Shims and pause processes of sandboxes the CRI could not remove.
        for _ in 0..50 {
            let left = self.footprint.processes();
            if left.is_empty() {
                break;
            }
            for pid in left {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for cgroup in self.footprint.cgroups() {
            let _ = fs::remove_dir(&cgroup);
        }
        if self.footprint.node_netns_exists() {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.footprint.node_netns])
                .status();
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// The cgroup hierarchies mounted under /sys/fs/cgroup (v1 controllers and a cgroup2
/// beside them, or a cgroup2 at /sys/fs/cgroup itself), each with whether it is cgroup2.
fn cgroup_hierarchies() -> Vec<(PathBuf, bool)> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mountinfo
        .lines()
        .filter_map(|line| {
            let (mount, source) = line.split_once(" - ")?;
            let point = mount.split(' ').nth(4)?;
            let fstype = source.split(' ').next()?;
            (point.starts_with("/sys/fs/cgroup") && fstype.starts_with("cgroup"))
                .then(|| (PathBuf::from(point), fstype == "cgroup2"))
        })
        .collect()
}

/// `dir` and every directory below it, if it exists.
fn collect_dirs(dir: &Path, found: &mut Vec<PathBuf>) {
    if !dir.is_dir() {
        return;
    }
    found.push(dir.to_path_buf());
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            collect_dirs(&entry.path(), found);
        }
    }
}

/// Builds the sandbox image in `dir` as a docker-archive tar (what `ctr images import`
/// reads): one layer holding busybox-static (sh, sleep, wget), whose entrypoint sleeps;
/// returns its path. The pods' containers run it too, with a command of their own.
fn sandbox_image(dir: &Path) -> PathBuf {
    let rootfs = dir.join("rootfs");
    for d in ["bin", "proc", "sys", "dev", "etc", "tmp"] {
        fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    for applet in ["sh", "sleep", "wget"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    let layer = dir.join("layer.tar");
    sh(Command::new("tar")
        .arg("--create")
        .arg("--file")
        .arg(&layer)
        .arg("--directory")
        .arg(&rootfs)
        .arg("."));
    let digest = sh(Command::new("sha256sum").arg(&layer));
    let digest = String::from_utf8_lossy(&digest.stdout);
    let digest = digest.split_whitespace().next().expect("sha256sum output");
    let config = serde_json::json!({
        "architecture": goarch(),
        "os": "linux",
        "config": {"Entrypoint": ["/bin/sleep", "86400"]},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{digest}")]},
    });
    fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let manifest = serde_json::json!([{
        "Config": "config.json",
        "RepoTags": [SANDBOX_IMAGE],
        "Layers": ["layer.tar"],
    }]);
    fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    let image = dir.join("image.tar");
    sh(Command::new("tar")
        .arg("--create")
        .arg("--file")
        .arg(&image)
        .arg("--directory")
        .arg(dir)
        .args(["manifest.json", "config.json", "layer.tar"]));
    image
}

/// This machine's architecture as OCI images name it.
fn goarch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => panic!("no OCI architecture name for {other}"),
    }
}
