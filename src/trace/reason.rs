//! The words of a decision: the hook, the reason, the event a reader receives.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};

use crate::abi::{self, OrigDst, RawEvent};
use crate::error::{Error, Result};
use crate::skel::types::{trace_hook, trace_reason};

/// The hook that decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// connect(2) (connect4/6).
    Connect,
    /// An unconnected datagram (sendmsg4/6).
    Sendmsg,
    /// bind(2) (bind4/6).
    Bind,
    /// A TCP connection's state (sockops).
    Sockops,
    /// getsockopt(SO_ORIGINAL_DST).
    Getsockopt,
    /// A new inbound connection (the pod's sk_lookup program).
    SkLookup,
    /// A message of an accelerated connection (sk_msg).
    SkMsg,
}

impl Hook {
    pub(super) fn from_raw(raw: u16) -> Option<Hook> {
        let raw = u32::from(raw);
        [
            (trace_hook::TRACE_HOOK_CONNECT, Hook::Connect),
            (trace_hook::TRACE_HOOK_SENDMSG, Hook::Sendmsg),
            (trace_hook::TRACE_HOOK_BIND, Hook::Bind),
            (trace_hook::TRACE_HOOK_SOCKOPS, Hook::Sockops),
            (trace_hook::TRACE_HOOK_GETSOCKOPT, Hook::Getsockopt),
            (trace_hook::TRACE_HOOK_SK_LOOKUP, Hook::SkLookup),
            (trace_hook::TRACE_HOOK_SK_MSG, Hook::SkMsg),
        ]
        .into_iter()
        .find_map(|(k, h)| (k.0 == raw).then_some(h))
    }
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Hook::Connect => "connect",
            Hook::Sendmsg => "sendto",
            Hook::Bind => "bind",
            Hook::Sockops => "sockops",
            Hook::Getsockopt => "getsockopt",
            Hook::SkLookup => "inbound",
            Hook::SkMsg => "sk_msg",
        })
    }
}

/// Why: one decision of the programs (`enum trace_reason` in meshbpf.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(missing_docs)] // each variant's words are its documentation: see Display
pub enum Reason {
    Captured,
    CapturedDns,
    ToInbound,
    SkipProxy,
    SkipLoopback,
    SkipPassthrough,
    SkipExcludedPort,
    SkipExcludedCidr,
    SkipNotIncluded,
    SkipDnsOff,
    SkipOutboundOff,
    SkipProxyPort,
    InboundMoved,
    InboundKept,
    OriginPublished,
    SockmapAdded,
    OriginAnswered,
    OriginMissed,
    InboundToProxy,
    InboundRefused,
    SockmapLeftSmall,
    SockmapLeftShutdown,
    SockmapLeftBehind,
    /// `explain` only: UDP to a port other than 53 is never looked at.
    SkipUdpNotDns,
    /// `explain` only: the pod is not registered.
    NotRegistered,
}

pub(super) const REASONS: [(trace_reason, Reason); 23] = [
    (trace_reason::TRACE_CAPTURED, Reason::Captured),
    (trace_reason::TRACE_CAPTURED_DNS, Reason::CapturedDns),
    (trace_reason::TRACE_TO_INBOUND, Reason::ToInbound),
    (trace_reason::TRACE_SKIP_PROXY, Reason::SkipProxy),
    (trace_reason::TRACE_SKIP_LOOPBACK, Reason::SkipLoopback),
    (
        trace_reason::TRACE_SKIP_PASSTHROUGH,
        Reason::SkipPassthrough,
    ),
    (
        trace_reason::TRACE_SKIP_EXCLUDED_PORT,
        Reason::SkipExcludedPort,
    ),
    (
        trace_reason::TRACE_SKIP_EXCLUDED_CIDR,
        Reason::SkipExcludedCidr,
    ),
    (
        trace_reason::TRACE_SKIP_NOT_INCLUDED,
        Reason::SkipNotIncluded,
    ),
    (trace_reason::TRACE_SKIP_DNS_OFF, Reason::SkipDnsOff),
    (
        trace_reason::TRACE_SKIP_OUTBOUND_OFF,
        Reason::SkipOutboundOff,
    ),
    (trace_reason::TRACE_SKIP_PROXY_PORT, Reason::SkipProxyPort),
    (trace_reason::TRACE_INBOUND_MOVED, Reason::InboundMoved),
    (trace_reason::TRACE_INBOUND_KEPT, Reason::InboundKept),
    (
        trace_reason::TRACE_ORIGIN_PUBLISHED,
        Reason::OriginPublished,
    ),
    (trace_reason::TRACE_SOCKMAP_ADDED, Reason::SockmapAdded),
    (trace_reason::TRACE_ORIGIN_ANSWERED, Reason::OriginAnswered),
    (trace_reason::TRACE_ORIGIN_MISSED, Reason::OriginMissed),
    (trace_reason::TRACE_INBOUND_TO_PROXY, Reason::InboundToProxy),
    (trace_reason::TRACE_INBOUND_REFUSED, Reason::InboundRefused),
    (
        trace_reason::TRACE_SOCKMAP_LEFT_SMALL,
        Reason::SockmapLeftSmall,
    ),
    (
        trace_reason::TRACE_SOCKMAP_LEFT_SHUTDOWN,
        Reason::SockmapLeftShutdown,
    ),
    (
        trace_reason::TRACE_SOCKMAP_LEFT_BEHIND,
        Reason::SockmapLeftBehind,
    ),
];

impl Reason {
    pub(super) fn from_raw(raw: u16) -> Option<Reason> {
        REASONS
            .iter()
            .find_map(|(k, r)| (k.0 == u32::from(raw)).then_some(*r))
    }

    /// Whether the connection goes to the sidecar.
    pub fn captured(self) -> bool {
        matches!(
            self,
            Reason::Captured | Reason::CapturedDns | Reason::ToInbound | Reason::InboundToProxy
        )
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reason::Captured => "captured: to the sidecar's outbound listener",
            Reason::CapturedDns => "captured: DNS to the sidecar's DNS listener",
            Reason::ToInbound => {
                "captured: the sidecar's call to its own pod, to its inbound listener"
            }
            Reason::SkipProxy => "skipped: the sidecar's own socket (proxy uid/gid)",
            Reason::SkipLoopback => "skipped: over lo (loopback or the pod's own address)",
            Reason::SkipPassthrough => "skipped: from 127.0.0.6 / ::6 (inbound passthrough)",
            Reason::SkipExcludedPort => "skipped: excluded outbound port",
            Reason::SkipExcludedCidr => "skipped: excluded outbound CIDR",
            Reason::SkipNotIncluded => "skipped: not in the included CIDRs or ports",
            Reason::SkipDnsOff => "skipped: DNS capture off",
            Reason::SkipOutboundOff => "skipped: outbound capture off",
            Reason::SkipProxyPort => "skipped: to the outbound listener's port",
            Reason::InboundMoved => "inbound: wildcard bind moved to loopback",
            Reason::InboundKept => "inbound: bind kept (port not captured)",
            Reason::OriginPublished => "original destination published for the sidecar",
            Reason::SockmapAdded => "sockmap: on the fast path",
            Reason::OriginAnswered => "SO_ORIGINAL_DST answered",
            Reason::OriginMissed => "SO_ORIGINAL_DST missed: no original destination known",
            Reason::InboundToProxy => "inbound: handed to the sidecar's listener",
            Reason::InboundRefused => "inbound: refused, no sidecar listener",
            Reason::SockmapLeftSmall => "sockmap: left, first message below sockmap_min_bytes",
            Reason::SockmapLeftShutdown => "sockmap: left, the application shut down writing",
            Reason::SockmapLeftBehind => {
                "sockmap: the receiver held a receive buffer unread, TCP from now on"
            }
            Reason::SkipUdpNotDns => "skipped: UDP to a port other than 53",
            Reason::NotRegistered => "skipped: the pod is not registered",
        })
    }
}

/// TCP or UDP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl std::str::FromStr for Protocol {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        match text.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            _ => Err(Error::InvalidSetting(format!(
                "protocol {text:?}: give tcp or udp"
            ))),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// One decision of the programs, as `meshbpf trace` prints it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceEvent {
    /// CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns).
    pub time_ns: u64,
    /// The pod.
    pub netns_cookie: u64,
    /// The calling process and its uid, where there is one (not for sockops and inbound
    /// lookups, which run outside any process).
    pub pid: Option<u32>,
    /// See `pid`.
    pub uid: Option<u32>,
    /// The calling process's name.
    pub comm: String,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// The hook that decided.
    pub hook: Hook,
    /// What it decided.
    pub reason: Reason,
    /// The address asked for (for a bind: the port on the family's wildcard).
    pub dst: Option<SocketAddr>,
    /// What it became, when it changed.
    pub to: Option<SocketAddr>,
}

impl TraceEvent {
    pub(super) fn from_raw(raw: &RawEvent) -> Option<TraceEvent> {
        let comm: Vec<u8> = raw
            .comm
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        let task = raw.pid != 0;
        Some(TraceEvent {
            time_ns: raw.time_ns,
            netns_cookie: raw.netns_cookie,
            pid: task.then_some(raw.pid),
            uid: task.then_some(raw.uid),
            comm: String::from_utf8_lossy(&comm).into_owned(),
            protocol: if raw.protocol == 17 {
                Protocol::Udp
            } else {
                Protocol::Tcp
            },
            hook: Hook::from_raw(raw.hook)?,
            reason: Reason::from_raw(raw.reason)?,
            dst: wildcard_or_addr(raw.dst),
            to: raw.to.to_socket_addr(),
        })
    }
}

/// A bind's event carries the family and port only: the family's wildcard.
pub(super) fn wildcard_or_addr(dst: OrigDst) -> Option<SocketAddr> {
    dst.to_socket_addr().or_else(|| match dst.family {
        abi::AF_INET => Some(SocketAddr::new(
            Ipv4Addr::UNSPECIFIED.into(),
            u16::from_be(dst.port),
        )),
        _ => None,
    })
}

impl fmt::Display for TraceEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.time_ns / 1_000_000_000;
        let micros = (self.time_ns % 1_000_000_000) / 1000;
        write!(f, "{secs}.{micros:06} pod={}", self.netns_cookie)?;
        if let (Some(pid), Some(uid)) = (self.pid, self.uid) {
            write!(f, " pid={pid}({}) uid={uid}", self.comm)?;
        }
        write!(f, " {} {}", self.protocol, self.hook)?;
        if let Some(dst) = self.dst {
            write!(f, " {dst}")?;
        }
        if let Some(to) = self.to {
            write!(f, " -> {to}")?;
        }
        write!(f, " {}", self.reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_and_hook_of_the_programs_has_words() {
        for raw in abi::TRACE_REASONS {
            assert!(
                Reason::from_raw(raw).is_some(),
                "trace_reason {raw} has no Reason"
            );
        }
        for raw in abi::TRACE_HOOKS {
            assert!(
                Hook::from_raw(raw).is_some(),
                "trace_hook {raw} has no Hook"
            );
        }
    }
}
