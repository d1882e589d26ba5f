//! One pod's capture settings: what `register` stores as the pod's `cookie_map` value.

use std::collections::BTreeSet;

use crate::abi::{pod_flags, RawPodSettings, RuleKind, NO_GID};
use crate::error::{Error, Result};

/// Istio's sidecar uid (istio-iptables `-u`, default 1337).
pub const DEFAULT_PROXY_UID: u32 = 1337;
/// Istio's outbound listener (istio-iptables `-p`, default 15001).
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
/// Istio's inbound listener (istio-iptables `-z`, default 15006).
pub const DEFAULT_INBOUND_PORT: u16 = 15006;
/// First-message size from which a connection is accelerated by default: below it, sockmap
/// measured slower than loopback TCP on this project's benchmark (README).
pub const DEFAULT_SOCKMAP_MIN_BYTES: u32 = 16 * 1024;
/// Istio's DNS proxy port (istio-agent, default 15053).
pub const DEFAULT_DNS_PORT: u16 = 15053;

/// Ports the mesh itself uses inside a pod, never captured inbound: Istio's HBONE (15008),
/// agent (15020), health (15021) and Envoy metrics (15090) ports; istio-iptables excludes them
/// with `-d 15090,15021,15020`.
pub const MESH_INBOUND_EXCLUDES: [u16; 4] = [15008, 15020, 15021, 15090];

/// The most ports one list of one pod may hold.
pub const MAX_PORTS_PER_LIST: usize = 1024;

/// A set of ports: all of them, or those listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ports {
    /// Every port.
    All,
    /// Only these.
    Only(BTreeSet<u16>),
}

impl Ports {
    /// Parses `*` or a comma-separated list such as `80,8080`; the error names the bad value.
    pub fn parse(text: &str) -> Result<Ports> {
        let text = text.trim();
        if text == "*" {
            return Ok(Ports::All);
        }
        parse_port_list(text).map(Ports::Only)
    }
}

/// Parses a comma-separated list of ports (empty = none); the error names the bad value.
pub fn parse_port_list(text: &str) -> Result<BTreeSet<u16>> {
    text.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| match p.parse::<u32>() {
            Ok(port @ 1..=65535) => Ok(port as u16),
            _ => Err(Error::InvalidSetting(format!(
                "port {p:?}: give a port from 1 to 65535"
            ))),
        })
        .collect()
}

/// What one registered pod wants captured, and where its sidecar listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSettings {
    /// The sidecar's uid: its own sockets are never captured.
    pub proxy_uid: u32,
    /// The sidecar's gid, if its group should be exempt too.
    pub proxy_gid: Option<u32>,
    /// The sidecar's outbound listener on loopback.
    pub outbound_port: u16,
    /// The sidecar's inbound listener.
    pub inbound_port: u16,
    /// The sidecar's DNS listener on loopback.
    pub dns_port: u16,
    /// Capture outbound TCP connections.
    pub capture_outbound: bool,
    /// Move the applications' wildcard TCP binds to loopback, so inbound traffic reaches them
    /// only through the sidecar.
    pub capture_inbound: bool,
    /// Inbound ports captured (default: all).
    pub inbound_ports: Ports,
    /// Inbound ports never captured, on top of [`MESH_INBOUND_EXCLUDES`].
    pub exclude_inbound_ports: BTreeSet<u16>,
    /// Send DNS (UDP and TCP to port 53) to the sidecar's DNS listener.
    pub capture_dns: bool,
    /// Move bytes from the pod's applications to its sidecar through sockmap, skipping the
    /// loopback TCP/IP stack (when the node's attachment has sockmap on).
    pub sockmap: bool,
    /// With `sockmap`, a connection is accelerated when its first message is at least this
    /// many bytes; smaller first messages mark streams where sockmap loses (README).
    pub sockmap_min_bytes: u32,
}

impl Default for PodSettings {
    fn default() -> Self {
        PodSettings {
            proxy_uid: DEFAULT_PROXY_UID,
            proxy_gid: None,
            outbound_port: DEFAULT_OUTBOUND_PORT,
            inbound_port: DEFAULT_INBOUND_PORT,
            dns_port: DEFAULT_DNS_PORT,
            capture_outbound: true,
            capture_inbound: true,
            inbound_ports: Ports::All,
            exclude_inbound_ports: BTreeSet::new(),
            capture_dns: true,
            sockmap: true,
            sockmap_min_bytes: DEFAULT_SOCKMAP_MIN_BYTES,
        }
    }
}

impl PodSettings {
    /// Checks that the settings make sense; the error names the offending value.
    pub fn validate(&self) -> Result<()> {
        for (name, port) in [
            ("outbound port", self.outbound_port),
            ("inbound port", self.inbound_port),
            ("DNS port", self.dns_port),
        ] {
            if port == 0 {
                return Err(Error::InvalidSetting(format!(
                    "{name} 0: give a port from 1 to 65535"
                )));
            }
        }
        if self.proxy_uid == u32::MAX || self.proxy_gid == Some(NO_GID) {
            return Err(Error::InvalidSetting(
                "proxy uid/gid 4294967295 is not a valid id".into(),
            ));
        }
        let lists = [
            (
                "inbound ports",
                match &self.inbound_ports {
                    Ports::All => None,
                    Ports::Only(ports) => Some(ports),
                },
            ),
            ("excluded inbound ports", Some(&self.exclude_inbound_ports)),
        ];
        for (name, ports) in lists {
            let Some(ports) = ports else { continue };
            if ports.contains(&0) {
                return Err(Error::InvalidSetting(format!(
                    "{name}: port 0: give ports from 1 to 65535"
                )));
            }
            if ports.len() > MAX_PORTS_PER_LIST {
                return Err(Error::InvalidSetting(format!(
                    "{name}: {} ports, at most {MAX_PORTS_PER_LIST} per list",
                    ports.len()
                )));
            }
        }
        Ok(())
    }

    /// The pod's `port_rules` entries.
    pub(crate) fn port_rules(&self) -> BTreeSet<(RuleKind, u16)> {
        let mut rules = BTreeSet::new();
        if let Ports::Only(ports) = &self.inbound_ports {
            rules.extend(ports.iter().map(|&p| (RuleKind::InboundInclude, p)));
        }
        let excludes = self
            .exclude_inbound_ports
            .iter()
            .chain(&MESH_INBOUND_EXCLUDES);
        rules.extend(excludes.map(|&p| (RuleKind::InboundExclude, p)));
        rules
    }

    /// Rebuilds settings from a `cookie_map` value and the pod's `port_rules`.
    pub(crate) fn from_parts(raw: &RawPodSettings, rules: &BTreeSet<(RuleKind, u16)>) -> Self {
        let mut settings = PodSettings::from_raw(raw);
        let of = |kind: RuleKind| rules.iter().filter(move |r| r.0 == kind).map(|r| r.1);
        if raw.flags & pod_flags::INBOUND_ALL_PORTS == 0 {
            settings.inbound_ports = Ports::Only(of(RuleKind::InboundInclude).collect());
        }
        settings.exclude_inbound_ports = of(RuleKind::InboundExclude)
            .filter(|p| !MESH_INBOUND_EXCLUDES.contains(p))
            .collect();
        settings
    }

    pub(crate) fn to_raw(&self) -> RawPodSettings {
        let mut flags = 0;
        if self.capture_outbound {
            flags |= pod_flags::CAPTURE_OUTBOUND;
        }
        if self.capture_inbound {
            flags |= pod_flags::CAPTURE_INBOUND;
        }
        if self.capture_dns {
            flags |= pod_flags::CAPTURE_DNS;
        }
        if self.sockmap {
            flags |= pod_flags::SOCKMAP;
        }
        if self.inbound_ports == Ports::All {
            flags |= pod_flags::INBOUND_ALL_PORTS;
        }
        RawPodSettings {
            proxy_uid: self.proxy_uid,
            proxy_gid: self.proxy_gid.unwrap_or(NO_GID),
            outbound_port: self.outbound_port,
            inbound_port: self.inbound_port,
            dns_port: self.dns_port,
            _pad: 0,
            flags,
            sockmap_min_bytes: self.sockmap_min_bytes,
        }
    }

    /// The `cookie_map` part only; port lists come from [`PodSettings::from_parts`].
    fn from_raw(raw: &RawPodSettings) -> Self {
        PodSettings {
            proxy_uid: raw.proxy_uid,
            proxy_gid: (raw.proxy_gid != NO_GID).then_some(raw.proxy_gid),
            outbound_port: raw.outbound_port,
            inbound_port: raw.inbound_port,
            dns_port: raw.dns_port,
            capture_outbound: raw.flags & pod_flags::CAPTURE_OUTBOUND != 0,
            capture_inbound: raw.flags & pod_flags::CAPTURE_INBOUND != 0,
            capture_dns: raw.flags & pod_flags::CAPTURE_DNS != 0,
            sockmap: raw.flags & pod_flags::SOCKMAP != 0,
            sockmap_min_bytes: raw.sockmap_min_bytes,
            ..PodSettings::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_istio_s() {
        let s = PodSettings::default();
        assert_eq!(
            (s.proxy_uid, s.outbound_port, s.dns_port),
            (1337, 15001, 15053)
        );
        assert!(s.capture_outbound);
    }

    #[test]
    fn round_trip_through_the_maps_keeps_every_field() {
        let s = PodSettings {
            proxy_uid: 2102,
            proxy_gid: Some(2102),
            outbound_port: 4140,
            capture_inbound: false,
            capture_dns: false,
            sockmap: false,
            sockmap_min_bytes: 1,
            dns_port: 5353,
            inbound_ports: Ports::parse("80,8080").unwrap(),
            exclude_inbound_ports: parse_port_list("9000").unwrap(),
            ..Default::default()
        };
        assert_eq!(PodSettings::from_parts(&s.to_raw(), &s.port_rules()), s);
        let d = PodSettings::default();
        assert_eq!(PodSettings::from_parts(&d.to_raw(), &d.port_rules()), d);
    }

    #[test]
    fn mesh_ports_are_always_excluded_inbound() {
        let rules = PodSettings::default().port_rules();
        for port in MESH_INBOUND_EXCLUDES {
            assert!(rules.contains(&(RuleKind::InboundExclude, port)));
        }
    }

    #[test]
    fn port_lists_parse_and_name_bad_values() {
        assert_eq!(Ports::parse("*").unwrap(), Ports::All);
        assert_eq!(
            Ports::parse(" 80, 443 ").unwrap(),
            Ports::Only([80, 443].into())
        );
        for bad in ["0", "65536", "http", "80;81"] {
            let err = Ports::parse(bad).unwrap_err().to_string();
            assert!(err.contains(bad), "{err}");
        }
    }

    #[test]
    fn too_many_ports_are_refused_with_the_limit() {
        let s = PodSettings {
            exclude_inbound_ports: (1..=1025).collect(),
            ..Default::default()
        };
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("1025 ports, at most 1024"), "{err}");
    }

    #[test]
    fn port_zero_is_refused_by_name() {
        let s = PodSettings {
            outbound_port: 0,
            ..Default::default()
        };
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("outbound port 0"), "{err}");
    }
}
