//! Why a connection was, or was not, captured: live from the programs' own decisions
//! ([`Mesh::trace`], a ring buffer per reader, never sampled), and from a pod's pinned
//! settings ([`explain`], the same policy evaluated in Rust). Both speak the same words:
//! [`Reason`]'s.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

use libbpf_rs::{MapCore, MapFlags, MapHandle, RingBuffer, RingBufferBuilder};

use crate::abi::{self, map, OrigDst, RawEvent};
use crate::error::{Context, Error, Result};
use crate::mesh::Mesh;
use crate::pins::MAPS_DIR;
use crate::settings::{InboundMode, PodSettings, Selection};
use crate::skel::types::{consts, trace_hook, trace_reason};

/// How many `trace` readers can run at once.
pub const TRACE_SLOTS: u32 = consts::TRACE_SLOTS.0;

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
    fn from_raw(raw: u16) -> Option<Hook> {
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

const REASONS: [(trace_reason, Reason); 23] = [
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
    fn from_raw(raw: u16) -> Option<Reason> {
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
    fn from_raw(raw: &RawEvent) -> Option<TraceEvent> {
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
fn wildcard_or_addr(dst: OrigDst) -> Option<SocketAddr> {
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

/// How often a reader drains its ring without being woken (the programs wake it only for a
/// batch): the longest a decision waits before [`Tracer::poll`] returns it.
pub const TRACE_DRAIN: Duration = Duration::from_millis(50);

/// A live `meshbpf trace` reader: a slot of its own, whose ring every program writes its
/// decisions to while the reader lives. Dropping it frees the slot.
pub struct Tracer {
    ctl: MapHandle,
    slot: u32,
    ring: RingBuffer<'static>,
    _ring_map: MapHandle,
    events: Rc<RefCell<VecDeque<TraceEvent>>>,
    cookie: Option<u64>,
}

impl Tracer {
    /// The decisions taken since the last call, waiting up to `timeout` for the first.
    ///
    /// The programs wake a reader only when a batch waits in its ring (a wakeup per decision
    /// cost more than the decision itself), so this also drains the ring every
    /// [`TRACE_DRAIN`]: a decision shows up at most that much after it was taken.
    pub fn poll(&mut self, timeout: Duration) -> Result<Vec<TraceEvent>> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let interrupted = match self.ring.poll(left.min(TRACE_DRAIN)) {
                Ok(()) => false,
                // A signal (Ctrl-C) while waiting: the caller decides what to do.
                Err(err) if err.kind() == libbpf_rs::ErrorKind::Interrupted => true,
                Err(err) => return Err(err).context(|| "reading the trace ring".into()),
            };
            self.ring
                .consume()
                .context(|| "reading the trace ring".into())?;
            let mut events = self.events.borrow_mut();
            let out: Vec<TraceEvent> = events
                .drain(..)
                .filter(|e| self.cookie.is_none_or(|c| c == e.netns_cookie))
                .collect();
            if !out.is_empty() || left.is_zero() || interrupted {
                return Ok(out);
            }
        }
    }

    /// The slot this reader holds.
    pub fn slot(&self) -> u32 {
        self.slot
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        let _ = set_slot(&self.ctl, self.slot, None);
    }
}

fn ctl_value(ctl: &MapHandle, index: u32) -> Result<u32> {
    let value = ctl
        .lookup(&index.to_ne_bytes(), MapFlags::ANY)
        .context(|| format!("reading {}", map::TRACE_CTL))?;
    Ok(value
        .and_then(|v| <[u8; 4]>::try_from(v.as_slice()).ok())
        .map_or(0, u32::from_ne_bytes))
}

/// Claims (`Some(pid)`) or frees (`None`) a slot: its reader's pid first, then the mask the
/// programs read.
fn set_slot(ctl: &MapHandle, slot: u32, pid: Option<u32>) -> Result<()> {
    let write = |index: u32, value: u32| {
        ctl.update(&index.to_ne_bytes(), &value.to_ne_bytes(), MapFlags::ANY)
            .context(|| format!("writing {}", map::TRACE_CTL))
    };
    write(1 + slot, pid.unwrap_or(0))?;
    let mask = ctl_value(ctl, 0)?;
    let bit = 1 << slot;
    write(
        0,
        if pid.is_some() {
            mask | bit
        } else {
            mask & !bit
        },
    )
}

impl Mesh {
    /// Starts a trace reader: from now on every decision of the programs (of the pod with
    /// `netns_cookie`, or of every pod) reaches it. Several readers work at once, up to
    /// [`TRACE_SLOTS`]; a reader whose process died frees its slot for the next.
    pub fn trace(&self, netns_cookie: Option<u64>) -> Result<Tracer> {
        let _lock = self.pin().lock(true)?;
        let maps = self.pin_dir().join(MAPS_DIR);
        let ctl = open(&maps, map::TRACE_CTL)?;
        let alive = |pid: u32| Path::new("/proc").join(pid.to_string()).exists();
        let mut free = None;
        for slot in 0..TRACE_SLOTS {
            let pid = ctl_value(&ctl, 1 + slot)?;
            let taken = ctl_value(&ctl, 0)? & (1 << slot) != 0;
            if taken && pid != 0 && !alive(pid) {
                set_slot(&ctl, slot, None)?; // its reader was killed
            } else if taken {
                continue;
            }
            free = free.or(Some(slot));
        }
        let slot = free.ok_or_else(|| {
            Error::InvalidSetting(format!(
                "{TRACE_SLOTS} `meshbpf trace` readers run already; stop one first"
            ))
        })?;
        let ring_map = open(&maps, ring_name(slot))?;
        let events = Rc::new(RefCell::new(VecDeque::new()));
        let sink = events.clone();
        let mut builder = RingBufferBuilder::new();
        builder
            .add(&ring_map, move |data: &[u8]| {
                if let Some(event) = abi::from_bytes::<RawEvent>(data)
                    .as_ref()
                    .and_then(TraceEvent::from_raw)
                {
                    sink.borrow_mut().push_back(event);
                }
                0
            })
            .context(|| "reading the trace ring".into())?;
        let ring = builder
            .build()
            .context(|| "reading the trace ring".into())?;
        // Empty the ring of what an earlier reader of this slot left, then go live.
        let _ = ring.consume();
        events.borrow_mut().clear();
        set_slot(&ctl, slot, Some(std::process::id()))?;
        Ok(Tracer {
            ctl,
            slot,
            ring,
            _ring_map: ring_map,
            events,
            cookie: netns_cookie,
        })
    }

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

fn open(maps: &Path, name: &str) -> Result<MapHandle> {
    let path = maps.join(name);
    MapHandle::from_pinned_path(&path).context(|| format!("opening pinned map {}", path.display()))
}

fn ring_name(slot: u32) -> &'static str {
    [
        map::TRACE_RING_0,
        map::TRACE_RING_1,
        map::TRACE_RING_2,
        map::TRACE_RING_3,
    ][slot as usize % 4]
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
const INBOUND_TUNNEL_PORT: u16 = 15008;
const DNS_PORT: u16 = 53;

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
fn over_lo(ip: IpAddr, addresses: &[IpAddr]) -> bool {
    ip.is_loopback() || ip.is_unspecified() || addresses.contains(&ip)
}

/// The sidecar's loopback address of `dst`'s family (IPv4-mapped stays IPv4).
fn loopback_for(dst: IpAddr) -> IpAddr {
    match dst {
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        _ => IpAddr::V4(Ipv4Addr::LOCALHOST),
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
