//! The map layouts shared with the BPF programs (`src/bpf/meshbpf.h`), as the
//! skeleton generates them, made byte-castable with `plain`, with conversions
//! to and from `std::net` types.

use std::mem::size_of;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// One decision the programs report to `meshbpf trace` (`struct decision_event`).
pub(crate) use crate::skel::types::decision_event as RawEvent;
pub(crate) use crate::skel::types::pod_settings as RawPodSettings;
pub(crate) use crate::skel::types::{
    cidr_key as CidrKey, conn_key as ConnKey, inbound_key as InboundKey, mesh_meta as MeshMeta,
    orig_dst as OrigDst, pod_addr_key as PodAddrKey, rule_key as RuleKey,
};

use crate::skel::types::{cidr_key_bits, consts, meta_flag, pod_flag, rule_kind, rule_marker};

/// The counter names and the map names, derived by build.rs from the BPF object.
mod generated {
    include!(concat!(env!("OUT_DIR"), "/abi_gen.rs"));
}
pub(crate) use generated::map;
pub use generated::COUNTER_NAMES;
#[cfg(test)]
pub(crate) use generated::{RULE_KINDS, TRACE_HOOKS, TRACE_REASONS};

/// The map layout this build reads and writes (`MESHBPF_LAYOUT_VERSION` in meshbpf.h).
pub const LAYOUT_VERSION: u32 = consts::MESHBPF_LAYOUT_VERSION.0;
/// The oldest layout this build upgrades from in place (the first of `migrate`'s steps, which
/// asserts it at compile time). Older attachments must be detached or upgraded by an
/// intermediate release.
pub(crate) const OLDEST_UPGRADABLE_LAYOUT: u32 = 7;
/// The map holding every registered pod's settings, by netns cookie (`cookie_map`).
pub const REGISTRATIONS_MAP: &str = map::COOKIE_MAP;
/// How many pods one node can register (`MAX_PODS` in meshbpf.h).
/// (the default: `attach --max-pods` sizes it).
pub const MAX_PODS: u32 = consts::MAX_PODS.0;
/// How many live captured connections `origin_dst_map` holds by default (`MAX_TRACKED_CONNS`).
pub const MAX_TRACKED_CONNS: u32 = consts::MAX_TRACKED_CONNS.0;
/// `NO_GID` in meshbpf.h: a pod without a proxy gid.
pub(crate) const NO_GID: u32 = consts::NO_GID.0;

pub(crate) const AF_INET: u16 = 2;
pub(crate) const AF_INET6: u16 = 10;

/// `enum pod_flag` in meshbpf.h.
pub(crate) mod pod_flags {
    use super::pod_flag;
    pub const CAPTURE_OUTBOUND: u32 = pod_flag::POD_F_CAPTURE_OUTBOUND.0;
    pub const CAPTURE_INBOUND: u32 = pod_flag::POD_F_CAPTURE_INBOUND.0;
    pub const CAPTURE_DNS: u32 = pod_flag::POD_F_CAPTURE_DNS.0;
    pub const SOCKMAP: u32 = pod_flag::POD_F_SOCKMAP.0;
    pub const INBOUND_ALL_PORTS: u32 = pod_flag::POD_F_INBOUND_ALL_PORTS.0;
    pub const OUTBOUND_ALL_CIDRS: u32 = pod_flag::POD_F_OUTBOUND_ALL_CIDRS.0;
    pub const MORE_PROXY_IDS: u32 = pod_flag::POD_F_MORE_PROXY_IDS.0;
    pub const INBOUND_REDIRECT: u32 = pod_flag::POD_F_INBOUND_REDIRECT.0;
    pub const NO_OUTBOUND_EXCLUDED_PORTS: u32 = pod_flag::POD_F_NO_OUTBOUND_EXCLUDED_PORTS.0;
    pub const NO_OUTBOUND_EXCLUDED_CIDRS: u32 = pod_flag::POD_F_NO_OUTBOUND_EXCLUDED_CIDRS.0;
    pub const NO_OUTBOUND_INCLUDED_PORTS: u32 = pod_flag::POD_F_NO_OUTBOUND_INCLUDED_PORTS.0;
    pub const INTRA_NODE: u32 = pod_flag::POD_F_INTRA_NODE.0;
}

/// `enum rule_kind` in meshbpf.h.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub(crate) enum RuleKind {
    InboundInclude = rule_kind::RULE_INBOUND_INCLUDE.0 as u8,
    InboundExclude = rule_kind::RULE_INBOUND_EXCLUDE.0 as u8,
    OutboundInclude = rule_kind::RULE_OUTBOUND_INCLUDE.0 as u8,
    OutboundExclude = rule_kind::RULE_OUTBOUND_EXCLUDE.0 as u8,
    ProxyUid = rule_kind::RULE_PROXY_UID.0 as u8,
    ProxyGid = rule_kind::RULE_PROXY_GID.0 as u8,
}

impl RuleKind {
    const ALL: [RuleKind; 6] = [
        RuleKind::InboundInclude,
        RuleKind::InboundExclude,
        RuleKind::OutboundInclude,
        RuleKind::OutboundExclude,
        RuleKind::ProxyUid,
        RuleKind::ProxyGid,
    ];

    pub(crate) fn from_raw(raw: u8) -> Option<Self> {
        RuleKind::ALL.into_iter().find(|k| *k as u8 == raw)
    }
}

/// `META_F_SOCKMAP` in meshbpf.h.
pub(crate) const META_F_SOCKMAP: u32 = meta_flag::META_F_SOCKMAP.0;
/// `META_F_PREORDER` in meshbpf.h.
pub(crate) const META_F_PREORDER: u32 = meta_flag::META_F_PREORDER.0;
/// `META_F_DRAINING` in meshbpf.h.
pub(crate) const META_F_DRAINING: u32 = meta_flag::META_F_DRAINING.0;

// The sizes of the C structs; a drift between meshbpf.h and the skeleton fails the build.
const _: () = assert!(size_of::<RawPodSettings>() == 56);
const _: () = assert!(size_of::<OrigDst>() == 20);
const _: () = assert!(size_of::<ConnKey>() == 48);
const _: () = assert!(size_of::<MeshMeta>() == 16 + 256);
const _: () = assert!(size_of::<RuleKey>() == 16);
const _: () = assert!(size_of::<CidrKey>() == 32);
const _: () = assert!(size_of::<InboundKey>() == 16);
const _: () = assert!(size_of::<RawEvent>() == 96);
const _: () = assert!(size_of::<PodAddrKey>() == 16);

// SAFETY: these are `#[repr(C)]` structs of integers (and byte arrays) generated from the BPF
// object's BTF: every bit pattern is a valid value and they hold no pointers.
unsafe impl plain::Plain for RawPodSettings {}
// SAFETY: as above.
unsafe impl plain::Plain for OrigDst {}
// SAFETY: as above.
unsafe impl plain::Plain for ConnKey {}
// SAFETY: as above.
unsafe impl plain::Plain for MeshMeta {}
// SAFETY: as above.
unsafe impl plain::Plain for RuleKey {}
// SAFETY: as above.
unsafe impl plain::Plain for CidrKey {}
// SAFETY: as above.
unsafe impl plain::Plain for InboundKey {}
// SAFETY: as above.
unsafe impl plain::Plain for RawEvent {}
// SAFETY: as above.
unsafe impl plain::Plain for PodAddrKey {}

impl PodAddrKey {
    /// The `pod_addrs` key of one of a pod's addresses: IPv6, IPv4 as IPv4-mapped.
    pub(crate) fn new(ip: IpAddr) -> Self {
        let v6 = match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        PodAddrKey {
            addr: ip6_words(&v6),
        }
    }
}

impl RuleKey {
    pub(crate) fn new(netns_cookie: u64, gen: u16, kind: RuleKind, value: u32) -> Self {
        RuleKey {
            netns_cookie,
            value,
            kind: kind as u8,
            gen,
            ..Default::default()
        }
    }

    /// The pod's "lists changing" marker (meshbpf.h's `RULE_LISTS_CHANGING`): present while
    /// a register or unregister of the pod runs, and after one that was stopped half-way.
    pub(crate) fn lists_changing(netns_cookie: u64) -> Self {
        RuleKey {
            netns_cookie,
            kind: rule_marker::RULE_LISTS_CHANGING.0 as u8,
            ..Default::default()
        }
    }

    /// Whether this is a [`RuleKey::lists_changing`] marker, not a list entry.
    pub(crate) fn is_marker(&self) -> bool {
        self.kind == rule_marker::RULE_LISTS_CHANGING.0 as u8
    }
}

/// Bits of a CIDR trie key before the address: the pod's cookie and its lists' generation.
const CIDR_KEY_PREFIX_BITS: u32 = cidr_key_bits::CIDR_KEY_PREFIX_BITS.0;

impl CidrKey {
    /// The trie key of one prefix of one pod.
    pub(crate) fn new(netns_cookie: u64, gen: u16, cidr: &crate::cidr::Cidr) -> Self {
        let (octets, plen) = cidr.as_v6();
        let mut addr = [0u32; 4];
        for (i, w) in addr.iter_mut().enumerate() {
            *w = u32::from_ne_bytes([
                octets[4 * i],
                octets[4 * i + 1],
                octets[4 * i + 2],
                octets[4 * i + 3],
            ]);
        }
        CidrKey {
            prefixlen: CIDR_KEY_PREFIX_BITS + u32::from(plen),
            netns_cookie: [netns_cookie as u32, (netns_cookie >> 32) as u32],
            gen: u32::from(gen),
            addr,
        }
    }

    pub(crate) fn cookie(&self) -> u64 {
        u64::from(self.netns_cookie[0]) | (u64::from(self.netns_cookie[1]) << 32)
    }

    pub(crate) fn cidr(&self) -> Option<crate::cidr::Cidr> {
        let mut octets = [0u8; 16];
        for (i, w) in self.addr.iter().enumerate() {
            octets[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        let plen = self.prefixlen.checked_sub(CIDR_KEY_PREFIX_BITS)?;
        crate::cidr::Cidr::from_v6(octets, u8::try_from(plen).ok()?)
    }
}

/// The bytes of a map key or value.
pub(crate) fn bytes<T: plain::Plain>(value: &T) -> &[u8] {
    // SAFETY: `T: Plain` is a padding-free-or-zeroed POD struct; viewing it as bytes is sound.
    unsafe { plain::as_bytes(value) }
}

/// A map key or value read back from its bytes; `None` when the size does not match.
pub(crate) fn from_bytes<T: plain::Plain + Default>(data: &[u8]) -> Option<T> {
    let mut value = T::default();
    plain::copy_from_bytes(&mut value, data).ok()?;
    (data.len() == size_of::<T>()).then_some(value)
}

/// Address words in network byte order, IPv4 (and IPv4-mapped IPv6) folded to `addr[0]`.
fn addr_words(ip: IpAddr) -> (u16, [u32; 4]) {
    let ip = match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) => (AF_INET, [u32::from_ne_bytes(v4.octets()), 0, 0, 0]),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let mut words = [0u32; 4];
            for (i, w) in words.iter_mut().enumerate() {
                *w = u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]);
            }
            (AF_INET6, words)
        }
    }
}

fn words_ip(family: u16, words: &[u32; 4]) -> Option<IpAddr> {
    match family {
        AF_INET => Some(IpAddr::V4(Ipv4Addr::from(words[0].to_ne_bytes()))),
        AF_INET6 => {
            let mut o = [0u8; 16];
            for (i, w) in words.iter().enumerate() {
                o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
            }
            Some(IpAddr::V6(Ipv6Addr::from(o)))
        }
        _ => None,
    }
}

/// An IPv6 address as four words in network byte order, as the maps hold it.
pub(crate) fn ip6_words(ip: &Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    let mut words = [0u32; 4];
    for (i, w) in words.iter_mut().enumerate() {
        *w = u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]);
    }
    words
}

impl RawPodSettings {
    /// The pod's own addresses as register found them.
    pub(crate) fn addresses(&self) -> Vec<IpAddr> {
        let mut out = Vec::new();
        if self.pod_ip4 != 0 {
            out.push(IpAddr::V4(Ipv4Addr::from(self.pod_ip4.to_ne_bytes())));
        }
        if self.pod_ip6 != [0; 4] {
            out.extend(words_ip(AF_INET6, &self.pod_ip6));
        }
        out
    }
}

impl OrigDst {
    /// The socket address this value describes, if its family is known.
    pub(crate) fn to_socket_addr(self) -> Option<SocketAddr> {
        let ip = words_ip(self.family, &self.addr)?;
        let port = u16::from_be(self.port);
        Some(match ip {
            IpAddr::V4(v4) => SocketAddr::V4(SocketAddrV4::new(v4, port)),
            IpAddr::V6(v6) => SocketAddr::V6(SocketAddrV6::new(v6, port, 0, 0)),
        })
    }
}

impl ConnKey {
    /// The key the BPF side builds for a connection from `client` (the application's end) to
    /// `listener` (the proxy's end) in the network namespace with `netns_cookie`.
    pub(crate) fn new(netns_cookie: u64, client: SocketAddr, listener: SocketAddr) -> Self {
        let (src_family, src_addr) = addr_words(client.ip());
        let (dst_family, dst_addr) = addr_words(listener.ip());
        // Both ends of a connection have one family; a mixed pair is simply never found.
        let family = if src_family == dst_family {
            src_family
        } else {
            0
        };
        ConnKey {
            src_addr,
            dst_addr,
            src_port: client.port().to_be(),
            dst_port: listener.port().to_be(),
            family: u32::from(family),
            netns_cookie,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rule_kind_of_the_programs_is_known_and_no_other() {
        let known: Vec<u16> = RuleKind::ALL.iter().map(|k| *k as u16).collect();
        assert_eq!(
            known, RULE_KINDS,
            "RuleKind::ALL against enum rule_kind (meshbpf.h)"
        );
    }

    #[test]
    fn ipv4_key_uses_first_word_in_network_order() {
        let key = ConnKey::new(
            7,
            "127.0.0.1:40000".parse().unwrap(),
            "127.0.0.1:15001".parse().unwrap(),
        );
        assert_eq!(key.family, u32::from(AF_INET));
        assert_eq!(key.src_addr, [u32::from_ne_bytes([127, 0, 0, 1]), 0, 0, 0]);
        assert_eq!(key.src_port, 40000u16.to_be());
        assert_eq!(key.dst_port, 15001u16.to_be());
        assert_eq!(key.netns_cookie, 7);
    }

    #[test]
    fn ipv4_mapped_ipv6_folds_to_the_ipv4_key() {
        let v4 = ConnKey::new(
            1,
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        );
        let mapped = ConnKey::new(
            1,
            "[::ffff:127.0.0.1]:1".parse().unwrap(),
            "[::ffff:127.0.0.1]:2".parse().unwrap(),
        );
        assert_eq!(bytes(&v4), bytes(&mapped));
    }

    #[test]
    fn orig_dst_round_trips_v4_and_v6() {
        for text in ["192.0.2.7:8080", "[2001:db8::7]:443"] {
            let addr: SocketAddr = text.parse().unwrap();
            let (family, words) = addr_words(addr.ip());
            let dst = OrigDst {
                addr: words,
                port: addr.port().to_be(),
                family,
            };
            assert_eq!(dst.to_socket_addr(), Some(addr));
        }
    }

    #[test]
    fn pod_addresses_are_keyed_as_ipv6_with_ipv4_mapped() {
        let v4 = PodAddrKey::new("192.0.2.10".parse().unwrap());
        let mapped = PodAddrKey::new("::ffff:192.0.2.10".parse().unwrap());
        assert_eq!(bytes(&v4), bytes(&mapped));
        assert_eq!(
            bytes(&v4),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 10]
        );
    }

    #[test]
    fn from_bytes_rejects_wrong_size() {
        assert!(from_bytes::<OrigDst>(&[0u8; 19]).is_none());
        assert!(from_bytes::<OrigDst>(&[0u8; 20]).is_some());
    }
}
