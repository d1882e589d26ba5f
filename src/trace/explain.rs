//! `explain`: the capture policy evaluated in Rust from a pod's pinned settings.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::error::Result;
use crate::mesh::Mesh;
use crate::pod::settings::{InboundMode, PodSettings, Selection};

use super::*;

impl Mesh {
    /// What the programs would decide for `query` in the pod with `netns_cookie`, from its
    /// pinned settings, and the rule that decides it.
    pub fn explain(&self, netns_cookie: u64, query: &Query) -> Result<Explanation> {
        Ok(
            match self.pods()?.iter().find(|p| p.netns_cookie == netns_cookie) {
                Some(pod) => explain(&pod.settings, &pod.addresses, query),
                None => Explanation {
                    reason: Reason::NotRegistered,
                    rule: "no cookie_map entry for this netns".into(),
                    to: None,
                },
            },
        )
    }
}

/// A connection (or datagram) to explain: who opens it, to where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    /// The destination asked for.
    pub dst: SocketAddr,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// The caller's uid.
    pub uid: u32,
    /// The caller's gid.
    pub gid: u32,
    /// The socket's bound source, if it bound one (127.0.0.6: Envoy's inbound passthrough).
    pub source: Option<IpAddr>,
}

/// What the programs decide, and the rule that decides it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    /// The decision, in `trace`'s words.
    pub reason: Reason,
    /// The rule, in the settings' words (such as `exclude_outbound_ports has 9090`).
    pub rule: String,
    /// Where the connection goes instead, when captured.
    pub to: Option<SocketAddr>,
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.reason)?;
        if let Some(to) = self.to {
            write!(f, " -> {to}")?;
        }
        write!(f, " ({})", self.rule)
    }
}

/// The port Istio never sends to the inbound listener (HBONE, istio-iptables' `-e`).
pub(super) const INBOUND_TUNNEL_PORT: u16 = 15008;
pub(super) const DNS_PORT: u16 = 53;

/// What connect4/6 and sendmsg4/6 (src/bpf/connect.bpf.c `redirect_port`) decide for
/// `query` in a pod with `settings` and own `addresses`, in the same order: istio-iptables'
/// ISTIO_OUTPUT.
pub fn explain(settings: &PodSettings, addresses: &[IpAddr], query: &Query) -> Explanation {
    let done = |reason: Reason, rule: String, port: Option<u16>| Explanation {
        reason,
        rule,
        to: port.map(|p| SocketAddr::new(loopback_for(query.dst.ip()), p)),
    };
    let tcp = query.protocol == Protocol::Tcp;
    let port = query.dst.port();
    let ip = match query.dst.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    let mut dns = port == DNS_PORT;
    if !tcp && !dns {
        return done(
            Reason::SkipUdpNotDns,
            "only TCP, and UDP to 53, are looked at".into(),
            None,
        );
    }
    // ::6, Envoy's IPv6 passthrough source, is on lo in redirect mode (`register` adds it).
    let lo = over_lo(ip, addresses)
        || (settings.inbound_mode == InboundMode::Redirect
            && ip == IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6)));
    if settings.exclude_outbound_ports.contains(&port) {
        return done(
            Reason::SkipExcludedPort,
            format!("exclude_outbound_ports has {port}"),
            None,
        );
    }
    let passthrough = matches!(query.source, Some(s) if s == IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6)) || s == IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6)));
    if lo && passthrough {
        return done(
            Reason::SkipPassthrough,
            "-o lo -s 127.0.0.6/32 -j RETURN".into(),
            None,
        );
    }
    if dns && !settings.capture_dns {
        dns = false;
        if !tcp {
            return done(Reason::SkipDnsOff, "capture_dns is off".into(), None);
        }
    }
    let proxy =
        settings.proxy_uids.contains(&query.uid) || settings.proxy_gids.contains(&query.gid);
    if proxy {
        let the_loopback = ip.is_unspecified()
            || ip == IpAddr::V4(Ipv4Addr::LOCALHOST)
            || ip == IpAddr::V6(Ipv6Addr::LOCALHOST);
        // By uid only: istio-iptables' `-o lo ! --uid-owner 1337 -j RETURN` comes before
        // the gid's ISTIO_IN_REDIRECT.
        if tcp
            && lo
            && settings.proxy_uids.contains(&query.uid)
            && !the_loopback
            && port != INBOUND_TUNNEL_PORT
            && !dns
            && settings.inbound_mode == InboundMode::Redirect
        {
            return done(
                Reason::ToInbound,
                "-o lo ! -d 127.0.0.1/32 --uid-owner proxy -j ISTIO_IN_REDIRECT".into(),
                Some(settings.inbound_port),
            );
        }
        let rule = if settings.proxy_uids.contains(&query.uid) {
            format!("proxy_uids has {}", query.uid)
        } else {
            format!("proxy_gids has {}", query.gid)
        };
        return done(Reason::SkipProxy, rule, None);
    }
    if dns {
        return done(
            Reason::CapturedDns,
            "capture_dns, port 53".into(),
            Some(settings.dns_port),
        );
    }
    if !settings.capture_outbound {
        return done(
            Reason::SkipOutboundOff,
            "capture_outbound is off".into(),
            None,
        );
    }
    if lo {
        return done(
            Reason::SkipLoopback,
            format!("{ip} is reached over lo"),
            None,
        );
    }
    if port == settings.outbound_port {
        return done(
            Reason::SkipProxyPort,
            format!("outbound_port is {port}"),
            None,
        );
    }
    if let Some(cidr) = settings
        .exclude_outbound_cidrs
        .iter()
        .find(|c| c.contains(ip))
    {
        return done(
            Reason::SkipExcludedCidr,
            format!("exclude_outbound_cidrs has {cidr}"),
            None,
        );
    }
    let included = match &settings.include_outbound_cidrs {
        Selection::All => Some("include_outbound_cidrs is *".to_string()),
        Selection::Only(cidrs) => settings
            .include_outbound_ports
            .contains(&port)
            .then(|| format!("include_outbound_ports has {port}"))
            .or_else(|| {
                cidrs
                    .iter()
                    .find(|c| c.contains(ip))
                    .map(|c| format!("include_outbound_cidrs has {c}"))
            }),
    };
    match included {
        Some(rule) => done(Reason::Captured, rule, Some(settings.outbound_port)),
        None => done(
            Reason::SkipNotIncluded,
            "neither included CIDRs nor ports have it".into(),
            None,
        ),
    }
}

/// 127.0.0.0/8, ::1, the unspecified addresses (connect turns them into loopback), and the
/// pod's own addresses: what istio-iptables' `-o lo` rules see.
pub(super) fn over_lo(ip: IpAddr, addresses: &[IpAddr]) -> bool {
    ip.is_loopback() || ip.is_unspecified() || addresses.contains(&ip)
}

/// The sidecar's loopback address of `dst`'s family (IPv4-mapped stays IPv4).
pub(super) fn loopback_for(dst: IpAddr) -> IpAddr {
    match dst {
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        _ => IpAddr::V4(Ipv4Addr::LOCALHOST),
    }
}
