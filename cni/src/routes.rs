//! What a pod routes out of given interfaces: the destinations a socket reaches through
//! them, which capture leaves alone, as istio-iptables' `OUTPUT -o IFACE -j RETURN` does.

use std::collections::BTreeSet;
use std::net::IpAddr;

use meshbpf::Cidr;
use meshbpf::Netns;

/// What a pod routes out of some of its interfaces.
#[derive(Debug, Default)]
pub(super) struct Routed {
    /// The destinations: the interfaces' own addresses, and every prefix the main routing
    /// table sends out of them, less the longer prefixes it sends elsewhere.
    pub(super) cidrs: BTreeSet<Cidr>,
    /// The names no interface of the pod has.
    pub(super) missing: Vec<String>,
}

/// What `netns` routes out of the interfaces `names`, as its main table says now (the
/// destinations a socket's connect reaches through them: what istio-iptables' `OUTPUT -o
/// IFACE -j RETURN` leaves alone).
pub(super) fn routed_out_of(netns: &Netns, names: &[String]) -> std::io::Result<Routed> {
    let fd = netns.file().try_clone()?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || -> std::io::Result<Routed> {
                nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)?;
                let mut routed = Routed::default();
                let mut indexes = BTreeSet::new();
                for name in names {
                    match nix::net::if_::if_nametoindex(name.as_str()) {
                        Ok(index) => drop(indexes.insert(index)),
                        Err(nix::errno::Errno::ENODEV) => routed.missing.push(name.clone()),
                        Err(err) => return Err(err.into()),
                    }
                }
                for ifa in nix::ifaddrs::getifaddrs()? {
                    let Some(addr) = ifa.address.filter(|_| names.contains(&ifa.interface_name))
                    else {
                        continue;
                    };
                    let ip = match (addr.as_sockaddr_in(), addr.as_sockaddr_in6()) {
                        (Some(v4), _) => IpAddr::V4(v4.ip()),
                        (_, Some(v6)) if !is_link_local(v6.ip()) => IpAddr::V6(v6.ip()),
                        _ => continue,
                    };
                    routed
                        .cidrs
                        .extend(cidr(ip, if ip.is_ipv4() { 32 } else { 128 }));
                }
                let mut routes = main_table_routes(nix::libc::AF_INET as u8)?;
                routes.extend(main_table_routes(nix::libc::AF_INET6 as u8)?);
                let (out, elsewhere): (Vec<_>, Vec<_>) = routes
                    .into_iter()
                    .partition(|(_, oif)| indexes.contains(oif));
                let elsewhere: Vec<Cidr> = elsewhere.into_iter().map(|(c, _)| c).collect();
                for (prefix, _) in out {
                    routed.cidrs.extend(without(prefix, &elsewhere));
                }
                Ok(routed)
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("route thread panicked")))
    })
}

pub(super) fn is_link_local(ip: std::net::Ipv6Addr) -> bool {
    ip.segments()[0] & 0xffc0 == 0xfe80
}

/// `ip`/`prefix` as a prefix (host bits cleared).
pub(super) fn cidr(ip: IpAddr, prefix: u8) -> Option<Cidr> {
    format!("{ip}/{prefix}").parse().ok()
}

/// `prefix` less every prefix of `holes` inside it (a hole as long or longer): the longest
/// match decides a route, so what a longer prefix sends elsewhere is not routed out here.
pub(super) fn without(prefix: Cidr, holes: &[Cidr]) -> Vec<Cidr> {
    let inside: Vec<Cidr> = holes
        .iter()
        .copied()
        .filter(|h| h.prefix() >= prefix.prefix() && prefix.contains(h.addr()))
        .collect();
    if inside.is_empty() {
        return vec![prefix];
    }
    if inside.iter().any(|h| h.prefix() == prefix.prefix()) {
        return Vec::new();
    }
    let bits = if prefix.addr().is_ipv4() { 32 } else { 128 };
    let low = match prefix.addr() {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    };
    let high = low | 1u128 << (bits - 1 - prefix.prefix());
    [low, high]
        .into_iter()
        .filter_map(|half| {
            let ip = match prefix.addr() {
                IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::from(half as u32)),
                IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::from(half)),
            };
            cidr(ip, prefix.prefix() + 1)
        })
        .flat_map(|half| without(half, &inside))
        .collect()
}

/// The unicast routes of the calling thread's network namespace's main table in `family`
/// (AF_INET or AF_INET6), each with its output interface: one RTM_GETROUTE dump over
/// rtnetlink (linux/rtnetlink.h). Multipath routes (no single RTA_OIF) are left out; IPv6
/// link-local ones too (every interface has fe80::/64, and a connect to one names its
/// interface).
pub(super) fn main_table_routes(family: u8) -> std::io::Result<Vec<(Cidr, u32)>> {
    use nix::libc;
    use nix::sys::socket::{recv, send, socket, MsgFlags, SockFlag, SockProtocol, SockType};
    use std::os::fd::AsRawFd;
    const RTM_GETROUTE: u16 = 26;
    const RTM_NEWROUTE: u16 = 24;
    const RTA_DST: u16 = 1;
    const RTA_OIF: u16 = 4;
    const RTA_TABLE: u16 = 15;
    const RTN_UNICAST: u8 = 1;
    const RT_TABLE_MAIN: u32 = 254;
    // nlmsghdr (16) + rtmsg (12).
    let mut msg = Vec::with_capacity(28);
    msg.extend_from_slice(&28u32.to_ne_bytes());
    msg.extend_from_slice(&RTM_GETROUTE.to_ne_bytes());
    msg.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    msg.extend_from_slice(&0u32.to_ne_bytes()); // the kernel
    msg.extend_from_slice(&[family, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let sock = socket(
        nix::sys::socket::AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )?;
    send(sock.as_raw_fd(), &msg, MsgFlags::empty())?;
    let u16_at = |b: &[u8], at: usize| b.get(at..at + 2).map(|w| u16::from_ne_bytes([w[0], w[1]]));
    let u32_at = |b: &[u8], at: usize| {
        b.get(at..at + 4)
            .map(|w| u32::from_ne_bytes([w[0], w[1], w[2], w[3]]))
    };
    let mut routes = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        if n == 0 {
            return Err(std::io::Error::other(
                "rtnetlink closed before the dump ended",
            ));
        }
        let mut at = 0;
        while at + 16 <= n {
            let (Some(len), Some(kind)) = (u32_at(&buf, at), u16_at(&buf, at + 4)) else {
                break;
            };
            let len = len as usize;
            if len < 16 || at + len > n {
                return Err(std::io::Error::other("truncated rtnetlink message"));
            }
            let body = &buf[at + 16..at + len];
            at += (len + 3) & !3;
            match kind {
                k if k == libc::NLMSG_DONE as u16 => return Ok(routes),
                k if k == libc::NLMSG_ERROR as u16 => {
                    let errno = u32_at(body, 0).map_or(0, |e| e as i32);
                    return Err(std::io::Error::from_raw_os_error(-errno));
                }
                RTM_NEWROUTE if body.len() >= 12 && body[7] == RTN_UNICAST => {}
                _ => continue,
            }
            let (dst_len, mut table) = (body[1], u32::from(body[4]));
            let (mut dst, mut oif) = (None, None);
            let mut a = 12;
            while a + 4 <= body.len() {
                let (Some(alen), Some(atype)) = (u16_at(body, a), u16_at(body, a + 2)) else {
                    break;
                };
                let alen = alen as usize;
                if alen < 4 || a + alen > body.len() {
                    break;
                }
                let data = &body[a + 4..a + alen];
                match atype {
                    RTA_DST => dst = Some(data.to_vec()),
                    RTA_OIF => oif = u32_at(data, 0),
                    RTA_TABLE => table = u32_at(data, 0).unwrap_or(table),
                    _ => {}
                }
                a += (alen + 3) & !3;
            }
            let ip = match (family as i32, dst.as_deref()) {
                (libc::AF_INET, Some(&[a, b, c, d])) => IpAddr::from([a, b, c, d]),
                (libc::AF_INET, None) => IpAddr::from([0u8; 4]),
                (libc::AF_INET6, Some(d)) => match <[u8; 16]>::try_from(d) {
                    Ok(octets) => IpAddr::from(octets),
                    Err(_) => continue,
                },
                (libc::AF_INET6, None) => IpAddr::from([0u8; 16]),
                _ => continue,
            };
            let link_local = matches!(ip, IpAddr::V6(v6) if is_link_local(v6));
            if let (RT_TABLE_MAIN, false, Some(oif), Some(prefix)) =
                (table, link_local, oif, cidr(ip, dst_len))
            {
                routes.push((prefix, oif));
            }
        }
    }
}
