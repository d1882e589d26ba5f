//! Stock istiod and the bind model: the Istio `Sidecar` resource (networking.istio.io/v1)
//! that makes an unmodified istiod give a bind-mode pod's Envoy one listener bound to each
//! port its applications listen on, forwarding to where meshbpf moved them (loopback).
//!
//! In bind mode an application's wildcard bind `0.0.0.0:PORT` becomes `127.0.0.1:PORT`, and
//! the pod's sk_lookup program hands an inbound connection to `pod_ip:PORT` only to the
//! sidecar's own listener on that port. Stock Envoy has no such listener: istiod builds one
//! `0.0.0.0:15006` listener that expects iptables (or redirect mode) to bring it every
//! connection. A `Sidecar` resource whose `ingress` lists each port with `captureMode: NONE`
//! makes istiod bind a real listener on the pod's address for that port, and
//! `defaultEndpoint: 127.0.0.1:PORT` sends what it accepts to the moved application —
//! Istio's documented "no iptables" example (istio/api `networking/v1alpha3/sidecar.proto`,
//! the `no-ip-tables` Sidecar), with the ports meshbpf discovered.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::path::Path;

use crate::error::{Error, Result};
use crate::mesh::{Mesh, Pod};
use crate::netns::Netns;
use crate::pod::settings::InboundMode;

/// `metadata.name` of the resource unless another is given.
pub const DEFAULT_SIDECAR_NAME: &str = "meshbpf-bind";

/// Istio's `Sidecar` resource for a bind-mode pod: one `ingress` listener per port its
/// applications listen on, each bound by Envoy itself (`captureMode: NONE`) and forwarding
/// to `127.0.0.1:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SidecarResource {
    /// `metadata.name`: a DNS-1123 subdomain.
    pub name: String,
    /// `metadata.namespace` (a DNS-1123 label); left out when `None`, so that
    /// `kubectl apply -n NS` chooses it.
    pub namespace: Option<String>,
    /// `spec.workloadSelector.labels`: the pod's labels. Empty: no `workloadSelector`, and
    /// the resource applies to every workload of its namespace that has no Sidecar of its own.
    pub selector: BTreeMap<String, String>,
    /// The ports, one `ingress` entry each, in ascending order.
    pub ports: Vec<u16>,
}

impl SidecarResource {
    /// The resource for `pod`, with `name`, `namespace` and `selector` checked as Kubernetes
    /// checks them; refused unless the pod is in bind mode with at least one discovered
    /// inbound listener (`path` names the pod in the error).
    pub fn for_pod(
        pod: &Pod,
        path: &Path,
        name: &str,
        namespace: Option<&str>,
        selector: BTreeMap<String, String>,
    ) -> Result<SidecarResource> {
        if pod.settings.inbound_mode != InboundMode::Bind {
            return Err(Error::NotBindMode {
                path: path.into(),
                mode: pod.settings.inbound_mode.to_string(),
            });
        }
        let mut ports = pod.inbound_listeners.clone();
        ports.sort_unstable();
        ports.dedup();
        if ports.is_empty() {
            return Err(Error::NoInboundListeners { path: path.into() });
        }
        let resource = SidecarResource {
            name: name.into(),
            namespace: namespace.map(str::to_string),
            selector,
            ports,
        };
        resource.validate()?;
        Ok(resource)
    }

    /// [`SidecarResource::for_pod`] for the pod whose network namespace is at `netns_path`,
    /// as `mesh` has it registered now.
    pub fn for_netns(
        mesh: &Mesh,
        netns_path: impl AsRef<Path>,
        name: &str,
        namespace: Option<&str>,
        selector: BTreeMap<String, String>,
    ) -> Result<SidecarResource> {
        let path = netns_path.as_ref();
        let cookie = Netns::open(path)?.cookie();
        let pod = mesh
            .pods()?
            .into_iter()
            .find(|pod| pod.netns_cookie == cookie)
            .ok_or_else(|| Error::NotRegistered { path: path.into() })?;
        SidecarResource::for_pod(&pod, path, name, namespace, selector)
    }

    /// Refuses a name, namespace or selector Kubernetes or Istio's CRD would refuse.
    fn validate(&self) -> Result<()> {
        if !is_dns_subdomain(&self.name) {
            return Err(bad(format!(
                "Sidecar name {:?}: give a DNS-1123 subdomain (lowercase letters, digits, '-' \
                 and '.', starting and ending with a letter or digit, at most 253 characters)",
                self.name
            )));
        }
        if let Some(namespace) = &self.namespace {
            if !is_dns_label(namespace) {
                return Err(bad(format!(
                    "namespace {namespace:?}: give a DNS-1123 label (lowercase letters, digits \
                     and '-', starting and ending with a letter or digit, at most 63 characters)"
                )));
            }
        }
        if self.selector.len() > MAX_SELECTOR_LABELS {
            return Err(bad(format!(
                "{} selector labels: Istio's workloadSelector takes at most {MAX_SELECTOR_LABELS}",
                self.selector.len()
            )));
        }
        for (key, value) in &self.selector {
            check_label(key, value)?;
        }
        Ok(())
    }

    /// The resource as YAML, for `kubectl apply -f -`.
    pub fn to_yaml(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_yaml(&mut out);
        out
    }

    fn write_yaml(&self, out: &mut String) -> fmt::Result {
        writeln!(out, "apiVersion: networking.istio.io/v1")?;
        writeln!(out, "kind: Sidecar")?;
        writeln!(out, "metadata:")?;
        writeln!(out, "  name: {}", scalar(&self.name))?;
        if let Some(namespace) = &self.namespace {
            writeln!(out, "  namespace: {}", scalar(namespace))?;
        }
        writeln!(out, "spec:")?;
        if !self.selector.is_empty() {
            writeln!(out, "  workloadSelector:")?;
            writeln!(out, "    labels:")?;
            for (key, value) in &self.selector {
                writeln!(out, "      {}: {}", scalar(key), scalar(value))?;
            }
        }
        writeln!(out, "  ingress:")?;
        for port in &self.ports {
            writeln!(out, "  - port:")?;
            writeln!(out, "      number: {port}")?;
            writeln!(out, "      protocol: TCP")?;
            writeln!(out, "      name: tcp-{port}")?;
            writeln!(out, "    defaultEndpoint: 127.0.0.1:{port}")?;
            writeln!(out, "    captureMode: NONE")?;
        }
        Ok(())
    }
}

impl fmt::Display for SidecarResource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_yaml())
    }
}

/// Parses one selector label, `KEY=VALUE` (a Kubernetes label: `app=web`,
/// `app.kubernetes.io/name=web`).
pub fn parse_selector(text: &str) -> Result<(String, String)> {
    let (key, value) = text.split_once('=').ok_or_else(|| {
        bad(format!(
            "selector {text:?}: give KEY=VALUE, such as app=web"
        ))
    })?;
    check_label(key, value)?;
    Ok((key.to_string(), value.to_string()))
}

/// The most labels Istio's CRD takes in `workloadSelector.labels`.
const MAX_SELECTOR_LABELS: usize = 256;

fn bad(message: String) -> Error {
    Error::InvalidSetting(message)
}

/// A Kubernetes label: `[PREFIX/]NAME` and a value, as the API server checks them.
fn check_label(key: &str, value: &str) -> Result<()> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if prefix.is_some_and(|p| !is_dns_subdomain(p)) || !is_label_name(name) {
        return Err(bad(format!(
            "selector label key {key:?}: give [PREFIX/]NAME, NAME of at most 63 letters, digits, \
             '-', '_' or '.' starting and ending with a letter or digit, PREFIX a DNS subdomain"
        )));
    }
    if !value.is_empty() && !is_label_name(value) {
        return Err(bad(format!(
            "selector label {key}={value:?}: a label value has at most 63 letters, digits, '-', \
             '_' or '.', starting and ending with a letter or digit"
        )));
    }
    Ok(())
}

/// A label name or non-empty value: `[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?`, 63 at most.
fn is_label_name(text: &str) -> bool {
    (1..=63).contains(&text.len())
        && starts_and_ends_alphanumeric(text)
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// A DNS-1123 label: lowercase letters, digits and '-', 63 at most, alphanumeric at both ends.
fn is_dns_label(text: &str) -> bool {
    (1..=63).contains(&text.len())
        && starts_and_ends_alphanumeric(text)
        && text
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// A DNS-1123 subdomain: DNS-1123 labels joined by '.', 253 at most.
fn is_dns_subdomain(text: &str) -> bool {
    text.len() <= 253 && text.split('.').all(is_dns_label)
}

fn starts_and_ends_alphanumeric(text: &str) -> bool {
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    alnum(text.chars().next()) && alnum(text.chars().last())
}

/// `text` as a YAML scalar that reads back as that string: plain when it cannot be taken for
/// anything else (a number, a boolean, null), double-quoted otherwise.
fn scalar(text: &str) -> String {
    let word = text.to_ascii_lowercase();
    let plain = text.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
        // YAML 1.1's booleans and null, which some readers still resolve.
        && !matches!(
            word.as_str(),
            "y" | "n" | "yes" | "no" | "true" | "false" | "on" | "off" | "null"
        );
    if plain {
        return text.to_string();
    }
    let mut quoted = String::with_capacity(text.len() + 2);
    quoted.push('"');
    for c in text.chars() {
        if matches!(c, '"' | '\\') {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('"');
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod::settings::PodSettings;

    fn pod(mode: InboundMode, listeners: &[u16]) -> Pod {
        Pod {
            netns_cookie: 4242,
            settings: PodSettings {
                inbound_mode: mode,
                ..PodSettings::default()
            },
            netns_inode: 1,
            addresses: Vec::new(),
            inbound_listeners: listeners.to_vec(),
        }
    }

    fn selector(labels: &[(&str, &str)]) -> BTreeMap<String, String> {
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn resource_for(pod: &Pod) -> Result<SidecarResource> {
        SidecarResource::for_pod(
            pod,
            Path::new("/run/netns/web"),
            "no-ip-tables",
            Some("prod-us1"),
            selector(&[("app", "productpage")]),
        )
    }

    /// Checked by hand against Istio's documented example (istio/api
    /// `networking/v1alpha3/sidecar.proto`, the `no-ip-tables` Sidecar, rendered at
    /// istio.io/docs/reference/config/networking/sidecar.html; quoted in the project's Istio
    /// notes §5): the same apiVersion, kind, metadata, `spec.workloadSelector.labels`, and
    /// `ingress` entries nesting `port` {`number`, `protocol`, `name`} beside
    /// `defaultEndpoint` and `captureMode: NONE`, with the same indentation. The differences
    /// are meshbpf's choices: protocol TCP, the application's own port behind loopback
    /// (the example maps 9080 to 127.0.0.1:8080), and no `egress` (outbound stays captured
    /// to Envoy's 15001 as usual; Istio then uses its default egress, `*/*`). Also checked by
    /// hand against the CRD's openAPIV3Schema (manifests/charts/base/files/crd-all.gen.yaml).
    const GOLDEN: &str = "\
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata:
  name: no-ip-tables
  namespace: prod-us1
spec:
  workloadSelector:
    labels:
      app: productpage
  ingress:
  - port:
      number: 8080
      protocol: TCP
      name: tcp-8080
    defaultEndpoint: 127.0.0.1:8080
    captureMode: NONE
  - port:
      number: 9080
      protocol: TCP
      name: tcp-9080
    defaultEndpoint: 127.0.0.1:9080
    captureMode: NONE
";

    #[test]
    fn a_bind_mode_pod_gets_one_ingress_listener_per_discovered_port() {
        let resource = resource_for(&pod(InboundMode::Bind, &[9080, 8080, 9080])).unwrap();
        assert_eq!(resource.to_yaml(), GOLDEN);
        assert_eq!(resource.to_string(), GOLDEN);
    }

    #[test]
    fn without_namespace_or_selector_those_fields_are_left_out() {
        let resource = SidecarResource::for_pod(
            &pod(InboundMode::Bind, &[80]),
            Path::new("/run/netns/web"),
            DEFAULT_SIDECAR_NAME,
            None,
            BTreeMap::new(),
        )
        .unwrap();
        assert_eq!(
            resource.to_yaml(),
            "\
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata:
  name: meshbpf-bind
spec:
  ingress:
  - port:
      number: 80
      protocol: TCP
      name: tcp-80
    defaultEndpoint: 127.0.0.1:80
    captureMode: NONE
"
        );
    }

    #[test]
    fn redirect_and_none_mode_pods_are_refused_with_the_bind_mode_named() {
        for mode in [InboundMode::Redirect, InboundMode::None] {
            let err = resource_for(&pod(mode, &[8080])).unwrap_err();
            assert!(matches!(err, Error::NotBindMode { .. }), "{err}");
            let text = err.to_string();
            assert!(
                text.contains(&format!("inbound mode {mode}"))
                    && text.contains("for bind mode")
                    && text.contains("--inbound-mode bind"),
                "{text}"
            );
        }
    }

    #[test]
    fn a_bind_mode_pod_with_no_listener_yet_is_refused() {
        let err = resource_for(&pod(InboundMode::Bind, &[])).unwrap_err();
        assert!(matches!(err, Error::NoInboundListeners { .. }), "{err}");
        assert!(err.to_string().contains("/run/netns/web"), "{err}");
    }

    #[test]
    fn label_values_yaml_would_read_as_other_types_are_quoted() {
        let resource = SidecarResource::for_pod(
            &pod(InboundMode::Bind, &[80]),
            Path::new("/run/netns/web"),
            "web",
            None,
            selector(&[
                ("app.kubernetes.io/name", "web"),
                ("canary", "true"),
                ("version", "1.10"),
                ("empty", ""),
                ("n", "No"),
            ]),
        )
        .unwrap();
        let yaml = resource.to_yaml();
        for line in [
            "      app.kubernetes.io/name: web\n",
            "      canary: \"true\"\n",
            "      version: \"1.10\"\n",
            "      empty: \"\"\n",
            "      \"n\": \"No\"\n",
        ] {
            assert!(yaml.contains(line), "{line:?} not in\n{yaml}");
        }
    }

    #[test]
    fn selectors_parse_and_bad_ones_are_refused_by_name() {
        assert_eq!(
            parse_selector("app.kubernetes.io/name=web").unwrap(),
            ("app.kubernetes.io/name".to_string(), "web".to_string())
        );
        assert_eq!(
            parse_selector("tier=").unwrap(),
            ("tier".to_string(), String::new())
        );
        for text in [
            "app",
            "=web",
            "app=we b",
            "app=*",
            "app=-web",
            "Example.COM/app=web",
            "/app=web",
            &format!("app={}", "a".repeat(64)),
        ] {
            let err = parse_selector(text).unwrap_err();
            assert!(matches!(err, Error::InvalidSetting(_)), "{text}: {err}");
            assert!(err.to_string().contains("selector"), "{text}: {err}");
        }
    }

    #[test]
    fn names_and_namespaces_kubernetes_refuses_are_refused() {
        let bind = pod(InboundMode::Bind, &[80]);
        let path = Path::new("/run/netns/web");
        for (name, namespace) in [
            ("Web", None),
            ("web_1", None),
            ("-web", None),
            ("", None),
            ("web", Some("shop.prod")),
            ("web", Some("Shop")),
        ] {
            let err = SidecarResource::for_pod(&bind, path, name, namespace, BTreeMap::new())
                .unwrap_err();
            assert!(matches!(err, Error::InvalidSetting(_)), "{name}: {err}");
        }
        let ok = SidecarResource::for_pod(&bind, path, "web.v1", Some("shop-1"), BTreeMap::new());
        assert!(ok.is_ok(), "{ok:?}");
    }
}
