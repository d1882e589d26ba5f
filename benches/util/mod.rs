//! Shared by the benchmarks: reading the load generators' result lines, summing up runs,
//! CPU time of pods, the machine's description, and the parts of `compare` that live in
//! their own files (production proxy, BPF program cost, map memory, the plot).
#![allow(dead_code)]

pub mod bpf_stats;
pub mod http;
pub mod memory;
pub mod plot;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{stdout_of, Pod};

/// `key=value` from a result line (`stream run`, or the wrk script's); NaN when the line
/// has no such key.
pub fn field(line: &str, key: &str) -> f64 {
    let prefix = format!("{key}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&prefix))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// The median of some runs (NaN for none).
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// CPU time (user + system, µs) spent so far by every process that ever ran in these pods'
/// cgroups: the cgroup v2 `cpu.stat` that exists with or without the cpu controller. Unlike
/// the machine's /proc/stat, other work on the machine does not count.
pub fn cpu_us(pods: &[&Pod]) -> f64 {
    pods.iter()
        .map(|pod| {
            let stat = std::fs::read_to_string(pod.cgroup.join("cpu.stat")).unwrap_or_default();
            stat.lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(f64::NAN)
        })
        .sum()
}

/// Per-pod sysctls (this pod's netns only) so that tens of thousands of short connections
/// do not run out of ephemeral ports: every mode gets the same.
pub fn tune(pod: &Pod) {
    for kv in [
        "net.ipv4.ip_local_port_range=1024 65000",
        "net.ipv4.tcp_tw_reuse=1",
    ] {
        stdout_of(&pod.run(0, Path::new("/sbin/sysctl"), &["-qw", kv]));
    }
}

/// TCP connections the pod's network namespace has accepted so far (`PassiveOpens`).
pub fn passive_opens(pod: &Pod) -> f64 {
    let snmp = in_netns(pod, &["cat", "/proc/net/snmp"]);
    let tcp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Tcp:")).collect();
    let (Some(names), Some(values)) = (tcp.first(), tcp.get(1)) else {
        return f64::NAN;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "PassiveOpens")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Output of a command in the pod's network namespace (as root, in the bench's cgroup).
pub fn in_netns(pod: &Pod, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &pod.name])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("ip netns exec {}: {e}", pod.name));
    assert!(
        out.status.success(),
        "{args:?} in {} failed: {}",
        pod.name,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until `count` sockets in the pod listen on TCP `port` (processes that print
/// nothing when ready, such as HAProxy and nginx; several HAProxy share a port).
pub fn wait_listening(pod: &Pod, port: u16, count: usize, why: impl Fn() -> String) {
    let filter = format!("sport = :{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while in_netns(pod, &["ss", "-Hltn", &filter]).lines().count() < count {
        assert!(
            Instant::now() < deadline,
            "nothing listens on {port}: {}",
            why()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The open-file limit raised to its hard limit (root without CAP_SYS_RESOURCE cannot go
/// further); children (HAProxy, nginx, the connection holder) inherit it. Returns it.
pub fn raise_nofile() -> u64 {
    use nix::libc::{getrlimit, rlimit, setrlimit, RLIMIT_NOFILE};
    let mut limit = rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read or fill one rlimit struct that lives on this stack.
    unsafe {
        if getrlimit(RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        limit.rlim_cur = limit.rlim_max;
        if setrlimit(RLIMIT_NOFILE, &limit) != 0 {
            let _ = getrlimit(RLIMIT_NOFILE, &mut limit);
        }
    }
    limit.rlim_cur
}

/// Where and when a run happened: for the report's header and the plot's caption.
pub struct Machine {
    pub date: String,
    pub cpus: usize,
    pub cpu_model: String,
    pub kernel: String,
}

impl Machine {
    pub fn here() -> Machine {
        let date = Command::new("date")
            .args(["-u", "+%Y-%m-%d %H:%M UTC"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| {
                c.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|m| m.trim().to_string())
            })
            .unwrap_or_default();
        Machine {
            date,
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            cpu_model,
            kernel: nix::sys::utsname::uname()
                .map(|u| u.release().to_string_lossy().into_owned())
                .unwrap_or_default(),
        }
    }

    /// `2 vCPU AMD EPYC …, Linux 6.18.44`
    pub fn describe(&self) -> String {
        format!(
            "{} vCPU {}, Linux {}",
            self.cpus, self.cpu_model, self.kernel
        )
    }
}

/// The first line a tool prints about its version (`haproxy -v`, `nginx -v`, `wrk -v`).
pub fn tool_version(program: &str, arg: &str) -> String {
    Command::new(program)
        .arg(arg)
        .output()
        .map(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_default()
}
