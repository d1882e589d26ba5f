//! A pod's settings as named options, read in one place for every front end: `meshbpf
//! register` takes them as flags (`--proxy-uid 1337`), the CNI plugin's conf entry as keys
//! (`"proxy_uid": "1337"`, the flag's name in snake_case, as istio-cni's conf spells its keys).

use std::collections::BTreeMap;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::presets::{apply_istio_annotations, MeshPreset};
use crate::settings::{
    parse_cidr_list, parse_id_list, parse_port_list, Cidrs, InboundMode, PodSettings, Ports,
};

/// One pod's settings as options: a mesh preset, then each option given, overriding it.
/// Lists are comma-separated; `*` means all.
#[derive(Clone, Debug, Default, PartialEq, Eq, clap::Args)]
pub struct PodOptions {
    /// Start from this mesh's conventions: istio (default), linkerd, kuma, generic.
    #[arg(long, value_name = "MESH")]
    pub mesh: Option<String>,
    /// Users whose connections are never captured (the sidecar's; 1337 for Istio).
    #[arg(long, value_name = "LIST")]
    pub proxy_uid: Option<String>,
    /// Groups whose connections are never captured.
    #[arg(long, value_name = "LIST")]
    pub proxy_gid: Option<String>,
    /// The sidecar's outbound listener port on loopback (15001).
    #[arg(long, value_name = "PORT")]
    pub outbound_port: Option<String>,
    /// Only these destinations are captured (`*`, the default, is all).
    #[arg(long, value_name = "LIST")]
    pub include_outbound_cidrs: Option<String>,
    /// Destinations never captured; wins over the included ones.
    #[arg(long, value_name = "LIST")]
    pub exclude_outbound_cidrs: Option<String>,
    /// Destination ports always captured, even outside the included CIDRs.
    #[arg(long, value_name = "LIST")]
    pub include_outbound_ports: Option<String>,
    /// Destination ports never captured, TCP and UDP.
    #[arg(long, value_name = "LIST")]
    pub exclude_outbound_ports: Option<String>,
    /// How inbound TCP reaches the applications: redirect (to the sidecar's inbound listener,
    /// Istio's; istio's, linkerd's and kuma's default), bind (wildcard binds move to loopback,
    /// the sidecar owns pod_ip:PORT; generic's default) or none.
    #[arg(long, value_name = "MODE")]
    pub inbound_mode: Option<String>,
    /// The sidecar's inbound listener port, in redirect mode (15006).
    #[arg(long, value_name = "PORT")]
    pub inbound_port: Option<String>,
    /// Inbound ports captured (`*`, the default, is all).
    #[arg(long, value_name = "LIST")]
    pub inbound_ports: Option<String>,
    /// Inbound ports never captured, on top of the mesh's own (15008,15020,15021,15090).
    #[arg(long, value_name = "LIST")]
    pub exclude_inbound_ports: Option<String>,
    /// Do not capture inbound (the same as --inbound-mode none).
    #[arg(long)]
    pub no_inbound: bool,
    /// The sidecar's DNS listener port on loopback, UDP and TCP (15053).
    #[arg(long, value_name = "PORT")]
    pub dns_port: Option<String>,
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
    #[arg(long, value_name = "BYTES")]
    pub sockmap_min_bytes: Option<String>,
    /// Accelerate connections between this pod's sidecar and the sidecars of other pods of
    /// the node registered with it too, socket to socket: their bytes then bypass the pods'
    /// interfaces, NetworkPolicy and any tc/netfilter processing (README: intra-node).
    #[arg(long)]
    pub intra_node: bool,
}

/// The options that take a value, by name (conf key; the flag is `--` and dashes).
const VALUED: [&str; 14] = [
    "mesh",
    "proxy_uid",
    "proxy_gid",
    "outbound_port",
    "include_outbound_cidrs",
    "exclude_outbound_cidrs",
    "include_outbound_ports",
    "exclude_outbound_ports",
    "inbound_mode",
    "inbound_port",
    "inbound_ports",
    "exclude_inbound_ports",
    "dns_port",
    "sockmap_min_bytes",
];
/// The options that are switches.
const SWITCHES: [&str; 5] = [
    "no_inbound",
    "no_dns",
    "sockmap",
    "no_sockmap",
    "intra_node",
];

impl PodOptions {
    /// Every option's name, as a CNI conf key.
    pub fn keys() -> impl Iterator<Item = &'static str> {
        VALUED.into_iter().chain(SWITCHES)
    }

    /// Sets the option named `key` (a conf key such as `proxy_uid`) from a JSON value: a
    /// string, a number, or for lists an array of them; `true`/`false` for a switch. Returns
    /// `Ok(false)` when `key` is not a pod option. A bad value is refused with the key and
    /// value in the message, and leaves the options as they were.
    pub fn set(&mut self, key: &str, value: &Value) -> Result<bool> {
        let bad = |what: &str| Error::InvalidSetting(format!("{key}: {value}: {what}"));
        if SWITCHES.contains(&key) {
            let on = value.as_bool().ok_or_else(|| bad("give true or false"))?;
            *self.switch_mut(key) = on;
            return Ok(true);
        }
        if !VALUED.contains(&key) {
            return Ok(false);
        }
        let scalar = |v: &Value| match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        };
        let text = match value {
            Value::Array(items) => items
                .iter()
                .map(scalar)
                .collect::<Option<Vec<_>>>()
                .map(|items| items.join(","))
                .ok_or_else(|| bad("give a list of strings or numbers"))?,
            other => {
                scalar(other).ok_or_else(|| bad("give a string, a number, or a list of them"))?
            }
        };
        // Parsed now, so that a bad value is named here, by its key.
        apply(&mut PodSettings::default(), key, &text).map_err(|err| bad(&reason(err)))?;
        *self.valued_mut(key) = Some(text);
        Ok(true)
    }

    /// The settings these options give: the mesh preset (istio unless `mesh` is given), then
    /// the pod's Istio annotations if any, then each option given. The error names the
    /// option (as its flag) and its value.
    pub fn settings(&self, annotations: Option<&BTreeMap<String, String>>) -> Result<PodSettings> {
        let preset: MeshPreset = self.mesh.as_deref().unwrap_or("istio").parse()?;
        let mut s = preset.settings();
        if let Some(annotations) = annotations {
            s = apply_istio_annotations(s, annotations)?;
        }
        for (key, value) in self.given() {
            apply(&mut s, key, value).map_err(|err| {
                Error::InvalidSetting(format!("--{}: {}", key.replace('_', "-"), reason(err)))
            })?;
        }
        if self.no_inbound {
            s.inbound_mode = InboundMode::None;
        }
        s.capture_dns &= !self.no_dns;
        s.sockmap = (s.sockmap || self.sockmap) && !self.no_sockmap;
        s.intra_node |= self.intra_node;
        s.validate()?;
        Ok(s)
    }

    /// The valued options given, with their values, in [`VALUED`] order.
    fn given(&self) -> Vec<(&'static str, &str)> {
        VALUED
            .into_iter()
            .filter_map(|key| Some((key, self.valued(key).as_deref()?)))
            .collect()
    }

    fn valued(&self, key: &str) -> &Option<String> {
        match key {
            "mesh" => &self.mesh,
            "proxy_uid" => &self.proxy_uid,
            "proxy_gid" => &self.proxy_gid,
            "outbound_port" => &self.outbound_port,
            "include_outbound_cidrs" => &self.include_outbound_cidrs,
            "exclude_outbound_cidrs" => &self.exclude_outbound_cidrs,
            "include_outbound_ports" => &self.include_outbound_ports,
            "exclude_outbound_ports" => &self.exclude_outbound_ports,
            "inbound_mode" => &self.inbound_mode,
            "inbound_port" => &self.inbound_port,
            "inbound_ports" => &self.inbound_ports,
            "exclude_inbound_ports" => &self.exclude_inbound_ports,
            "dns_port" => &self.dns_port,
            _ => &self.sockmap_min_bytes,
        }
    }

    fn valued_mut(&mut self, key: &str) -> &mut Option<String> {
        match key {
            "mesh" => &mut self.mesh,
            "proxy_uid" => &mut self.proxy_uid,
            "proxy_gid" => &mut self.proxy_gid,
            "outbound_port" => &mut self.outbound_port,
            "include_outbound_cidrs" => &mut self.include_outbound_cidrs,
            "exclude_outbound_cidrs" => &mut self.exclude_outbound_cidrs,
            "include_outbound_ports" => &mut self.include_outbound_ports,
            "exclude_outbound_ports" => &mut self.exclude_outbound_ports,
            "inbound_mode" => &mut self.inbound_mode,
            "inbound_port" => &mut self.inbound_port,
            "inbound_ports" => &mut self.inbound_ports,
            "exclude_inbound_ports" => &mut self.exclude_inbound_ports,
            "dns_port" => &mut self.dns_port,
            _ => &mut self.sockmap_min_bytes,
        }
    }

    fn switch_mut(&mut self, key: &str) -> &mut bool {
        match key {
            "no_inbound" => &mut self.no_inbound,
            "no_dns" => &mut self.no_dns,
            "sockmap" => &mut self.sockmap,
            "intra_node" => &mut self.intra_node,
            _ => &mut self.no_sockmap,
        }
    }
}

/// A library error's message without the "invalid setting: " its Display adds.
fn reason(err: Error) -> String {
    match err {
        Error::InvalidSetting(text) => text,
        other => other.to_string(),
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

/// Applies the valued option `key` to `s`.
fn apply(s: &mut PodSettings, key: &str, text: &str) -> Result<()> {
    match key {
        // The preset is the starting point, applied before every option.
        "mesh" => {
            text.parse::<MeshPreset>()?;
        }
        "proxy_uid" => s.proxy_uids = parse_id_list(text)?,
        "proxy_gid" => s.proxy_gids = parse_id_list(text)?,
        "outbound_port" => s.outbound_port = port(text)?,
        "include_outbound_cidrs" => s.include_outbound_cidrs = Cidrs::parse(text)?,
        "exclude_outbound_cidrs" => s.exclude_outbound_cidrs = parse_cidr_list(text)?,
        "include_outbound_ports" => s.include_outbound_ports = parse_port_list(text)?,
        "exclude_outbound_ports" => s.exclude_outbound_ports = parse_port_list(text)?,
        "inbound_mode" => s.inbound_mode = text.parse::<InboundMode>()?,
        "inbound_port" => s.inbound_port = port(text)?,
        "inbound_ports" => s.inbound_ports = Ports::parse(text)?,
        "exclude_inbound_ports" => s.exclude_inbound_ports = parse_port_list(text)?,
        "dns_port" => s.dns_port = port(text)?,
        _ => {
            s.sockmap_min_bytes = text.trim().parse().map_err(|_| {
                Error::InvalidSetting(format!(
                    "{text:?}: give a number of bytes from 0 to 4294967295"
                ))
            })?
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Args, Command};
    use serde_json::json;

    #[test]
    fn every_flag_is_a_conf_key_and_every_conf_key_a_flag() {
        let flags: Vec<String> = PodOptions::augment_args(Command::new("register"))
            .get_arguments()
            .map(|a| a.get_id().to_string())
            .collect();
        let mut keys: Vec<String> = PodOptions::keys().map(str::to_string).collect();
        let mut sorted_flags = flags.clone();
        sorted_flags.sort();
        keys.sort();
        assert_eq!(sorted_flags, keys);
        // And each one reaches its own field.
        for key in PodOptions::valued_keys() {
            let mut o = PodOptions::default();
            let value = match key {
                "mesh" => "kuma",
                "inbound_mode" => "bind",
                k if k.contains("cidrs") => "192.0.2.7",
                _ => "7",
            };
            o.set(key, &json!(value)).unwrap();
            assert_eq!(o.given(), vec![(key, value)], "{key}");
        }
    }

    impl PodOptions {
        fn valued_keys() -> impl Iterator<Item = &'static str> {
            VALUED.into_iter()
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
        let flags = PodOptions {
            mesh: Some("linkerd".into()),
            proxy_uid: Some("2102,3000".into()),
            outbound_port: Some("4140".into()),
            exclude_outbound_cidrs: Some("192.0.2.0/24, 2001:db8::/32".into()),
            no_dns: true,
            sockmap_min_bytes: Some("0".into()),
            ..Default::default()
        };
        let s = conf.settings(None).unwrap();
        assert_eq!(s, flags.settings(None).unwrap());
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
            ("mesh", json!("consul"), "consul"),
            ("sockmap_min_bytes", json!(-1), "-1"),
        ] {
            let mut o = PodOptions::default();
            let err = o.set(key, &value).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains(named), "{err}");
            assert_eq!(o, PodOptions::default(), "{key} changed the options");
        }
        assert!(!PodOptions::default().set("bogus", &json!(1)).unwrap());
    }

    #[test]
    fn flag_errors_name_the_flag() {
        let o = PodOptions {
            include_outbound_ports: Some("http".into()),
            ..Default::default()
        };
        let err = o.settings(None).unwrap_err().to_string();
        assert!(
            err.contains("--include-outbound-ports") && err.contains("http"),
            "{err}"
        );
    }

    #[test]
    fn options_override_annotations_which_override_the_preset() {
        let annotations = BTreeMap::from([(
            "traffic.sidecar.istio.io/excludeOutboundPorts".to_string(),
            "3306".to_string(),
        )]);
        let o = PodOptions {
            mesh: Some("kuma".into()),
            exclude_outbound_ports: Some("5432".into()),
            ..Default::default()
        };
        let s = o.settings(Some(&annotations)).unwrap();
        assert_eq!(s.exclude_outbound_ports, [5432].into());
        assert_eq!(s.proxy_uids, [5678].into());
        let without = PodOptions {
            mesh: Some("kuma".into()),
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
}
