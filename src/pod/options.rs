//! A pod's settings as named options, read in one place for every front end: `meshbpf
//! register` takes them as flags (`--proxy-uid 1337`), the CNI plugin's conf entry as keys
//! (`"proxy_uid": "1337"`, the flag's name in snake_case, as istio-cni's conf spells its keys).
//! clap parses both: a conf key's value goes through its flag's parser.

use std::collections::{BTreeMap, BTreeSet};

use clap::{Args, FromArgMatches};
use serde_json::Value;

use crate::cidr::Cidr;
use crate::error::{Error, Result};
use crate::pod::presets::{read_istio_annotations, MeshPreset};
use crate::pod::settings::{
    parse_cidr_list, parse_id_list, parse_port_list, Cidrs, InboundMode, PodSettings, Ports,
};

/// One pod's settings as options: a mesh preset, then each option given, overriding it.
/// Lists are comma-separated; `*` means all.
#[derive(Clone, Debug, Default, PartialEq, Eq, clap::Args)]
#[non_exhaustive]
pub struct PodOptions {
    /// Start from this mesh's conventions (istio when not given).
    #[arg(long, value_name = "MESH", value_enum, ignore_case = true)]
    pub mesh: Option<MeshPreset>,
    /// Users whose connections are never captured (the sidecar's; 1337 for Istio).
    #[arg(long, value_name = "LIST", value_parser = reason(parse_id_list))]
    pub proxy_uid: Option<BTreeSet<u32>>,
    /// Groups whose connections are never captured.
    #[arg(long, value_name = "LIST", value_parser = reason(parse_id_list))]
    pub proxy_gid: Option<BTreeSet<u32>>,
    /// The sidecar's outbound listener port on loopback (15001).
    #[arg(long, value_name = "PORT", value_parser = reason(port))]
    pub outbound_port: Option<u16>,
    /// Only these destinations are captured (`*`, the default, is all).
    #[arg(long, value_name = "LIST", value_parser = reason(Cidrs::parse))]
    pub include_outbound_cidrs: Option<Cidrs>,
    /// Destinations never captured; wins over the included ones.
    #[arg(long, value_name = "LIST", value_parser = reason(parse_cidr_list))]
    pub exclude_outbound_cidrs: Option<BTreeSet<Cidr>>,
    /// Destination ports always captured, even outside the included CIDRs.
    #[arg(long, value_name = "LIST", value_parser = reason(parse_port_list))]
    pub include_outbound_ports: Option<BTreeSet<u16>>,
    /// Destination ports never captured, TCP and UDP.
    #[arg(long, value_name = "LIST", value_parser = reason(parse_port_list))]
    pub exclude_outbound_ports: Option<BTreeSet<u16>>,
    /// How inbound TCP reaches the applications: redirect (to the sidecar's inbound listener,
    /// Istio's; istio's, linkerd's and kuma's default), bind (wildcard binds move to loopback,
    /// the sidecar owns pod_ip:PORT; generic's default) or none.
    #[arg(long, value_name = "MODE", value_enum, ignore_case = true)]
    pub inbound_mode: Option<InboundMode>,
    /// The sidecar's inbound listener port, in redirect mode (15006).
    #[arg(long, value_name = "PORT", value_parser = reason(port))]
    pub inbound_port: Option<u16>,
    /// Inbound ports captured (`*`, the default, is all).
    #[arg(long, value_name = "LIST", value_parser = reason(Ports::parse))]
    pub inbound_ports: Option<Ports>,
    /// Inbound ports never captured, on top of the mesh's own (15008,15020,15021,15090).
    #[arg(long, value_name = "LIST", value_parser = reason(parse_port_list))]
    pub exclude_inbound_ports: Option<BTreeSet<u16>>,
    /// Do not capture inbound (the same as --inbound-mode none).
    #[arg(long)]
    pub no_inbound: bool,
    /// The sidecar's DNS listener port on loopback, UDP and TCP (15053).
    #[arg(long, value_name = "PORT", value_parser = reason(port))]
    pub dns_port: Option<u16>,
    /// Do not capture DNS: queries go straight to the servers.
    #[arg(long)]
    pub no_dns: bool,
    /// Accelerate this pod's application-sidecar connections with sockmap (off by default:
    /// it pays only for connections whose first message is large; docs/bench-sockmap.md).
    #[arg(long, conflicts_with = "no_sockmap")]
    pub sockmap: bool,
    /// Do not accelerate this pod's connections with sockmap (the default).
    #[arg(long)]
    pub no_sockmap: bool,
    /// Accelerate a connection only if its first message is at least this many bytes
    /// (16384; 0: every connection).
    #[arg(long, value_name = "BYTES", value_parser = reason(bytes))]
    pub sockmap_min_bytes: Option<u32>,
    /// Accelerate connections between this pod's sidecar and the sidecars of other pods of
    /// the node registered with it too, socket to socket: their bytes then bypass the pods'
    /// interfaces, NetworkPolicy and any tc/netfilter processing (the book's "Intra-node acceleration").
    #[arg(long)]
    pub intra_node: bool,
}

impl PodOptions {
    /// Every option's name, as a CNI conf key.
    pub fn keys() -> Vec<String> {
        Self::augment_args(clap::Command::new("conf"))
            .get_arguments()
            .map(|arg| arg.get_id().to_string())
            .collect()
    }

    /// Sets the option named `key` (a conf key such as `proxy_uid`) from a JSON value: a
    /// string, a number, or for lists an array of them; `true` turns a switch on (`false`
    /// leaves it as it was: off unless set before). Returns `Ok(false)` when `key` is not a
    /// pod option. A bad value is refused with the key and value in the message, and leaves
    /// the options as they were.
    pub fn set(&mut self, key: &str, value: &Value) -> Result<bool> {
        let bad = |what: String| Error::InvalidSetting(format!("{key}: {value}: {what}"));
        let command = Self::augment_args(clap::Command::new("conf").no_binary_name(true));
        let Some(arg) = command.get_arguments().find(|arg| arg.get_id() == key) else {
            return Ok(false);
        };
        let flag = format!("--{}", arg.get_long().unwrap_or(key));
        let argv = if arg.get_action().takes_values() {
            let text = conf_text(value)
                .ok_or_else(|| bad("give a string, a number, or a list of them".into()))?;
            // `--flag=value`: a value may start with a dash.
            vec![format!("{flag}={text}")]
        } else {
            match value.as_bool() {
                Some(true) => vec![flag],
                Some(false) => vec![],
                None => return Err(bad("give true or false".into())),
            }
        };
        let given = command
            .try_get_matches_from(argv)
            .and_then(|matches| PodOptions::from_arg_matches(&matches))
            .map_err(|err| bad(clap_reason(&err)))?;
        self.overlay(given);
        Ok(true)
    }

    /// Takes every option `given` gives: each value, and each switch turned on. (Every
    /// field is named: a new option is a compile error here until it is taken.)
    fn overlay(&mut self, given: PodOptions) {
        let PodOptions {
            mesh,
            proxy_uid,
            proxy_gid,
            outbound_port,
            include_outbound_cidrs,
            exclude_outbound_cidrs,
            include_outbound_ports,
            exclude_outbound_ports,
            inbound_mode,
            inbound_port,
            inbound_ports,
            exclude_inbound_ports,
            no_inbound,
            dns_port,
            no_dns,
            sockmap,
            no_sockmap,
            sockmap_min_bytes,
            intra_node,
        } = given;
        fn take<T>(mine: &mut Option<T>, given: Option<T>) {
            if given.is_some() {
                *mine = given;
            }
        }
        take(&mut self.mesh, mesh);
        take(&mut self.proxy_uid, proxy_uid);
        take(&mut self.proxy_gid, proxy_gid);
        take(&mut self.outbound_port, outbound_port);
        take(&mut self.include_outbound_cidrs, include_outbound_cidrs);
        take(&mut self.exclude_outbound_cidrs, exclude_outbound_cidrs);
        take(&mut self.include_outbound_ports, include_outbound_ports);
        take(&mut self.exclude_outbound_ports, exclude_outbound_ports);
        take(&mut self.inbound_mode, inbound_mode);
        take(&mut self.inbound_port, inbound_port);
        take(&mut self.inbound_ports, inbound_ports);
        take(&mut self.exclude_inbound_ports, exclude_inbound_ports);
        take(&mut self.dns_port, dns_port);
        take(&mut self.sockmap_min_bytes, sockmap_min_bytes);
        self.no_inbound |= no_inbound;
        self.no_dns |= no_dns;
        self.sockmap |= sockmap;
        self.no_sockmap |= no_sockmap;
        self.intra_node |= intra_node;
    }

    /// The settings these options give: the mesh preset (istio unless `mesh` is given), then
    /// the pod's Istio annotations if any, then each option given. Annotations are read as
    /// istio-cni reads them (unknown keys left alone), except `excludeInterfaces`, which only
    /// the pod's network namespace can turn into settings: it is refused, naming the fix.
    pub fn settings(&self, annotations: Option<&BTreeMap<String, String>>) -> Result<PodSettings> {
        let mut s = self.mesh.unwrap_or(MeshPreset::Istio).settings();
        if let Some(annotations) = annotations {
            let read = read_istio_annotations(s, annotations)?;
            if !read.exclude_interfaces.is_empty() {
                return Err(Error::InvalidSetting(format!(
                    "traffic.sidecar.istio.io/excludeInterfaces: {}: read from annotations \
                     only by meshbpf-cni, which looks up what the interfaces reach in the \
                     pod; here give --exclude-outbound-cidrs with their subnets and routes",
                    read.exclude_interfaces.join(",")
                )));
            }
            s = read.settings;
        }
        fn put<T: Clone>(setting: &mut T, option: &Option<T>) {
            if let Some(value) = option {
                *setting = value.clone();
            }
        }
        put(&mut s.proxy_uids, &self.proxy_uid);
        put(&mut s.proxy_gids, &self.proxy_gid);
        put(&mut s.outbound_port, &self.outbound_port);
        put(&mut s.include_outbound_cidrs, &self.include_outbound_cidrs);
        put(&mut s.exclude_outbound_cidrs, &self.exclude_outbound_cidrs);
        put(&mut s.include_outbound_ports, &self.include_outbound_ports);
        put(&mut s.exclude_outbound_ports, &self.exclude_outbound_ports);
        put(&mut s.inbound_mode, &self.inbound_mode);
        put(&mut s.inbound_port, &self.inbound_port);
        put(&mut s.inbound_ports, &self.inbound_ports);
        put(&mut s.exclude_inbound_ports, &self.exclude_inbound_ports);
        put(&mut s.dns_port, &self.dns_port);
        put(&mut s.sockmap_min_bytes, &self.sockmap_min_bytes);
        if self.no_inbound {
            s.inbound_mode = InboundMode::None;
        }
        s.capture_dns &= !self.no_dns;
        s.sockmap = (s.sockmap || self.sockmap) && !self.no_sockmap;
        s.intra_node |= self.intra_node;
        s.validate()?;
        Ok(s)
    }
}

/// A conf value as the text its flag would take: lists joined with commas.
fn conf_text(value: &Value) -> Option<String> {
    let scalar = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    match value {
        Value::Array(items) => items
            .iter()
            .map(scalar)
            .collect::<Option<Vec<_>>>()
            .map(|items| items.join(",")),
        other => scalar(other),
    }
}

/// Why clap refused a value: the parser's reason, or the values it takes.
fn clap_reason(err: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue};
    if let Some(source) = std::error::Error::source(err) {
        return source.to_string();
    }
    match err.get(ContextKind::ValidValue) {
        Some(ContextValue::Strings(valid)) => format!("give one of {}", valid.join(", ")),
        _ => err.kind().to_string(),
    }
}

/// A parser for clap whose error is the library error's reason, without the "invalid
/// setting: " its Display adds (clap names the flag and value itself).
fn reason<T: 'static>(
    parse: fn(&str) -> Result<T>,
) -> impl Fn(&str) -> std::result::Result<T, String> + Clone + Send + Sync + 'static {
    move |text| {
        parse(text).map_err(|err| match err {
            Error::InvalidSetting(text) => text,
            other => other.to_string(),
        })
    }
}

/// One port, 1 to 65535; the error names the value.
fn port(text: &str) -> Result<u16> {
    let ports = parse_port_list(text)?;
    match (ports.len(), ports.first()) {
        (1, Some(&p)) => Ok(p),
        _ => Err(Error::InvalidSetting(format!(
            "port {text:?}: give one port from 1 to 65535"
        ))),
    }
}

/// A number of bytes, 0 to 2^32-1; the error names the value.
fn bytes(text: &str) -> Result<u32> {
    text.trim().parse().map_err(|_| {
        Error::InvalidSetting(format!(
            "{text:?}: give a number of bytes from 0 to 4294967295"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Command;
    use serde_json::json;

    /// `args` as `meshbpf register` parses them.
    fn flags(args: &[&str]) -> std::result::Result<PodOptions, clap::Error> {
        PodOptions::augment_args(Command::new("register").no_binary_name(true))
            .try_get_matches_from(args)
            .and_then(|matches| PodOptions::from_arg_matches(&matches))
    }

    #[test]
    fn every_conf_key_sets_what_its_flag_sets() {
        for key in PodOptions::keys() {
            let value = match key.as_str() {
                "mesh" => "kuma",
                "inbound_mode" => "bind",
                k if k.contains("cidrs") => "192.0.2.7",
                _ => "7",
            };
            let flag = format!("--{}", key.replace('_', "-"));
            let switch =
                key.starts_with("no_") || ["sockmap", "intra_node"].contains(&key.as_str());
            let (conf, flag) = if switch {
                (json!(true), flags(&[&flag]).unwrap())
            } else {
                (json!(value), flags(&[&flag, value]).unwrap())
            };
            let mut o = PodOptions::default();
            assert!(o.set(&key, &conf).unwrap(), "{key}");
            assert_ne!(o, PodOptions::default(), "{key} set nothing");
            assert_eq!(o, flag, "{key}");
            // --no-sockmap restates the default: it shows over a preset or conf with sockmap on.
            let base = PodOptions {
                sockmap: key == "no_sockmap",
                ..Default::default()
            };
            let mut both = base.clone();
            both.overlay(o);
            assert_ne!(
                both.settings(None).unwrap(),
                base.settings(None).unwrap(),
                "{key} changes no setting"
            );
        }
    }

    #[test]
    fn conf_values_give_the_same_settings_as_flags() {
        let mut conf = PodOptions::default();
        for (key, value) in [
            ("mesh", json!("linkerd")),
            ("proxy_uid", json!([2102, "3000"])),
            ("outbound_port", json!(4140)),
            (
                "exclude_outbound_cidrs",
                json!("192.0.2.0/24, 2001:db8::/32"),
            ),
            ("no_dns", json!(true)),
            ("sockmap_min_bytes", json!(0)),
        ] {
            assert!(conf.set(key, &value).unwrap(), "{key}");
        }
        let flags = flags(&[
            "--mesh",
            "linkerd",
            "--proxy-uid",
            "2102,3000",
            "--outbound-port",
            "4140",
            "--exclude-outbound-cidrs",
            "192.0.2.0/24, 2001:db8::/32",
            "--no-dns",
            "--sockmap-min-bytes",
            "0",
        ])
        .unwrap();
        assert_eq!(conf, flags);
        let s = conf.settings(None).unwrap();
        assert_eq!(s.proxy_uids, [2102, 3000].into());
        assert_eq!((s.outbound_port, s.sockmap_min_bytes), (4140, 0));
        assert!(!s.capture_dns);
    }

    #[test]
    fn bad_conf_values_are_refused_with_key_and_value() {
        for (key, value, named) in [
            (
                "exclude_outbound_cidrs",
                json!("10.0.0.0/33"),
                "10.0.0.0/33",
            ),
            ("outbound_port", json!(70000), "70000"),
            ("outbound_port", json!("80,81"), "80,81"),
            ("no_dns", json!("yes"), "true or false"),
            ("proxy_uid", json!({"a": 1}), "a list"),
            ("mesh", json!("consul"), "linkerd"),
            ("sockmap_min_bytes", json!(-1), "-1"),
        ] {
            let mut o = PodOptions::default();
            let err = o.set(key, &value).unwrap_err().to_string();
            assert!(
                err.contains(key) && err.contains(&value.to_string()) && err.contains(named),
                "{err}"
            );
            assert_eq!(o, PodOptions::default(), "{key} changed the options");
        }
        assert!(!PodOptions::default().set("bogus", &json!(1)).unwrap());
    }

    #[test]
    fn flag_errors_name_the_flag_and_the_value() {
        for (args, named) in [
            (&["--include-outbound-ports", "http"][..], "http"),
            (&["--outbound-port", "0"], "\"0\""),
            (&["--mesh", "consul"], "consul"),
            (&["--inbound-mode", "tproxy"], "tproxy"),
        ] {
            let err = flags(args).unwrap_err().to_string();
            assert!(err.contains(args[0]) && err.contains(named), "{err}");
        }
        assert_eq!(
            flags(&["--mesh", "Linkerd", "--inbound-mode", "BIND"]).unwrap(),
            PodOptions {
                mesh: Some(MeshPreset::Linkerd),
                inbound_mode: Some(InboundMode::Bind),
                ..Default::default()
            }
        );
    }

    #[test]
    fn options_override_annotations_which_override_the_preset() {
        let annotations = BTreeMap::from([(
            "traffic.sidecar.istio.io/excludeOutboundPorts".to_string(),
            "3306".to_string(),
        )]);
        let o = PodOptions {
            mesh: Some(MeshPreset::Kuma),
            exclude_outbound_ports: Some([5432].into()),
            ..Default::default()
        };
        let s = o.settings(Some(&annotations)).unwrap();
        assert_eq!(s.exclude_outbound_ports, [5432].into());
        assert_eq!(s.proxy_uids, [5678].into());
        let without = PodOptions {
            mesh: Some(MeshPreset::Kuma),
            ..Default::default()
        };
        assert_eq!(
            without
                .settings(Some(&annotations))
                .unwrap()
                .exclude_outbound_ports,
            [3306].into()
        );
    }

    #[test]
    fn annotations_outside_the_cni_plugin_refuse_only_what_needs_the_pod() {
        let ann = |key: &str, value: &str| BTreeMap::from([(key.to_string(), value.to_string())]);
        let o = PodOptions::default();
        let err = o
            .settings(Some(&ann(
                "traffic.sidecar.istio.io/excludeInterfaces",
                "net1",
            )))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("net1") && err.contains("--exclude-outbound-cidrs"),
            "{err}"
        );
        for (key, value) in [
            ("traffic.sidecar.istio.io/foo", "1"),
            ("traffic.sidecar.istio.io/kubevirtInterfaces", "k6t-eth0"),
        ] {
            assert_eq!(
                o.settings(Some(&ann(key, value))).unwrap(),
                PodSettings::default()
            );
        }
    }
}
