//! Pod settings from a mesh's conventions (`--mesh`) or from a pod's Istio
//! annotations (`--from-annotations`), derived as istio-iptables would.

use std::collections::BTreeMap;
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::pod::settings::{
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

/// The keys istio-cni reads besides the `traffic.sidecar.istio.io/` ones, all of which
/// meshbpf reads too (istio-cni `cni/pkg/plugin/sidecar_redirect.go`, `annotationRegistry`).
const READ_KEYS: [&str; 4] = [
    "sidecar.istio.io/status",
    "sidecar.istio.io/inject",
    "sidecar.istio.io/interceptionMode",
    REROUTE_VIRTUAL_INTERFACES,
];

/// The current name of `traffic.sidecar.istio.io/kubevirtInterfaces`; istio-cni prefers it
/// when both are given (KubeVirt sets both).
const REROUTE_VIRTUAL_INTERFACES: &str = "istio.io/reroute-virtual-interfaces";

/// A pod's annotations as istio-cni reads them: the settings they give, the interfaces they
/// name (which only the pod's network namespace can turn into addresses), and the keys
/// meshbpf leaves alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IstioAnnotations {
    /// The settings, with the traffic annotations applied.
    pub settings: PodSettings,
    /// `traffic.sidecar.istio.io/excludeInterfaces`: nothing routed out of these is captured
    /// (istio-iptables `-c`).
    pub exclude_interfaces: Vec<String>,
    /// `istio.io/reroute-virtual-interfaces`, else `traffic.sidecar.istio.io/kubevirtInterfaces`
    /// (istio-iptables `-k`): a KubeVirt VM's bridge, whose forwarded traffic iptables
    /// redirects to the sidecar as outbound.
    pub virtual_interfaces: Vec<String>,
    /// `traffic.sidecar.istio.io/` keys neither istio-cni nor meshbpf knows: ignored, as
    /// istio-cni ignores them.
    pub unknown_traffic_keys: Vec<String>,
    /// Every other annotation: not read (neither Istio's traffic keys nor injection's).
    pub other_keys: Vec<String>,
}

/// Settings without annotations.
impl From<PodSettings> for IstioAnnotations {
    fn from(settings: PodSettings) -> Self {
        IstioAnnotations {
            settings,
            exclude_interfaces: Vec::new(),
            virtual_interfaces: Vec::new(),
            unknown_traffic_keys: Vec::new(),
            other_keys: Vec::new(),
        }
    }
}

/// Reads a pod's annotations as istio-cni does (`NewRedirect`): a malformed value of a key it
/// reads fails, as it fails the pod there; keys it does not read are never an error.
/// Traffic annotations have istio-iptables' meaning: `includeOutboundIPRanges` (`-i`, `*` =
/// all, empty = none), `excludeOutboundIPRanges` (`-x`), `includeOutboundPorts` (`-q`),
/// `excludeOutboundPorts` (`-o`), `includeInboundPorts` (`-b`, `*` = all, empty = no inbound
/// capture), `excludeInboundPorts` (`-d`, the mesh's own ports always added);
/// `excludeInterfaces` and `kubevirtInterfaces` are returned as names.
pub fn read_istio_annotations(
    base: PodSettings,
    annotations: &BTreeMap<String, String>,
) -> Result<IstioAnnotations> {
    let mut read = IstioAnnotations::from(base);
    let s = &mut read.settings;
    for (key, value) in annotations {
        if key == "sidecar.istio.io/interceptionMode" && value != "REDIRECT" {
            // istio-cni takes TPROXY too, but the sidecar it configures then connects to the
            // application from the client's address (original_src), which only TPROXY's
            // policy routing brings back: with meshbpf such a pod's inbound would hang.
            return Err(Error::InvalidSetting(format!(
                "{key}: {value:?}: meshbpf provides REDIRECT semantics only; remove the \
                 annotation or set it to REDIRECT"
            )));
        }
        let Some(name) = key.strip_prefix(ANNOTATION_PREFIX) else {
            if !READ_KEYS.contains(&key.as_str()) {
                read.other_keys.push(key.clone());
            }
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
            "excludeInterfaces" => {
                read.exclude_interfaces = parse_interface_names(value).map_err(named)?
            }
            // Never validated by istio-cni: names that cannot be interfaces match nothing.
            "kubevirtInterfaces" if !annotations.contains_key(REROUTE_VIRTUAL_INTERFACES) => {
                read.virtual_interfaces = split_names(value)
            }
            "kubevirtInterfaces" => {}
            _ => read.unknown_traffic_keys.push(key.clone()),
        }
    }
    if let Some(value) = annotations.get(REROUTE_VIRTUAL_INTERFACES) {
        read.virtual_interfaces = split_names(value);
    }
    Ok(read)
}

/// Applies a pod's `traffic.sidecar.istio.io/*` annotations to `base` as
/// `read_istio_annotations` reads them; the interfaces they name and the keys left alone
/// are dropped (a caller holding the pod's network namespace wants the former: see
/// `read_istio_annotations`).
pub fn apply_istio_annotations(
    base: PodSettings,
    annotations: &BTreeMap<String, String>,
) -> Result<PodSettings> {
    read_istio_annotations(base, annotations).map(|read| read.settings)
}

/// A comma-separated list of names, trimmed, empty ones left out.
fn split_names(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(String::from)
        .collect()
}

/// A comma-separated list of interface names, each one Linux could have: at most 15 bytes
/// of letters, digits, `_`, `.` and `-`, not starting with `.` or `-` (istio-cni's
/// `ValidateInterfaceNames`); empty entries are left out.
fn parse_interface_names(text: &str) -> Result<Vec<String>> {
    let names = split_names(text);
    for name in &names {
        let valid = name.len() <= 15
            && !name.starts_with(['.', '-'])
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if !valid {
            return Err(Error::InvalidSetting(format!(
                "interface {name:?}: give interface names of at most 15 letters, digits, \
                 '_', '.' or '-'"
            )));
        }
    }
    Ok(names)
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
            (
                r#"{"traffic.sidecar.istio.io/excludeInterfaces":"eth1,bad/name"}"#,
                "bad/name",
            ),
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

    #[test]
    #[cfg(feature = "cli")]
    fn keys_istio_cni_accepts_are_read_or_left_alone_never_refused() {
        let ann = parse_annotations(
            r#"{"traffic.sidecar.istio.io/excludeInterfaces":"net1, net2,",
                "traffic.sidecar.istio.io/kubevirtInterfaces":"k6t-eth0",
                "traffic.sidecar.istio.io/foo":"bar",
                "traffic.sidecar.istio.io/excludeOutboundPorts":"3306",
                "sidecar.istio.io/status":"{}",
                "prometheus.io/scrape":"true"}"#,
        )
        .unwrap();
        let read = read_istio_annotations(PodSettings::default(), &ann).unwrap();
        assert_eq!(read.exclude_interfaces, ["net1", "net2"]);
        assert_eq!(read.virtual_interfaces, ["k6t-eth0"]);
        assert_eq!(read.unknown_traffic_keys, ["traffic.sidecar.istio.io/foo"]);
        assert_eq!(read.other_keys, ["prometheus.io/scrape"]);
        assert_eq!(read.settings.exclude_outbound_ports, [3306].into());
        // The current name wins over the deprecated one, as in istio-cni.
        let both = parse_annotations(
            r#"{"traffic.sidecar.istio.io/kubevirtInterfaces":"old",
                "istio.io/reroute-virtual-interfaces":"new"}"#,
        )
        .unwrap();
        let read = read_istio_annotations(PodSettings::default(), &both).unwrap();
        assert_eq!(read.virtual_interfaces, ["new"]);
        assert!(read.other_keys.is_empty() && read.unknown_traffic_keys.is_empty());
    }
}
