//! Outbound TCP capture, end to end: real pods, the sidecar stand-in, and the
//! very `getsockopt(SO_ORIGINAL_DST)` a proxy makes behind iptables.

mod common;

use common::*;

/// A registered client pod with a sidecar, a server pod, and the mesh attached.
struct World {
    env: Env,
    mesh: meshbpf::Mesh,
    client: Pod,
    server: Pod,
    _server_proc: Proc,
    sidecar: Proc,
}

fn world() -> World {
    let mut env = Env::new();
    let mesh = env.attach();
    let client = env.pod("client");
    let server = env.pod("server");
    let server_proc = server.server(&["0.0.0.0:8080", "0.0.0.0:8082", "[::]:8081"]);
    mesh.register_netns(&client.netns, &meshbpf::PodSettings::default())
        .unwrap();
    let sidecar = client.sidecar();
    World {
        env,
        mesh,
        client,
        server,
        _server_proc: server_proc,
        sidecar,
    }
}

fn captured_through_sidecar(v6: bool) {
    if !privileged() {
        return;
    }
    let w = world();
    let port = if v6 { 8081 } else { 8080 };
    let dest = w.server.addr(v6, port);

    let probe = w.client.connect(&dest, &["--message", "ping"]);

    // The server answered, and saw the pod's own address: the sidecar's upstream connection.
    assert_eq!(
        probe.get("reply"),
        format!(
            "from={dest} saw={}:{} msg=ping",
            fmt_ip(w.client.ip(v6)),
            peer_port(&probe.get("reply"))
        )
    );
    // The sidecar accepted it and learned the original destination.
    let events = w.sidecar.lines("outbound ");
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(
        events[0].contains(&format!("original_dst={dest} upstream=connected")),
        "{events:?}"
    );
    // The application's own view: getpeername() reports where it connected, not the sidecar.
    assert_eq!(probe.get("peer"), dest);
    // ... while its socket really is connected to the sidecar on loopback.
    let local = probe.get("local");
    assert!(
        local.starts_with(if v6 { "[::1]:" } else { "127.0.0.1:" }),
        "local={local}"
    );
    // The sidecar sees it come from the pod's address, with the application's port, as the
    // application's getsockname() names it and as behind iptables REDIRECT.
    let sockname = probe.get("sockname");
    let (named, real): (std::net::SocketAddr, std::net::SocketAddr) =
        (sockname.parse().unwrap(), local.parse().unwrap());
    assert_eq!((named.ip(), named.port()), (w.client.ip(v6), real.port()));
    assert!(
        events[0].contains(&format!("peer={sockname} ")),
        "sidecar saw another peer: {events:?}"
    );
    assert_eq!(counter(&w.mesh, "connect_redirected"), 1);
    assert_eq!(counter(&w.mesh, "getsockopt_answered"), 1);
    assert_eq!(counter(&w.mesh, "getpeername_restored"), 1);
    // Named at the sidecar's accept() and at its getpeername() (peer_addr()).
    assert_eq!(counter(&w.mesh, "proxy_peer_restored"), 2);
}

fn fmt_ip(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V6(v6) => format!("[{v6}]"),
        v4 => v4.to_string(),
    }
}

/// The port in `saw=IP:PORT` of a reply.
fn peer_port(reply: &str) -> String {
    let saw = reply
        .split_whitespace()
        .find_map(|w| w.strip_prefix("saw="))
        .unwrap();
    saw.rsplit(':').next().unwrap().to_string()
}

#[test]
fn registered_pod_ipv4_connection_goes_through_sidecar() {
    captured_through_sidecar(false);
}

#[test]
fn registered_pod_ipv6_connection_goes_through_sidecar() {
    captured_through_sidecar(true);
}

#[test]
fn unregistered_pod_is_not_redirected() {
    if !privileged() {
        return;
    }
    let mut w = world();
    let other = w.env.pod("other");
    let other_sidecar = other.sidecar();
    for v6 in [false, true] {
        let dest = w.server.addr(v6, if v6 { 8081 } else { 8080 });
        let probe = other.connect(&dest, &[]);
        assert_eq!(probe.get("peer"), dest);
        // Straight from the pod's address to the server: no loopback hop.
        assert!(
            probe.get("local").starts_with(&fmt_ip(other.ip(v6))),
            "{probe:?}"
        );
        assert!(
            probe
                .get("reply")
                .contains(&format!("saw={}", probe.get("local"))),
            "{probe:?}"
        );
    }
    assert!(
        other_sidecar.lines("outbound ").is_empty(),
        "{}",
        other_sidecar.output()
    );
    assert!(
        w.sidecar.lines("outbound ").is_empty(),
        "{}",
        w.sidecar.output()
    );
    assert_eq!(counter(&w.mesh, "connect_redirected"), 0);
}

#[test]
fn sidecar_upstream_connections_are_not_captured() {
    if !privileged() {
        return;
    }
    let w = world();
    for i in 0..3 {
        let probe = w.client.connect(
            &w.server.addr(false, 8080),
            &["--message", &format!("n{i}")],
        );
        assert!(probe.get("reply").ends_with(&format!("msg=n{i}")));
    }
    // One accept per application connection: the sidecar's own upstream connects went out
    // directly instead of looping back into it.
    assert_eq!(
        w.sidecar.lines("outbound ").len(),
        3,
        "{}",
        w.sidecar.output()
    );
    assert_eq!(counter(&w.mesh, "skip_proxy_uid"), 3);
    assert_eq!(counter(&w.mesh, "connect_redirected"), 3);
}

#[test]
fn loopback_destinations_in_registered_pod_are_not_captured() {
    if !privileged() {
        return;
    }
    let w = world();
    let _local = w.client.server(&["127.0.0.1:9000", "[::1]:9001"]);
    for dest in ["127.0.0.1:9000", "[::1]:9001"] {
        let probe = w.client.connect(dest, &[]);
        assert!(
            probe.get("reply").starts_with(&format!("from={dest} ")),
            "{probe:?}"
        );
    }
    assert!(
        w.sidecar.lines("outbound ").is_empty(),
        "{}",
        w.sidecar.output()
    );
    assert_eq!(counter(&w.mesh, "skip_loopback"), 2);
}

#[test]
fn pods_using_the_same_source_port_each_get_their_own_destination() {
    if !privileged() {
        return;
    }
    let mut w = world();
    let second = w.env.pod("second");
    w.mesh
        .register_netns(&second.netns, &meshbpf::PodSettings::default())
        .unwrap();
    let second_sidecar = second.sidecar();
    let first_dest = w.server.addr(false, 8080);
    let second_dest = w.server.addr(false, 8082);

    // Same application-side 4-tuple in both pods: 127.0.0.1:40000 -> 127.0.0.1:15001.
    let a = w.client.connect(&first_dest, &["--bind", "0.0.0.0:40000"]);
    let b = second.connect(&second_dest, &["--bind", "0.0.0.0:40000"]);
    assert_eq!(a.get("local"), "127.0.0.1:40000");
    assert_eq!(b.get("local"), "127.0.0.1:40000");
    assert_eq!(a.get("peer"), first_dest);
    assert_eq!(b.get("peer"), second_dest);
    assert!(a.get("reply").starts_with(&format!("from={first_dest} ")));
    assert!(b.get("reply").starts_with(&format!("from={second_dest} ")));
    assert!(
        w.sidecar
            .output()
            .contains(&format!("original_dst={first_dest} ")),
        "{}",
        w.sidecar.output()
    );
    assert!(
        second_sidecar
            .output()
            .contains(&format!("original_dst={second_dest} ")),
        "{}",
        second_sidecar.output()
    );
}

#[test]
fn origin_lookup_matches_what_the_proxy_is_told() {
    if !privileged() {
        return;
    }
    let w = world();
    // A proxy that accepts but holds the connection open, so the entry stays.
    drop(w.sidecar);
    let holder = w.client.spawn(
        PROXY_UID,
        &helper("netprobe"),
        &["sockopts", "--listen", "127.0.0.1:15001", "--hold"],
    );
    holder.wait_for("listening=");
    let _app = w.client.spawn(
        APP_UID,
        &helper("netprobe"),
        &[
            "connect",
            &w.server.addr(false, 8080),
            "--bind",
            "0.0.0.0:41000",
        ],
    );
    holder.wait_for("probes done");
    let cookie = meshbpf::Netns::open(&w.client.netns).unwrap().cookie();
    let found = w
        .mesh
        .lookup_origin_dst(
            cookie,
            "127.0.0.1:41000".parse().unwrap(),
            "127.0.0.1:15001".parse().unwrap(),
        )
        .unwrap();
    assert_eq!(
        found,
        Some(format!("{}:8080", w.server.v4).parse().unwrap())
    );
    // The CLI gives the same answer.
    let out = w.env.meshbpf(&[
        "origin",
        "--netns",
        w.client.netns.to_str().unwrap(),
        "--client",
        "127.0.0.1:41000",
    ]);
    assert_eq!(stdout_of(&out).trim(), format!("{}:8080", w.server.v4));
    // Another pod's cookie finds nothing for the same 4-tuple.
    let none = w.mesh.lookup_origin_dst(
        cookie + 1_000_000,
        "127.0.0.1:41000".parse().unwrap(),
        "127.0.0.1:15001".parse().unwrap(),
    );
    assert_eq!(none.unwrap(), None);
}

#[test]
fn origin_entries_are_removed_when_the_proxy_side_closes() {
    if !privileged() {
        return;
    }
    let w = world();
    for _ in 0..20 {
        w.client.connect(&w.server.addr(false, 8080), &[]);
    }
    wait_until(
        || w.mesh.tracked_connections() == 0,
        || format!("{} connections still tracked", w.mesh.tracked_connections()),
    );
    assert_eq!(counter(&w.mesh, "origin_recorded"), 20);
    assert_eq!(counter(&w.mesh, "origin_removed"), 20);
}
