//! The plugin's conf: what the runtime passes on stdin, and the pod settings it gives.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde_json::value::RawValue;
use serde_json::Value;

use meshbpf::Netns;
use meshbpf::PodOptions;
use meshbpf::PodSettings;
use meshbpf::DEFAULT_PIN_DIR;
use meshbpf::{read_istio_annotations, IstioAnnotations};

use super::*;

/// A request's conf: the plugin's conf entry with what the runtime inserted.
#[derive(Clone, Debug)]
pub struct PluginConf {
    /// The protocol version in use.
    pub cni_version: String,
    /// The network's name.
    pub name: String,
    /// The bpffs directory of the attachment (default [`DEFAULT_PIN_DIR`]).
    pub pin_dir: PathBuf,
    /// Where `ADD` remembers what it registered (default [`DEFAULT_STATE_DIR`]).
    pub state_dir: PathBuf,
    /// Pods of these Kubernetes namespaces (`K8S_POD_NAMESPACE`) are never registered.
    pub exclude_namespaces: Vec<String>,
    /// A file the plugin appends its log lines to, besides stderr.
    pub log_file: Option<PathBuf>,
    /// The per-pod settings of this network's pods.
    pub options: PodOptions,
    /// The pod's annotations, when the runtime delivered them in `runtimeConfig`.
    pub annotations: Option<BTreeMap<String, String>>,
    pub(super) prev_result: Option<Box<RawValue>>,
    pub(super) valid_attachments: Option<BTreeSet<(String, String)>>,
}

impl PluginConf {
    /// Parses a request's conf (the plugin's stdin), or a conf entry as a conflist holds it;
    /// an unknown key or a bad value is refused by name.
    pub fn parse(bytes: &[u8]) -> Result<PluginConf, ErrorResult> {
        let fields: BTreeMap<String, Box<RawValue>> =
            serde_json::from_slice(bytes).map_err(|err| {
                ErrorResult::new(
                    code::DECODE_FAILURE,
                    "the network configuration is not a JSON object",
                    err.to_string(),
                )
            })?;
        let mut conf = PluginConf {
            cni_version: "1.1.0".into(),
            name: String::new(),
            pin_dir: DEFAULT_PIN_DIR.into(),
            state_dir: DEFAULT_STATE_DIR.into(),
            exclude_namespaces: DEFAULT_EXCLUDE_NAMESPACES.map(String::from).to_vec(),
            log_file: None,
            options: PodOptions::default(),
            annotations: None,
            prev_result: None,
            valid_attachments: None,
        };
        for (key, raw) in fields {
            if key == "prevResult" {
                if !raw.get().trim_start().starts_with('{') {
                    return Err(ErrorResult::config("prevResult: not a JSON object"));
                }
                conf.prev_result = Some(raw);
                continue;
            }
            let value: Value = serde_json::from_str(raw.get()).map_err(|err| {
                ErrorResult::new(code::DECODE_FAILURE, format!("{key}: {err}"), "")
            })?;
            conf.set(&key, value)?;
        }
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(ErrorResult::new(
                code::INCOMPATIBLE_VERSION,
                format!("cniVersion {:?} is not supported", conf.cni_version),
                format!("meshbpf-cni speaks {}", SUPPORTED_VERSIONS.join(", ")),
            ));
        }
        conf.options
            .settings(None)
            .map_err(|err| ErrorResult::config(err.to_string()))?;
        Ok(conf)
    }

    pub(super) fn set(&mut self, key: &str, value: Value) -> Result<(), ErrorResult> {
        let bad = |what: &str| ErrorResult::config(format!("{key}: {value}: {what}"));
        let path = |value: &Value| match value.as_str() {
            Some(p) if p.starts_with('/') => Ok(PathBuf::from(p)),
            _ => Err(bad("give an absolute path")),
        };
        match key {
            "cniVersion" => {
                self.cni_version = value
                    .as_str()
                    .ok_or_else(|| bad("give a version string"))?
                    .into()
            }
            "name" => self.name = value.as_str().ok_or_else(|| bad("give a string"))?.into(),
            // The protocol's own keys, and those of the conflist around the entry.
            "type" | "cniVersions" | "capabilities" | "args" => {}
            "pin_dir" => self.pin_dir = path(&value)?,
            "state_dir" => self.state_dir = path(&value)?,
            "log_file" => self.log_file = Some(path(&value)?),
            "exclude_namespaces" => {
                self.exclude_namespaces = value
                    .as_array()
                    .and_then(|a| a.iter().map(|v| v.as_str().map(String::from)).collect())
                    .ok_or_else(|| bad("give a list of namespace names"))?
            }
            "runtimeConfig" => {
                let Some(annotations) = value.get(ANNOTATIONS_CAPABILITY) else {
                    return Ok(());
                };
                // containerd (1.6 at least) sends null for a pod without annotations.
                let empty = serde_json::Map::new();
                let map = match annotations {
                    Value::Null => &empty,
                    other => other
                        .as_object()
                        .ok_or_else(|| bad("pod annotations: give a JSON object or null"))?,
                };
                self.annotations = Some(
                    map.iter()
                        .map(|(k, v)| {
                            let text = v.as_str().map_or_else(|| v.to_string(), String::from);
                            (k.clone(), text)
                        })
                        .collect(),
                );
            }
            "cni.dev/valid-attachments" => {
                let attachment = |v: &Value| {
                    Some((
                        v.get("containerID")?.as_str()?.to_string(),
                        v.get("ifname")?.as_str()?.to_string(),
                    ))
                };
                self.valid_attachments = Some(
                    value
                        .as_array()
                        .and_then(|a| a.iter().map(attachment).collect())
                        .ok_or_else(|| bad("give a list of {containerID, ifname}"))?,
                );
            }
            key if key.starts_with("cni.dev/") => {}
            _ => {
                let known = self
                    .options
                    .set(key, &value)
                    .map_err(|err| ErrorResult::config(err.to_string()))?;
                if !known {
                    let mut err =
                        ErrorResult::config(format!("unsupported field {key:?}: {value}"));
                    err.code = code::UNSUPPORTED_FIELD;
                    return Err(err);
                }
            }
        }
        Ok(())
    }

    /// Whether a pod is registered, and with which settings: skipped when its Kubernetes
    /// namespace is excluded, or when the runtime delivered its annotations (`null`: none)
    /// and they show no injected sidecar; otherwise the conf's settings with the pod's
    /// Istio annotations applied over them, read as istio-cni reads them.
    pub fn decide(&self, cni_args: Option<&str>) -> Result<Decision, ErrorResult> {
        if let Some(namespace) = cni_arg(cni_args, "K8S_POD_NAMESPACE") {
            if self.exclude_namespaces.iter().any(|n| n == namespace) {
                return Ok(Decision::Skip(format!(
                    "namespace {namespace} is in exclude_namespaces"
                )));
            }
        }
        let settings = self
            .options
            .settings(None)
            .map_err(|err| ErrorResult::config(err.to_string()))?;
        let Some(annotations) = &self.annotations else {
            return Ok(Decision::Register(Box::new(IstioAnnotations::from(
                settings,
            ))));
        };
        if !annotations.contains_key("sidecar.istio.io/status") {
            return Ok(Decision::Skip(
                "no sidecar injected (no sidecar.istio.io/status annotation)".into(),
            ));
        }
        if annotations
            .get("sidecar.istio.io/inject")
            .is_some_and(|v| v.eq_ignore_ascii_case("false"))
        {
            return Ok(Decision::Skip(
                "annotation sidecar.istio.io/inject is \"false\"".into(),
            ));
        }
        read_istio_annotations(settings, annotations)
            .and_then(|read| read.settings.validate().map(|()| read))
            .map(|read| Decision::Register(Box::new(read)))
            .map_err(|err| ErrorResult::annotation(format!("pod annotations: {err}")))
    }
}

/// What the conf and the pod's annotations say about a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Leave the pod alone, for this reason.
    Skip(String),
    /// Register it.
    Register(Box<Registration>),
}

/// The settings of a pod the plugin registers, before its network namespace is looked at,
/// and what its annotations named that only the namespace or the log can answer.
pub type Registration = IstioAnnotations;

/// The settings to register the pod in `netns` with: the [`Registration`]'s, with outbound to
/// what its excluded interfaces reach not captured; and the lines to log, saying what was
/// read and what was left alone.
pub(super) fn settings_in(
    registration: &Registration,
    netns: &Netns,
) -> Result<(PodSettings, Vec<String>), ErrorResult> {
    let mut settings = registration.settings.clone();
    let mut notes = Vec::new();
    let (unknown, others) = (&registration.unknown_traffic_keys, &registration.other_keys);
    if !unknown.is_empty() {
        notes.push(format!(
            "ignored {} traffic annotation(s) neither istio-cni nor meshbpf reads: {}",
            unknown.len(),
            unknown.join(", ")
        ));
    }
    if !others.is_empty() {
        notes.push(format!(
            "left alone {} annotation(s) that are not Istio's traffic settings: {}",
            others.len(),
            others.join(", ")
        ));
    }
    if !registration.virtual_interfaces.is_empty() {
        notes.push(format!(
            "kubevirtInterfaces {}: the VM's traffic is forwarded through the pod, not \
             made by its sockets, so it is not captured (istio-iptables redirects what \
             arrives there to the sidecar as outbound); the pod's own connections are \
             captured as usual",
            registration.virtual_interfaces.join(",")
        ));
    }
    if registration.exclude_interfaces.is_empty() {
        return Ok((settings, notes));
    }
    let routed = routed_out_of(netns, &registration.exclude_interfaces).map_err(|err| {
        ErrorResult::new(
            code::FAILED,
            format!(
                "reading the routes of {} in {}",
                registration.exclude_interfaces.join(","),
                netns.path().display()
            ),
            err.to_string(),
        )
    })?;
    if !routed.missing.is_empty() {
        notes.push(format!(
            "excludeInterfaces: {} not in the pod at ADD: nothing excluded for it",
            routed.missing.join(",")
        ));
    }
    if !routed.cidrs.is_empty() {
        notes.push(format!(
            "excludeInterfaces {}: outbound to {} is not captured",
            registration.exclude_interfaces.join(","),
            routed
                .cidrs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ));
    }
    settings.exclude_outbound_cidrs.extend(routed.cidrs);
    settings.validate().map_err(|err| {
        ErrorResult::annotation(format!(
            "pod annotations: traffic.sidecar.istio.io/excludeInterfaces: {err}"
        ))
    })?;
    Ok((settings, notes))
}

/// The value of `key` in `CNI_ARGS` (`K1=V1;K2=V2`).
pub(super) fn cni_arg<'a>(args: Option<&'a str>, key: &str) -> Option<&'a str> {
    args?
        .split(';')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim())
}
