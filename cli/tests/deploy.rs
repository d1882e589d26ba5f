//! deploy/: the manifests are valid Kubernetes objects (PyPI kubernetes-validate against the
//! bundled schemas, offline, strict), the DaemonSet's flags are ones `meshbpf agent` takes,
//! and the ConfigMap's plugin conf is one the agent and the plugin accept. The Istio
//! injection template (deploy/istio/) is checked as far as this machine can without istiod:
//! what it deletes and adds, and that what it adds validates in a Pod.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::manifests::{list_after, validator};
use common::repo_root;

fn deploy(name: &str) -> PathBuf {
    repo_root().join("deploy").join(name)
}

fn validate(validator: &Path, files: &[PathBuf]) -> (bool, String) {
    let out = Command::new(validator)
        .arg("--strict")
        .args(files)
        .output()
        .expect("run kubernetes-validate");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn the_manifests_are_valid_kubernetes_objects() {
    let Some(validator) = validator() else {
        return;
    };
    let files = [
        deploy("meshbpf.yaml"),
        deploy("uninstall.yaml"),
        deploy("pod-init-container.yaml"),
    ];
    let (ok, text) = validate(&validator, &files);
    assert!(ok, "{text}");
    for (file, resource) in [
        ("meshbpf.yaml", "configmap/meshbpf-cni"),
        ("meshbpf.yaml", "daemonset/meshbpf "),
        // Uninstall mode replaces the agent's DaemonSet in place, under the same name.
        ("uninstall.yaml", "daemonset/meshbpf "),
        ("pod-init-container.yaml", "pod/web"),
    ] {
        assert!(
            text.contains(&format!("{file} passed for resource {resource}")),
            "{text}"
        );
    }
    // The same check refuses a manifest with a field Kubernetes does not know.
    let broken = std::env::temp_dir().join(format!("meshbpf-broken-{}.yaml", std::process::id()));
    let manifest = std::fs::read_to_string(&files[0]).unwrap();
    std::fs::write(&broken, manifest.replace("hostPID: true", "hostPid: true")).unwrap();
    let (ok, text) = validate(&validator, std::slice::from_ref(&broken));
    let _ = std::fs::remove_file(&broken);
    assert!(!ok && text.contains("hostPid"), "{text}");
}

/// The lines of a YAML block scalar `key: |` in `text`, unindented.
fn block_scalar(text: &str, key: &str) -> String {
    let mut lines = text.lines().skip_while(|l| l.trim() != format!("{key}: |"));
    let header = lines
        .next()
        .unwrap_or_else(|| panic!("no {key}: | in the manifest"));
    let indent = header.len() - header.trim_start().len() + 2;
    lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() >= indent)
        .map(|l| l.get(indent..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The items of the first `command:` list after `after` in `text`.
fn command_after(text: &str, after: &str) -> Vec<String> {
    list_after(text, after, "command")
}

#[test]
fn the_configmap_s_plugin_conf_is_accepted_and_matches_the_daemonset() {
    let manifest = std::fs::read_to_string(deploy("meshbpf.yaml")).unwrap();
    let conf = block_scalar(&manifest, "plugin.json");
    let command = command_after(&manifest, "- name: agent");
    let flag = |name: &str| {
        command
            .iter()
            .find_map(|a| a.strip_prefix(&format!("--{name}=")))
            .unwrap_or_else(|| panic!("no --{name} in {command:?}"))
            .to_string()
    };
    let pin_dir = flag("pin-dir");
    let entry = meshbpf_cli::agent::plugin_entry(Some(&conf), Path::new(&pin_dir))
        .unwrap_or_else(|e| panic!("{e}\n{conf}"));
    let parsed = meshbpf_cni::PluginConf::parse(entry.to_string().as_bytes()).unwrap();
    assert_eq!(parsed.pin_dir, Path::new(&pin_dir));
    assert!(
        parsed.state_dir.starts_with("/run/meshbpf"),
        "mounted by the DaemonSet"
    );
    assert!(parsed
        .exclude_namespaces
        .contains(&"kube-system".to_string()));
    assert_eq!(
        entry["capabilities"]["io.kubernetes.cri.pod-annotations"],
        true
    );
    assert!(flag("plugin-conf").ends_with("/plugin.json"));
}

#[test]
fn the_manifests_run_flags_meshbpf_takes() {
    for (file, container, verb) in [
        ("meshbpf.yaml", "- name: agent", "agent"),
        ("uninstall.yaml", "- name: uninstall", "agent"),
        (
            "pod-init-container.yaml",
            "- name: meshbpf-init",
            "register",
        ),
        (
            "istio/injection-values.yaml",
            "image: registry.example.com/meshbpf",
            "register",
        ),
    ] {
        let manifest = std::fs::read_to_string(deploy(file)).unwrap();
        let command = command_after(&manifest, container);
        assert_eq!(command[..2], ["meshbpf", verb], "{file}");
        // clap reads the flags in order: --help succeeds only after flags it knows.
        let out = Command::new(env!("CARGO_BIN_EXE_meshbpf"))
            .args(&command[1..])
            .arg("--help")
            .output()
            .unwrap();
        assert!(out.status.success(), "{file}: {command:?}: {out:?}");
    }
}

/// The items of the block list `key:` in `text`, each as its lines (the first starts `- `).
fn list_items(text: &str, key: &str) -> Vec<Vec<String>> {
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut lines = text.lines().skip_while(|l| l.trim() != format!("{key}:"));
    let header = lines
        .next()
        .unwrap_or_else(|| panic!("no {key}: in {text}"));
    let mut items: Vec<Vec<String>> = Vec::new();
    for line in lines.take_while(|l| l.trim().is_empty() || indent(l) > indent(header)) {
        if line.trim_start().starts_with("- ")
            && items.first().is_none_or(|i| indent(&i[0]) == indent(line))
        {
            items.push(Vec::new());
        }
        if let Some(item) = items.last_mut() {
            item.push(line.to_string());
        }
    }
    items
}

#[test]
fn the_istio_injection_template_puts_a_valid_meshbpf_init_container_in_istio_init_s_place() {
    let values = std::fs::read_to_string(deploy("istio/injection-values.yaml")).unwrap();
    let template = block_scalar(&values, "meshbpf");
    // Plain YAML: nothing for istiod's text/template to render.
    assert!(!template.contains("{{"), "{template}");
    let name = |item: &[String]| {
        item.iter()
            .find_map(|l| {
                l.trim_start()
                    .trim_start_matches("- ")
                    .strip_prefix("name: ")
            })
            .unwrap_or_else(|| panic!("no name in {item:?}"))
            .to_string()
    };
    let (deleted, added): (Vec<_>, Vec<_>) = list_items(&template, "initContainers")
        .into_iter()
        .partition(|item| item.iter().any(|l| l.trim() == "$patch: delete"));
    // Istio's init containers go, whichever the install injects ...
    let names: Vec<String> = deleted.iter().map(|i| name(i)).collect();
    assert_eq!(names, ["istio-init", "istio-validation"]);
    // ... and one takes istio-init's name (and so its place in Istio's ordering), running
    // meshbpf's registration in Istio's redirect mode.
    assert_eq!(added.len(), 1, "{added:?}");
    assert_eq!(name(&added[0]), "istio-init");
    let command = command_after(&added[0].join("\n"), "- name: istio-init");
    assert_eq!(
        command,
        [
            "meshbpf",
            "register",
            "--netns=/proc/self/ns/net",
            "--pin-dir=/sys/fs/bpf/meshbpf",
            "--mesh=istio"
        ]
    );
    // Its fields are ones Kubernetes takes: the template without its delete directives, in a
    // Pod beside an application container, validated like the manifests.
    let Some(validator) = validator() else {
        return;
    };
    let mut kept = template.clone();
    for item in &deleted {
        kept = kept.replacen(&format!("{}\n", item.join("\n")), "", 1);
    }
    let spec = kept
        .strip_prefix("spec:\n")
        .unwrap_or_else(|| panic!("the template does not start with spec: {kept}"));
    let pod = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: injected\n  namespace: shop\nspec:\n  \
         containers:\n    - name: app\n      image: registry.example.com/web:1.0\n{spec}\n"
    );
    assert!(
        pod.contains("hostPath:") && !pod.contains("$patch"),
        "{pod}"
    );
    let file = std::env::temp_dir().join(format!("meshbpf-injected-{}.yaml", std::process::id()));
    std::fs::write(&file, &pod).unwrap();
    let (ok, text) = validate(&validator, std::slice::from_ref(&file));
    let _ = std::fs::remove_file(&file);
    assert!(
        ok && text.contains("passed for resource pod/injected"),
        "{text}\n{pod}"
    );
}
