//! `meshbpf-cni` invoked directly, as a container runtime does: every CNI command, the
//! spec's cases, annotation-driven decisions, and bad input answered with CNI error JSON.

mod common;

use std::path::PathBuf;

use common::k8s::*;
use common::*;
use serde_json::{json, Value};

/// A previous plugin's result, spaced and ordered as no serializer would: ADD must print it
/// back byte for byte.
const PREV: &str = "{\"cniVersion\":\"1.0.0\",  \"interfaces\":[{\"name\":\"eth0\",\"mac\":\"0a:58:c0:00:02:0a\",\"sandbox\":\"/run/netns/x\"}],\n \"ips\":[ {\"address\":\"192.0.2.10/24\",\"gateway\":\"192.0.2.1\",\"interface\":0} ], \"dns\":{ }, \"zz\":1.50}";

fn state_dir(env: &Env) -> PathBuf {
    env.root.join("cni-state")
}

/// The plugin's conf for this env, with `extra` keys, without `prevResult`.
fn conf_without_prev(env: &Env, extra: Value) -> String {
    let fields = json!({
        "cniVersion": "1.0.0",
        "name": "mbt-net",
        "type": "meshbpf-cni",
        "pin_dir": env.pin_dir,
        "state_dir": state_dir(env),
    });
    with_keys(fields, extra).to_string()
}

/// The plugin's conf for this env, with `extra` keys and [`PREV`] as `prevResult`.
fn conf(env: &Env, extra: Value) -> String {
    let text = conf_without_prev(env, extra);
    format!("{},\"prevResult\":{PREV}}}", &text[..text.len() - 1])
}

fn vars<'a>(container: &'a str, pod: &'a Pod) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CONTAINERID", container),
        ("NETNS", pod.netns.to_str().unwrap()),
        ("IFNAME", "eth0"),
    ]
}

fn add(env: &Env, container: &str, pod: &Pod, extra: Value) -> CniCall {
    cni("ADD", &vars(container, pod), &conf(env, extra))
}

fn del(env: &Env, container: &str, pod: &Pod) -> CniCall {
    cni("DEL", &vars(container, pod), &conf(env, json!({})))
}

fn state_files(env: &Env) -> Vec<String> {
    let dir = state_dir(env).join("mbt-net");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn version_names_spec_1_0_0_and_1_1_0() {
    let out = cni("VERSION", &[], r#"{"cniVersion":"1.1.0"}"#);
    out.assert_ok();
    let json = out.json();
    assert_eq!(json["cniVersion"], "1.1.0");
    let versions = json["supportedVersions"].as_array().unwrap();
    for v in ["0.4.0", "1.0.0", "1.1.0"] {
        assert!(versions.contains(&json!(v)), "{json}");
    }
}

#[test]
fn add_registers_the_pod_with_its_conf_settings_and_prints_prev_result_byte_for_byte() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    let mesh = env.attach();
    let pod = env.pod("app");
    let extra = json!({"mesh": "linkerd", "exclude_outbound_ports": [3306], "no_sockmap": true});
    let out = add(&env, "ctr1", &pod, extra);
    out.assert_ok();
    assert_eq!(out.stdout, PREV, "ADD changed prevResult");

    let pods = mesh.pods().unwrap();
    assert_eq!(pods.len(), 1);
    assert_eq!(pods[0].netns_cookie, cookie(&pod.netns));
    let expected = meshbpf::PodSettings {
        exclude_outbound_ports: [3306].into(),
        sockmap: false,
        ..meshbpf::MeshPreset::Linkerd.settings()
    };
    assert_eq!(pods[0].settings, expected);
    assert_eq!(state_files(&env), ["ctr1.eth0"]);
    // CHECK agrees, with the same conf.
    cni(
        "CHECK",
        &vars("ctr1", &pod),
        &conf(
            &env,
            json!({"mesh": "linkerd", "exclude_outbound_ports": "3306", "no_sockmap": true}),
        ),
    )
    .assert_ok();
}

#[test]
fn a_pod_added_by_the_plugin_is_captured_and_a_pod_not_added_is_not() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    let mesh = env.attach();
    let app = env.pod("app");
    let plain = env.pod("plain");
    let server = env.pod("server");
    let _server = server.server(&["0.0.0.0:8080"]);
    add(&env, "ctr-app", &app, json!({})).assert_ok();
    let sidecar = app.sidecar();
    let dest = server.addr(false, 8080);

    let probe = app.connect(&dest, &["--message", "via-cni"]);
    assert!(probe.get("reply").contains("msg=via-cni"), "{probe:?}");
    let events = sidecar.lines("outbound ");
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(
        events[0].contains(&format!("original_dst={dest}")),
        "{events:?}"
    );

    // The pod the plugin never saw connects straight to the server.
    let probe = plain.connect(&dest, &["--message", "direct"]);
    assert_eq!(
        probe.get("reply"),
        format!(
            "from={dest} saw={}:{} msg=direct",
            plain.v4,
            port_of(&probe)
        ),
    );
    assert_eq!(counter(&mesh, "connect_redirected"), 1);
    assert_eq!(registered_cookies(&env.pin_dir), [cookie(&app.netns)]);
}

/// The source port the server saw, from `reply=from=... saw=IP:PORT msg=...`.
fn port_of(probe: &Probe) -> String {
    let reply = probe.get("reply");
    let saw = reply
        .split(' ')
        .find_map(|w| w.strip_prefix("saw="))
        .unwrap();
    saw.rsplit(':').next().unwrap().to_string()
}

#[test]
fn del_unregisters_even_when_the_netns_is_gone_and_again_is_a_no_op() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    env.attach();
    let pod = env.pod("app");
    let keep = env.pod("keep");
    add(&env, "ctr1", &pod, json!({})).assert_ok();
    add(&env, "ctr2", &keep, json!({})).assert_ok();
    assert_eq!(registered_cookies(&env.pin_dir).len(), 2);

    // The runtime removed the netns before DEL (allowed: DEL must still clean up).
    let name = pod.netns.file_name().unwrap().to_str().unwrap().to_string();
    let status = std::process::Command::new("ip")
        .args(["netns", "del", &name])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(!pod.netns.exists());

    let out = del(&env, "ctr1", &pod);
    out.assert_ok();
    assert_eq!(out.stdout, "", "DEL prints nothing on success");
    assert_eq!(registered_cookies(&env.pin_dir), [cookie(&keep.netns)]);
    assert_eq!(state_files(&env), ["ctr2.eth0"]);
    // Twice, and for a container ADD never saw: success, nothing else touched.
    del(&env, "ctr1", &pod).assert_ok();
    del(&env, "never-added", &pod).assert_ok();
    assert_eq!(registered_cookies(&env.pin_dir), [cookie(&keep.netns)]);
}

#[test]
fn del_after_a_failed_add_succeeds() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    let pod = env.pod("app");
    // Before anything is attached: ADD asks to try again later, DEL succeeds.
    let out = add(&env, "ctr1", &pod, json!({}));
    assert_eq!(out.error_code(), 11, "{out:?}");
    del(&env, "ctr1", &pod).assert_ok();

    env.attach();
    // A bad conf: ADD refuses it, DEL with the same conf still succeeds.
    let bad = conf(&env, json!({"bogus": true}));
    let out = cni("ADD", &vars("ctr2", &pod), &bad);
    assert_eq!(out.error_code(), 2);
    cni("DEL", &vars("ctr2", &pod), &bad).assert_ok();
    // Even a conf that is not JSON.
    cni("DEL", &vars("ctr2", &pod), "{not json").assert_ok();
    assert!(registered_cookies(&env.pin_dir).is_empty());
    assert!(state_files(&env).is_empty());
}

#[test]
fn check_fails_when_the_pod_is_not_registered_as_its_conf_says() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    env.attach();
    let pod = env.pod("app");
    add(&env, "ctr1", &pod, json!({})).assert_ok();
    let check = || cni("CHECK", &vars("ctr1", &pod), &conf(&env, json!({})));
    check().assert_ok();

    // Registered with other settings behind the plugin's back.
    let netns = pod.netns.to_str().unwrap();
    stdout_of(&env.meshbpf(&["register", "--netns", netns, "--outbound-port", "4140"]));
    let out = check();
    out.assert_error(102, "outbound_port: 4140");
    assert!(out.message().contains("15001"), "{}", out.message());

    stdout_of(&env.meshbpf(&["unregister", "--netns", netns]));
    let out = check();
    out.assert_error(101, "not registered");
}

#[test]
fn status_fails_with_code_50_until_meshbpf_is_attached() {
    if !privileged() {
        return;
    }
    let env = Env::new();
    let status = || cni("STATUS", &[], &conf_without_prev(&env, json!({})));
    let out = status();
    assert_eq!(out.error_code(), 50, "{out:?}");
    assert!(out.message().contains("not attached"), "{}", out.message());
    env.attach();
    let out = status();
    out.assert_ok();
    assert_eq!(out.stdout, "");
}

#[test]
fn gc_unregisters_the_attachments_not_in_valid_attachments() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    env.attach();
    let a = env.pod("a");
    let b = env.pod("b");
    add(&env, "ctr-a", &a, json!({})).assert_ok();
    add(&env, "ctr-b", &b, json!({})).assert_ok();

    let gc = conf_without_prev(
        &env,
        json!({"cniVersion": "1.1.0", "cni.dev/valid-attachments": [{"containerID": "ctr-a", "ifname": "eth0"}]}),
    );
    let out = cni("GC", &[], &gc);
    out.assert_ok();
    assert_eq!(out.stdout, "");
    assert_eq!(registered_cookies(&env.pin_dir), [cookie(&a.netns)]);
    assert_eq!(state_files(&env), ["ctr-a.eth0"]);
    // The valid attachment's DEL still works afterwards.
    del(&env, "ctr-a", &a).assert_ok();
    assert!(registered_cookies(&env.pin_dir).is_empty());
}

#[test]
fn pod_annotations_decide_who_is_registered_and_with_what() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    let mesh = env.attach();
    let with = annotated;
    let injected = json!({
        "sidecar.istio.io/status": "{\"containers\":[\"istio-proxy\"]}",
        "traffic.sidecar.istio.io/excludeOutboundPorts": "3306",
        "traffic.sidecar.istio.io/includeOutboundIPRanges": "192.0.2.0/24,2001:db8::/32",
    });
    let cases = [
        ("plain", json!({"prometheus.io/scrape": "true"}), None),
        (
            "optout",
            json!({"sidecar.istio.io/status": "{}", "sidecar.istio.io/inject": "false"}),
            None,
        ),
        (
            "system",
            injected.clone(),
            Some("K8S_POD_NAMESPACE=kube-system"),
        ),
        (
            "mesh",
            injected,
            Some("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web"),
        ),
    ];
    let mut pods = Vec::new();
    for (name, annotations, args) in cases {
        let pod = env.pod(name);
        let mut v = vars(name, &pod);
        if let Some(args) = args {
            v.push(("ARGS", args));
        }
        let out = cni("ADD", &v, &conf(&env, with(annotations)));
        out.assert_ok();
        assert_eq!(out.stdout, PREV, "{name}");
        pods.push(pod);
    }
    let registered = mesh.pods().unwrap();
    assert_eq!(registered.len(), 1, "{registered:?}");
    assert_eq!(registered[0].netns_cookie, cookie(&pods[3].netns));
    let s = &registered[0].settings;
    assert_eq!(s.exclude_outbound_ports, [3306].into());
    assert_eq!(
        s.include_outbound_cidrs,
        meshbpf::Cidrs::parse("192.0.2.0/24,2001:db8::/32").unwrap()
    );
    assert_eq!(
        s.proxy_uids,
        [1337].into(),
        "the conf's settings stay under"
    );

    // A bad traffic annotation fails the pod's ADD by name, and registers nothing.
    let bad = env.pod("bad");
    let out = cni(
        "ADD",
        &vars("bad", &bad),
        &conf(
            &env,
            with(
                json!({"sidecar.istio.io/status": "{}", "traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.0.0.0/99"}),
            ),
        ),
    );
    assert_eq!(out.error_code(), 7);
    assert!(out.message().contains("10.0.0.0/99"), "{}", out.message());
    assert_eq!(mesh.pods().unwrap().len(), 1);
}

#[test]
fn bad_conf_or_environment_is_a_cni_error_and_registers_nothing() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    env.attach();
    let pod = env.pod("app");
    let netns = pod.netns.to_str().unwrap().to_string();
    let good_vars = vars("ctr1", &pod);
    // What is wrong, the conf, the CNI_* variables, the error code, what the message names.
    type Case<'a> = (&'a str, String, Vec<(&'a str, &'a str)>, u64, &'a str);
    let cases: Vec<Case> = vec![
        (
            "unknown key",
            conf(&env, json!({"outbound_prot": 15001})),
            good_vars.clone(),
            2,
            "\"outbound_prot\": 15001",
        ),
        (
            "bad CIDR",
            conf(&env, json!({"exclude_outbound_cidrs": "192.0.2.0/33"})),
            good_vars.clone(),
            7,
            "exclude_outbound_cidrs",
        ),
        (
            "missing pin dir",
            conf(&env, json!({"pin_dir": "/nonexistent/meshbpf"})),
            good_vars.clone(),
            7,
            "pin_dir /nonexistent/meshbpf",
        ),
        (
            "not JSON",
            "{\"cniVersion\": ".to_string(),
            good_vars.clone(),
            6,
            "JSON",
        ),
        (
            "unsupported version",
            conf(&env, json!({"cniVersion": "9.0.0"})),
            good_vars.clone(),
            1,
            "9.0.0",
        ),
        (
            "no CNI_NETNS",
            conf(&env, json!({})),
            vec![("CONTAINERID", "ctr1"), ("IFNAME", "eth0")],
            4,
            "CNI_NETNS",
        ),
        (
            "not a netns",
            conf(&env, json!({})),
            vec![
                ("CONTAINERID", "ctr1"),
                ("NETNS", "/etc/hostname"),
                ("IFNAME", "eth0"),
            ],
            4,
            "not a network namespace",
        ),
        (
            "the host's netns",
            conf(&env, json!({})),
            vec![
                ("CONTAINERID", "ctr1"),
                ("NETNS", "/proc/self/ns/net"),
                ("IFNAME", "eth0"),
            ],
            4,
            "host's own network namespace",
        ),
        (
            "not chained",
            conf_without_prev(&env, json!({})),
            good_vars.clone(),
            7,
            "chained",
        ),
    ];
    for (what, stdin, vars, code, named) in cases {
        let out = cni("ADD", &vars, &stdin);
        assert_eq!(out.error_code(), code, "{what}: {out:?}");
        assert!(out.message().contains(named), "{what}: {}", out.message());
        assert!(
            registered_cookies(&env.pin_dir).is_empty(),
            "{what} registered something"
        );
        assert!(state_files(&env).is_empty(), "{what} left state");
    }
    assert!(std::path::Path::new(&netns).exists());
}

#[test]
fn parallel_adds_and_dels_of_different_containers_lose_nothing() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    let mesh = env.attach();
    let pods: Vec<Pod> = (0..12).map(|i| env.pod(&format!("p{i}"))).collect();
    let run_all = |command: &'static str| {
        std::thread::scope(|scope| {
            let handles: Vec<_> = pods
                .iter()
                .enumerate()
                .map(|(i, pod)| {
                    let env = &env;
                    scope.spawn(move || {
                        let id = format!("ctr{i}");
                        cni(command, &vars(&id, pod), &conf(env, json!({})))
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap().assert_ok();
            }
        })
    };
    run_all("ADD");
    let mut expected: Vec<u64> = pods.iter().map(|p| cookie(&p.netns)).collect();
    expected.sort();
    assert_eq!(registered_cookies(&env.pin_dir), expected);
    assert_eq!(state_files(&env).len(), 12);
    run_all("DEL");
    assert!(mesh.pods().unwrap().is_empty());
    assert!(state_files(&env).is_empty());
}

#[test]
fn stdout_carries_only_the_result_while_logs_go_to_stderr_and_the_log_file() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    env.attach();
    let pod = env.pod("app");
    let log = env.root.join("cni.log");
    let out = add(&env, "ctr1", &pod, json!({"log_file": log}));
    assert_eq!(out.stdout, PREV);
    assert!(out.stderr.contains("registered"), "{}", out.stderr);
    // Each line names its level, the container ID and the pod's netns, in both places.
    let logged = std::fs::read_to_string(&log).unwrap();
    let added = format!(
        " INFO meshbpf-cni ADD container=ctr1 netns={} ifname=eth0: registered",
        pod.netns.display()
    );
    assert!(logged.contains(&added), "{logged}");
    assert!(out.stderr.contains(&added), "{}", out.stderr);
    let out = cni(
        "DEL",
        &vars("ctr1", &pod),
        &conf(&env, json!({"log_file": log})),
    );
    assert_eq!(out.stdout, "");
    let deleted = format!(
        " INFO meshbpf-cni DEL container=ctr1 netns={} ifname=eth0: unregistered netns cookie",
        pod.netns.display()
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains(&deleted), "{logged}");
}

/// The `runtimeConfig` containerd and CRI-O send with a pod's annotations.
fn annotated(annotations: Value) -> Value {
    json!({"runtimeConfig": {"io.kubernetes.cri.pod-annotations": annotations}})
}

/// `extra` keys with `more` keys added.
fn with_keys(mut extra: Value, more: Value) -> Value {
    if let (Some(extra), Value::Object(more)) = (extra.as_object_mut(), more) {
        extra.extend(more);
    }
    extra
}

#[test]
fn null_pod_annotations_from_containerd_mean_none() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    let mesh = env.attach();
    let pod = env.pod("app");
    // What containerd 1.6's CRI plugin sends for a sandbox without annotations.
    let out = add(&env, "ctr1", &pod, annotated(Value::Null));
    out.assert_ok();
    assert_eq!(out.stdout, PREV);
    // No annotations: no sidecar.istio.io/status, so no injected sidecar to capture for.
    assert!(mesh.pods().unwrap().is_empty());
    assert!(out.stderr.contains("no sidecar injected"), "{}", out.stderr);
    cni(
        "CHECK",
        &vars("ctr1", &pod),
        &conf(&env, annotated(Value::Null)),
    )
    .assert_ok();
    del(&env, "ctr1", &pod).assert_ok();
}

#[test]
fn an_error_in_the_conf_reaches_the_log_file() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    env.attach();
    let pod = env.pod("app");
    let log = env.root.join("cni.log");
    // Each error's details name where the fix goes: the conf's keys, or the pod.
    let conf_fix = "meshbpf-cni takes: pin_dir,";
    for (extra, code, named, fix) in [
        (
            json!({"outbound_prot": 15001}),
            2,
            "outbound_prot",
            conf_fix,
        ),
        (
            json!({"exclude_outbound_cidrs": "192.0.2.0/33"}),
            7,
            "192.0.2.0/33",
            conf_fix,
        ),
        (
            annotated(json!({"sidecar.istio.io/status": "{}",
                             "traffic.sidecar.istio.io/excludeOutboundPorts": "http"})),
            7,
            "\"http\"",
            "the pod's annotation is wrong, not the plugin's conf",
        ),
    ] {
        let out = add(
            &env,
            "ctr1",
            &pod,
            with_keys(extra, json!({"log_file": log})),
        );
        assert_eq!(out.error_code(), code, "{out:?}");
        assert!(out.message().contains(fix), "{}", out.message());
        let logged = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(
            logged
                .lines()
                .any(|l| l.contains(&format!("error {code}")) && l.contains(named)),
            "{named} not in the log file:\n{logged}"
        );
    }
    assert!(registered_cookies(&env.pin_dir).is_empty());
}

#[test]
fn an_unknown_traffic_annotation_is_logged_and_counted_not_refused() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    let mesh = env.attach();
    let pod = env.pod("app");
    let log = env.root.join("cni.log");
    let annotations = json!({
        "sidecar.istio.io/status": "{}",
        "traffic.sidecar.istio.io/foo": "bar",
        "traffic.sidecar.istio.io/excludeOutboundPorts": "3306",
        "prometheus.io/scrape": "true",
    });
    let extra = with_keys(annotated(annotations), json!({"log_file": log}));
    let out = add(&env, "ctr1", &pod, extra.clone());
    out.assert_ok();
    assert_eq!(out.stdout, PREV);
    let pods = mesh.pods().unwrap();
    assert_eq!(pods.len(), 1);
    assert_eq!(pods[0].settings.exclude_outbound_ports, [3306].into());
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains(
            "ignored 1 traffic annotation(s) neither istio-cni nor meshbpf reads: \
             traffic.sidecar.istio.io/foo"
        ),
        "{logged}"
    );
    assert!(
        logged.contains("left alone 1 annotation(s) that are not Istio's traffic settings: prometheus.io/scrape"),
        "{logged}"
    );
    cni("CHECK", &vars("ctr1", &pod), &conf(&env, extra)).assert_ok();
}

/// Gives `pod` a second interface `ifname`: a veth to `far` with 203.0.113.1/24 and
/// 2001:db8:1::1/64 (`far`'s end has .2 and ::2), and a route to 198.51.100.0/24 through it,
/// to `far`, which holds 198.51.100.7 on lo.
fn second_interface(pod: &Pod, far: &Pod, ifname: &str) {
    let ip = |ns: &str, args: &str| {
        let mut argv = vec!["-n", ns];
        argv.extend(args.split(' '));
        sh(std::process::Command::new("ip").args(&argv));
    };
    let (near, other) = (pod.name.as_str(), far.name.as_str());
    ip(
        near,
        &format!("link add {ifname} type veth peer name peer0 netns {other}"),
    );
    ip(near, &format!("addr add 203.0.113.1/24 dev {ifname}"));
    ip(
        near,
        &format!("addr add 2001:db8:1::1/64 dev {ifname} nodad"),
    );
    ip(near, &format!("link set {ifname} up"));
    ip(near, "route add 198.51.100.0/24 via 203.0.113.2");
    ip(other, "addr add 203.0.113.2/24 dev peer0");
    ip(other, "addr add 2001:db8:1::2/64 dev peer0 nodad");
    ip(other, "addr add 198.51.100.7/32 dev lo");
    ip(other, "link set peer0 up");
}

#[test]
fn exclude_interfaces_leaves_what_the_interface_reaches_uncaptured() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    let mesh = env.attach();
    let app = env.pod("app");
    let far = env.pod("far");
    let server = env.pod("server");
    second_interface(&app, &far, "net1");
    let _far = far.server(&["0.0.0.0:8080", "[2001:db8:1::2]:8081"]);
    let _server = server.server(&["0.0.0.0:8080"]);
    let log = env.root.join("cni.log");
    let annotations = json!({
        "sidecar.istio.io/status": "{}",
        "traffic.sidecar.istio.io/excludeInterfaces": "net1",
    });
    let extra = with_keys(annotated(annotations), json!({"log_file": log}));
    add(&env, "ctr-app", &app, extra.clone()).assert_ok();
    let pods = mesh.pods().unwrap();
    assert_eq!(pods.len(), 1);
    let excluded: Vec<String> = pods[0]
        .settings
        .exclude_outbound_cidrs
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        excluded,
        [
            "198.51.100.0/24",
            "203.0.113.0/24",
            "203.0.113.1/32",
            "2001:db8:1::/64",
            "2001:db8:1::1/128"
        ],
        "what net1 reaches: its addresses, its subnets, the route through it"
    );
    let sidecar = app.sidecar();

    // Through net1, to its subnet and along its route: straight to the server, as behind
    // istio-iptables' `-o net1 -j RETURN`.
    for (dest, saw) in [
        ("203.0.113.2:8080", "203.0.113.1"),
        ("198.51.100.7:8080", "203.0.113.1"),
        ("[2001:db8:1::2]:8081", "[2001:db8:1::1]"),
    ] {
        let probe = app.connect(dest, &["--message", "direct"]);
        assert_eq!(
            probe.get("reply"),
            format!("from={dest} saw={saw}:{} msg=direct", port_of(&probe)),
        );
    }
    assert!(
        sidecar.lines("outbound ").is_empty(),
        "{}",
        sidecar.output()
    );
    assert_eq!(counter(&mesh, "skip_excluded_cidr"), 3);
    // Through eth0: captured as before.
    let dest = server.addr(false, 8080);
    let probe = app.connect(&dest, &["--message", "captured"]);
    assert!(probe.get("reply").contains("msg=captured"), "{probe:?}");
    let events = sidecar.lines("outbound ");
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(
        events[0].contains(&format!("original_dst={dest}")),
        "{events:?}"
    );

    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("excludeInterfaces net1: outbound to 198.51.100.0/24,"),
        "{logged}"
    );
    let check = || cni("CHECK", &vars("ctr-app", &app), &conf(&env, extra.clone()));
    check().assert_ok();

    // Decided at ADD: a route through net1 added since is not excluded, and CHECK says so.
    sh(std::process::Command::new("ip").args([
        "-n",
        &app.name,
        "route",
        "add",
        "2001:db8:2::/48",
        "via",
        "2001:db8:1::2",
    ]));
    let out = check();
    out.assert_error(102, "2001:db8:2::/48");
}

#[test]
fn exclude_interfaces_naming_an_interface_the_pod_lacks_excludes_nothing() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    let mesh = env.attach();
    let app = env.pod("app");
    let annotations = json!({
        "sidecar.istio.io/status": "{}",
        "traffic.sidecar.istio.io/excludeInterfaces": "net7",
    });
    let out = add(&env, "ctr-app", &app, annotated(annotations));
    out.assert_ok();
    assert!(
        out.stderr.contains("net7 not in the pod at ADD"),
        "{}",
        out.stderr
    );
    let pods = mesh.pods().unwrap();
    assert_eq!(pods[0].settings, meshbpf::PodSettings::default());
}

#[test]
fn kubevirt_interfaces_start_the_pod_and_its_own_connections_stay_captured() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    let mesh = env.attach();
    let app = env.pod("app");
    let far = env.pod("far");
    second_interface(&app, &far, "k6t-eth0");
    let _far = far.server(&["0.0.0.0:8080"]);
    let _app = app.server(&["0.0.0.0:8080"]);
    // As KubeVirt's virt-controller annotates a VM's pod: both names.
    let annotations = json!({
        "sidecar.istio.io/status": "{}",
        "traffic.sidecar.istio.io/kubevirtInterfaces": "k6t-eth0",
        "istio.io/reroute-virtual-interfaces": "k6t-eth0",
    });
    let out = add(&env, "ctr-app", &app, annotated(annotations));
    out.assert_ok();
    assert!(
        out.stderr
            .contains("kubevirtInterfaces k6t-eth0: the VM's traffic is forwarded"),
        "{}",
        out.stderr
    );
    let pods = mesh.pods().unwrap();
    assert_eq!(pods.len(), 1);
    assert_eq!(pods[0].settings, meshbpf::PodSettings::default());
    let sidecar = app.sidecar();

    // The pod's own connection out of the VM bridge is captured, as istio-iptables' OUTPUT
    // chain captures it (its -k rules are all PREROUTING).
    let probe = app.connect("203.0.113.2:8080", &["--message", "to-vm"]);
    assert!(probe.get("reply").contains("msg=to-vm"), "{probe:?}");
    let events = sidecar.lines("outbound ");
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(
        events[0].contains("original_dst=203.0.113.2:8080"),
        "{events:?}"
    );

    // The book, "Where it differs from iptables": a connection arriving on the bridge to the pod's
    // own sockets is captured inbound like any other (iptables: `-i k6t-eth0 -j RETURN`,
    // then to the outbound listener); the stand-in has no inbound listener, so it is
    // refused.
    let probe = far.connect("203.0.113.1:8080", &["--message", "from-vm"]);
    assert!(!probe.ok && probe.stderr.contains("refused"), "{probe:?}");
    assert_eq!(counter(&mesh, "inbound_refused"), 1);
}
