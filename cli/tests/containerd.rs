//! A real containerd drives meshbpf through the Kubernetes CRI, as the kubelet does:
//! RunPodSandbox, StopPodSandbox and RemovePodSandbox over gRPC to Debian's containerd 1.6
//! and its CRI plugin, whose CNI conflist chains `bridge` + `host-local` + `meshbpf-cni`
//! with the pod-annotations capability declared (tests/common/containerd.rs has the
//! runtime's setup and cleanup).
//!
//! runc (cgroupfs driver) puts a sandbox's and its containers' processes in this machine's
//! cgroup v1 hierarchies and, at the same path, in the unified (cgroup2) one; the sandboxes'
//! cgroup parent is below the test cgroup meshbpf attaches to, so the containers' own
//! connections are captured, as on a node where meshbpf attaches to the pods' cgroups. The
//! sidecar stand-in runs in a pod's network namespace from the test, as the proxy uid.

mod common;
#[path = "common/containerd.rs"]
mod cri;

use std::fs;
use std::path::{Path, PathBuf};

use common::k8s::*;
use common::*;
use cri::{containerd_available, host_dirs, Containerd, Footprint, Sandbox};
use serde_json::{json, Value};

/// The CNI network's name, its bridge and subnet (in containerd's own netns).
const NETWORK: &str = "meshbpf-cri";
const SUBNET: &str = "198.51.100.0/24";

/// What an injected pod's annotations look like (the injector adds `sidecar.istio.io/status`).
const INJECTED: (&str, &str) = (
    "sidecar.istio.io/status",
    "{\"containers\":[\"istio-proxy\"]}",
);

/// The conflist containerd loads: bridge and host-local, then meshbpf-cni with this test's
/// pins, state and log, and the capability under which containerd passes pod annotations.
fn conflist(env: &Env) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": NETWORK,
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cri0",
                "isGateway": false,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "dataDir": env.root.join("ipam"),
                    "ranges": [[{"subnet": SUBNET}]],
                },
            },
            {
                "type": "meshbpf-cni",
                "pin_dir": env.pin_dir,
                "state_dir": state_dir(env),
                "log_file": log_file(env),
                // The servers here have no sidecar: this test is about the outbound side.
                "no_inbound": true,
                "capabilities": {"io.kubernetes.cri.pod-annotations": true},
            },
        ],
    })
}

fn state_dir(env: &Env) -> PathBuf {
    env.root.join("cni-state")
}

fn log_file(env: &Env) -> PathBuf {
    env.root.join("cni.log")
}

fn plugin_log(env: &Env) -> String {
    fs::read_to_string(log_file(env)).unwrap_or_default()
}

/// The state file meshbpf-cni keeps for a sandbox's eth0 while it is registered.
fn state_file(env: &Env, sandbox: &str) -> PathBuf {
    state_dir(env).join(NETWORK).join(format!("{sandbox}.eth0"))
}

/// RunPodSandbox, which must succeed; the sandbox as the CRI reports it.
#[track_caller]
fn run(
    ctrd: &mut Containerd,
    env: &Env,
    name: &str,
    ns: &str,
    annotations: &[(&str, &str)],
) -> Sandbox {
    let id = ctrd
        .run_pod(name, ns, annotations)
        .unwrap_or_else(|status| {
            panic!(
                "RunPodSandbox {name}: {status}\nmeshbpf-cni log:\n{}\ncontainerd's log:\n{}",
                plugin_log(env),
                ctrd.log()
            )
        });
    ctrd.sandbox(&id)
}

/// `meshbpf list --json`, by netns cookie.
fn listed(env: &Env) -> Vec<(u64, Value)> {
    let list: Value = serde_json::from_str(&stdout_of(&env.meshbpf(&["list", "--json"]))).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .map(|p| (p["netns_cookie"].as_u64().unwrap(), p.clone()))
        .collect()
}

/// Shuts containerd down as the guard does when dropped, then finds nothing it left.
#[track_caller]
fn shut_down_leaving_nothing(ctrd: &mut Containerd) {
    ctrd.shut_down();
    assert!(
        !ctrd.running(),
        "containerd (pid {}) still runs",
        ctrd.pid()
    );
    assert_nothing_left(&ctrd.footprint());
}

/// Nothing a containerd made is left on the host: its process, shims and sandbox
/// processes, cgroups, network namespaces and mounts (no process is left in its mount
/// namespace, which goes with the footprint's last handle on it).
#[track_caller]
fn assert_nothing_left(footprint: &Footprint) {
    assert!(!footprint.containerd_running());
    assert_eq!(footprint.processes(), Vec::<u32>::new());
    assert_eq!(footprint.cgroups(), Vec::<PathBuf>::new());
    assert!(!footprint.node_netns_exists());
    assert_ne!(
        Some(fs::read_link("/proc/self/ns/mnt").unwrap().as_path()),
        footprint.mount_ns(),
        "containerd ran in the test's mount namespace"
    );
    assert_eq!(footprint.mounts(), Vec::<String>::new());
    // The directories containerd uses whatever its config says were its own, never the
    // host's.
    assert_eq!(host_dirs(), footprint.host_dirs_before);
}

#[test]
fn a_sandbox_without_annotations_starts_as_a_pod_with_no_sidecar_injected() {
    if !privileged() || !containerd_available() {
        return;
    }
    let env = Env::new();
    let _mesh = env.attach();
    let mut ctrd = Containerd::start(&env, &conflist(&env));
    // containerd passes `"io.kubernetes.cri.pod-annotations": null` for a sandbox that has
    // none (a bare CRI client; the kubelet always adds a few). That means no annotations:
    // RunPodSandbox succeeds (it failed with the plugin's code 7), and, as for `{}`, no
    // injected sidecar, so the pod is left out of the mesh as istio-cni leaves it.
    let pod = run(&mut ctrd, &env, "bare", "default", &[]);
    assert!(registered_cookies(&env.pin_dir).is_empty());
    let logged = plugin_log(&env);
    assert!(
        logged.contains(&format!(
            "ADD container={} netns={} ifname=eth0: not registering {}: no sidecar injected",
            pod.id, pod.netns_path, pod.netns_path
        )),
        "{logged}"
    );
    ctrd.stop_pod(&pod.id).unwrap();
    ctrd.remove_pod(&pod.id).unwrap();
    shut_down_leaving_nothing(&mut ctrd);
}

#[test]
fn containerd_sandboxes_are_registered_captured_and_removed_through_the_cri() {
    if !privileged() || !containerd_available() {
        return;
    }
    let mut env = Env::new();
    let mesh = env.attach();
    let mut ctrd = Containerd::start(&env, &conflist(&env));

    // Four pods: one injected (the conf's settings), one injected with a port excluded by
    // annotation, one whose annotations show no injected sidecar, and one injected but in
    // kube-system, which the plugin leaves alone by default.
    let app = run(&mut ctrd, &env, "app", "shop", &[INJECTED]);
    let web = run(
        &mut ctrd,
        &env,
        "web",
        "shop",
        &[
            INJECTED,
            ("traffic.sidecar.istio.io/excludeOutboundPorts", "9090"),
        ],
    );
    let plain = run(
        &mut ctrd,
        &env,
        "plain",
        "shop",
        &[("prometheus.io/scrape", "true")],
    );
    let system = run(&mut ctrd, &env, "dns", "kube-system", &[INJECTED]);

    // The netns containerd handed the plugins (CNI_NETNS, in its own mount namespace) is
    // the sandbox's.
    let app_cookie = cookie(&app.netns());
    let in_containerd = format!(
        "/proc/{}/root/{}",
        ctrd.pid(),
        app.netns_path
            .trim_start_matches("/var")
            .trim_start_matches('/')
    );
    assert_eq!(
        cookie(Path::new(&in_containerd)),
        app_cookie,
        "{in_containerd}"
    );
    // It exists only there: the host's /run/netns never saw it.
    assert!(!Path::new(&app.netns_path).exists(), "{}", app.netns_path);

    // Registration: the pods the plugin should put in the mesh, and only those, with the
    // annotated pod's exclusion.
    let web_cookie = cookie(&web.netns());
    let mut expected = vec![app_cookie, web_cookie];
    expected.sort();
    assert_eq!(registered_cookies(&env.pin_dir), expected);
    let listed = listed(&env);
    let settings = |c: u64| &listed.iter().find(|(cookie, _)| *cookie == c).unwrap().1;
    assert_eq!(
        settings(web_cookie)["exclude_outbound_ports"],
        json!([9090])
    );
    assert_eq!(settings(app_cookie)["exclude_outbound_ports"], json!([]));
    let logged = plugin_log(&env);
    for pod in [&app, &web] {
        assert!(
            logged.contains(&format!(
                "ADD container={} netns={} ifname=eth0: registered",
                pod.id, pod.netns_path
            )),
            "{logged}"
        );
        assert!(state_file(&env, &pod.id).exists());
    }
    // containerd passed the pod's Kubernetes namespace (K8S_POD_NAMESPACE in CNI_ARGS).
    assert!(
        logged.contains(&format!(
            "ADD container={} netns={} ifname=eth0: not registering {}: namespace kube-system \
             is in exclude_namespaces",
            system.id, system.netns_path, system.netns_path
        )),
        "{logged}"
    );
    assert!(
        logged.contains(&format!(
            "ADD container={} netns={} ifname=eth0: not registering {}:",
            plain.id, plain.netns_path, plain.netns_path
        )),
        "{logged}"
    );
    for pod in [&plain, &system] {
        assert!(!state_file(&env, &pod.id).exists());
    }

    // Capture: a container in each mesh pod fetches from the server in `plain` through
    // its pod's sidecar, except on the port the annotation excludes. runc put the
    // containers' processes in cgroups below the attached one; the sidecar stand-in runs in
    // the pod's netns from the test (uid 1337, as istio-proxy).
    let server_pod = env.adopt("plain", plain.netns(), plain.ip);
    let server = server_pod.spawn(
        APP_UID,
        &helper("netprobe"),
        &["http", "0.0.0.0:8080", "0.0.0.0:9090"],
    );
    wait_until(|| server.lines("listening=").len() == 2, || server.output());
    let app_sidecar = env.adopt("app", app.netns(), app.ip).sidecar();
    let web_sidecar = env.adopt("web", web.netns(), web.ip).sidecar();
    let to = |port: u16| format!("{}:{port}", plain.ip);
    let fetch = format!(
        "wget -q -O - http://{}/ && wget -q -O - http://{}/",
        to(8080),
        to(9090)
    );
    for (pod, sidecar, captured) in [
        (&app, &app_sidecar, &[8080, 9090][..]),
        (&web, &web_sidecar, &[8080][..]),
    ] {
        let (code, out) = ctrd.run_container(&pod.id, "fetch", &["/bin/sh", "-c", &fetch]);
        assert_eq!(code, 0, "{out}");
        // Whether through the sidecar or not, the server sees the pod's address.
        let served: Vec<&str> = out.lines().collect();
        assert_eq!(served.len(), 2, "{out}");
        for (line, port) in served.iter().zip([8080, 9090]) {
            assert!(
                line.starts_with(&format!("served by {} to {}:", to(port), pod.ip)),
                "{out}"
            );
        }
        let events = sidecar.lines("outbound ");
        assert_eq!(
            events.len(),
            captured.len(),
            "{events:?}\n{}",
            sidecar.output()
        );
        for (event, port) in events.iter().zip(captured) {
            assert!(
                event.contains(&format!("original_dst={} upstream=connected", to(*port))),
                "{events:?}"
            );
        }
    }
    assert_eq!(counter(&mesh, "connect_redirected"), 3);
    assert_eq!(counter(&mesh, "getsockopt_answered"), 3);

    // StopPodSandbox runs CNI DEL: the pod leaves the mesh and its state goes, though the
    // sidecar still holds its netns. RemovePodSandbox then forgets the sandbox.
    ctrd.stop_pod(&app.id).unwrap();
    assert_eq!(registered_cookies(&env.pin_dir), [web_cookie]);
    assert!(!state_file(&env, &app.id).exists());
    assert!(
        plugin_log(&env).contains(&format!(
            "DEL container={} netns={} ifname=eth0: unregistered netns cookie {app_cookie}",
            app.id, app.netns_path
        )),
        "{}",
        plugin_log(&env)
    );
    assert!(
        !Path::new(&in_containerd).exists(),
        "containerd kept the stopped pod's netns"
    );
    ctrd.remove_pod(&app.id).unwrap();
    assert!(!ctrd.pods().unwrap().contains(&app.id));
    for pod in [&web, &plain, &system] {
        ctrd.stop_pod(&pod.id).unwrap();
        ctrd.remove_pod(&pod.id).unwrap();
    }
    assert!(ctrd.pods().unwrap().is_empty());
    assert!(registered_cookies(&env.pin_dir).is_empty());
    assert!(fs::read_dir(state_dir(&env).join(NETWORK))
        .unwrap()
        .next()
        .is_none());
    drop((app_sidecar, web_sidecar, server));
    shut_down_leaving_nothing(&mut ctrd);
    for pod in [&app, &web, &plain, &system] {
        assert!(!pod.running(), "{pod:?}");
    }
}

#[test]
fn a_test_that_fails_with_sandboxes_running_leaves_nothing_behind() {
    if !privileged() || !containerd_available() {
        return;
    }
    let env = Env::new();
    let _mesh = env.attach();
    let mut seen = None;
    let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut ctrd = Containerd::start(&env, &conflist(&env));
        let pods: Vec<Sandbox> = ["one", "two"]
            .iter()
            .map(|name| run(&mut ctrd, &env, name, "default", &[INJECTED]))
            .collect();
        assert_eq!(registered_cookies(&env.pin_dir).len(), 2);
        assert!(pods.iter().all(Sandbox::running));
        let footprint = ctrd.footprint();
        assert!(!footprint.cgroups().is_empty());
        seen = Some((footprint, pods));
        panic!("a failing assertion with two sandboxes running");
    }));
    assert!(failed.is_err());
    let (footprint, pods) = seen.expect("the sandboxes ran");
    // The guard's Drop removed the sandboxes through the CRI (the plugin's DEL ran), then
    // ended containerd and everything it made.
    assert!(!pods.iter().any(Sandbox::running));
    assert!(registered_cookies(&env.pin_dir).is_empty());
    assert_nothing_left(&footprint);
}

#[test]
fn a_sandbox_with_a_malformed_annotation_fails_naming_it_and_nothing_stays_registered() {
    if !privileged() || !containerd_available() {
        return;
    }
    let env = Env::new();
    let _mesh = env.attach();
    let mut ctrd = Containerd::start(&env, &conflist(&env));
    // istio-cni fails such a pod too (its NewRedirect returns the annotation's validation
    // error): the kubelet shows the reason and retries.
    let err = ctrd
        .run_pod(
            "broken",
            "shop",
            &[
                INJECTED,
                ("traffic.sidecar.istio.io/excludeOutboundPorts", "http"),
            ],
        )
        .expect_err("RunPodSandbox with excludeOutboundPorts: http");
    let message = err.message();
    assert!(
        message.contains("plugin type=\"meshbpf-cni\" failed (add)")
            && message.contains("traffic.sidecar.istio.io/excludeOutboundPorts")
            && message.contains("\"http\""),
        "{message}"
    );
    // containerd removed the failed sandbox and its network; nothing was registered.
    assert!(ctrd.pods().unwrap().is_empty());
    assert!(registered_cookies(&env.pin_dir).is_empty());
    let states = fs::read_dir(state_dir(&env).join(NETWORK));
    assert!(states.map_or(true, |mut d| d.next().is_none()));
    shut_down_leaving_nothing(&mut ctrd);
}
