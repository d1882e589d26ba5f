//! The production stack of the benchmark, all from Debian packages: nginx (nginx-light)
//! serves a 64-byte file, wrk loads it, and HAProxy is the sidecar — in transparent mode,
//! as the proxy uid, forwarding each connection to the destination the application asked
//! for (`server 0.0.0.0:0`, which HAProxy learns with `getsockopt(SO_ORIGINAL_DST)`, the
//! same call behind iptables REDIRECT and behind meshbpf).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::{stdout_of, Env, Pod, Proc, APP_UID, PROXY_UID};

use super::{field, wait_listening};

/// nginx's port in the server pod.
pub const SERVER_PORT: u16 = 8080;
/// The path of the 64-byte body.
pub const PATH: &str = "/64.txt";
/// The body: 64 bytes.
const BODY: &[u8; 64] = b"meshbpf benchmark: a 64-byte HTTP response body, no more or less";

/// HAProxy as the sidecar: the outbound listener on every address (`bind :15001`),
/// HTTP mode (an L7 proxy, as Envoy is in a mesh), one thread, and every connection
/// forwarded to its original destination.
const HAPROXY_CFG: &str = "global
    nbthread 1
    maxconn 9000
defaults
    mode http
    maxconn 9000
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-keep-alive 300s
frontend outbound
    bind :15001
    default_backend original_dst
backend original_dst
    server original_dst 0.0.0.0:0
";

/// Prints one `summary` line with what the benchmark reads (wrk's own latency
/// distribution, in µs, over every request).
const WRK_SCRIPT: &str = r#"done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "summary requests=%d duration_us=%d errors=%d p50_us=%d p99_us=%d p999_us=%d\n",
    summary.requests, summary.duration,
    e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
"#;

/// An HTTP workload: wrk with this many connections, keep-alive or a new connection per
/// request (`Connection: close`).
#[derive(Clone, Debug)]
pub struct Workload {
    pub name: &'static str,
    /// For the plot's narrow panels.
    pub short: &'static str,
    pub key: &'static str,
    pub connections: usize,
    pub new_connection_per_request: bool,
}

/// The HTTP workloads.
pub fn workloads() -> Vec<Workload> {
    vec![
        Workload {
            name: "keep-alive, 64 B HTTP × 16 conn",
            short: "keep-alive ×16",
            key: "keepalive16",
            connections: 16,
            new_connection_per_request: false,
        },
        Workload {
            name: "new connection per request, 64 B HTTP × 16",
            short: "new conn ×16",
            key: "newconn16",
            connections: 16,
            new_connection_per_request: true,
        },
        Workload {
            name: "keep-alive, 64 B HTTP × 1 conn",
            short: "keep-alive ×1",
            key: "keepalive1",
            connections: 1,
            new_connection_per_request: false,
        },
    ]
}

/// One wrk run.
#[derive(Clone, Debug, Default)]
pub struct WrkResult {
    pub requests: f64,
    pub seconds: f64,
    pub errors: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
}

impl WrkResult {
    pub fn rps(&self) -> f64 {
        self.requests / self.seconds
    }
}

/// The configuration files, in a directory every uid can read.
pub struct Stack {
    dir: PathBuf,
}

impl Stack {
    pub fn new(env: &Env) -> Stack {
        let dir = env.root.join("http");
        fs::create_dir_all(dir.join("www")).unwrap();
        fs::write(dir.join("www").join(PATH.trim_start_matches('/')), BODY).unwrap();
        fs::write(dir.join("haproxy.cfg"), HAPROXY_CFG).unwrap();
        fs::write(dir.join("wrk.lua"), WRK_SCRIPT).unwrap();
        let nginx = format!(
            "daemon off;
worker_processes 1;
user www-data;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 16000; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    client_body_temp_path {dir}/body;
    server {{
        listen {SERVER_PORT} backlog=4096;
        root {dir}/www;
    }}
}}
",
            dir = dir.display()
        );
        fs::write(dir.join("nginx.conf"), nginx).unwrap();
        for path in [env.root.as_path(), dir.as_path(), &dir.join("www")] {
            fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
        }
        Stack { dir }
    }

    /// nginx in the server pod (master as root, one worker as www-data); returns it and
    /// the URL of the 64-byte body.
    pub fn nginx(&self, pod: &Pod) -> (Proc, String) {
        let conf = self.dir.join("nginx.conf");
        let err = self.dir.join("nginx-error.log");
        let proc = pod.spawn(
            0,
            Path::new("/usr/sbin/nginx"),
            &["-c", conf.to_str().unwrap(), "-e", err.to_str().unwrap()],
        );
        wait_listening(pod, SERVER_PORT, 1, || {
            format!(
                "nginx: {}{}",
                proc.output(),
                fs::read_to_string(&err).unwrap_or_default()
            )
        });
        (
            proc,
            format!("http://{}{PATH}", pod.addr(false, SERVER_PORT)),
        )
    }

    /// HAProxy as the pod's sidecar, as the proxy uid. More than one can run in a pod: they
    /// share the listener (SO_REUSEPORT), which is how the memory benchmark holds more
    /// connections than one process may have descriptors for.
    /// `running` is how many already listen in the pod.
    pub fn haproxy(&self, pod: &Pod, running: usize) -> Proc {
        let cfg = self.dir.join("haproxy.cfg");
        let proc = pod.spawn(
            PROXY_UID,
            Path::new("/usr/sbin/haproxy"),
            &["-db", "-f", cfg.to_str().unwrap()],
        );
        wait_listening(pod, meshbpf::DEFAULT_OUTBOUND_PORT, running + 1, || {
            format!("haproxy: {}", proc.output())
        });
        proc
    }

    /// wrk as the application in `pod` for `seconds`.
    pub fn wrk(&self, pod: &Pod, url: &str, w: &Workload, seconds: f64) -> WrkResult {
        let script = self.dir.join("wrk.lua");
        let connections = w.connections.to_string();
        let duration = format!("{}s", seconds.round().max(1.0) as u64);
        let mut args = vec![
            "-t1",
            "-c",
            &connections,
            "-d",
            &duration,
            "--timeout",
            "10s",
            "-s",
            script.to_str().unwrap(),
        ];
        if w.new_connection_per_request {
            args.extend(["-H", "Connection: close"]);
        }
        args.push(url);
        let out = stdout_of(&pod.run_for(
            Duration::from_secs_f64(seconds + 60.0),
            APP_UID,
            Path::new("/usr/bin/wrk"),
            &args,
        ));
        let line = out
            .lines()
            .find(|l| l.starts_with("summary "))
            .unwrap_or_else(|| panic!("no summary from wrk: {out}"));
        let r = WrkResult {
            requests: field(line, "requests"),
            seconds: field(line, "duration_us") / 1e6,
            errors: field(line, "errors"),
            p50_us: field(line, "p50_us"),
            p99_us: field(line, "p99_us"),
            p999_us: field(line, "p999_us"),
        };
        assert!(
            r.requests > 0.0,
            "wrk made no request through {}: {out}",
            pod.name
        );
        r
    }
}
