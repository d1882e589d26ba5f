//! Beside a CNI's socket load balancer (Cilium's socket-LB, Calico eBPF): a Service VIP
//! translated to a backend at connect/sendmsg by cgroup programs on the same hooks as
//! meshbpf's, attached before meshbpf (tests/common/socketlb.bpf.c, in Cilium's style). The
//! sidecar must learn the VIP the application asked for, its own connection to the VIP must
//! still be balanced by the CNI, and unregistered pods keep the CNI's behaviour. Each case
//! runs with the balancer on the cgroup meshbpf is attached to, on an ancestor of it, and
//! with no balancer at all (nothing changes where none is present).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use common::envoy::{self, Envoy};
use common::k8s::{Agent, CniDirs};
use common::socketlb::{LbHook, SocketLb};
use common::*;
use meshbpf::PodSettings;

/// Where the test's socket load balancer sits, if anywhere.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Lb {
    /// None: the application asks the backend itself.
    Absent,
    /// Attached first to the cgroup meshbpf is then attached to.
    SameCgroup,
    /// Attached to the test cgroup; meshbpf to its `kubepods` child.
    Ancestor,
}

const VIP4: &str = "203.0.113.10:80";
const VIP6: &str = "[2001:db8:1::10]:80";
const DNS4: &str = "203.0.113.53:53";
const DNS6: &str = "[2001:db8:1::53]:53";
const NAME: &str = "web.mesh.test";
const ANSWER_V4: &str = "192.0.2.99";
const ANSWER_V6: &str = "2001:db8::99";

struct World {
    // Dropped first: the balancer's links, then meshbpf, then the pods.
    lb: Option<SocketLb>,
    _mesh: meshbpf::Mesh,
    kubepods: PathBuf,
    env: Env,
}

/// A test cgroup with a `kubepods` child for the pods, the balancer (if any) attached first,
/// then meshbpf.
fn world(lb: Lb) -> World {
    let mut env = Env::new();
    let kubepods = env.sub_cgroup("kubepods");
    let balancer = (lb != Lb::Absent).then(|| SocketLb::attach(&env, &env.cgroup, false));
    let mesh_at = match lb {
        Lb::Ancestor => kubepods.clone(),
        _ => env.cgroup.clone(),
    };
    let mesh = meshbpf::Mesh::attach(&mesh_at, &env.pin_dir).expect("attach");
    World {
        lb: balancer,
        _mesh: mesh,
        kubepods,
        env,
    }
}

impl World {
    /// Where the application connects for a Service whose backend is `backend`: its VIP
    /// (`vip`) when a balancer translates it, the backend itself when none does.
    fn service(&self, vip: &str, backend: SocketAddr) -> SocketAddr {
        match &self.lb {
            Some(lb) => {
                let vip: SocketAddr = vip.parse().unwrap();
                lb.service(vip, backend);
                vip
            }
            None => backend,
        }
    }

    fn pod(&mut self, name: &str) -> Pod {
        let kubepods = self.kubepods.clone();
        self.env.pod_under(&kubepods, name)
    }

    /// How often the balancer translated at `hooks`; 0 without one.
    fn lb_count(&self, hooks: &[LbHook]) -> u64 {
        self.lb
            .as_ref()
            .map_or(0, |lb| hooks.iter().map(|h| lb.count(*h)).sum())
    }

    /// `meshbpf status --json`, as a user reads it.
    fn status(&self) -> serde_json::Value {
        serde_json::from_str(&stdout_of(&self.env.meshbpf(&["status", "--json"]))).unwrap()
    }

    /// What `meshbpf status` and `meshbpf check` say of the balancer: each of its programs on
    /// meshbpf's capture hooks listed where it is attached, running after meshbpf's.
    #[track_caller]
    fn assert_meshbpf_runs_first(&self) {
        let status = self.status();
        assert_eq!(status["runs_first"], true, "{status}");
        let others = status["other_programs"].as_array().expect("other_programs");
        match &self.lb {
            None => assert!(others.is_empty(), "{status}"),
            Some(lb) => {
                let hooks: Vec<&str> = others.iter().filter_map(|p| p["hook"].as_str()).collect();
                assert_eq!(
                    hooks,
                    ["connect4", "connect6", "sendmsg4", "sendmsg6"],
                    "{status}"
                );
                for p in others {
                    assert!(p["name"].as_str().unwrap().starts_with("lb_"), "{p}");
                    assert_eq!(p["cgroup"], lb.cgroup.display().to_string(), "{p}");
                    assert_eq!(p["runs_before_meshbpf"], false, "{p}");
                }
            }
        }
        let check = self.env.meshbpf(&["check"]);
        let text = stdout_of(&check);
        assert!(check.status.success(), "{text}");
        assert!(text.contains("other programs on meshbpf's hooks"), "{text}");
    }
}

fn register_istio(env: &Env, pod: &Pod) {
    stdout_of(&env.meshbpf(&[
        "register",
        "--netns",
        pod.netns.to_str().unwrap(),
        "--mesh",
        "istio",
        "--proxy-gid",
        "1337",
    ]));
}

/// An application in a registered pod with Envoy as its sidecar connects to a Service; the
/// backend pod is registered too, with its own Envoy.
fn tcp_to_a_service(lb: Lb, v6: bool) {
    let Some(binary) = envoy::binary() else {
        return;
    };
    let mut w = world(lb);
    let client = w.pod("client");
    let server = w.pod("server");
    register_istio(&w.env, &client);
    register_istio(&w.env, &server);
    let _app = server.server(&["0.0.0.0:8080", "[::]:8081"]);
    let client_envoy = Envoy::start(&w.env, &client, &binary);
    let server_envoy = Envoy::start(&w.env, &server, &binary);
    let backend: SocketAddr = server
        .addr(v6, if v6 { 8081 } else { 8080 })
        .parse()
        .unwrap();
    let dest = w.service(if v6 { VIP6 } else { VIP4 }, backend);

    let probe = client.connect(&dest.to_string(), &["--message", "ping"]);

    assert!(probe.ok, "{probe:?}\n{}", client_envoy.output());
    // The application's getpeername() shows what it asked for.
    assert_eq!(probe.get("peer"), dest.to_string());
    // The sidecar's SO_ORIGINAL_DST is the Service, and it connected there...
    let outbound = client_envoy.wait_for_entries(1)[0].clone();
    assert_eq!(outbound["listener"], "virtualOutbound", "{outbound:?}");
    assert_eq!(
        outbound["downstream_local"],
        dest.to_string(),
        "{outbound:?}"
    );
    assert_eq!(outbound["upstream"], dest.to_string(), "{outbound:?}");
    // ... through the balancer, which translated that connection (and only that one: the
    // application's own connect() went to the sidecar untranslated).
    let connects = [LbHook::Connect4, LbHook::Connect6];
    let expected = u64::from(lb != Lb::Absent);
    assert_eq!(w.lb_count(&connects), expected);
    // The backend's application answered, on its own address: the backend's sidecar took it
    // inbound with the backend as original destination (inbound untouched by the balancer).
    let reply = probe.get("reply");
    assert!(
        reply.starts_with(&format!("from={backend} ")),
        "reply={reply}"
    );
    let inbound = server_envoy.wait_for_entries(1)[0].clone();
    assert_eq!(inbound["listener"], "virtualInbound", "{inbound:?}");
    assert_eq!(
        inbound["downstream_local"],
        backend.to_string(),
        "{inbound:?}"
    );
    w.assert_meshbpf_runs_first();
}

#[test]
fn envoy_sees_the_vip_over_tcp_v4_with_the_lb_on_the_same_cgroup() {
    tcp_to_a_service(Lb::SameCgroup, false);
}

#[test]
fn envoy_sees_the_vip_over_tcp_v6_with_the_lb_on_the_same_cgroup() {
    tcp_to_a_service(Lb::SameCgroup, true);
}

#[test]
fn envoy_sees_the_vip_over_tcp_v4_with_the_lb_on_an_ancestor() {
    tcp_to_a_service(Lb::Ancestor, false);
}

#[test]
fn envoy_sees_the_vip_over_tcp_v6_with_the_lb_on_an_ancestor() {
    tcp_to_a_service(Lb::Ancestor, true);
}

#[test]
fn envoy_sees_the_destination_over_tcp_v4_and_v6_with_no_lb() {
    tcp_to_a_service(Lb::Absent, false);
    tcp_to_a_service(Lb::Absent, true);
}

/// A pod running dnsmasq for NAME on port 53 (the kube-dns backend).
fn dns_server(w: &mut World) -> (Pod, Proc) {
    let dns = w.pod("dns");
    let dnsmasq = dnsmasq(&dns, NAME, ANSWER_V4, ANSWER_V6, &[]);
    (dns, dnsmasq)
}

/// Connected and unconnected UDP queries to the kube-dns ClusterIP, v4 and v6, from a
/// registered pod whose sidecar answers DNS on 15053 (the stand-in: Envoy has no DNS proxy;
/// Istio's is pilot-agent's).
fn dns_to_a_cluster_ip(lb: Lb) {
    if !privileged() {
        return;
    }
    let mut w = world(lb);
    let (dns, _dnsmasq) = dns_server(&mut w);
    let client = w.pod("client");
    w._mesh
        .register_netns(&client.netns, &PodSettings::default())
        .unwrap();
    let sidecar = client.sidecar();
    let mut asked = 0;
    for (v6, qtype, answer) in [(false, "A", ANSWER_V4), (true, "AAAA", ANSWER_V6)] {
        let server = w.service(
            if v6 { DNS6 } else { DNS4 },
            dns.addr(v6, 53).parse().unwrap(),
        );
        for connected in [false, true] {
            let server = server.to_string();
            let mut args = vec!["dns", server.as_str(), NAME, qtype];
            if connected {
                args.push("--connected");
            }
            let probe = stdout_of(&client.run(APP_UID, &helper("netprobe"), &args));
            // The reply comes from the ClusterIP (recvfrom() or getpeername()).
            assert!(probe.contains(&format!("from={server}\n")), "{probe}");
            assert!(probe.contains(&format!("answer={answer}\n")), "{probe}");
            asked += 1;
            // The sidecar on 15053 saw the ClusterIP as the server asked.
            let seen = sidecar.lines("dns proto=udp");
            assert_eq!(seen.len(), asked, "{}", sidecar.output());
            assert!(
                seen[asked - 1].contains(&format!("original_dst={server} ")),
                "{seen:?}"
            );
        }
    }
    // The balancer translated the sidecar's own queries (one connected socket each), never
    // the application's.
    let expected = if lb == Lb::Absent { 0 } else { 4 };
    assert_eq!(w.lb_count(&[LbHook::Connect4, LbHook::Connect6]), expected);
    assert_eq!(w.lb_count(&[LbHook::Sendmsg4, LbHook::Sendmsg6]), 0);
    w.assert_meshbpf_runs_first();
}

#[test]
fn udp_dns_to_a_cluster_ip_is_captured_with_the_cluster_ip_with_the_lb_on_the_same_cgroup() {
    dns_to_a_cluster_ip(Lb::SameCgroup);
}

#[test]
fn udp_dns_to_a_cluster_ip_is_captured_with_the_cluster_ip_with_the_lb_on_an_ancestor() {
    dns_to_a_cluster_ip(Lb::Ancestor);
}

#[test]
fn udp_dns_is_captured_with_the_server_asked_with_no_lb() {
    dns_to_a_cluster_ip(Lb::Absent);
}

#[test]
fn an_unregistered_pod_keeps_the_lb_translation() {
    if !privileged() {
        return;
    }
    let mut w = world(Lb::SameCgroup);
    let (dns, _dnsmasq) = dns_server(&mut w);
    let server = w.pod("server");
    let _app = server.server(&["0.0.0.0:8080"]);
    let plain = w.pod("plain");
    let vip = w.service(VIP4, server.addr(false, 8080).parse().unwrap());
    let cluster_ip = w.service(DNS4, dns.addr(false, 53).parse().unwrap());

    let probe = plain.connect(&vip.to_string(), &["--message", "ping"]);
    assert!(probe.ok, "{probe:?}");
    // Straight to the backend, the balancer's way: its getpeername shows the VIP (the
    // balancer's reversal), the backend saw the pod itself.
    assert_eq!(probe.get("peer"), vip.to_string());
    let reply = probe.get("reply");
    assert!(
        reply.starts_with(&format!(
            "from={} saw={}:",
            server.addr(false, 8080),
            plain.v4
        )),
        "{reply}"
    );
    let query = stdout_of(&plain.run(
        APP_UID,
        &helper("netprobe"),
        &["dns", &cluster_ip.to_string(), NAME, "A"],
    ));
    assert!(query.contains(&format!("from={cluster_ip}\n")), "{query}");
    assert!(query.contains(&format!("answer={ANSWER_V4}\n")), "{query}");
    assert_eq!(w.lb_count(&[LbHook::Connect4]), 1);
    assert_eq!(w.lb_count(&[LbHook::Getpeername4]), 1);
    assert_eq!(w.lb_count(&[LbHook::Sendmsg4]), 1);
    assert_eq!(w.lb_count(&[LbHook::Recvmsg4]), 1);
    w.assert_meshbpf_runs_first();
}

#[test]
fn the_lb_reattached_after_meshbpf_still_runs_after_it() {
    if !privileged() {
        return;
    }
    let mut w = world(Lb::SameCgroup);
    let server = w.pod("server");
    let _app = server.server(&["0.0.0.0:8080"]);
    let client = w.pod("client");
    w._mesh
        .register_netns(&client.netns, &PodSettings::default())
        .unwrap();
    let sidecar = client.sidecar();
    // The CNI's agent restarts: its programs go, and come back after meshbpf's.
    if let Some(lb) = w.lb.as_mut() {
        lb.detach();
    }
    w.lb = Some(SocketLb::attach(&w.env, &w.env.cgroup, false));
    let vip = w.service(VIP4, server.addr(false, 8080).parse().unwrap());

    let probe = client.connect(&vip.to_string(), &["--message", "ping"]);

    assert!(probe.ok, "{probe:?}\n{}", sidecar.output());
    assert_eq!(probe.get("peer"), vip.to_string());
    let events = sidecar.lines("outbound ");
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(
        events[0].contains(&format!("original_dst={vip} upstream=connected")),
        "{events:?}"
    );
    assert_eq!(w.lb_count(&[LbHook::Connect4]), 1);
    w.assert_meshbpf_runs_first();
}

/// A program that runs before meshbpf's whatever meshbpf does (on kernels with
/// `BPF_F_PREORDER` links: one attached so itself; before them: one attached first to the
/// same cgroup, with no kubelet child to attach below it) is found and reported, by
/// `status`, `check` (which fails) and the agent's /healthz and metric.
#[test]
fn a_program_running_before_meshbpf_is_reported_by_status_check_and_the_agent() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    let preorder = meshbpf::preorder_links();
    let lb = SocketLb::attach(&env, &env.cgroup, preorder);
    let _mesh = meshbpf::Mesh::attach(&env.cgroup, &env.pin_dir).expect("attach");
    // Attaching again cannot do better: the same links, not moved again.
    let links = || -> Vec<(String, u32)> {
        let programs = _mesh.programs().unwrap();
        programs.into_iter().map(|p| (p.hook, p.link_id)).collect()
    };
    let before = links();
    meshbpf::Mesh::attach(&env.cgroup, &env.pin_dir).expect("attach again");
    assert_eq!(links(), before);
    let server = env.pod("server");
    let _app = server.server(&["0.0.0.0:8080"]);
    let client = env.pod("client");
    _mesh
        .register_netns(&client.netns, &PodSettings::default())
        .unwrap();
    let sidecar = client.sidecar();
    let vip: SocketAddr = VIP4.parse().unwrap();
    lb.service(vip, server.addr(false, 8080).parse().unwrap());
    // What goes wrong then: the sidecar learns the backend, not the VIP.
    let probe = client.connect(VIP4, &["--message", "ping"]);
    assert!(probe.ok, "{probe:?}");
    let events = sidecar.lines("outbound ");
    assert!(
        events[0].contains(&format!("original_dst={} ", server.addr(false, 8080))),
        "{events:?}"
    );

    let status: serde_json::Value =
        serde_json::from_str(&stdout_of(&env.meshbpf(&["status", "--json"]))).unwrap();
    assert_eq!(status["runs_first"], false, "{status}");
    let before: Vec<&serde_json::Value> = status["other_programs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["runs_before_meshbpf"] == true)
        .collect();
    assert_eq!(before.len(), 4, "{status}");
    assert!(
        before.iter().any(|p| p["name"] == "lb_connect4"),
        "{status}"
    );
    let text = stdout_of(&env.meshbpf(&["status"]));
    assert!(text.contains("RUNS BEFORE meshbpf"), "{text}");
    let check = env.meshbpf(&["check"]);
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert_eq!(check.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("lb_connect4") && stderr.contains("fix:"),
        "{stderr}"
    );

    // The agent says so on /healthz and in a metric.
    let dirs = CniDirs::new(&env.root);
    let agent = Agent::start(
        &env,
        &dirs,
        "{}",
        &["--no-discover", "--gc-interval", "3600"],
    );
    let (code, healthz) = agent.get("/healthz");
    assert_eq!(code, 503, "{healthz}");
    assert!(healthz.contains("lb_connect4"), "{healthz}");
    let (_, metrics) = agent.get("/metrics");
    assert!(
        metrics.contains("\nmeshbpf_capture_runs_first 0\n"),
        "{metrics}"
    );
}

/// `meshbpf attach --cgroup CGROUP`, as on a kernel whose cgroup links take no
/// `BPF_F_PREORDER` if `no_preorder`.
fn attach_cli(cgroup: &Path, pin_dir: &Path, no_preorder: bool) -> std::process::Output {
    let mut cmd = std::process::Command::new(cli());
    if no_preorder {
        cmd.env("MESHBPF_NO_PREORDER", "1");
    }
    cmd.args(["attach", "--cgroup"])
        .arg(cgroup)
        .arg("--pin-dir")
        .arg(pin_dir)
        .output()
        .expect("meshbpf attach")
}

/// Where cgroup links take no `BPF_F_PREORDER` (before Linux 6.17; forced here with
/// `MESHBPF_NO_PREORDER=1`), a fresh attach to a cgroup whose connect/sendmsg hooks already
/// hold a socket load balancer goes to its kubelet child, where meshbpf's programs run
/// before their parent's; attaching again keeps it there.
#[test]
fn without_preorder_links_attach_goes_below_the_lb_to_the_kubepods_child() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    let kubepods = env.sub_cgroup("kubepods");
    let lb = SocketLb::attach(&env, &env.cgroup, false);
    let (cgroup, pin_dir) = (env.cgroup.clone(), env.pin_dir.clone());
    let attach = |no_preorder: bool| stdout_of(&attach_cli(&cgroup, &pin_dir, no_preorder));
    let text = attach(true);
    assert!(
        text.contains(&format!("to {} (cgroup id", kubepods.display())),
        "{text}"
    );
    let mesh = meshbpf::Mesh::open(&env.pin_dir).unwrap();
    let server = env.pod_under(&kubepods, "server");
    let _app = server.server(&["0.0.0.0:8080"]);
    let client = env.pod_under(&kubepods, "client");
    mesh.register_netns(&client.netns, &PodSettings::default())
        .unwrap();
    let sidecar = client.sidecar();
    let vip: SocketAddr = VIP4.parse().unwrap();
    lb.service(vip, server.addr(false, 8080).parse().unwrap());

    let probe = client.connect(VIP4, &["--message", "ping"]);

    assert!(probe.ok, "{probe:?}\n{}", sidecar.output());
    assert_eq!(probe.get("peer"), VIP4);
    let events = sidecar.lines("outbound ");
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(
        events[0].contains(&format!("original_dst={VIP4} upstream=connected")),
        "{events:?}"
    );
    assert_eq!(lb.count(LbHook::Connect4), 1);
    // Attaching again, with or without the flag, replaces in place where it is.
    for no_preorder in [true, false] {
        let text = attach(no_preorder);
        assert!(
            text.contains(&format!("to {} (cgroup id", kubepods.display())),
            "{text}"
        );
    }
    let status: serde_json::Value =
        serde_json::from_str(&stdout_of(&env.meshbpf(&["status", "--json"]))).unwrap();
    assert_eq!(status["runs_first"], true, "{status}");
}

/// An attachment made behind a socket load balancer (by an older meshbpf, or on a kernel
/// without `BPF_F_PREORDER` links: forced here) is moved in front of it by the next attach
/// where the kernel can, its pods registered still; attaching once more changes nothing.
#[test]
fn attaching_again_moves_an_attachment_made_behind_the_lb_in_front_of_it() {
    if !privileged() {
        return;
    }
    if !meshbpf::preorder_links() {
        skip("this kernel's cgroup links take no BPF_F_PREORDER: nothing to move in front");
        return;
    }
    let mut env = Env::new();
    let lb = SocketLb::attach(&env, &env.cgroup, false);
    let (cgroup, pin_dir) = (env.cgroup.clone(), env.pin_dir.clone());
    let attach = |no_preorder: bool| attach_cli(&cgroup, &pin_dir, no_preorder);
    // Behind it, with no kubelet child to go to: said at once.
    let behind = attach(true);
    let warning = String::from_utf8_lossy(&behind.stderr);
    assert!(behind.status.success(), "{warning}");
    assert!(
        warning.contains("warning: programs run before meshbpf's capture programs")
            && warning.contains("lb_connect4"),
        "{warning}"
    );
    let mesh = meshbpf::Mesh::open(&env.pin_dir).unwrap();
    let server = env.pod("server");
    let _app = server.server(&["0.0.0.0:8080"]);
    let client = env.pod("client");
    mesh.register_netns(&client.netns, &PodSettings::default())
        .unwrap();
    let sidecar = client.sidecar();
    let backend = server.addr(false, 8080);
    lb.service(VIP4.parse().unwrap(), backend.parse().unwrap());
    let original_dst = |n: usize| {
        let probe = client.connect(VIP4, &["--message", "ping"]);
        assert!(probe.ok, "{probe:?}\n{}", sidecar.output());
        let events = sidecar.lines("outbound ");
        assert_eq!(events.len(), n, "{events:?}");
        events[n - 1]
            .split_whitespace()
            .find_map(|w| w.strip_prefix("original_dst="))
            .unwrap()
            .to_string()
    };
    assert_eq!(original_dst(1), backend, "behind the balancer");

    let links = |mesh: &meshbpf::Mesh| -> Vec<(String, u32)> {
        let programs = mesh.programs().unwrap();
        programs.into_iter().map(|p| (p.hook, p.link_id)).collect()
    };
    let before = links(&mesh);
    let again = attach(false);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(
        again.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(original_dst(2), VIP4, "moved in front of the balancer");
    assert_eq!(mesh.pods().unwrap().len(), 1);
    // Only the capture hooks got new links.
    let moved = links(&mesh);
    let changed: Vec<&str> = before
        .iter()
        .zip(&moved)
        .filter(|(a, b)| a != b)
        .map(|(a, _)| a.0.as_str())
        .collect();
    assert_eq!(changed, ["connect4", "connect6", "sendmsg4", "sendmsg6"]);
    assert_eq!(env.attached_hooks().len(), ATTACH_TYPES.len() + 8);
    // In front already: replaced in place, the same links.
    let once_more = attach(false);
    assert!(once_more.status.success());
    assert_eq!(links(&mesh), moved);
    assert_eq!(original_dst(3), VIP4);
}
