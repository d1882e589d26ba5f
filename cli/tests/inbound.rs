//! Inbound capture, end to end: wildcard binds move to loopback, the sidecar
//! owns pod_ip:PORT (binding privileged ports without any sysctl), and the
//! ports applications listen on are discovered.

mod common;

use std::collections::BTreeSet;

use common::*;
use meshbpf::{InboundMode, PodSettings, Ports};

/// The bind model (the article's): what these tests are about.
fn bind_mode() -> PodSettings {
    PodSettings {
        inbound_mode: InboundMode::Bind,
        ..PodSettings::default()
    }
}

fn registered(env: &mut Env, mesh: &meshbpf::Mesh, name: &str, settings: &PodSettings) -> Pod {
    let pod = env.pod(name);
    mesh.register_netns(&pod.netns, settings).unwrap();
    pod
}

#[test]
fn wildcard_bind_moves_to_loopback_and_inbound_traffic_goes_through_the_sidecar() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    let mesh = env.attach();
    let web = registered(&mut env, &mesh, "web", &bind_mode());
    let client = env.pod("client");
    // The application asks for every address, IPv4 and (dual-stack) IPv6, on two ports;
    // it gets loopback: 127.0.0.1, and for the dual-stack socket ::ffff:127.0.0.1, which
    // IPv4 reaches and the pod's sk_lookup program hands IPv6 to [::1] to.
    let app = web.server_as(0, &["0.0.0.0:80", "[::]:81"]);
    assert_eq!(
        app.lines("listening="),
        ["listening=127.0.0.1:80", "listening=[::ffff:127.0.0.1]:81"]
    );
    // The sidecar (uid 1337, not root) owns the pod's addresses on port 80.
    let (v4, v6) = (web.v4.to_string(), web.v6.to_string());
    let sidecar = web.spawn(
        PROXY_UID,
        &example("sidecar"),
        &[
            "--pod-ip",
            &v4,
            "--pod-ip",
            &v6,
            "--inbound",
            "80",
            "--inbound",
            "81",
        ],
    );
    sidecar.wait_for(&format!("listening inbound=[{v6}]:81"));

    for (v6, port, loopback, from) in [
        (false, 80, "127.0.0.1:80", "127.0.0.1:80"),
        (true, 80, "127.0.0.1:80", "127.0.0.1:80"),
        (false, 81, "127.0.0.1:81", "[::ffff:127.0.0.1]:81"),
        (true, 81, "[::1]:81", "[::1]:81"),
    ] {
        let dest = web.addr(v6, port);
        let probe = client.connect(&dest, &[]);
        assert!(
            probe.get("reply").starts_with(&format!("from={from} saw=")),
            "{probe:?}"
        );
        assert!(
            sidecar
                .output()
                .contains(&format!("listener={dest} upstream={loopback}")),
            "{}",
            sidecar.output()
        );
    }
    assert_eq!(counter(&mesh, "bind_redirected"), 2);
    assert_eq!(counter(&mesh, "inbound_dual_stack"), 1);

    // Without the sidecar nothing answers on pod_ip:80: the application is unreachable
    // except through it.
    drop(sidecar);
    for v6 in [false, true] {
        let probe = client.connect(&web.addr(v6, 80), &[]);
        assert!(!probe.ok && probe.stderr.contains("refused"), "{probe:?}");
    }
}

#[test]
fn sidecar_binds_privileged_ports_without_the_sysctl_while_others_still_cannot() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    let mesh = env.attach();
    let pod = registered(&mut env, &mesh, "pod", &bind_mode());
    let plain = env.pod("plain");
    let sysctl = std::path::Path::new("/proc/sys/net/ipv4/ip_unprivileged_port_start");
    let read_in = |p: &Pod| {
        stdout_of(&p.run(
            0,
            std::path::Path::new("/bin/cat"),
            &[sysctl.to_str().unwrap()],
        ))
        .trim()
        .to_string()
    };
    assert_eq!(
        read_in(&pod),
        "1024",
        "the pod's netns sysctl must stay at its default"
    );
    assert_eq!(
        std::fs::read_to_string(sysctl).unwrap().trim(),
        "1024",
        "the node's sysctl must stay at its default"
    );

    assert_eq!(
        pod.bind(PROXY_UID, &pod.addr(false, 81)),
        format!("bound={}", pod.addr(false, 81))
    );
    assert_eq!(
        pod.bind(PROXY_UID, &pod.addr(true, 81)),
        format!("bound={}", pod.addr(true, 81))
    );
    assert_eq!(pod.bind(APP_UID, &pod.addr(false, 82)), "bind_error=EACCES");
    assert_eq!(
        plain.bind(PROXY_UID, &plain.addr(false, 81)),
        "bind_error=EACCES"
    );
    assert_eq!(counter(&mesh, "bind_proxy_privileged"), 2);
}

#[test]
fn excluded_ports_specific_addresses_and_other_pods_are_untouched() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    let mesh = env.attach();
    let excluding = PodSettings {
        exclude_inbound_ports: BTreeSet::from([9000]),
        ..bind_mode()
    };
    let pod = registered(&mut env, &mesh, "pod", &excluding);
    let only80 = PodSettings {
        inbound_ports: Ports::Only(BTreeSet::from([80])),
        ..bind_mode()
    };
    let narrow = registered(&mut env, &mesh, "narrow", &only80);
    let off = PodSettings {
        inbound_mode: InboundMode::None,
        ..bind_mode()
    };
    let disabled = registered(&mut env, &mesh, "disabled", &off);
    let plain = env.pod("plain");

    // Captured, for contrast.
    assert_eq!(pod.bind(APP_UID, "0.0.0.0:8081"), "bound=127.0.0.1:8081");
    assert_eq!(
        pod.bind(APP_UID, "[::]:8081"),
        "bound=[::ffff:127.0.0.1]:8081"
    );
    // Excluded by the pod's list, and the mesh's own port.
    assert_eq!(pod.bind(APP_UID, "0.0.0.0:9000"), "bound=0.0.0.0:9000");
    assert_eq!(pod.bind(APP_UID, "0.0.0.0:15020"), "bound=0.0.0.0:15020");
    // A specific address is the application's explicit choice.
    assert_eq!(
        pod.bind(APP_UID, &pod.addr(false, 8082)),
        format!("bound={}", pod.addr(false, 8082))
    );
    // An ephemeral bind is no listener.
    assert!(!pod.bind(APP_UID, "0.0.0.0:0").starts_with("bound=127."));
    // Only the listed ports.
    assert_eq!(narrow.bind(0, "0.0.0.0:80"), "bound=127.0.0.1:80");
    assert_eq!(narrow.bind(APP_UID, "0.0.0.0:8080"), "bound=0.0.0.0:8080");
    // Inbound capture off, and a pod that is not registered.
    assert_eq!(disabled.bind(APP_UID, "0.0.0.0:8080"), "bound=0.0.0.0:8080");
    assert_eq!(plain.bind(APP_UID, "0.0.0.0:8080"), "bound=0.0.0.0:8080");
    assert_eq!(plain.bind(APP_UID, "[::]:8080"), "bound=[::]:8080");
}

#[test]
fn discovered_inbound_ports_are_exactly_the_ports_the_applications_listen_on() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    let mesh = env.attach();
    let pod = env.pod("pod");
    // Registered through the CLI, with its inbound flags.
    let out = env.meshbpf(&[
        "register",
        "--netns",
        pod.netns.to_str().unwrap(),
        "--exclude-inbound-ports",
        "7000",
        "--inbound-mode",
        "bind",
    ]);
    stdout_of(&out);
    let specific = pod.addr(false, 7070);
    let app = pod.server(&[
        "0.0.0.0:8080",
        "[::]:9090",
        &specific,
        "0.0.0.0:7000",
        "0.0.0.0:15020",
    ]);

    let listeners = |mesh: &meshbpf::Mesh| mesh.pods().unwrap()[0].inbound_listeners.clone();
    assert_eq!(listeners(&mesh), [8080, 9090]);
    let list: serde_json::Value =
        serde_json::from_str(&stdout_of(&env.meshbpf(&["list", "--json"]))).unwrap();
    assert_eq!(
        list[0]["inbound_listeners"],
        serde_json::json!([8080, 9090])
    );
    assert_eq!(list[0]["exclude_inbound_ports"], serde_json::json!([7000]));
    assert_eq!(list[0]["inbound_ports"], "*");

    // When the application exits, its listeners are gone.
    drop(app);
    wait_until(
        || listeners(&mesh).is_empty(),
        || format!("listeners left: {:?}", listeners(&mesh)),
    );
}

#[test]
fn a_bind_before_registration_is_not_changed() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    let mesh = env.attach();
    let pod = env.pod("pod");
    let early = pod.server(&["0.0.0.0:8080"]);
    mesh.register_netns(&pod.netns, &bind_mode()).unwrap();
    let late = pod.server(&["0.0.0.0:8081"]);
    assert_eq!(early.lines("listening="), ["listening=0.0.0.0:8080"]);
    assert_eq!(late.lines("listening="), ["listening=127.0.0.1:8081"]);
}

#[test]
fn a_moved_bind_that_failed_is_not_discovered_when_the_socket_binds_elsewhere() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    let mesh = env.attach();
    let pod = env.pod("pod");
    mesh.register_netns(&pod.netns, &bind_mode()).unwrap();
    // Loopback ports taken by binds to a specific address (neither moved nor counted).
    let _taken = pod.server(&["127.0.0.1:8080", "127.0.0.1:8081"]);
    let mut rebinds = Vec::new();
    for (first, second) in [
        ("0.0.0.0:8080", "0.0.0.0:15020"),
        ("[::]:8081", "[::]:15021"),
    ] {
        // The moved bind fails (EADDRINUSE); the same socket then listens on a mesh port.
        let proc = pod.spawn(APP_UID, &helper("netprobe"), &["rebind", first, second]);
        proc.wait_for("bound=");
        assert!(
            proc.output().contains("first=err:EADDRINUSE"),
            "{}",
            proc.output()
        );
        rebinds.push(proc);
    }
    assert_eq!(mesh.pods().unwrap()[0].inbound_listeners, Vec::<u16>::new());
}

/// Whether a client reaches `dest`: the address the application saw it from, or `refused`.
fn reach(client: &Pod, dest: &str) -> String {
    let probe = client.connect(dest, &[]);
    if !probe.ok {
        assert!(probe.stderr.contains("refused"), "{probe:?}");
        return "refused".into();
    }
    let reply = probe.get("reply");
    let saw = reply
        .split_whitespace()
        .find_map(|w| w.strip_prefix("saw="))
        .unwrap();
    saw.rsplit_once(':').unwrap().0.to_string()
}

#[test]
fn in_bind_mode_no_application_listener_is_reached_around_the_sidecar() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    let mesh = env.attach();
    let client = env.pod("client");
    let meshed = registered(&mut env, &mesh, "meshed", &bind_mode());
    let plain = env.pod("plain");
    for pod in [&meshed, &plain] {
        let _app = pod.server(&["0.0.0.0:8080"]);
        // What moving wildcard binds to loopback cannot close: the pod's own address, a
        // socket that never called bind(), a bind to port 0 (ephemeral).
        let _own_ip = pod.server(&[&pod.addr(false, 7070)]);
        let unbound = pod.spawn(APP_UID, &helper("netprobe"), &["autolisten"]);
        unbound.wait_for("listening=");
        let ephemeral = pod.server(&["0.0.0.0:0"]);
        let port_of = |p: &Proc| -> u16 {
            p.lines("listening=")[0]
                .rsplit(':')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        let bypasses = [7070, port_of(&unbound), port_of(&ephemeral)];
        if pod.name == meshed.name {
            // Through the sidecar, the application is reached (from loopback).
            let sidecar = pod.spawn(
                PROXY_UID,
                &example("sidecar"),
                &["--pod-ip", &pod.v4.to_string(), "--inbound", "8080"],
            );
            sidecar.wait_for("listening inbound=");
            assert_eq!(reach(&client, &pod.addr(false, 8080)), "127.0.0.1");
            for port in bypasses {
                let got = reach(&client, &pod.addr(false, port));
                assert_eq!(got, "refused", "port {port} was reached around the sidecar");
            }
        } else {
            // Unregistered, nothing changes: the client reaches each directly.
            for port in bypasses {
                assert_eq!(
                    reach(&client, &pod.addr(false, port)),
                    client.v4.to_string()
                );
            }
        }
    }
    assert!(counter(&mesh, "inbound_refused") >= 3);
}

#[test]
fn a_dual_stack_application_moved_to_loopback_stays_reachable_over_ipv4() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    let mesh = env.attach();
    let meshed = registered(&mut env, &mesh, "meshed", &bind_mode());
    let plain = env.pod("plain");
    for pod in [&meshed, &plain] {
        // A dual-stack listener ([::] without IPV6_V6ONLY: Linux's default).
        let app = pod.server(&["[::]:8082"]);
        let expected = if pod.name == meshed.name {
            "[::ffff:127.0.0.1]:8082"
        } else {
            "[::]:8082"
        };
        assert_eq!(app.lines("listening="), [format!("listening={expected}")]);
        // The sidecar forwards IPv4 clients to 127.0.0.1, IPv6 ones to ::1: both reach it.
        for dest in ["127.0.0.1:8082", "[::1]:8082"] {
            let probe = pod.run(PROXY_UID, &helper("netprobe"), &["connect", dest]);
            let out = stdout_of(&probe);
            assert!(out.contains("reply=from="), "{}: {dest}: {out}", pod.name);
        }
    }
    assert_eq!(counter(&mesh, "inbound_dual_stack"), 1);
}

/// A documented limit of the bind model (issue 12, item 8): a client socket that binds a
/// wildcard address with a fixed port and then connects somewhere not captured has its bind
/// moved to loopback, so the connect fails (EINVAL), where behind iptables it works. Redirect
/// mode, which moves no bind, behaves as iptables does; a captured destination works in both.
#[test]
fn a_client_bound_to_a_wildcard_port_reaches_an_excluded_destination_in_redirect_mode_only() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    let mesh = env.attach();
    let server = env.pod("server");
    let _server = server.server(&["0.0.0.0:8080", "0.0.0.0:8082"]);
    let excluded = PodSettings {
        exclude_outbound_ports: [8082].into(),
        ..PodSettings::default()
    };
    let bind_settings = PodSettings {
        inbound_mode: InboundMode::Bind,
        ..excluded.clone()
    };
    let bind = registered(&mut env, &mesh, "bindmode", &bind_settings);
    let redirect = registered(&mut env, &mesh, "redirect", &excluded);
    let to_excluded = server.addr(false, 8082);
    let to_captured = server.addr(false, 8080);

    let probe = bind.connect(&to_excluded, &["--bind", "0.0.0.0:2020"]);
    assert!(!probe.ok, "{probe:?}");
    assert!(
        probe.stdout.contains("Invalid argument") || probe.stderr.contains("Invalid argument"),
        "{probe:?}"
    );
    let probe = redirect.connect(&to_excluded, &["--bind", "0.0.0.0:2020"]);
    assert!(probe.ok, "{probe:?}");
    assert_eq!(
        probe.get("local"),
        format!("{}:2020", redirect.v4),
        "{probe:?}"
    );

    for pod in [&bind, &redirect] {
        let sidecar = pod.sidecar();
        let probe = pod.connect(&to_captured, &["--bind", "0.0.0.0:2021"]);
        assert!(probe.ok, "{probe:?}");
        assert_eq!(sidecar.lines("outbound ").len(), 1, "{}", sidecar.output());
    }
}
