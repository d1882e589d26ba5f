//! deploy/charts/meshbpf, rendered by Helm's own engine (PyPI helm-python-sdk, through
//! scripts/render-deploy.sh): the default values, each platform and the other modes give valid
//! Kubernetes objects (kubernetes-validate, offline, strict), the chart lints clean, its
//! schema refuses bad values naming them, the plain manifests in deploy/ are its rendering byte
//! for byte, and the agent's container runs with exactly the capabilities the chart grants:
//! the agent's real work (attach, plugin install, conflist, a pod found running, a pod
//! registered through the installed plugin, gc, metrics, uninstall) succeeds with them and the
//! chart's mounts (a read-only root filesystem, the node's netns pins followed), and fails
//! without any one of them.

mod common;

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::k8s::*;
use common::manifests::validator;
use common::*;
use serde_json::{json, Value};

fn root() -> PathBuf {
    repo_root()
}

/// The first line scripts/render-deploy.sh writes above the rendered manifests.
const HEADER: &str = "# Rendered from deploy/charts/meshbpf by scripts/render-deploy.sh: edit the chart, not this file.\n";

/// Whether the chart can be rendered here: scripts/render-deploy.sh exits 3 when Helm's
/// engine (helm-python-sdk) is missing. The test then skips, except under CI, where it fails.
#[track_caller]
fn helm_available() -> bool {
    let out = render_script(&["render", "{}"]);
    if out.status.code() == Some(3) {
        assert!(
            std::env::var_os("CI").is_none(),
            "helm-python-sdk is missing and CI is set: run scripts/deps.sh\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        skip("helm-python-sdk is missing (scripts/deps.sh installs it)");
        return false;
    }
    true
}

fn render_script(args: &[&str]) -> Output {
    Command::new(root().join("scripts/render-deploy.sh"))
        .args(args)
        .output()
        .expect("run scripts/render-deploy.sh")
}

/// The chart's manifests for `values`, or the script's exit code and stderr. Each rendering is
/// made once per test binary (Helm's engine takes a second or more to start), and shared.
fn render(values: &Value) -> Result<String, (Option<i32>, String)> {
    type Renderings = Mutex<HashMap<String, Result<String, (Option<i32>, String)>>>;
    static RENDERED: OnceLock<Renderings> = OnceLock::new();
    let key = values.to_string();
    let cache = RENDERED.get_or_init(Default::default);
    if let Some(done) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return done.clone();
    }
    let out = render_script(&["render", &key]);
    let result = if out.status.success() {
        Ok(String::from_utf8(out.stdout).expect("UTF-8 manifests"))
    } else {
        Err((
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, result.clone());
    result
}

/// The chart's objects for `values` (each YAML document of its rendering, as JSON).
#[track_caller]
fn objects(values: &Value) -> Vec<Value> {
    let text = render(values).unwrap_or_else(|e| panic!("{values}: {e:?}"));
    yaml_documents(&text)
}

/// A YAML stream's documents as JSON, by the virtualenv's PyYAML (the script's own reader).
#[track_caller]
fn yaml_documents(text: &str) -> Vec<Value> {
    let python = std::env::var_os("MESHBPF_PYTHON").unwrap_or("/opt/meshbpf-py/bin/python".into());
    let mut child = Command::new(python)
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d]))",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run python");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).expect("a JSON list of objects")
}

/// The object of `kind` in `objects`.
#[track_caller]
fn object<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in {objects:#?}"))
}

/// The container (or init container) `name` of the DaemonSet in `objects`.
#[track_caller]
fn container<'a>(objects: &'a [Value], name: &str) -> &'a Value {
    let spec = &object(objects, "DaemonSet")["spec"]["template"]["spec"];
    ["containers", "initContainers"]
        .iter()
        .filter_map(|key| spec[key].as_array())
        .flatten()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name} in {spec:#}"))
}

/// The host path of the DaemonSet's volume `name`.
#[track_caller]
fn host_path(objects: &[Value], name: &str) -> String {
    let volumes = &object(objects, "DaemonSet")["spec"]["template"]["spec"]["volumes"];
    volumes
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == name))
        .and_then(|v| v["hostPath"]["path"].as_str())
        .unwrap_or_else(|| panic!("no hostPath volume {name} in {volumes:#}"))
        .to_string()
}

fn command_of(container: &Value) -> Vec<String> {
    container["command"]
        .as_array()
        .expect("a command")
        .iter()
        .map(|a| a.as_str().expect("a string").to_string())
        .collect()
}

#[test]
fn the_plain_manifests_in_deploy_are_the_chart_rendered_byte_for_byte() {
    if !helm_available() {
        return;
    }
    for (file, values) in [
        ("meshbpf.yaml", json!({})),
        ("uninstall.yaml", json!({"uninstall": true})),
    ] {
        let rendered = render(&values).unwrap_or_else(|e| panic!("{e:?}"));
        let plain = fs::read_to_string(root().join("deploy").join(file)).unwrap();
        assert!(
            plain == format!("{HEADER}{rendered}"),
            "deploy/{file} is not the chart's rendering: run scripts/render-deploy.sh"
        );
    }
    // The script's own check agrees.
    let out = render_script(&["--check"]);
    assert!(out.status.success(), "{out:?}");
}

/// The values of each rendering the tests validate: the defaults, each platform, and the
/// settings that change the objects' shape.
fn renderings() -> Vec<(&'static str, Value)> {
    vec![
        ("default", json!({})),
        ("gke", json!({"platform": "gke"})),
        ("k3s", json!({"platform": "k3s"})),
        ("microk8s", json!({"platform": "microk8s"})),
        ("uninstall", json!({"uninstall": true, "platform": "gke"})),
        (
            "node-ip",
            json!({"agent": {"listenAddress": "node"}, "podMonitor": {"enabled": true}}),
        ),
        (
            "loopback",
            json!({"agent": {"listenAddress": "127.0.0.1"}, "bpffs": {"mount": false}}),
        ),
        ("unserved", json!({"agent": {"listenAddress": ""}})),
        (
            "custom",
            json!({
                "image": {"digest": format!("sha256:{}", "ab".repeat(32))},
                "cni": {"binDir": "/srv/cni/bin", "stateDir": "/var/run/mesh/cni", "podAnnotations": false},
                "pinDir": "/sys/fs/bpf/mesh",
                "agent": {"maxPods": 110, "maxConnections": 16384, "logLevel": "debug", "logFormat": "json"},
                "resources": {"limits": {"cpu": "500m", "memory": "128Mi"}},
                "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "10%"}},
                "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "mesh", "effect": "NoSchedule"}],
                "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "mesh", "operator": "Exists"}]}]}}},
                "imagePullSecrets": [{"name": "registry"}],
                // What a parent chart sends its subcharts: its globals, and the condition
                // that enables this one.
                "global": {"imageRegistry": "registry.example.com"},
                "enabled": true,
            }),
        ),
    ]
}

#[test]
fn every_rendering_of_the_chart_is_valid_kubernetes_objects() {
    if !helm_available() {
        return;
    }
    let Some(validator) = validator() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("meshbpf-chart-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let _cleanup = RemoveOnDrop(dir.clone());
    let mut files = Vec::new();
    for (name, values) in renderings() {
        let text = render(&values).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        // kubernetes-validate has the Kubernetes schemas, not the Prometheus Operator's: the
        // PodMonitor is checked by hand below.
        let kept: Vec<&str> = text
            .split("---\n")
            .filter(|doc| !doc.contains("kind: PodMonitor"))
            .collect();
        let file = dir.join(format!("{name}.yaml"));
        fs::write(&file, kept.join("---\n")).unwrap();
        files.push(file);
    }
    let out = Command::new(&validator)
        .arg("--strict")
        .args(&files)
        .output()
        .expect("run kubernetes-validate");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    for (name, _) in renderings() {
        for resource in ["configmap/meshbpf-cni", "daemonset/meshbpf "] {
            assert!(
                text.contains(&format!("{name}.yaml passed for resource {resource}")),
                "{name}: {text}"
            );
        }
    }
    assert!(text.contains("gke.yaml passed for resource resourcequota/meshbpf"));
}

#[test]
fn platforms_and_values_reach_the_objects() {
    if !helm_available() {
        return;
    }
    let all: std::collections::BTreeMap<&str, Vec<Value>> = renderings()
        .into_iter()
        .map(|(name, values)| (name, objects(&values)))
        .collect();
    let dirs = |name: &str| {
        (
            host_path(&all[name], "cni-bin"),
            host_path(&all[name], "cni-conf"),
        )
    };
    assert_eq!(
        dirs("default"),
        ("/opt/cni/bin".into(), "/etc/cni/net.d".into())
    );
    assert_eq!(
        dirs("gke"),
        ("/home/kubernetes/bin".into(), "/etc/cni/net.d".into())
    );
    assert_eq!(
        dirs("k3s"),
        (
            "/var/lib/rancher/k3s/data/cni".into(),
            "/var/lib/rancher/k3s/agent/etc/cni/net.d".into()
        )
    );
    assert_eq!(host_path(&all["custom"], "cni-bin"), "/srv/cni/bin");
    // A value given wins over the platform's.
    let over = objects(&json!({"platform": "gke", "cni": {"binDir": "/opt/cni/bin"}}));
    assert_eq!(host_path(&over, "cni-bin"), "/opt/cni/bin");
    // GKE admits system-node-critical outside kube-system only under a quota naming it.
    let quota = object(&all["gke"], "ResourceQuota");
    assert_eq!(
        quota["spec"]["scopeSelector"]["matchExpressions"][0]["values"],
        json!(["system-node-critical"])
    );
    assert!(!all["default"].iter().any(|o| o["kind"] == "ResourceQuota"));

    // The agent on every node: Linux nodes, tolerating every taint, node-critical.
    let pod = &object(&all["default"], "DaemonSet")["spec"]["template"]["spec"];
    assert_eq!(pod["nodeSelector"], json!({"kubernetes.io/os": "linux"}));
    assert_eq!(pod["tolerations"], json!([{"operator": "Exists"}]));
    assert_eq!(pod["priorityClassName"], "system-node-critical");

    // The listen address: the node's IP through the downward API, loopback with the probes
    // sent there, or not served at all (no probes, no metrics port).
    let agent = container(&all["node-ip"], "agent");
    assert!(command_of(agent).contains(&"--listen=$(NODE_IP):9190".to_string()));
    assert_eq!(
        agent["env"][0]["valueFrom"]["fieldRef"]["fieldPath"],
        "status.hostIP"
    );
    let monitor = object(&all["node-ip"], "PodMonitor");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(monitor["spec"]["podMetricsEndpoints"][0]["port"], "metrics");
    assert_eq!(agent["ports"][0]["name"], "metrics");
    assert_eq!(
        monitor["spec"]["selector"]["matchLabels"],
        object(&all["node-ip"], "DaemonSet")["spec"]["selector"]["matchLabels"]
    );
    let agent = container(&all["loopback"], "agent");
    assert!(command_of(agent).contains(&"--listen=127.0.0.1:9190".to_string()));
    assert_eq!(agent["readinessProbe"]["httpGet"]["host"], "127.0.0.1");
    assert_eq!(agent["livenessProbe"]["httpGet"]["host"], "127.0.0.1");
    let agent = container(&all["unserved"], "agent");
    assert!(command_of(agent).contains(&"--listen=none".to_string()));
    assert!(agent.get("readinessProbe").is_none() && agent.get("ports").is_none());
    let served = render(&json!({"agent": {"listenAddress": "::1"}})).unwrap();
    assert!(served.contains("--listen=[::1]:9190"), "{served}");
    // A PodMonitor cannot scrape loopback: refused at render, saying why.
    let (code, err) =
        render(&json!({"agent": {"listenAddress": "127.0.0.1"}, "podMonitor": {"enabled": true}}))
            .unwrap_err();
    assert_eq!(code, Some(2));
    assert!(
        err.contains("cannot scrape an agent listening on loopback"),
        "{err}"
    );

    // The image by digest; the pin dir and state dir in the flags, the conf and the mounts.
    let custom = &all["custom"];
    let agent = container(custom, "agent");
    assert_eq!(
        agent["image"],
        format!("registry.example.com/meshbpf@sha256:{}", "ab".repeat(32))
    );
    for flag in [
        "--pin-dir=/sys/fs/bpf/mesh",
        "--max-pods=110",
        "--max-connections=16384",
        "--log-level=debug",
        "--log-format=json",
    ] {
        assert!(command_of(agent).contains(&flag.to_string()), "{flag}");
    }
    let conf: Value = serde_json::from_str(
        object(custom, "ConfigMap")["data"]["plugin.json"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(conf["pin_dir"], "/sys/fs/bpf/mesh");
    assert_eq!(conf["state_dir"], "/var/run/mesh/cni");
    assert!(conf.get("capabilities").is_none(), "{conf}");

    // Uninstall mode: the same DaemonSet (a rolling update replaces the agent node by node),
    // its init container running `meshbpf agent --uninstall` with the release's dirs and conf.
    let uninstall = &all["uninstall"];
    let ds = object(uninstall, "DaemonSet");
    assert_eq!(ds["metadata"]["name"], "meshbpf");
    let init = container(uninstall, "uninstall");
    let command = command_of(init);
    assert_eq!(command[..3], ["meshbpf", "agent", "--uninstall"]);
    assert!(command.contains(&"--plugin-conf=/etc/meshbpf/plugin.json".to_string()));
    assert_eq!(host_path(uninstall, "cni-bin"), "/home/kubernetes/bin");
    assert_eq!(host_path(uninstall, "cni-state"), "/run/meshbpf");
    let spec = &ds["spec"]["template"]["spec"];
    assert!(spec["containers"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["name"] != "agent"));
}

#[test]
fn only_the_bpffs_mount_runs_privileged_and_meshbpf_s_containers_are_locked_down() {
    if !helm_available() {
        return;
    }
    for (name, values) in renderings() {
        let objects = objects(&values);
        let spec = &object(&objects, "DaemonSet")["spec"]["template"]["spec"];
        assert_eq!(spec["automountServiceAccountToken"], false, "{name}");
        assert_eq!(
            spec["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
        let uninstall = values["uninstall"] == true;
        let meshbpf = container(&objects, if uninstall { "uninstall" } else { "agent" });
        let sc = &meshbpf["securityContext"];
        assert_eq!(sc["privileged"], false, "{name}");
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
        assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{name}");
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{name}");
        // Which ones, and why each: the_agent_s_work_needs_each_capability_the_chart_grants_and_no_other.
        assert!(
            sc["capabilities"]["add"]
                .as_array()
                .is_some_and(|caps| !caps.is_empty() && !caps.contains(&json!("ALL"))),
            "{name}: {sc}"
        );
        for c in ["containers", "initContainers"]
            .iter()
            .filter_map(|k| spec[k].as_array())
            .flatten()
        {
            let privileged = c["securityContext"]["privileged"] == true;
            assert_eq!(
                privileged,
                c["name"] == "mount-bpffs",
                "{name}: {}",
                c["name"]
            );
        }
        let mounts_bpffs = values["bpffs"]["mount"] != false && !uninstall;
        let has_mount = spec["initContainers"]
            .as_array()
            .is_some_and(|i| i.iter().any(|c| c["name"] == "mount-bpffs"));
        assert_eq!(has_mount, mounts_bpffs, "{name}");
    }
}

#[test]
fn the_chart_lints_clean() {
    if !helm_available() {
        return;
    }
    for (name, values) in renderings() {
        let out = render_script(&["lint", &values.to_string()]);
        assert!(out.status.success(), "{name}: {out:?}");
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["errors"], json!([]), "{name}: {report:#}");
        // Severity 2 is a warning, 3 an error; 1 (info) is only "icon is recommended".
        let findings: Vec<&Value> = report["messages"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["severity"].as_u64().unwrap_or(3) >= 2)
            .collect();
        assert!(findings.is_empty(), "{name}: {findings:#?}");
    }
    // Lint sees a bad value as an error.
    let out = render_script(&["lint", r#"{"platform": "eks"}"#]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_ne!(report["errors"], json!([]), "{report:#}");
}

#[test]
fn the_schema_refuses_a_bad_value_before_anything_is_rendered_and_names_it() {
    if !helm_available() {
        return;
    }
    for (values, named) in [
        (json!({"platform": "eks"}), "/platform"),
        (
            json!({"plugin": {"proxyUID": [1337]}}),
            "'proxyUID' not allowed",
        ),
        (
            json!({"plugin": {"outboundPort": 70000}}),
            "/plugin/outboundPort",
        ),
        (
            json!({"plugin": {"proxyUid": ["1337"]}}),
            "/plugin/proxyUid/0",
        ),
        (json!({"plugin": {"mesh": "consul"}}), "/plugin/mesh"),
        (
            json!({"plugin": {"inboundMode": "tproxy"}}),
            "/plugin/inboundMode",
        ),
        (
            json!({"plugin": {"excludeOutboundCidrs": ["10.0.0.0"]}}),
            "/plugin/excludeOutboundCidrs/0",
        ),
        (json!({"pinDir": "/var/run/meshbpf"}), "/pinDir"),
        (json!({"cni": {"binDir": "opt/cni/bin"}}), "/cni/binDir"),
        (json!({"cni": {"stateDir": "/meshbpf"}}), "/cni/stateDir"),
        (
            json!({"cni": {"excludeNamespaces": "kube-system"}}),
            "/cni/excludeNamespaces",
        ),
        (
            json!({"agent": {"listenAddress": "localhost"}}),
            "/agent/listenAddress",
        ),
        (json!({"agent": {"port": "9190"}}), "/agent/port"),
        (json!({"agent": {"gcInterval": 0}}), "/agent/gcInterval"),
        (json!({"image": {"digest": "latest"}}), "/image/digest"),
        (
            json!({"updateStrategy": {"type": "Recreate"}}),
            "/updateStrategy/type",
        ),
        (json!({"uninstall": "yes"}), "/uninstall"),
        // A flag the chart passes already, which meshbpf would refuse at start: the value
        // to set instead is named.
        (
            json!({"agent": {"extraArgs": ["--gc-interval=5"]}}),
            "the chart sets --gc-interval already (meshbpf takes a flag once): use the value agent.gcInterval",
        ),
    ] {
        let (code, err) = render(&values).expect_err(&values.to_string());
        assert_eq!(code, Some(2), "{values}: {err}");
        assert!(
            err.contains("the chart refused these values") && err.contains(named),
            "{values}: {err}"
        );
    }
}

#[test]
fn the_plugin_values_are_every_register_option_and_reach_the_plugin_s_conf() {
    if !helm_available() {
        return;
    }
    // Every option of `meshbpf register`, set away from its default.
    let plugin = json!({
        "mesh": "generic",
        "proxyUid": [1337, 1338],
        "proxyGid": [1337],
        "outboundPort": 15011,
        "includeOutboundCidrs": ["10.0.0.0/8", "2001:db8::/32"],
        "excludeOutboundCidrs": ["10.96.0.1/32"],
        "includeOutboundPorts": [443],
        "excludeOutboundPorts": [3306, 5432],
        "inboundMode": "redirect",
        "inboundPort": 15016,
        "inboundPorts": [8080],
        "excludeInboundPorts": [9090],
        "noInbound": true,
        "dnsPort": 15054,
        "noDns": true,
        "sockmap": true,
        "noSockmap": false,
        "sockmapMinBytes": 0,
        "intraNode": true,
    });
    let objects =
        objects(&json!({"plugin": plugin, "cni": {"logFile": "/var/log/meshbpf-cni.log"}}));
    let text = object(&objects, "ConfigMap")["data"]["plugin.json"]
        .as_str()
        .unwrap()
        .to_string();
    let conf: Value = serde_json::from_str(&text).unwrap();
    let mut keys: Vec<String> = conf.as_object().unwrap().keys().cloned().collect();
    keys.retain(|k| {
        ![
            "type",
            "pin_dir",
            "state_dir",
            "exclude_namespaces",
            "capabilities",
            "log_file",
        ]
        .contains(&k.as_str())
    });
    let mut options = meshbpf::PodOptions::keys();
    // no_sockmap=false is left out (false leaves a switch to the preset), and conflicts
    // with sockmap anyway; every other option is there.
    options.retain(|k| k != "no_sockmap");
    keys.sort();
    options.sort();
    assert_eq!(keys, options, "{text}");
    assert_eq!(conf["proxy_uid"], json!([1337, 1338]));
    assert_eq!(conf["log_file"], "/var/log/meshbpf-cni.log");
    // The plugin and the agent take the conf as rendered.
    let entry = meshbpf_cli::agent::plugin_entry(Some(&text), Path::new("/sys/fs/bpf/meshbpf"))
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
    let parsed = meshbpf_cni::PluginConf::parse(entry.to_string().as_bytes()).unwrap();
    let settings = parsed.options.settings(None).unwrap();
    assert_eq!(settings.outbound_port, 15011);
    assert!(settings.exclude_outbound_ports.contains(&5432));
    // Every option the schema knows is one the values file lists, and the other way round.
    let values = fs::read_to_string(root().join("deploy/charts/meshbpf/values.yaml")).unwrap();
    let schema: Value = serde_json::from_str(
        &fs::read_to_string(root().join("deploy/charts/meshbpf/values.schema.json")).unwrap(),
    )
    .unwrap();
    for key in plugin.as_object().unwrap().keys() {
        assert!(
            values.contains(&format!("\n  {key}: ")),
            "{key} not in values.yaml"
        );
        assert!(
            schema["properties"]["plugin"]["properties"]
                .get(key)
                .is_some(),
            "{key} not in values.schema.json"
        );
    }
    assert_eq!(
        schema["properties"]["plugin"]["properties"]
            .as_object()
            .unwrap()
            .len(),
        plugin.as_object().unwrap().len()
    );
}

/// Removes a directory tree when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// GET `path` from `addr`: the status code and the body, or why not.
fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

/// Polls `done` for up to `timeout`; whether it held.
fn within(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + scaled(timeout);
    loop {
        if done() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `meshbpf ARGS` as the chart's containers run it: uid 0 with exactly `caps` (bounding,
/// permitted and effective; nothing inheritable or ambient, no new privileges), in a mount
/// namespace of its own whose mounts no longer follow the host's, except `follow` (the chart's
/// HostToContainer volume of /run/netns, if it has one), whose root filesystem and cgroup2
/// mount are read-only (readOnlyRootFilesystem, the cgroup volume's readOnly), and where only
/// `writable` (the CNI dirs; the test's bpffs is a mount of its own) can be written.
fn contained(
    caps: &[&str],
    follow: Option<&Path>,
    cgroup_mount: &Path,
    writable: &[&Path],
    args: &[&str],
) -> Command {
    const SCRIPT: &str = r#"set -e
follow=$1; cgroup=$2; count=$3; shift 3
if [ -n "$follow" ]; then mount --make-rslave "$follow"; fi
findmnt -rn -o TARGET | while read -r m; do
    if [ -n "$follow" ]; then
        case "$m" in "$follow" | "$follow"/*) continue ;; esac
    fi
    mount --make-private "$m" 2>/dev/null || true
done
while [ "$count" -gt 0 ]; do mount --bind "$1" "$1"; shift; count=$((count - 1)); done
mount -o remount,bind,ro /
mount -o remount,bind,ro "$cgroup"
exec "$@""#;
    let bounding: String = std::iter::once("-all".to_string())
        .chain(caps.iter().map(|c| format!("+{}", c.to_lowercase())))
        .collect::<Vec<_>>()
        .join(",");
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "unchanged",
        "--",
        "sh",
        "-c",
        SCRIPT,
        "sh",
    ])
    .arg(follow.unwrap_or(Path::new("")))
    .arg(cgroup_mount)
    .arg(writable.len().to_string())
    .args(writable)
    .args([
        "setpriv",
        "--inh-caps=-all",
        "--ambient-caps=-all",
        &format!("--bounding-set={bounding}"),
        "--no-new-privs",
        "--",
    ])
    .arg(cli())
    .args(args);
    cmd
}

/// Where the chart's agent sees the host's network namespace pins follow the host's mounts
/// (a HostToContainer volume of /run/netns, mounted at the same path), if it does.
fn followed_netns_dir() -> Option<PathBuf> {
    let objects = objects(&json!({}));
    let agent = container(&objects, "agent");
    let netns = Path::new("/run/netns");
    let mounted = agent["volumeMounts"].as_array()?.iter().any(|m| {
        m["mountPath"] == "/run/netns"
            && m["mountPropagation"] == "HostToContainer"
            && host_path(&objects, m["name"].as_str().unwrap_or_default()) == "/run/netns"
    });
    mounted.then(|| netns.to_path_buf())
}

/// A process that is SIGTERMed (then killed) when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.0.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = self.0.kill();
                let _ = self.0.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The capabilities the chart adds to `name`'s container, rendered with `values`.
fn added_capabilities(values: Value, name: &str) -> Vec<String> {
    container(&objects(&values), name)["securityContext"]["capabilities"]["add"]
        .as_array()
        .expect("capabilities added")
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect()
}

/// The arguments the chart gives `meshbpf` in `name`'s container, rendered with `values`, each
/// `--flag=VALUE` of `places` given this test's value instead; every flag the chart passes a
/// value to must be in `places`.
fn chart_command(values: &Value, name: &str, places: &[(&str, &str)]) -> Vec<String> {
    let command = command_of(container(&objects(values), name));
    assert_eq!(command[0], "meshbpf", "{command:?}");
    command[1..]
        .iter()
        .map(|arg| match arg.split_once('=') {
            None => arg.clone(),
            Some((flag, _)) => {
                let (_, here) = places
                    .iter()
                    .find(|(f, _)| *f == flag)
                    .unwrap_or_else(|| panic!("the chart passes {arg}: map it to this test"));
                format!("{flag}={here}")
            }
        })
        .collect()
}

/// The steps of the agent's work, in order; the first that fails is the outcome.
const STEPS: [&str; 10] = [
    "serves /healthz 200",
    "attached every program",
    "installed the plugin",
    "put its entry in the primary conflist",
    "registered the pod found running",
    "the installed plugin registered a new pod",
    "gc kept the new pod, whose netns only the runtime's pin holds",
    "gc unregistered the pod whose netns is gone",
    "serves /metrics",
    "uninstall removed everything",
];

/// Does the agent's work with `caps`, then the uninstaller's with `uninstaller`, as the chart's
/// containers do them, on a world of its own; returns the first step of [`STEPS`] that failed
/// and the agent's log, or none.
fn agent_work(
    caps: &[&str],
    uninstaller: &[&str],
    follow: Option<&Path>,
    patience: Duration,
) -> Option<(&'static str, String)> {
    let mut env = Env::new();
    let dirs = CniDirs::new(&env.root);
    let cgroup_mount = env.cgroup.parent().unwrap().to_path_buf();
    let primary = dirs.primary();
    // A pod running before the agent, with its sidecar (uid 1337); IPv6 too: registering it
    // adds ::6 to its lo.
    let (running, _sidecar, outbound) = pod_with_running_sidecar(&mut env, "running");
    let plugin_conf = json!({
        "capabilities": {"io.kubernetes.cri.pod-annotations": true},
        "state_dir": env.root.join("run/cni"),
        "outbound_port": outbound,
    });
    let conf_file = env.root.join("plugin.json");
    fs::write(&conf_file, plugin_conf.to_string()).unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let pin_dir = env.pin_dir.to_str().unwrap().to_string();
    let log_path = env.root.join("agent.log");
    let log = || fs::read_to_string(&log_path).unwrap_or_default();
    let log_file = fs::File::create(&log_path).unwrap();
    // The chart's own command lines, its container paths mapped to this test's world.
    let cgroup = env.cgroup.to_str().unwrap().to_string();
    let places = [
        ("--cgroup", cgroup.as_str()),
        ("--pin-dir", &pin_dir),
        ("--cni-bin-dir", dirs.bin.to_str().unwrap()),
        ("--cni-conf-dir", dirs.conf.to_str().unwrap()),
        ("--plugin-conf", conf_file.to_str().unwrap()),
        ("--listen", &addr),
        ("--gc-interval", "1"),
        ("--log-level", "debug"),
        ("--log-format", "text"),
    ];
    let mut agent_args = chart_command(&json!({}), "agent", &places);
    // The image holds meshbpf-cni beside meshbpf, which is where the agent looks by default.
    agent_args.extend([
        "--plugin-binary".into(),
        cni_plugin().into_os_string().into_string().unwrap(),
    ]);
    let agent_args: Vec<&str> = agent_args.iter().map(String::as_str).collect();
    let writable = [dirs.bin.as_path(), dirs.conf.as_path()];
    let agent = Running(
        contained(caps, follow, &cgroup_mount, &writable, &agent_args)
            .stdout(Stdio::from(log_file.try_clone().unwrap()))
            .stderr(Stdio::from(log_file))
            .spawn()
            .expect("start the contained agent"),
    );
    let fail = |step: usize| Some((STEPS[step], log()));

    if !within(patience, || {
        http_get(&addr, "/healthz").is_some_and(|(code, _)| code == 200)
    }) {
        return fail(0);
    }
    if env.attached_hooks().len() != ATTACH_TYPES.len() {
        return fail(1);
    }
    let installed = dirs.bin.join("meshbpf-cni");
    if fs::read(&installed).ok() != fs::read(cni_plugin()).ok() {
        return fail(2);
    }
    let conflist: Value = serde_json::from_str(&fs::read_to_string(&primary).unwrap()).unwrap();
    let Some(entry) = conflist["plugins"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["type"] == "meshbpf-cni"))
        .cloned()
    else {
        return fail(3);
    };
    let running_cookie = cookie(&running.netns);
    if !within(patience, || {
        registered_cookies(&env.pin_dir).contains(&running_cookie)
    }) {
        return fail(4);
    }
    // A new pod: as a runtime makes it (containerd, CRI-O), its network namespace is pinned
    // by a bind mount under /run/netns, made after the agent started, and no process is in
    // it yet when the runtime runs the plugin the agent installed (root, on the node).
    let added = env.pod("added");
    let mut stdin = entry.clone();
    stdin["cniVersion"] = conflist["cniVersion"].clone();
    stdin["name"] = conflist["name"].clone();
    stdin["prevResult"] = json!({"cniVersion": "1.0.0", "interfaces": [], "ips": []});
    let mut plugin = Command::new(&installed)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "added")
        .env("CNI_NETNS", &added.netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", &dirs.bin)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    plugin
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.to_string().as_bytes())
        .unwrap();
    let added_cookie = cookie(&added.netns);
    if !plugin.wait_with_output().unwrap().status.success()
        || !registered_cookies(&env.pin_dir).contains(&added_cookie)
    {
        return fail(5);
    }
    // gc runs every second: the pod stays registered while its pin holds the namespace.
    std::thread::sleep(scaled(Duration::from_millis(2500)));
    if !registered_cookies(&env.pin_dir).contains(&added_cookie) {
        return fail(6);
    }
    sh(Command::new("ip").args(["netns", "del", &added.name]));
    if !within(patience, || {
        !registered_cookies(&env.pin_dir).contains(&added_cookie)
    }) {
        return fail(7);
    }
    let metrics = http_get(&addr, "/metrics");
    if !metrics
        .is_some_and(|(code, body)| code == 200 && body.contains("meshbpf_registered_pods 1"))
    {
        return fail(8);
    }
    drop(agent);
    let uninstall_args = chart_command(&json!({"uninstall": true}), "uninstall", &places);
    let uninstall_args: Vec<&str> = uninstall_args.iter().map(String::as_str).collect();
    // The state directory's parent, as the chart mounts it for the uninstaller.
    let state_parent = env.root.join("run");
    fs::create_dir_all(state_parent.join("cni")).unwrap();
    let writable = [
        dirs.bin.as_path(),
        dirs.conf.as_path(),
        state_parent.as_path(),
    ];
    let out = contained(uninstaller, None, &cgroup_mount, &writable, &uninstall_args)
        .output()
        .unwrap();
    let conflist = fs::read_to_string(&primary).unwrap();
    if !out.status.success()
        || !env.attached_hooks().is_empty()
        || env.pin_dir.exists()
        || installed.exists()
        || conflist.contains("meshbpf-cni")
    {
        return Some((STEPS[9], format!("{}{out:?}", log())));
    }
    None
}

#[test]
fn the_agent_s_work_needs_each_capability_the_chart_grants_and_no_other() {
    if !privileged() || !helm_available() {
        return;
    }
    // What the chart grants the agent, and the uninstaller of uninstall mode.
    let granted = added_capabilities(json!({}), "agent");
    let granted: Vec<&str> = granted.iter().map(String::as_str).collect();
    let uninstaller = added_capabilities(json!({"uninstall": true}), "uninstall");
    let uninstaller: Vec<&str> = uninstaller.iter().map(String::as_str).collect();
    // The chart's mounts that follow the host's (the network namespace pins).
    let follow = followed_netns_dir();
    let follow = follow.as_deref();
    fn without<'a>(caps: &[&'a str], missing: &str) -> Vec<&'a str> {
        caps.iter().copied().filter(|c| *c != missing).collect()
    }

    // With exactly them, every step of the agent's work succeeds, on a read-only root.
    if let Some((step, log)) = agent_work(&granted, &uninstaller, follow, Duration::from_secs(20)) {
        panic!("with {granted:?}, {uninstaller:?} to uninstall, failed at: {step}\n{log}");
    }
    // Without any one of them, a step fails: each is needed, none is one too many.
    let mut table = Vec::new();
    for missing in &granted {
        let caps = without(&granted, missing);
        let (step, log) = agent_work(&caps, &uninstaller, follow, Duration::from_secs(5))
            .unwrap_or_else(|| {
                panic!("without {missing} every step of the agent's work succeeded: drop it from the chart")
            });
        let why = log
            .lines()
            .find(|l| l.contains("discovery") || l.starts_with("meshbpf: "))
            .unwrap_or("");
        table.push(format!(
            "agent without {missing}: fails at \"{step}\": {why}"
        ));
    }
    for missing in &uninstaller {
        let caps = without(&uninstaller, missing);
        let (step, log) = agent_work(&granted, &caps, follow, Duration::from_secs(5))
            .unwrap_or_else(|| {
                panic!("the uninstaller without {missing} did its work: drop it from the chart")
            });
        assert_eq!(step, STEPS[9], "{log}");
        table.push(format!(
            "uninstaller without {missing}: fails at \"{step}\""
        ));
    }
    // CAP_BPF and CAP_PERFMON (what bpf(2) asks for since 5.8) do not stand in for SYS_ADMIN:
    // setns(2) into a pod's network namespace, to read its cookie, needs SYS_ADMIN itself.
    let mut narrower = without(&granted, "SYS_ADMIN");
    narrower.extend(["BPF", "PERFMON"]);
    let (step, log) = agent_work(&narrower, &uninstaller, follow, Duration::from_secs(5))
        .unwrap_or_else(|| panic!("{narrower:?} did all the agent's work: grant them instead"));
    assert_eq!(step, "registered the pod found running", "{log}");
    table.push(format!("agent with {narrower:?}: fails at \"{step}\""));
    // What each one is for, seen where the test is read.
    let _ = writeln!(std::io::stderr(), "{}", table.join("\n"));
}

#[test]
fn gc_with_the_chart_s_capabilities_keeps_a_pod_that_only_another_user_s_process_holds() {
    if !privileged() || !helm_available() {
        return;
    }
    let granted = added_capabilities(json!({}), "agent");
    let granted: Vec<&str> = granted.iter().map(String::as_str).collect();
    let mut env = Env::new();
    let cgroup_mount = env.cgroup.parent().unwrap().to_path_buf();
    let mesh = env.attach();
    let pin_dir = env.pin_dir.to_str().unwrap().to_string();
    // Kubernetes' pause process runs as 65535: a pod whose namespace only it holds (no pin,
    // no other process) is alive.
    let held = env.pod("held");
    let _pause = held.spawn(65535, Path::new("/bin/sleep"), &["60"]);
    let held_cookie = mesh
        .register_netns(&held.netns, &meshbpf::PodSettings::default())
        .unwrap()
        .netns_cookie;
    sh(Command::new("ip").args(["netns", "del", &held.name]));
    let gc = |caps: &[&str]| {
        let out = contained(
            caps,
            None,
            &cgroup_mount,
            &[],
            &["gc", "--pin-dir", &pin_dir],
        )
        .output()
        .unwrap();
        assert!(out.status.success(), "{out:?}");
        registered_cookies(&env.pin_dir).contains(&held_cookie)
    };
    assert!(gc(&granted), "gc with {granted:?} unregistered a live pod");
    // SYS_PTRACE is what lets gc see it: /proc/PID/ns/net of another user's process.
    let without: Vec<&str> = granted
        .iter()
        .copied()
        .filter(|c| *c != "SYS_PTRACE")
        .collect();
    assert!(!gc(&without), "gc without SYS_PTRACE saw the pod after all");
}

#[test]
fn every_rendering_runs_flags_meshbpf_takes() {
    if !helm_available() {
        return;
    }
    let mut all = renderings();
    all.push((
        "switches",
        json!({"agent": {"noSockmap": true, "discover": false, "extraArgs": ["--plugin-binary=/usr/local/bin/meshbpf-cni"]}}),
    ));
    for (name, values) in all {
        let objects = objects(&values);
        let meshbpf = if values["uninstall"] == true {
            "uninstall"
        } else {
            "agent"
        };
        let command = command_of(container(&objects, meshbpf));
        // The kubelet expands $(NODE_IP) (status.hostIP) before it runs the command.
        let args: Vec<String> = command[1..]
            .iter()
            .map(|a| a.replace("$(NODE_IP)", "192.0.2.7"))
            .collect();
        // clap reads the flags in order: --help succeeds only after flags (and values) it takes.
        let out = Command::new(cli())
            .args(&args)
            .arg("--help")
            .output()
            .unwrap();
        assert!(out.status.success(), "{name}: {args:?}: {out:?}");
    }
}
