//! The Kubernetes pieces as a container runtime drives them: `meshbpf-cni` invoked with the
//! `CNI_*` environment and a conf on stdin, and `meshbpf agent` as a process.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

/// The plugin binary cargo built for these tests.
pub fn cni_plugin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_meshbpf-cni"))
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
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not one JSON value ({e}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }

    /// The CNI error code of a failed call, after checking stdout is the spec's error object.
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

    /// Fails the test unless the call succeeded.
    pub fn assert_ok(&self) -> &Self {
        assert!(self.ok, "plugin failed: {self:?}");
        self
    }
}

/// Runs `meshbpf-cni` with `CNI_COMMAND=command`, the other `CNI_*` variables from `vars`
/// (as `("CONTAINERID", "c1")`), and `stdin` as the conf.
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
pub fn cookie(path: &Path) -> u64 {
    meshbpf::Netns::open(path).expect("open netns").cookie()
}
