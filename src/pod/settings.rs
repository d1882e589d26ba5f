//! One pod's capture settings: what `register` stores as the pod's `cookie_map`
//! value and its entries in the per-pod list maps (`pod_rules`, the CIDR tries).

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use crate::abi::{pod_flags, RawPodSettings, RuleKind, NO_GID};
use crate::cidr::Cidr;
use crate::error::{Error, Result};

/// Istio's sidecar uid (istio-iptables `-u`, default 1337).
pub const DEFAULT_PROXY_UID: u32 = 1337;
/// Istio's outbound listener (istio-iptables `-p`, default 15001).
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
/// Istio's inbound listener (istio-iptables `-z`, default 15006).
pub const DEFAULT_INBOUND_PORT: u16 = 15006;
/// Istio's DNS proxy port (istio-agent, default 15053).
pub const DEFAULT_DNS_PORT: u16 = 15053;
/// First-message size from which a connection is accelerated by default: below it, sockmap
/// measured slower than loopback TCP on this project's benchmark (docs/bench-sockmap.md).
pub const DEFAULT_SOCKMAP_MIN_BYTES: u32 = 16 * 1024;

/// Ports the mesh itself uses inside a pod, never captured inbound: Istio's HBONE (15008),
/// agent (15020), health (15021) and Envoy metrics (15090) ports; istio-iptables excludes them
/// with `-d 15090,15021,15020`.
pub const MESH_INBOUND_EXCLUDES: [u16; 4] = [15008, 15020, 15021, 15090];

/// The most entries one list of one pod may hold (ports, ids or CIDRs). The maps behind
/// them hold 65,536 entries for all pods of a node together.
pub const MAX_ENTRIES_PER_LIST: usize = 1024;

/// Every value of a kind, or only those listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selection<T: Ord> {
    /// Every value (`*`).
    All,
    /// Only these (empty: none).
    Only(BTreeSet<T>),
}

/// A set of ports: all of them, or those listed.
pub type Ports = Selection<u16>;
/// A set of destination prefixes: all of them, or those listed.
pub type Cidrs = Selection<Cidr>;

/// `*` for all, or the list.
#[cfg(feature = "serde")]
impl<T: Ord + serde::Serialize> serde::Serialize for Selection<T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Selection::All => serializer.serialize_str("*"),
            Selection::Only(values) => values.serialize(serializer),
        }
    }
}

impl<T: Ord> Selection<T> {
    fn parse_with(text: &str, list: impl Fn(&str) -> Result<BTreeSet<T>>) -> Result<Self> {
        match text.trim() {
            "*" => Ok(Selection::All),
            text => list(text).map(Selection::Only),
        }
    }
}

impl Selection<u16> {
    /// Parses `*` or a comma-separated list of ports (empty: none); the error names the bad
    /// value.
    pub fn parse(text: &str) -> Result<Self> {
        Selection::parse_with(text, parse_port_list)
    }
}

impl Selection<Cidr> {
    /// Parses `*` or a comma-separated list of IPv4 and IPv6 prefixes (empty: none); the error
    /// names the bad value.
    pub fn parse(text: &str) -> Result<Self> {
        Selection::parse_with(text, parse_cidr_list)
    }
}

/// Parses a comma-separated list of IPv4 and IPv6 prefixes; the error names the bad value.
pub fn parse_cidr_list(text: &str) -> Result<BTreeSet<Cidr>> {
    text.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::parse)
        .collect()
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

/// Parses a comma-separated list of uids or gids; the error names the bad value.
pub fn parse_id_list(text: &str) -> Result<BTreeSet<u32>> {
    text.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| match p.parse::<u32>() {
            Ok(id) if id != NO_GID => Ok(id),
            _ => Err(Error::InvalidSetting(format!(
                "id {p:?}: give a uid/gid from 0 to 4294967294"
            ))),
        })
        .collect()
}

/// How inbound TCP connections to a pod reach its applications.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize),
    serde(rename_all = "lowercase")
)]
pub enum InboundMode {
    /// Istio's: every inbound connection to a captured port goes to the sidecar's inbound
    /// listener (`inbound_port`, 15006), which accepts it with the original `pod_ip:PORT` as
    /// its local address and `SO_ORIGINAL_DST`; the applications keep their binds.
    Redirect,
    /// The article's: the applications' wildcard binds move to loopback; the sidecar listens
    /// on `pod_ip:PORT` for each port (listener discovery tells it which).
    Bind,
    /// No inbound capture.
    None,
}

impl FromStr for InboundMode {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "redirect" => Ok(InboundMode::Redirect),
            "bind" => Ok(InboundMode::Bind),
            "none" => Ok(InboundMode::None),
            _ => Err(Error::InvalidSetting(format!(
                "inbound mode {text:?}: give redirect, bind or none"
            ))),
        }
    }
}

impl fmt::Display for InboundMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InboundMode::Redirect => "redirect",
            InboundMode::Bind => "bind",
            InboundMode::None => "none",
        })
    }
}

/// What one registered pod wants captured, and where its sidecar listens.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct PodSettings {
    /// The sidecar's uids: their sockets are never captured (istio-iptables `-u`).
    pub proxy_uids: BTreeSet<u32>,
    /// Groups whose sockets are never captured either (istio-iptables `-g`).
    pub proxy_gids: BTreeSet<u32>,
    /// The sidecar's outbound listener on loopback (`-p`).
    pub outbound_port: u16,
    /// The sidecar's inbound listener (`-z`).
    pub inbound_port: u16,
    /// The sidecar's DNS listener on loopback.
    pub dns_port: u16,
    /// Capture outbound TCP connections.
    pub capture_outbound: bool,
    /// Destinations captured (`-i`, default all).
    pub include_outbound_cidrs: Cidrs,
    /// Destinations never captured; wins over the included ones (`-x`).
    pub exclude_outbound_cidrs: BTreeSet<Cidr>,
    /// Destination ports always captured, even outside the included CIDRs (`-q`).
    pub include_outbound_ports: BTreeSet<u16>,
    /// Destination ports never captured, TCP and UDP (`-o`).
    pub exclude_outbound_ports: BTreeSet<u16>,
    /// How inbound TCP reaches the applications: through the sidecar's one inbound listener
    /// (`Redirect`, Istio's), through the sidecar's listener on each port with the
    /// applications' wildcard binds moved to loopback (`Bind`, the article's), or directly
    /// (`None`).
    pub inbound_mode: InboundMode,
    /// Inbound ports captured (`-b`, default all).
    pub inbound_ports: Ports,
    /// Inbound ports never captured, on top of [`MESH_INBOUND_EXCLUDES`] (`-d`).
    pub exclude_inbound_ports: BTreeSet<u16>,
    /// Send DNS (UDP and TCP to port 53) to the sidecar's DNS listener.
    pub capture_dns: bool,
    /// Move bytes from the pod's applications to its sidecar through sockmap, skipping the
    /// loopback TCP/IP stack (when the node's attachment has sockmap on). Off by default:
    /// entering and leaving sock_hash costs every new connection more than small messages
    /// gain (measured: docs/bench-compare.md, docs/bench-sockmap.md).
    pub sockmap: bool,
    /// With `sockmap`, a connection is accelerated when its first message is at least this
    /// many bytes; smaller first messages mark streams where sockmap loses.
    pub sockmap_min_bytes: u32,
    /// Intra-node acceleration: a TCP connection between this pod's sidecar and the sidecar
    /// of another pod of the node that opted in too goes socket to socket, both ways,
    /// skipping the pods' interfaces (and so NetworkPolicy, netfilter and tc for its bytes
    /// once established). Off by default (the book's "Sockmap fast path").
    pub intra_node: bool,
}

impl Default for PodSettings {
    fn default() -> Self {
        PodSettings {
            proxy_uids: BTreeSet::from([DEFAULT_PROXY_UID]),
            proxy_gids: BTreeSet::new(),
            outbound_port: DEFAULT_OUTBOUND_PORT,
            inbound_port: DEFAULT_INBOUND_PORT,
            dns_port: DEFAULT_DNS_PORT,
            capture_outbound: true,
            include_outbound_cidrs: Selection::All,
            exclude_outbound_cidrs: BTreeSet::new(),
            include_outbound_ports: BTreeSet::new(),
            exclude_outbound_ports: BTreeSet::new(),
            inbound_mode: InboundMode::Redirect,
            inbound_ports: Selection::All,
            exclude_inbound_ports: BTreeSet::new(),
            capture_dns: true,
            sockmap: false,
            sockmap_min_bytes: DEFAULT_SOCKMAP_MIN_BYTES,
            intra_node: false,
        }
    }
}

/// The per-pod list entries of one pod, as the maps hold them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Lists {
    pub rules: BTreeSet<(RuleKind, u32)>,
    pub include_cidrs: BTreeSet<Cidr>,
    pub exclude_cidrs: BTreeSet<Cidr>,
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
        if self.proxy_uids.is_empty() {
            return Err(Error::InvalidSetting(
                "proxy uids: give at least one (1337 for Istio)".into(),
            ));
        }
        if self.proxy_uids.contains(&NO_GID) || self.proxy_gids.contains(&NO_GID) {
            return Err(Error::InvalidSetting(
                "proxy uid/gid 4294967295 is not a valid id".into(),
            ));
        }
        let only = |s: &Ports| match s {
            Selection::All => 0,
            Selection::Only(p) => p.len(),
        };
        let cidrs = |s: &Cidrs| match s {
            Selection::All => 0,
            Selection::Only(c) => c.len(),
        };
        let lists = [
            ("proxy uids", self.proxy_uids.len()),
            ("proxy gids", self.proxy_gids.len()),
            (
                "included outbound CIDRs",
                cidrs(&self.include_outbound_cidrs),
            ),
            ("excluded outbound CIDRs", self.exclude_outbound_cidrs.len()),
            ("included outbound ports", self.include_outbound_ports.len()),
            ("excluded outbound ports", self.exclude_outbound_ports.len()),
            ("inbound ports", only(&self.inbound_ports)),
            ("excluded inbound ports", self.exclude_inbound_ports.len()),
        ];
        for (name, len) in lists {
            if len > MAX_ENTRIES_PER_LIST {
                return Err(Error::InvalidSetting(format!(
                    "{name}: {len} entries, at most {MAX_ENTRIES_PER_LIST} per list"
                )));
            }
        }
        let mut ports = self
            .include_outbound_ports
            .iter()
            .chain(&self.exclude_outbound_ports)
            .chain(&self.exclude_inbound_ports);
        if let Selection::Only(p) = &self.inbound_ports {
            if p.contains(&0) {
                return Err(Error::InvalidSetting(
                    "inbound ports: port 0: give ports from 1 to 65535".into(),
                ));
            }
        }
        if ports.any(|p| *p == 0) {
            return Err(Error::InvalidSetting(
                "port 0 in a port list: give ports from 1 to 65535".into(),
            ));
        }
        Ok(())
    }

    /// The pod's entries in `pod_rules` and the CIDR tries.
    pub(crate) fn lists(&self) -> Lists {
        let mut rules = BTreeSet::new();
        let mut add = |kind: RuleKind, values: &mut dyn Iterator<Item = u32>| {
            rules.extend(values.map(|v| (kind, v)));
        };
        if let Selection::Only(ports) = &self.inbound_ports {
            add(
                RuleKind::InboundInclude,
                &mut ports.iter().map(|&p| p.into()),
            );
        }
        add(
            RuleKind::InboundExclude,
            &mut self
                .exclude_inbound_ports
                .iter()
                .chain(&MESH_INBOUND_EXCLUDES)
                .map(|&p| p.into()),
        );
        add(
            RuleKind::OutboundInclude,
            &mut self.include_outbound_ports.iter().map(|&p| p.into()),
        );
        add(
            RuleKind::OutboundExclude,
            &mut self.exclude_outbound_ports.iter().map(|&p| p.into()),
        );
        // The first uid and gid live in cookie_map; the rest here.
        add(
            RuleKind::ProxyUid,
            &mut self.proxy_uids.iter().skip(1).copied(),
        );
        add(
            RuleKind::ProxyGid,
            &mut self.proxy_gids.iter().skip(1).copied(),
        );
        Lists {
            rules,
            include_cidrs: match &self.include_outbound_cidrs {
                Selection::All => BTreeSet::new(),
                Selection::Only(c) => c.clone(),
            },
            exclude_cidrs: self.exclude_outbound_cidrs.clone(),
        }
    }

    pub(crate) fn to_raw(&self) -> RawPodSettings {
        let flag = |on: bool, bit: u32| if on { bit } else { 0 };
        let flags = flag(self.capture_outbound, pod_flags::CAPTURE_OUTBOUND)
            | flag(
                self.inbound_mode != InboundMode::None,
                pod_flags::CAPTURE_INBOUND,
            )
            | flag(
                self.inbound_mode == InboundMode::Redirect,
                pod_flags::INBOUND_REDIRECT,
            )
            | flag(self.capture_dns, pod_flags::CAPTURE_DNS)
            | flag(self.sockmap, pod_flags::SOCKMAP)
            | flag(self.intra_node, pod_flags::INTRA_NODE)
            | flag(
                self.inbound_ports == Selection::All,
                pod_flags::INBOUND_ALL_PORTS,
            )
            | flag(
                self.include_outbound_cidrs == Selection::All,
                pod_flags::OUTBOUND_ALL_CIDRS,
            )
            | flag(
                self.proxy_uids.len() > 1 || self.proxy_gids.len() > 1,
                pod_flags::MORE_PROXY_IDS,
            )
            | flag(
                self.exclude_outbound_ports.is_empty(),
                pod_flags::NO_OUTBOUND_EXCLUDED_PORTS,
            )
            | flag(
                self.exclude_outbound_cidrs.is_empty(),
                pod_flags::NO_OUTBOUND_EXCLUDED_CIDRS,
            )
            | flag(
                self.include_outbound_ports.is_empty(),
                pod_flags::NO_OUTBOUND_INCLUDED_PORTS,
            );
        RawPodSettings {
            proxy_uid: self
                .proxy_uids
                .first()
                .copied()
                .unwrap_or(DEFAULT_PROXY_UID),
            proxy_gid: self.proxy_gids.first().copied().unwrap_or(NO_GID),
            outbound_port: self.outbound_port,
            inbound_port: self.inbound_port,
            dns_port: self.dns_port,
            flags,
            sockmap_min_bytes: self.sockmap_min_bytes,
            ..Default::default()
        }
    }

    /// Rebuilds settings from a `cookie_map` value and the pod's list entries.
    pub(crate) fn from_parts(raw: &RawPodSettings, lists: &Lists) -> Self {
        let has = |bit: u32| raw.flags & bit != 0;
        let of = |kind: RuleKind| lists.rules.iter().filter(move |r| r.0 == kind).map(|r| r.1);
        let ports = |kind: RuleKind| {
            of(kind)
                .filter_map(|v| u16::try_from(v).ok())
                .collect::<BTreeSet<_>>()
        };
        let mut proxy_uids: BTreeSet<u32> = of(RuleKind::ProxyUid).collect();
        proxy_uids.insert(raw.proxy_uid);
        let mut proxy_gids: BTreeSet<u32> = of(RuleKind::ProxyGid).collect();
        if raw.proxy_gid != NO_GID {
            proxy_gids.insert(raw.proxy_gid);
        }
        PodSettings {
            proxy_uids,
            proxy_gids,
            outbound_port: raw.outbound_port,
            inbound_port: raw.inbound_port,
            dns_port: raw.dns_port,
            capture_outbound: has(pod_flags::CAPTURE_OUTBOUND),
            include_outbound_cidrs: if has(pod_flags::OUTBOUND_ALL_CIDRS) {
                Selection::All
            } else {
                Selection::Only(lists.include_cidrs.clone())
            },
            exclude_outbound_cidrs: lists.exclude_cidrs.clone(),
            include_outbound_ports: ports(RuleKind::OutboundInclude),
            exclude_outbound_ports: ports(RuleKind::OutboundExclude),
            inbound_mode: match (
                has(pod_flags::CAPTURE_INBOUND),
                has(pod_flags::INBOUND_REDIRECT),
            ) {
                (false, _) => InboundMode::None,
                (true, true) => InboundMode::Redirect,
                (true, false) => InboundMode::Bind,
            },
            inbound_ports: if has(pod_flags::INBOUND_ALL_PORTS) {
                Selection::All
            } else {
                Selection::Only(ports(RuleKind::InboundInclude))
            },
            exclude_inbound_ports: ports(RuleKind::InboundExclude)
                .into_iter()
                .filter(|p| !MESH_INBOUND_EXCLUDES.contains(p))
                .collect(),
            capture_dns: has(pod_flags::CAPTURE_DNS),
            sockmap: has(pod_flags::SOCKMAP),
            sockmap_min_bytes: raw.sockmap_min_bytes,
            intra_node: has(pod_flags::INTRA_NODE),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_istio_s() {
        let s = PodSettings::default();
        assert_eq!(s.proxy_uids, BTreeSet::from([1337]));
        assert_eq!(
            (s.outbound_port, s.inbound_port, s.dns_port),
            (15001, 15006, 15053)
        );
        assert_eq!(s.include_outbound_cidrs, Selection::All);
        assert!(s.capture_outbound && s.capture_dns && !s.sockmap && !s.intra_node);
        assert_eq!(s.inbound_mode, InboundMode::Redirect);
    }

    #[test]
    fn round_trip_through_the_maps_keeps_every_field() {
        let s = PodSettings {
            proxy_uids: parse_id_list("2102,3000").unwrap(),
            proxy_gids: parse_id_list("4000,4001").unwrap(),
            outbound_port: 4140,
            include_outbound_cidrs: Cidrs::parse("10.0.0.0/8,2001:db8::/32").unwrap(),
            exclude_outbound_cidrs: parse_cidr_list("10.1.0.0/16").unwrap(),
            include_outbound_ports: parse_port_list("8443").unwrap(),
            exclude_outbound_ports: parse_port_list("3306").unwrap(),
            inbound_mode: InboundMode::None,
            capture_dns: false,
            sockmap: false,
            sockmap_min_bytes: 1,
            intra_node: true,
            dns_port: 5353,
            inbound_ports: Ports::parse("80,8080").unwrap(),
            exclude_inbound_ports: parse_port_list("9000").unwrap(),
            ..Default::default()
        };
        assert_eq!(PodSettings::from_parts(&s.to_raw(), &s.lists()), s);
        let d = PodSettings::default();
        assert_eq!(PodSettings::from_parts(&d.to_raw(), &d.lists()), d);
    }

    #[test]
    fn mesh_ports_are_always_excluded_inbound() {
        let rules = PodSettings::default().lists().rules;
        for port in MESH_INBOUND_EXCLUDES {
            assert!(rules.contains(&(RuleKind::InboundExclude, u32::from(port))));
        }
    }

    #[test]
    fn port_lists_parse_and_name_bad_values() {
        assert_eq!(Ports::parse("*").unwrap(), Selection::All);
        assert_eq!(
            Ports::parse(" 80, 443 ").unwrap(),
            Selection::Only([80, 443].into())
        );
        assert_eq!(Ports::parse("").unwrap(), Selection::Only(BTreeSet::new()));
        for bad in ["0", "65536", "http", "80;81"] {
            let err = Ports::parse(bad).unwrap_err().to_string();
            assert!(err.contains(bad), "{err}");
        }
    }

    #[test]
    fn cidrs_parse_both_families_clear_host_bits_and_name_bad_values() {
        let c: Cidr = "10.1.2.3/8".parse().unwrap();
        assert_eq!(c.to_string(), "10.0.0.0/8");
        assert_eq!(
            "2001:db8::1/32".parse::<Cidr>().unwrap().to_string(),
            "2001:db8::/32"
        );
        assert_eq!("192.0.2.7".parse::<Cidr>().unwrap().prefix(), 32);
        let (octets, plen) = c.as_v6();
        assert_eq!(Cidr::from_v6(octets, plen), Some(c));
        for bad in [
            "10.0.0.0/33",
            "2001:db8::/129",
            "10.0.0/8",
            "example.com/8",
            "10.0.0.0/x",
        ] {
            let err = Cidrs::parse(bad).unwrap_err().to_string();
            assert!(err.contains(bad), "{err}");
        }
    }

    #[test]
    fn too_many_entries_are_refused_with_the_limit() {
        let s = PodSettings {
            exclude_inbound_ports: (1..=1025).collect(),
            ..Default::default()
        };
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("1025 entries, at most 1024"), "{err}");
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
