//! Pod settings from a mesh's conventions (`--mesh`) or from a pod's Istio
//! annotations (`--from-annotations`), derived as istio-iptables would.

use std::collections::BTreeMap;
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::settings::{
    parse_cidr_list, parse_port_list, Cidrs, InboundMode, PodSettings, Ports, Selection,
};

/// A service mesh whose sidecar conventions meshbpf knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize),
    serde(rename_all = "lowercase")
)]
pub enum MeshPreset {
    /// Istio: proxy uid 1337, outbound 15001, inbound 15006, DNS 15053
    /// (istio.io/latest/docs/ops/deployment/application-requirements/, "Ports used by Istio").
    Istio,
    /// Linkerd: proxy uid 2102, outbound 4140, inbound 4143; its proxy's own ports 4190 (tap)
    /// and 4191 (admin) are skipped inbound; no DNS proxy
    /// (linkerd.io/2/reference/cli/install/ `--proxy-uid` default 2102;
    /// linkerd.io/2/reference/proxy-configuration/; proxy-init `--inbound-ports-to-ignore`).
    Linkerd,
    /// Kuma: kuma-dp uid 5678, outbound 15001, inbound 15006, DNS 15053, Envoy admin 9901
    /// skipped inbound (kuma.io/docs/latest/networking/transparent-proxying/).
    Kuma,
    /// meshbpf's own defaults: Istio's ports, and the bind model inbound (the applications'
    /// wildcard binds move to loopback, the sidecar owns `pod_ip:PORT`), which needs no
    /// single inbound listener from the sidecar.
    Generic,
}

impl FromStr for MeshPreset {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "istio" => Ok(MeshPreset::Istio),
            "linkerd" => Ok(MeshPreset::Linkerd),
            "kuma" => Ok(MeshPreset::Kuma),
            "generic" => Ok(MeshPreset::Generic),
            _ => Err(Error::InvalidSetting(format!(
                "mesh {text:?}: give one of istio, linkerd, kuma, generic"
            ))),
        }
    }
}

impl MeshPreset {
    /// The pod settings this mesh's sidecar expects.
    pub fn settings(self) -> PodSettings {
        let base = PodSettings::default();
        match self {
            MeshPreset::Istio => base,
            MeshPreset::Generic => PodSettings {
                inbound_mode: InboundMode::Bind,
                ..base
            },
            MeshPreset::Linkerd => PodSettings {
                proxy_uids: [2102].into(),
                outbound_port: 4140,
                inbound_port: 4143,
                exclude_inbound_ports: [4190, 4191].into(),
                capture_dns: false,
                ..base
            },
            MeshPreset::Kuma => PodSettings {
                proxy_uids: [5678].into(),
                exclude_inbound_ports: [9901].into(),
                ..base
            },
        }
    }
}

const ANNOTATION_PREFIX: &str = "traffic.sidecar.istio.io/";

/// Parses a pod's annotations: a JSON object, or a YAML mapping of `key: value` lines (as
/// `kubectl get pod -o jsonpath='{.metadata.annotations}'` or the manifest's block gives).
#[cfg(feature = "cli")]
pub fn parse_annotations(text: &str) -> Result<BTreeMap<String, String>> {
    let bad = |what: String| Error::InvalidSetting(format!("annotations: {what}"));
    if text.trim_start().starts_with('{') {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON ({e})")))?;
        let object = value
            .as_object()
            .ok_or_else(|| bad("not a JSON object".into()))?;
        return object
            .iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => Ok((k.clone(), s.clone())),
                other => Ok((k.clone(), other.to_string())),
            })
            .collect();
    }
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line == "annotations:" || line == "---" {
            continue;
        }
        let (key, value) = line
            .split_once(':')
            .filter(|(k, _)| !k.trim().is_empty())
            .ok_or_else(|| bad(format!("line {}: {line:?} is not `key: value`", n + 1)))?;
        let unquote = |s: &str| {
            let s = s.trim();
            s.strip_prefix('"')
                .and_then(|s| s.strip_suffix('"'))
                .or_else(|| s.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')))
                .unwrap_or(s)
                .to_string()
        };
        out.insert(unquote(key), unquote(value));
    }
    Ok(out)
}

/// Applies a pod's `traffic.sidecar.istio.io/*` annotations to `base`, with the meaning
/// istio-iptables gives them: `includeOutboundIPRanges` (`-i`, `*` = all, empty = none),
/// `excludeOutboundIPRanges` (`-x`), `includeOutboundPorts` (`-q`), `excludeOutboundPorts`
/// (`-o`), `includeInboundPorts` (`-b`, `*` = all, empty = no inbound capture),
/// `excludeInboundPorts` (`-d`, the mesh's own ports always added). Other annotations are
/// not meshbpf's business and are ignored; an unknown `traffic.sidecar.istio.io/` key is
/// refused rather than silently dropped.
pub fn apply_istio_annotations(
    base: PodSettings,
    annotations: &BTreeMap<String, String>,
) -> Result<PodSettings> {
    let mut s = base;
    for (key, value) in annotations {
        if key == "sidecar.istio.io/interceptionMode" && value != "REDIRECT" {
            return Err(Error::InvalidSetting(format!(
                "{key}: {value:?}: meshbpf provides REDIRECT semantics only"
            )));
        }
        let Some(name) = key.strip_prefix(ANNOTATION_PREFIX) else {
            continue;
        };
        let named = |e: Error| Error::InvalidSetting(format!("{key}: {e}"));
        match name {
            "includeOutboundIPRanges" => {
                s.include_outbound_cidrs = Cidrs::parse(value).map_err(named)?
            }
            "excludeOutboundIPRanges" => {
                s.exclude_outbound_cidrs = parse_cidr_list(value).map_err(named)?
            }
            "includeOutboundPorts" => {
                s.include_outbound_ports = parse_port_list(value).map_err(named)?
            }
            "excludeOutboundPorts" => {
                s.exclude_outbound_ports = parse_port_list(value).map_err(named)?
            }
            "includeInboundPorts" => {
                let ports = Ports::parse(value).map_err(named)?;
                // istio-iptables: an empty -b installs no inbound capture at all.
                if ports == Selection::Only(Default::default()) {
                    s.inbound_mode = InboundMode::None;
                }
                s.inbound_ports = ports;
            }
            "excludeInboundPorts" => {
                s.exclude_inbound_ports = parse_port_list(value).map_err(named)?
            }
            "excludeInterfaces" | "kubevirtInterfaces" => {
                return Err(Error::InvalidSetting(format!(
                    "{key}: interface-based rules have no meaning for socket hooks; remove it"
                )))
            }
            _ => {
                return Err(Error::InvalidSetting(format!(
                    "{key}: unknown traffic annotation"
                )))
            }
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_carry_each_mesh_s_uid_and_ports() {
        let l = MeshPreset::Linkerd.settings();
        assert_eq!(
            (l.proxy_uids.first(), l.outbound_port, l.inbound_port),
            (Some(&2102), 4140, 4143)
        );
        assert!(!l.capture_dns);
        let k = MeshPreset::Kuma.settings();
        assert_eq!(
            (
                k.proxy_uids.first(),
                k.outbound_port,
                k.inbound_port,
                k.dns_port
            ),
            (Some(&5678), 15001, 15006, 15053)
        );
        let i = MeshPreset::Istio.settings();
        assert_eq!(
            (
                i.proxy_uids.first(),
                i.outbound_port,
                i.inbound_port,
                i.dns_port
            ),
            (Some(&1337), 15001, 15006, 15053)
        );
        let err = "consul".parse::<MeshPreset>().unwrap_err().to_string();
        assert!(err.contains("consul") && err.contains("linkerd"), "{err}");
    }

    #[test]
    #[cfg(feature = "cli")]
    fn yaml_and_json_annotations_give_the_same_settings() {
        let yaml = "annotations:\n  traffic.sidecar.istio.io/includeOutboundIPRanges: \"10.0.0.0/8,2001:db8::/32\"\n  traffic.sidecar.istio.io/excludeOutboundPorts: '3306'\n  prometheus.io/scrape: true\n";
        let json = r#"{"traffic.sidecar.istio.io/includeOutboundIPRanges":"10.0.0.0/8,2001:db8::/32","traffic.sidecar.istio.io/excludeOutboundPorts":"3306","prometheus.io/scrape":"true"}"#;
        let a = apply_istio_annotations(PodSettings::default(), &parse_annotations(yaml).unwrap())
            .unwrap();
        let b = apply_istio_annotations(PodSettings::default(), &parse_annotations(json).unwrap())
            .unwrap();
        assert_eq!(a, b);
        assert_eq!(
            a.include_outbound_cidrs,
            Cidrs::parse("10.0.0.0/8,2001:db8::/32").unwrap()
        );
        assert_eq!(a.exclude_outbound_ports, [3306].into());
    }

    #[test]
    #[cfg(feature = "cli")]
    fn empty_include_inbound_ports_turns_inbound_capture_off_as_istio_does() {
        let ann =
            parse_annotations(r#"{"traffic.sidecar.istio.io/includeInboundPorts":""}"#).unwrap();
        assert_eq!(
            apply_istio_annotations(PodSettings::default(), &ann)
                .unwrap()
                .inbound_mode,
            InboundMode::None
        );
    }

    #[test]
    #[cfg(feature = "cli")]
    fn bad_annotations_are_refused_by_name() {
        for (text, named) in [
            (
                r#"{"traffic.sidecar.istio.io/excludeOutboundIPRanges":"10.0.0.0/40"}"#,
                "10.0.0.0/40",
            ),
            (r#"{"traffic.sidecar.istio.io/bogus":"1"}"#, "bogus"),
            (
                r#"{"sidecar.istio.io/interceptionMode":"TPROXY"}"#,
                "TPROXY",
            ),
        ] {
            let err =
                apply_istio_annotations(PodSettings::default(), &parse_annotations(text).unwrap())
                    .unwrap_err();
            assert!(err.to_string().contains(named), "{err}");
        }
        assert!(parse_annotations("just text").is_err());
    }
}
