//! Stock istiod and the bind model: `meshbpf sidecar-resource` prints the Istio `Sidecar`
//! resource for a bind-mode pod's discovered inbound ports, and a proxy that does what it
//! says (a real listener on the pod's address per port, to `defaultEndpoint`) serves the pod.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Output};

use common::*;
use meshbpf::istio::SidecarResource;
use meshbpf::{InboundMode, PodSettings};

const EXIT_NOT_ATTACHED: i32 = 3;
const EXIT_BAD_INPUT: i32 = 6;

fn bind_mode() -> PodSettings {
    PodSettings {
        inbound_mode: InboundMode::Bind,
        ..PodSettings::default()
    }
}

fn sidecar_resource(env: &Env, pod: &Pod, extra: &[&str]) -> Output {
    let mut args = vec!["sidecar-resource", "--netns", pod.netns.to_str().unwrap()];
    args.extend_from_slice(extra);
    env.meshbpf(&args)
}

/// A refusal: the exit code, nothing on stdout, the message on stderr.
fn refused(out: &Output, code: i32) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "{stderr}");
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

/// The `ingress` entries of a printed resource: (port number, defaultEndpoint).
fn ingress(yaml: &str) -> Vec<(u16, String)> {
    fn value<'a>(line: &'a str, key: &str) -> Option<&'a str> {
        line.trim().strip_prefix(key).map(str::trim)
    }
    let numbers = yaml.lines().filter_map(|l| value(l, "number:"));
    let endpoints = yaml.lines().filter_map(|l| value(l, "defaultEndpoint:"));
    numbers
        .zip(endpoints)
        .map(|(n, e)| (n.parse().unwrap(), e.to_string()))
        .collect()
}

/// Envoy as istiod configures it from the resource, played by an unmodified HAProxy: per
/// ingress entry, a listener bound to the pod's own addresses on that port (captureMode
/// NONE, no `bind`: the instance's IPs) forwarding to `defaultEndpoint`.
fn proxy_following(env: &Env, pod: &Pod, entries: &[(u16, String)]) -> Proc {
    let mut cfg = String::from(
        "global\n    maxconn 64\ndefaults\n    mode tcp\n    timeout connect 5s\n    \
         timeout client 30s\n    timeout server 30s\n",
    );
    for (port, endpoint) in entries {
        cfg += &format!(
            "frontend ingress{port}\n    bind {}:{port}\n    bind [{}]:{port}\n    \
             default_backend app{port}\nbackend app{port}\n    server app {endpoint}\n",
            pod.v4, pod.v6
        );
    }
    let file = write_file(env, "sidecar-resource-proxy.cfg", &cfg);
    let proc = pod.spawn(
        PROXY_UID,
        std::path::Path::new("/usr/sbin/haproxy"),
        &["-db", "-f", file.to_str().unwrap()],
    );
    let listening = || {
        let out = sh(Command::new("ip").args(["netns", "exec", &pod.name, "ss", "-Hltn"]));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    wait_until(
        || {
            let ss = listening();
            entries.iter().all(|(port, _)| {
                ss.contains(&pod.addr(false, *port)) && ss.contains(&pod.addr(true, *port))
            })
        },
        || format!("haproxy did not listen: {}\n{}", proc.output(), listening()),
    );
    proc
}

#[test]
fn the_sidecar_resource_lists_exactly_the_ports_a_bind_mode_pod_listens_on_and_serves_it() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    let mesh = env.attach();
    let web = env.pod("web");
    mesh.register_netns(&web.netns, &bind_mode()).unwrap();
    let client = env.pod("client");
    // Two ports moved to loopback (IPv4, and dual-stack IPv6); a bind to the pod's own
    // address and one to a mesh port, neither moved, so neither listed.
    let app = web.server(&[
        "0.0.0.0:8080",
        "[::]:9090",
        &web.addr(false, 7070),
        "0.0.0.0:15020",
    ]);
    assert_eq!(
        app.lines("listening=")[..2],
        [
            "listening=127.0.0.1:8080",
            "listening=[::ffff:127.0.0.1]:9090"
        ]
    );

    let out = sidecar_resource(
        &env,
        &web,
        &[
            "--name",
            "web",
            "--namespace",
            "shop",
            "--selector",
            "app=web",
            "--selector",
            "version=v1",
        ],
    );
    let yaml = stdout_of(&out);
    assert_eq!(
        yaml,
        "\
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata:
  name: web
  namespace: shop
spec:
  workloadSelector:
    labels:
      app: web
      version: v1
  ingress:
  - port:
      number: 8080
      protocol: TCP
      name: tcp-8080
    defaultEndpoint: 127.0.0.1:8080
    captureMode: NONE
  - port:
      number: 9090
      protocol: TCP
      name: tcp-9090
    defaultEndpoint: 127.0.0.1:9090
    captureMode: NONE
"
    );
    // The library says the same.
    let selector = BTreeMap::from([("app".to_string(), "web".to_string())]);
    let resource = SidecarResource::for_netns(&mesh, &web.netns, "web", None, selector).unwrap();
    assert_eq!(resource.ports, [8080, 9090]);

    // Bind mode without the listeners the resource asks for: nothing answers on the pod's
    // address (the sidecar is the only way in).
    let entries = ingress(&yaml);
    for (port, _) in &entries {
        let probe = client.connect(&web.addr(false, *port), &[]);
        assert!(!probe.ok && probe.stderr.contains("refused"), "{probe:?}");
    }
    // With them, as the resource describes: every port, IPv4 and IPv6, reaches the
    // application through the proxy, from loopback.
    let _proxy = proxy_following(&env, &web, &entries);
    for (port, _) in &entries {
        for v6 in [false, true] {
            let probe = client.connect(&web.addr(v6, *port), &[]);
            assert!(probe.ok, "{port} v6={v6}: {probe:?}");
            assert!(
                probe.get("reply").contains("saw=127.0.0.1:")
                    || probe.get("reply").contains("saw=[::ffff:127.0.0.1]:"),
                "{port} v6={v6}: {probe:?}"
            );
        }
    }
}

#[test]
fn sidecar_resource_refuses_what_is_not_a_bind_mode_pod_with_listeners() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    let pod = env.pod("pod");

    // Nothing attached yet.
    let text = refused(&sidecar_resource(&env, &pod, &[]), EXIT_NOT_ATTACHED);
    assert!(text.contains("meshbpf attach"), "{text}");

    let mesh = env.attach();
    // Not registered: nothing changes for it, and there is nothing to describe.
    let text = refused(&sidecar_resource(&env, &pod, &[]), EXIT_BAD_INPUT);
    assert!(
        text.contains("is not registered") && text.contains("meshbpf register"),
        "{text}"
    );
    // Not a network namespace at all.
    let out = env.meshbpf(&["sidecar-resource", "--netns", "/proc/999999999/ns/net"]);
    let text = refused(&out, EXIT_BAD_INPUT);
    assert!(text.contains("no such file"), "{text}");

    // Redirect mode (Istio's own model, the default): stock istiod needs no Sidecar resource.
    mesh.register_netns(&pod.netns, &PodSettings::default())
        .unwrap();
    let _app = pod.server(&["0.0.0.0:8080"]);
    let text = refused(&sidecar_resource(&env, &pod, &[]), EXIT_BAD_INPUT);
    assert!(
        text.contains("inbound mode redirect")
            && text.contains("is for bind mode")
            && text.contains("--inbound-mode bind"),
        "{text}"
    );

    // Bind mode, but no application listens yet (8080 was bound before the change).
    mesh.register_netns(&pod.netns, &bind_mode()).unwrap();
    let text = refused(&sidecar_resource(&env, &pod, &[]), EXIT_BAD_INPUT);
    assert!(text.contains("no inbound listener discovered"), "{text}");

    // Labels and names Kubernetes would refuse.
    let _late = pod.server(&["0.0.0.0:8081"]);
    for extra in [
        &["--selector", "app"][..],
        &["--selector", "app=*"],
        &["--name", "Web"],
        &["--namespace", "shop.prod"],
    ] {
        let text = refused(&sidecar_resource(&env, &pod, extra), EXIT_BAD_INPUT);
        assert!(text.contains("invalid setting"), "{extra:?}: {text}");
    }
    // Once the input is right, the same pod is described.
    let yaml = stdout_of(&sidecar_resource(&env, &pod, &["--selector", "app=web"]));
    assert_eq!(ingress(&yaml), [(8081, "127.0.0.1:8081".to_string())]);
}
