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
    // The application asks for every address; it gets loopback.
    let app = web.server_as(0, &["0.0.0.0:80", "[::]:80"]);
    assert_eq!(
        app.lines("listening="),
        ["listening=127.0.0.1:80", "listening=[::1]:80"]
    );
    // The sidecar (uid 1337, not root) owns the pod's addresses on port 80.
    let (v4, v6) = (web.v4.to_string(), web.v6.to_string());
    let sidecar = web.spawn(
        PROXY_UID,
        &example("sidecar"),
        &["--pod-ip", &v4, "--pod-ip", &v6, "--inbound", "80"],
    );
    sidecar.wait_for(&format!("listening inbound=[{v6}]:80"));

    for (v6, loopback) in [(false, "127.0.0.1:80"), (true, "[::1]:80")] {
        let dest = web.addr(v6, 80);
        let probe = client.connect(&dest, &[]);
        assert!(
            probe
                .get("reply")
                .starts_with(&format!("from={loopback} saw=")),
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
    assert_eq!(pod.bind(APP_UID, "[::]:8081"), "bound=[::1]:8081");
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
    let _taken = pod.server(&["127.0.0.1:8080", "[::1]:8081"]);
    let mut rebinds = Vec::new();
    for (first, second) in [
        ("0.0.0.0:8080", "0.0.0.0:15020"),
        ("[::]:8081", "[::]:15021"),
    ] {
        // The moved bind fails (EADDRINUSE); the same socket then listens on a mesh port.
        let proc = pod.spawn(APP_UID, &example("netprobe"), &["rebind", first, second]);
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
