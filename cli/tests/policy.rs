//! Per-pod capture policy at parity with istio-iptables: every option, with one
//! connection that must be captured and one that must not, IPv4 and IPv6, and
//! the precedence of istio-iptables' ISTIO_OUTPUT rules case by case.

mod common;

use std::collections::BTreeSet;

use common::*;
use meshbpf::{Cidr, Mesh, PodSettings, Selection};

/// A registered client pod with sidecars on 15001 and 15101, and two server pods.
struct World {
    env: Env,
    mesh: Mesh,
    client: Pod,
    s1: Pod,
    s2: Pod,
    _procs: Vec<Proc>,
}

fn world() -> World {
    let mut env = Env::new();
    let mesh = env.attach();
    let client = env.pod("client");
    let s1 = env.pod("s1");
    let s2 = env.pod("s2");
    let mut procs = Vec::new();
    for s in [&s1, &s2] {
        procs.push(s.server(&["0.0.0.0:8080", "0.0.0.0:8081", "[::]:8180", "[::]:8181"]));
    }
    mesh.register_netns(&client.netns, &PodSettings::default())
        .unwrap();
    procs.push(client.sidecar());
    let other = client.spawn(
        PROXY_UID,
        &example("sidecar"),
        &["--outbound-port", "15101", "--dns-port", "15153"],
    );
    other.wait_for("listening dns-udp=[::1]");
    procs.push(other);
    procs.push(client.server(&["127.0.0.1:9000", "[::1]:9000"]));
    World {
        env,
        mesh,
        client,
        s1,
        s2,
        _procs: procs,
    }
}

/// The server port for IPv4 or IPv6: the servers listen on 8080/8081 (v4), 8180/8181 (v6).
fn port(v6: bool, base: u16) -> u16 {
    if v6 {
        base + 100
    } else {
        base
    }
}

fn cidr(pod: &Pod, v6: bool, prefix: u8) -> Cidr {
    format!(
        "{}/{}",
        pod.ip(v6),
        if v6 { 128 - 32 + prefix } else { prefix }
    )
    .parse()
    .unwrap()
}

/// Connects as `uid` and says whether the connection went through a sidecar.
fn captured(w: &World, uid: u32, dest: &str) -> bool {
    let out = w.client.run(uid, &helper("netprobe"), &["connect", dest]);
    let text = stdout_of(&out);
    assert!(text.contains("reply=from="), "no reply from {dest}: {text}");
    // Direct, the server sees the application's own socket; captured, it sees the sidecar's.
    let local = text.lines().find_map(|l| l.strip_prefix("local=")).unwrap();
    let saw = text
        .split_whitespace()
        .find_map(|w| w.strip_prefix("saw="))
        .unwrap();
    local != saw
}

struct Case {
    /// What the case shows, and the istio-iptables rule it mirrors.
    name: &'static str,
    settings: fn(&World, bool) -> PodSettings,
    uid: u32,
    dest: fn(&World, bool) -> String,
    captured: bool,
}

fn s1(w: &World, v6: bool, base: u16) -> String {
    w.s1.addr(v6, port(v6, base))
}

fn s2(w: &World, v6: bool, base: u16) -> String {
    w.s2.addr(v6, port(v6, base))
}

fn cases() -> Vec<Case> {
    let d = |_: &World, _: bool| PodSettings::default();
    vec![
        // -- each option, captured and not --
        Case { name: "defaults: -i '*' captures any destination", settings: d, uid: APP_UID, dest: |w, v6| s1(w, v6, 8080), captured: true },
        Case { name: "-u 1337,2000: -m owner --uid-owner 2000 -j RETURN", settings: |_, _| PodSettings { proxy_uids: [1337, 2000].into(), ..Default::default() }, uid: 2000, dest: |w, v6| s1(w, v6, 8080), captured: false },
        Case { name: "-u 1337,2000: another uid is captured", settings: |_, _| PodSettings { proxy_uids: [1337, 2000].into(), ..Default::default() }, uid: APP_UID, dest: |w, v6| s1(w, v6, 8080), captured: true },
        Case { name: "-g 3000: -m owner --gid-owner 3000 -j RETURN", settings: |_, _| PodSettings { proxy_gids: [3000].into(), ..Default::default() }, uid: 3000, dest: |w, v6| s1(w, v6, 8080), captured: false },
        Case { name: "-i s1: -d s1 -j ISTIO_REDIRECT", settings: |w, v6| PodSettings { include_outbound_cidrs: Selection::Only([cidr(&w.s1, v6, 32)].into()), ..Default::default() }, uid: APP_UID, dest: |w, v6| s1(w, v6, 8080), captured: true },
        Case { name: "-i s1: s2 falls through ISTIO_OUTPUT (RETURN)", settings: |w, v6| PodSettings { include_outbound_cidrs: Selection::Only([cidr(&w.s1, v6, 32)].into()), ..Default::default() }, uid: APP_UID, dest: |w, v6| s2(w, v6, 8080), captured: false },
        Case { name: "-x s1: -d s1 -j RETURN", settings: |w, v6| PodSettings { exclude_outbound_cidrs: [cidr(&w.s1, v6, 32)].into(), ..Default::default() }, uid: APP_UID, dest: |w, v6| s1(w, v6, 8080), captured: false },
        Case { name: "-x s1: s2 still captured", settings: |w, v6| PodSettings { exclude_outbound_cidrs: [cidr(&w.s1, v6, 32)].into(), ..Default::default() }, uid: APP_UID, dest: |w, v6| s2(w, v6, 8080), captured: true },
        Case { name: "-i '' -q 8081: -p tcp --dport 8081 -j ISTIO_REDIRECT", settings: |_, v6| PodSettings { include_outbound_cidrs: Selection::Only(BTreeSet::new()), include_outbound_ports: [port(v6, 8081)].into(), ..Default::default() }, uid: APP_UID, dest: |w, v6| s1(w, v6, 8081), captured: true },
        Case { name: "-i '' -q 8081: port 8080 is not", settings: |_, v6| PodSettings { include_outbound_cidrs: Selection::Only(BTreeSet::new()), include_outbound_ports: [port(v6, 8081)].into(), ..Default::default() }, uid: APP_UID, dest: |w, v6| s1(w, v6, 8080), captured: false },
        Case { name: "-o 8081: -p tcp --dport 8081 -j RETURN", settings: |_, v6| PodSettings { exclude_outbound_ports: [port(v6, 8081)].into(), ..Default::default() }, uid: APP_UID, dest: |w, v6| s1(w, v6, 8081), captured: false },
        Case { name: "-o 8081: port 8080 still captured", settings: |_, v6| PodSettings { exclude_outbound_ports: [port(v6, 8081)].into(), ..Default::default() }, uid: APP_UID, dest: |w, v6| s1(w, v6, 8080), captured: true },
        Case { name: "-p 15101: ISTIO_REDIRECT --to-ports 15101", settings: |_, _| PodSettings { outbound_port: 15101, ..Default::default() }, uid: APP_UID, dest: |w, v6| s1(w, v6, 8080), captured: true },
        // -- precedence, in ISTIO_OUTPUT order --
        Case { name: "exclude port before include CIDR: -o 8081 RETURN precedes -d s1 ISTIO_REDIRECT", settings: |w, v6| PodSettings { include_outbound_cidrs: Selection::Only([cidr(&w.s1, v6, 32)].into()), exclude_outbound_ports: [port(v6, 8081)].into(), ..Default::default() }, uid: APP_UID, dest: |w, v6| s1(w, v6, 8081), captured: false },
        Case { name: "uid before include port: --uid-owner 1337 RETURN precedes --dport 8081 ISTIO_REDIRECT", settings: |_, v6| PodSettings { include_outbound_ports: [port(v6, 8081)].into(), ..Default::default() }, uid: PROXY_UID, dest: |w, v6| s1(w, v6, 8081), captured: false },
        Case { name: "loopback before include port: -d 127.0.0.1/32 RETURN precedes --dport 9000 ISTIO_REDIRECT", settings: |_, _| PodSettings { include_outbound_ports: [9000].into(), ..Default::default() }, uid: APP_UID, dest: |_, v6| if v6 { "[::1]:9000".into() } else { "127.0.0.1:9000".into() }, captured: false },
        Case { name: "exclude CIDR before include port: -d s1 RETURN precedes --dport 8081 ISTIO_REDIRECT", settings: |w, v6| PodSettings { exclude_outbound_cidrs: [cidr(&w.s1, v6, 32)].into(), include_outbound_ports: [port(v6, 8081)].into(), ..Default::default() }, uid: APP_UID, dest: |w, v6| s1(w, v6, 8081), captured: false },
        Case { name: "include port beyond include CIDRs: --dport 8081 ISTIO_REDIRECT precedes the -i rules", settings: |w, v6| PodSettings { include_outbound_cidrs: Selection::Only([cidr(&w.s2, v6, 32)].into()), include_outbound_ports: [port(v6, 8081)].into(), ..Default::default() }, uid: APP_UID, dest: |w, v6| s1(w, v6, 8081), captured: true },
        Case { name: "exclude CIDR before include CIDR: -x s1 RETURN precedes -i s1/24 ISTIO_REDIRECT", settings: |w, v6| PodSettings { include_outbound_cidrs: Selection::Only([cidr(&w.s1, v6, 24)].into()), exclude_outbound_cidrs: [cidr(&w.s1, v6, 32)].into(), ..Default::default() }, uid: APP_UID, dest: |w, v6| s1(w, v6, 8080), captured: false },
        Case { name: "exclude CIDR before include CIDR: a neighbour in the /24 is captured", settings: |w, v6| PodSettings { include_outbound_cidrs: Selection::Only([cidr(&w.s1, v6, 24)].into()), exclude_outbound_cidrs: [cidr(&w.s1, v6, 32)].into(), ..Default::default() }, uid: APP_UID, dest: |w, v6| s2(w, v6, 8080), captured: true },
    ]
}

#[test]
fn every_option_and_the_istio_iptables_precedence_ipv4_and_ipv6() {
    if !privileged() {
        return;
    }
    let w = world();
    let mut wrong = Vec::new();
    for v6 in [false, true] {
        for case in cases() {
            // Registering again changes the pod's settings for new connections at once.
            w.mesh
                .register_netns(&w.client.netns, &(case.settings)(&w, v6))
                .unwrap();
            let dest = (case.dest)(&w, v6);
            let got = captured(&w, case.uid, &dest);
            if got != case.captured {
                wrong.push(format!(
                    "{} [{}] to {dest}: captured={got}",
                    case.name,
                    if v6 { "IPv6" } else { "IPv4" }
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn two_pods_with_different_settings_behave_independently() {
    if !privileged() {
        return;
    }
    let mut w = world();
    let other = w.env.pod("other");
    let _sidecar = other.sidecar();
    let strict = PodSettings {
        exclude_outbound_ports: [8080].into(),
        ..Default::default()
    };
    w.mesh.register_netns(&w.client.netns, &strict).unwrap();
    w.mesh
        .register_netns(&other.netns, &PodSettings::default())
        .unwrap();
    let dest = w.s1.addr(false, 8080);
    assert!(!captured(&w, APP_UID, &dest));
    let out = stdout_of(&other.run(APP_UID, &helper("netprobe"), &["connect", &dest]));
    assert!(out.contains("local=127.0.0.1:"), "{out}");
}

#[test]
fn mesh_presets_and_istio_annotations_drive_registration() {
    if !privileged() {
        return;
    }
    let mut w = world();
    let pin = w.env.pin_dir.clone();
    let netns = w.client.netns.to_str().unwrap().to_string();
    let dest = w.s1.addr(false, 8081);
    // Linkerd: proxy uid 2102, outbound 4140.
    let linkerd = w.env.pod("linkerd");
    let lnetns = linkerd.netns.to_str().unwrap().to_string();
    stdout_of(
        &w.env
            .meshbpf(&["register", "--netns", &lnetns, "--mesh", "linkerd"]),
    );
    let proxy = linkerd.spawn(
        2102,
        &example("sidecar"),
        &["--outbound-port", "4140", "--dns-port", "4153"],
    );
    proxy.wait_for("listening dns-udp=[::1]");
    let out = stdout_of(&linkerd.run(APP_UID, &helper("netprobe"), &["connect", &dest]));
    assert!(out.contains("local=127.0.0.1:"), "{out}");
    assert_eq!(proxy.lines("outbound ").len(), 1, "{}", proxy.output());
    let list: serde_json::Value =
        serde_json::from_str(&stdout_of(&w.env.meshbpf(&["list", "--json"]))).unwrap();
    let pod = list
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["outbound_port"] == 4140)
        .unwrap();
    assert_eq!(pod["proxy_uids"], serde_json::json!([2102]));
    assert_eq!(pod["capture_dns"], false);

    // Istio annotations, as a YAML block: 8081 excluded, the rest captured.
    let file = write_file(&w.env, "annotations.yaml", "annotations:\n  traffic.sidecar.istio.io/excludeOutboundPorts: \"8081\"\n  sidecar.istio.io/status: '{}'\n");
    let out = Command::new(cli())
        .args(["register", "--netns", &netns, "--from-annotations"])
        .arg(&file)
        .arg("--pin-dir")
        .arg(&pin)
        .output()
        .unwrap();
    stdout_of(&out);
    assert!(!captured(&w, APP_UID, &dest));
    assert!(captured(&w, APP_UID, &w.s1.addr(false, 8080)));
}

use std::process::Command;

#[test]
fn bad_values_are_refused_by_name_and_nothing_is_written() {
    if !privileged() {
        return;
    }
    let w = world();
    let netns = w.client.netns.to_str().unwrap().to_string();
    let before = stdout_of(&w.env.meshbpf(&["list", "--json"]));
    let many: Vec<String> = (1..=1025).map(|p| p.to_string()).collect();
    let many = many.join(",");
    for (args, named) in [
        (vec!["--outbound-port", "0"], "\"0\""),
        (vec!["--exclude-outbound-ports", "80,70000"], "70000"),
        (
            vec!["--exclude-outbound-cidrs", "10.0.0.0/33"],
            "10.0.0.0/33",
        ),
        (
            vec!["--include-outbound-cidrs", "2001:db8::/x"],
            "2001:db8::/x",
        ),
        (
            vec!["--exclude-inbound-ports", many.as_str()],
            "1025 entries, at most 1024",
        ),
        (vec!["--mesh", "consul"], "consul"),
        (vec!["--proxy-uid", "me"], "me"),
    ] {
        let mut all = vec!["register", "--netns", netns.as_str()];
        all.extend(args.iter().copied());
        let out = w.env.meshbpf(&all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(6), "{args:?}: {stderr}");
        assert!(stderr.contains(named), "{args:?}: {stderr}");
        assert_eq!(
            stdout_of(&w.env.meshbpf(&["list", "--json"])),
            before,
            "{args:?} changed the registration"
        );
    }
}
