//! The Kubernetes pieces as a container runtime drives them: `meshbpf-cni` invoked with the
//! `CNI_*` environment and a conf on stdin, and `meshbpf agent` as a process.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

/// The plugin binary, beside `meshbpf` in the workspace's target directory: it is another
/// crate's (cni/), which `cargo build` and scripts/test.sh build, but not `cargo test` of
/// this crate alone. Refused when missing or older than its sources, never run stale.
pub fn cni_plugin() -> PathBuf {
    let bin = super::cli().with_file_name("meshbpf-cni");
    let built = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{}: {e}; run `cargo build -p meshbpf-cni`", bin.display()));
    let root = super::repo_root();
    let mut dirs = vec![root.join("cni/src"), root.join("src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t > built)
            {
                panic!(
                    "{} is older than {}; run `cargo build -p meshbpf-cni`",
                    bin.display(),
                    path.display()
                );
            }
        }
    }
    bin
}

/// What one plugin invocation printed, and how it exited.
#[derive(Debug)]
pub struct CniCall {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl CniCall {
    /// Stdout as JSON; fails the test unless stdout is exactly one JSON value.
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not one JSON value ({e}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }

    /// The CNI error code of a failed call, after checking stdout is the spec's error object.
    #[track_caller]
    pub fn error_code(&self) -> u64 {
        assert!(!self.ok, "succeeded: {self:?}");
        let json = self.json();
        let object = json.as_object().expect("error is an object");
        let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(keys, ["cniVersion", "code", "details", "msg"], "{json}");
        json["code"].as_u64().expect("numeric code")
    }

    /// The error's `msg` and `details`.
    pub fn message(&self) -> String {
        let json = self.json();
        let text = |key: &str| json[key].as_str().unwrap_or_default().to_string();
        format!("{} / {}", text("msg"), text("details"))
    }

    /// Fails the test unless the call failed with `code` and a message or details naming
    /// `text`.
    #[track_caller]
    pub fn assert_error(&self, code: u64, text: &str) {
        assert_eq!(self.error_code(), code, "{self:?}");
        let message = self.message();
        assert!(message.contains(text), "{message}");
    }

    /// Fails the test unless the call succeeded.
    #[track_caller]
    pub fn assert_ok(&self) -> &Self {
        assert!(self.ok, "plugin failed: {self:?}");
        self
    }
}

/// Runs `meshbpf-cni` with `CNI_COMMAND=command`, the other `CNI_*` variables from `vars`
/// (as `("CONTAINERID", "c1")`), and `stdin` as the conf.
#[track_caller]
pub fn cni(command: &str, vars: &[(&str, &str)], stdin: &str) -> CniCall {
    let mut cmd = Command::new(cni_plugin());
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", command)
        .env("CNI_PATH", "/opt/cni/bin");
    for (k, v) in vars {
        cmd.env(format!("CNI_{k}"), v);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run meshbpf-cni");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write conf");
    let out = child.wait_with_output().expect("wait meshbpf-cni");
    CniCall {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The netns cookies registered under `pin_dir`.
#[track_caller]
pub fn registered_cookies(pin_dir: &Path) -> Vec<u64> {
    match meshbpf::Mesh::open(pin_dir) {
        Ok(mesh) => mesh
            .pods()
            .expect("pods")
            .iter()
            .map(|p| p.netns_cookie)
            .collect(),
        Err(meshbpf::Error::NotAttached { .. }) => Vec::new(),
        Err(err) => panic!("opening {}: {err}", pin_dir.display()),
    }
}

/// The cookie of the network namespace at `path`.
#[track_caller]
pub fn cookie(path: &Path) -> u64 {
    meshbpf::Netns::open(path).expect("open netns").cookie()
}

/// The node's CNI directories, under a test's root.
pub struct CniDirs {
    pub bin: PathBuf,
    pub conf: PathBuf,
}

impl CniDirs {
    #[track_caller]
    pub fn new(root: &Path) -> CniDirs {
        let dirs = CniDirs {
            bin: root.join("cni-bin"),
            conf: root.join("net.d"),
        };
        std::fs::create_dir_all(&dirs.bin).unwrap();
        std::fs::create_dir_all(&dirs.conf).unwrap();
        dirs
    }

    /// Writes a primary network configuration (a one-plugin conflist, as a primary CNI would)
    /// into the conf dir; returns its path.
    #[track_caller]
    pub fn primary(&self) -> PathBuf {
        let path = self.conf.join("10-kindnet.conflist");
        std::fs::write(
            &path,
            r#"{"cniVersion":"1.0.0","name":"kindnet","plugins":[{"type":"ptp"}]}"#,
        )
        .unwrap();
        path
    }
}

/// `meshbpf agent` for this env's pin dir and these CNI dirs, with `plugin_conf` (JSON
/// text) as its plugin conf.
#[track_caller]
pub fn agent_command(env: &super::Env, dirs: &CniDirs, plugin_conf: &str) -> Command {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let conf = env.root.join(format!("plugin-{n}.json"));
    std::fs::write(&conf, plugin_conf).unwrap();
    let mut cmd = Command::new(super::cli());
    cmd.arg("agent")
        .arg("--pin-dir")
        .arg(&env.pin_dir)
        .arg("--cni-bin-dir")
        .arg(&dirs.bin)
        .arg("--cni-conf-dir")
        .arg(&dirs.conf)
        .arg("--plugin-conf")
        .arg(&conf);
    cmd
}

/// `meshbpf agent` running as a process of the test, for this env and these CNI dirs; its
/// stderr goes to a log file. Stopped with SIGTERM (then killed) when dropped.
pub struct Agent {
    child: Option<std::process::Child>,
    log: PathBuf,
    /// Where it serves /livez, /healthz and /metrics.
    pub addr: String,
}

impl Agent {
    /// Starts the agent with `plugin_conf` (JSON text) and extra flags, and waits until it
    /// serves HTTP (by then it has attached, installed and inserted).
    #[track_caller]
    pub fn start(env: &super::Env, dirs: &CniDirs, plugin_conf: &str, extra: &[&str]) -> Agent {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let log = env.root.join(format!("agent-{n}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = agent_command(env, dirs, plugin_conf)
            .arg("--cgroup")
            .arg(&env.cgroup)
            .arg("--plugin-binary")
            .arg(cni_plugin())
            .args(["--listen", "127.0.0.1:0"])
            // gc every second unless the test says otherwise.
            .args(if extra.contains(&"--gc-interval") {
                &[][..]
            } else {
                &["--gc-interval", "1"][..]
            })
            .args(extra)
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("start meshbpf agent");
        let mut agent = Agent {
            child: Some(child),
            log,
            addr: String::new(),
        };
        let marker = "serving /livez, /healthz and /metrics on ";
        let log_path = agent.log.clone();
        super::wait_until(
            || agent.log().contains(marker) || agent.exited(),
            || {
                format!(
                    "agent did not start serving:\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                )
            },
        );
        let log = agent.log();
        agent.addr = log
            .lines()
            .find_map(|l| l.split(marker).nth(1))
            .unwrap_or_else(|| panic!("agent exited:\n{log}"))
            .trim()
            .to_string();
        agent
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| c.try_wait().ok().flatten().is_some())
    }

    /// Waits until the log contains `text`.
    #[track_caller]
    pub fn wait_for(&self, text: &str) {
        super::wait_until(
            || self.log().contains(text),
            || format!("agent never logged {text:?}:\n{}", self.log()),
        );
    }

    /// Sends `signal` and waits for the agent to exit; returns whether it exited 0, and its log.
    #[track_caller]
    pub fn stop(mut self, signal: nix::sys::signal::Signal) -> (bool, String) {
        let mut child = self.child.take().expect("running");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, signal).expect("signal the agent");
        let status = child.wait().expect("wait for the agent");
        (status.success(), self.log())
    }

    /// GET `path` from the agent: the status code and the body.
    #[track_caller]
    pub fn get(&self, path: &str) -> (u16, String) {
        use std::io::Read;
        let mut stream = std::net::TcpStream::connect(&self.addr).expect("connect to the agent");
        write!(stream, "GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", self.addr).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("a status code");
        (code, body.to_string())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() {
                if std::time::Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
}

/// A free TCP port on loopback: for an agent's endpoint, or an outbound port no sidecar on
/// this machine listens on.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port on loopback")
        .port()
}

/// A pod running before the agent: its sidecar (the proxy uid) listens on an outbound port
/// nothing else here uses (other tests' sidecars are not this agent's to find), returned.
#[track_caller]
pub fn pod_with_running_sidecar(
    env: &mut super::Env,
    name: &str,
) -> (super::Pod, super::Proc, u16) {
    let outbound = free_port();
    let pod = env.pod(name);
    let sidecar = pod.spawn(
        super::PROXY_UID,
        &super::example("sidecar"),
        &[
            "--outbound-port",
            &outbound.to_string(),
            "--dns-port",
            "15053",
        ],
    );
    sidecar.wait_for("listening dns-udp=[::1]");
    (pod, sidecar, outbound)
}
