//! Socket semantics at parity with iptables REDIRECT: sockets reused for a second connect,
//! destinations the kernel treats as loopback, and the other socket kinds real applications
//! and proxies use.

mod common;

use std::collections::BTreeMap;

use common::*;
use meshbpf::PodSettings;

/// A registered client pod and a server pod answering lines on [`port`]s 8080 and 8082.
struct World {
    _env: Env,
    mesh: meshbpf::Mesh,
    client: Pod,
    server: Pod,
    _server_proc: Proc,
}

fn world(settings: &PodSettings) -> World {
    let mut env = Env::new();
    let mesh = env.attach();
    let client = env.pod("client");
    let server = env.pod("server");
    let server_proc = server.server(&["0.0.0.0:8080", "0.0.0.0:8082", "[::]:8090", "[::]:8092"]);
    mesh.register_netns(&client.netns, settings).unwrap();
    World {
        _env: env,
        mesh,
        client,
        server,
        _server_proc: server_proc,
    }
}

/// The server's port for `base` in one family (IPv6 ports are 10 up).
fn port(v6: bool, base: u16) -> u16 {
    if v6 {
        base + 10
    } else {
        base
    }
}

fn loopback(v6: bool, port: u16) -> String {
    if v6 {
        format!("[::1]:{port}")
    } else {
        format!("127.0.0.1:{port}")
    }
}

/// Waits until origin_dst_map is empty again: every connection's entry went with it.
#[track_caller]
fn no_entry_outlives_its_connection(w: &World) {
    wait_until(
        || w.mesh.tracked_connections() == 0,
        || {
            format!(
                "{} entries outlive their connections",
                w.mesh.tracked_connections()
            )
        },
    );
}

/// `netprobe reuse ...` as the application; its `key=value` lines.
fn reuse(w: &World, args: &[&str]) -> BTreeMap<String, String> {
    let mut all = vec!["reuse"];
    all.extend_from_slice(args);
    let out = w.client.run(APP_UID, &helper("netprobe"), &all);
    let text = stdout_of(&out);
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A getsockopt prober of the pod's own on loopback (an application, not the sidecar):
/// what it is told about the one connection it accepts.
fn loopback_prober(w: &World, v6: bool, port: u16) -> Proc {
    let proc = w.client.spawn(
        APP_UID,
        &helper("netprobe"),
        &["sockopts", "--listen", &loopback(v6, port), "--hold"],
    );
    proc.wait_for("listening=");
    proc
}

fn stale_destination_is_forgotten(v6: bool) {
    if !privileged() {
        return;
    }
    // With sockmap acceleration on: a reused socket must not enter sock_hash either.
    let w = world(&PodSettings {
        exclude_outbound_ports: [8082, 8092].into(),
        sockmap: true,
        ..Default::default()
    });
    let captured = w.server.addr(v6, port(v6, 8080));
    let sockmap_before = counter(&w.mesh, "sockmap_added");

    // 1. A captured connect fails (no sidecar yet), then the socket connects to a loopback
    //    server of the pod.
    let prober = loopback_prober(&w, v6, 7000);
    let seen = reuse(&w, &["tcp", &captured, &loopback(v6, 7000)]);
    assert_eq!(seen["first"], "err:ECONNREFUSED", "{seen:?}");
    assert_eq!(
        seen["peer"],
        loopback(v6, 7000),
        "getpeername lies: {seen:?}"
    );
    prober.wait_for("probes done");
    let told = probes(&prober.output());
    // No conntrack here: the kernel's own answer for a connection never redirected.
    assert_eq!(
        told["original_dst"], "err:2",
        "forged SO_ORIGINAL_DST: {told:?}"
    );
    assert_ne!(
        told["original_dst"],
        format!("ok:{}", sockaddr_hex(captured.parse().unwrap()))
    );

    // 2. A captured connection through the sidecar, dissolved with connect(AF_UNSPEC), then
    //    the same socket to a loopback server, and to an excluded port.
    let sidecar = w.client.sidecar();
    let prober = loopback_prober(&w, v6, 7001);
    let seen = reuse(&w, &["tcp", &captured, &loopback(v6, 7001), "--unspec"]);
    assert_eq!(seen["first"], "ok");
    assert_eq!(seen["peer"], loopback(v6, 7001), "{seen:?}");
    prober.wait_for("probes done");
    assert_eq!(probes(&prober.output())["original_dst"], "err:2");
    let excluded = w.server.addr(v6, port(v6, 8082));
    let seen = reuse(&w, &["tcp", &captured, &excluded, "--unspec"]);
    assert_eq!(seen["peer"], excluded, "{seen:?}");
    let own = w.client.addr(v6, 0);
    let saw = own.strip_suffix('0').unwrap_or(&own);
    assert!(
        seen["reply"].starts_with(&format!("from={excluded} saw={saw}")),
        "{seen:?}"
    );
    assert_eq!(sidecar.lines("outbound ").len(), 2, "{}", sidecar.output());

    // 3. A DNS query sent with sendto(), then the same UDP socket connected elsewhere.
    let dns = format!("{}:53", if v6 { "[2001:db8::53]" } else { "192.0.2.53" });
    let seen = reuse(&w, &["udp-dns", &dns, &loopback(v6, 9999)]);
    assert_eq!(seen["peer"], loopback(v6, 9999), "{seen:?}");

    // None of the second connects entered sock_hash or left an entry behind.
    assert_eq!(counter(&w.mesh, "sockmap_added") - sockmap_before, 4);
    drop(sidecar);
    no_entry_outlives_its_connection(&w);
}

#[test]
fn a_reused_socket_keeps_no_stale_original_destination_ipv4() {
    stale_destination_is_forgotten(false);
}

#[test]
fn a_reused_socket_keeps_no_stale_original_destination_ipv6() {
    stale_destination_is_forgotten(true);
}

#[test]
fn connects_to_the_unspecified_address_are_loopback_as_for_iptables() {
    if !privileged() {
        return;
    }
    let w = world(&PodSettings::default());
    let sidecar = w.client.sidecar();
    let _local = w.client.server(&["0.0.0.0:7002", "[::]:7003"]);
    for (dest, peer) in [
        ("0.0.0.0:7002", "127.0.0.1:7002"),
        ("[::]:7003", "[::1]:7003"),
    ] {
        let probe = w.client.connect(dest, &[]);
        assert!(probe.ok, "{probe:?}");
        assert_eq!(probe.get("peer"), peer);
        assert!(probe.get("reply").starts_with("from="), "{probe:?}");
    }
    assert!(
        sidecar.lines("outbound ").is_empty(),
        "{}",
        sidecar.output()
    );
    assert_eq!(counter(&w.mesh, "connect_redirected"), 0);
}

/// A pod whose outbound TCP to the server is captured by iptables REDIRECT (the
/// istio-iptables way), outside meshbpf's cgroup: the reference behaviour.
fn iptables_pod(env: &mut Env, name: &str) -> Pod {
    let pod = env.pod_outside(name);
    for iptables in ["iptables", "ip6tables"] {
        sh(std::process::Command::new("ip")
            .args(["netns", "exec", &pod.name, iptables])
            .args([
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "-p",
                "tcp",
                "-o",
                "eth0",
                "-m",
                "owner",
                "!",
                "--uid-owner",
                "1337",
                "-j",
                "REDIRECT",
                "--to-ports",
                "15001",
            ]));
    }
    pod
}

/// What a proxy listening on the dual-stack `[::]:15001` is told about a connection the
/// application made to `dest`: every getsockopt probe's answer.
fn dual_stack_proxy_view(pod: &Pod, dest: &str) -> BTreeMap<String, String> {
    let prober = pod.spawn(
        PROXY_UID,
        &helper("netprobe"),
        &["sockopts", "--listen", "[::]:15001"],
    );
    prober.wait_for("listening=");
    let _app = pod.spawn(APP_UID, &helper("netprobe"), &["connect", dest]);
    probes(&prober.wait())
}

#[test]
fn a_dual_stack_proxy_listener_is_told_what_iptables_tells_it() {
    if !privileged() {
        return;
    }
    let mut w = world(&PodSettings::default());
    let reference = iptables_pod(&mut w._env, "iptables");
    for dest in [w.server.addr(false, 8080), w.server.addr(true, 8090)] {
        let meshed = dual_stack_proxy_view(&w.client, &dest);
        let behind_iptables = dual_stack_proxy_view(&reference, &dest);
        assert_eq!(meshed, behind_iptables, "to {dest}");
        assert!(
            meshed.values().any(|v| v.starts_with("ok:0")),
            "nothing answered: {meshed:?}"
        );
    }
}

#[test]
fn ipv4_mapped_destinations_are_captured_and_reported_as_asked() {
    if !privileged() {
        return;
    }
    let w = world(&PodSettings::default());
    let sidecar = w.client.sidecar();
    let dest = format!("[::ffff:{}]:8080", w.server.v4);
    let probe = w.client.connect(&dest, &[]);
    assert!(probe.ok, "{probe:?}");
    assert_eq!(probe.get("peer"), dest);
    assert!(
        probe.get("local").starts_with("[::ffff:127.0.0.1]:"),
        "{probe:?}"
    );
    let events = sidecar.lines("outbound ");
    assert!(
        events[0].contains(&format!(
            "original_dst={}:8080 upstream=connected",
            w.server.v4
        )),
        "{events:?}"
    );
}

/// `count` connections with TCP Fast Open from the application of `pod`, each sending its
/// first line in the SYN; returns how many came back answered.
fn fastopen_connections(pod: &Pod, dest: &str, count: usize) -> usize {
    (0..count)
        .filter(|_| {
            pod.connect(dest, &["--fastopen"])
                .stdout
                .contains("reply=from=")
        })
        .count()
}

fn enable_fastopen(pod: &Pod) {
    // Client and server, without cookies (0x1 | 0x2 | 0x4 | 0x200).
    sh(std::process::Command::new("ip").args([
        "netns",
        "exec",
        &pod.name,
        "sysctl",
        "-q",
        "-w",
        "net.ipv4.tcp_fastopen=519",
    ]));
}

fn fastopen_passive(pod: &Pod) -> u64 {
    let out = sh(std::process::Command::new("ip").args([
        "netns",
        "exec",
        &pod.name,
        "nstat",
        "-az",
        "TcpExtTCPFastOpenPassive",
    ]));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("TcpExtTCPFastOpenPassive"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn tcp_fast_open_connections_get_their_original_destination_every_time() {
    if !privileged() {
        return;
    }
    let mut w = world(&PodSettings::default());
    let reference = iptables_pod(&mut w._env, "iptables");
    let count = 100;
    for (pod, name) in [(&w.client, "meshbpf"), (&reference, "iptables")] {
        enable_fastopen(pod);
        let sidecar = pod.spawn(PROXY_UID, &example("sidecar"), &["--fastopen", "64"]);
        sidecar.wait_for("listening dns-udp=[::1]");
        for v6 in [false, true] {
            let dest = w.server.addr(v6, port(v6, 8080));
            assert_eq!(fastopen_connections(pod, &dest, count), count, "{name}");
            let told = sidecar.lines("outbound ");
            let right = told
                .iter()
                .filter(|l| l.contains(&format!("original_dst={dest} upstream=connected")))
                .count();
            assert_eq!(right, count, "{name}: {}", sidecar.output());
        }
        assert!(
            fastopen_passive(pod) >= 2 * count as u64 - 2,
            "{name}: no Fast Open"
        );
    }
    no_entry_outlives_its_connection(&w);
}

#[test]
fn mptcp_connections_are_captured_and_name_both_ends_as_behind_iptables() {
    if !privileged() {
        return;
    }
    let mut w = world(&PodSettings::default());
    let reference = iptables_pod(&mut w._env, "iptables");
    for (pod, name) in [(&w.client, "meshbpf"), (&reference, "iptables")] {
        let sidecar = pod.sidecar();
        for v6 in [false, true] {
            let dest = w.server.addr(v6, port(v6, 8080));
            let probe = pod.connect(&dest, &["--mptcp"]);
            assert!(probe.ok, "{name}: {probe:?}");
            assert_eq!(probe.get("peer"), dest, "{name}: getpeername");
            // getsockname() of the MPTCP socket names the pod, as plain TCP's does.
            let own = pod.addr(v6, 0);
            assert!(
                probe
                    .get("sockname")
                    .starts_with(own.strip_suffix('0').unwrap_or(&own)),
                "{name}: getsockname: {probe:?}"
            );
            assert!(
                probe.get("reply").starts_with(&format!("from={dest}")),
                "{name}"
            );
        }
        assert_eq!(
            sidecar.lines("outbound ").len(),
            2,
            "{name}: {}",
            sidecar.output()
        );
    }
    no_entry_outlives_its_connection(&w);
}

/// What the application learns of its own captured connection: getsockname() names the
/// pod's address (a `getsockname4/6` hook rewrites the loopback source connect4/6 led to)
/// and getpeername() the destination it asked for, as behind iptables, where NAT is undone
/// for both. Only the kernel's socket table (`ss`, /proc/net/tcp) still shows loopback.
#[test]
fn a_captured_connection_names_the_pod_and_the_destination_as_behind_iptables() {
    if !privileged() {
        return;
    }
    let mut w = world(&PodSettings::default());
    let reference = iptables_pod(&mut w._env, "iptables");
    for (pod, name) in [(&w.client, "meshbpf"), (&reference, "iptables")] {
        let sidecar = pod.sidecar();
        for v6 in [false, true] {
            let dest = w.server.addr(v6, port(v6, 8080));
            let probe = pod.connect(&dest, &[]);
            assert!(probe.ok, "{name}: {probe:?}");
            let own = if v6 {
                format!("[{}]:", pod.v6)
            } else {
                format!("{}:", pod.v4)
            };
            let sockname = probe.get("sockname");
            assert!(sockname.starts_with(&own), "{name} {dest}: {probe:?}");
            assert_eq!(probe.get("peer"), dest, "{name}");
            // The same ephemeral port as the socket really has.
            let port_of = |a: &str| a.rsplit_once(':').map(|(_, p)| p.to_string());
            assert_eq!(
                port_of(&sockname),
                port_of(&probe.get("local")),
                "{name}: {probe:?}"
            );
            let table = if name == "meshbpf" {
                if v6 {
                    "[::1]:"
                } else {
                    "127.0.0.1:"
                }
            } else {
                own.as_str()
            };
            assert!(probe.get("local").starts_with(table), "{name}: {probe:?}");
        }
        assert_eq!(
            sidecar.lines("outbound ").len(),
            2,
            "{name}: {}",
            sidecar.output()
        );
    }
}

/// An application that binds one of its pod's addresses before connecting (curl
/// `--interface`, Go's `Dialer.LocalAddr`, JDBC `localAddress`): its captured connection
/// reaches the sidecar from that address, not from loopback, and the sidecar must still be
/// told the original destination; the application sees its bound address and the
/// destination it asked for, as behind iptables REDIRECT. Every address the socket can
/// have: the pod's registered IPv4 and IPv6 addresses (with port 0 and a fixed port), the
/// IPv4 one on a dual-stack IPv6 socket (IPv4-mapped), and a second address of the pod's
/// that `register` never saw. With sockmap acceleration on, so that such a connection is
/// accelerated as one from loopback is.
#[test]
fn an_application_bound_to_its_pod_address_gets_its_original_destination_as_behind_iptables() {
    if !privileged() {
        return;
    }
    let mut w = world(&PodSettings {
        sockmap: true,
        sockmap_min_bytes: 1,
        ..Default::default()
    });
    let reference = iptables_pod(&mut w._env, "iptables");
    for (pod, name) in [(&w.client, "meshbpf"), (&reference, "iptables")] {
        // A second address of each family on the pod's interface, added after `register`.
        for second in ["203.0.113.7/32", "2001:db8:1::7/128"] {
            sh(std::process::Command::new("ip").args([
                "-n", &pod.name, "addr", "add", second, "dev", "eth0", "nodad",
            ]));
        }
        let sidecar = pod.sidecar();
        let server4 = w.server.addr(false, 8080);
        let server6 = w.server.addr(true, 8090);
        let mapped_server = format!("[::ffff:{}]:8080", w.server.v4);
        let cases = [
            (pod.addr(false, 0), server4.clone(), server4.clone()),
            (pod.addr(false, 41000), server4.clone(), server4.clone()),
            (pod.addr(true, 0), server6.clone(), server6.clone()),
            (pod.addr(true, 41001), server6.clone(), server6.clone()),
            (
                format!("[::ffff:{}]:0", pod.v4),
                mapped_server.clone(),
                server4.clone(),
            ),
            (
                "203.0.113.7:0".to_string(),
                server4.clone(),
                server4.clone(),
            ),
            (
                "[2001:db8:1::7]:0".to_string(),
                server6.clone(),
                server6.clone(),
            ),
        ];
        for (i, (src, dest, told)) in cases.iter().enumerate() {
            let probe = pod.connect(dest, &["--bind", src]);
            assert!(probe.ok, "{name}: from {src} to {dest}: {probe:?}");
            assert!(
                probe.get("reply").starts_with(&format!("from={told}")),
                "{name}: from {src} to {dest}: {probe:?}"
            );
            assert_eq!(probe.get("peer"), *dest, "{name}: from {src}: getpeername");
            let (src_ip, src_port) = src.rsplit_once(':').unwrap();
            let sockname = probe.get("sockname");
            assert!(
                sockname.starts_with(&format!("{src_ip}:")),
                "{name}: from {src}: getsockname {probe:?}"
            );
            if src_port != "0" {
                assert!(
                    sockname.ends_with(&format!(":{src_port}")),
                    "{name}: {probe:?}"
                );
            }
            let events = sidecar.lines("outbound ");
            assert_eq!(events.len(), i + 1, "{name}: {}", sidecar.output());
            assert!(
                events[i].contains(&format!("original_dst={told} upstream=connected")),
                "{name}: from {src} to {dest}: {events:?}"
            );
            // The sidecar sees the connection come from the address the application bound
            // (an IPv4-mapped one as the IPv4 address it is, on its IPv4 listener).
            let from = sockname.replace("[::ffff:", "").replace("]:", ":");
            let from = if src.starts_with("[::ffff:") {
                from
            } else {
                sockname.clone()
            };
            assert!(
                events[i].starts_with(&format!("outbound peer={from} ")),
                "{name}: from {src}: {events:?}"
            );
        }
    }
    // Each of the seven connections' first message went socket to socket.
    assert!(
        counter(&w.mesh, "sockmap_msg_redirected") >= 7,
        "{}",
        counter(&w.mesh, "sockmap_msg_redirected")
    );
    no_entry_outlives_its_connection(&w);
}

/// An application bound to its pod's IPv6 link-local address is bound to that interface (the
/// address's scope), and lo is not it: its captured connect fails at once with ENETUNREACH,
/// never escaping the sidecar. Behind ip6tables REDIRECT the same connect() had not returned
/// after 20 s (measured: the harness's timeout), so the reference side is not run here.
#[test]
fn an_application_bound_to_its_link_local_address_is_refused_at_once_never_let_through() {
    if !privileged() {
        return;
    }
    let w = world(&PodSettings::default());
    let sidecar = w.client.sidecar();
    let out = sh(std::process::Command::new("ip").args([
        "-n",
        &w.client.name,
        "-6",
        "-o",
        "addr",
        "show",
        "dev",
        "eth0",
        "scope",
        "link",
    ]));
    // `2: eth0    inet6 fe80::.../64 scope link ...`: the interface index and the address.
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let index = text
        .split(':')
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    let link_local = text
        .split_whitespace()
        .nth(3)
        .and_then(|a| a.split('/').next())
        .unwrap_or_default()
        .to_string();
    assert!(link_local.starts_with("fe80:"), "{text}");
    let src = format!("[{link_local}%{index}]:0");
    let dest = w.server.addr(true, 8090);
    // The link-local address may still be tentative (duplicate address detection).
    let mut probe = w.client.connect(&dest, &["--bind", &src]);
    for _ in 0..50 {
        if !probe.stderr.contains("Cannot assign requested address") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        probe = w.client.connect(&dest, &["--bind", &src]);
    }
    assert!(!probe.ok, "{probe:?}");
    assert!(probe.stderr.contains("ENETUNREACH"), "{probe:?}");
    assert!(
        sidecar.lines("outbound ").is_empty(),
        "{}",
        sidecar.output()
    );
    // It was captured, so it never went to the server directly.
    assert_eq!(counter(&w.mesh, "connect_redirected"), 1);
}
