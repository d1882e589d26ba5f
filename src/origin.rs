//! The original destination of a captured connection, as a proxy asks for it.

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;

use nix::libc;

/// `SO_ORIGINAL_DST` (linux/netfilter_ipv4.h); `IP6T_SO_ORIGINAL_DST`
/// (linux/netfilter_ipv6/ip6_tables.h), its IPv6 counterpart at `SOL_IPV6`, has the same number.
pub const SO_ORIGINAL_DST: libc::c_int = libc::SO_ORIGINAL_DST;

/// The address the application connected to, for a connection a proxy accepted: the plain
/// `getsockopt(SO_ORIGINAL_DST)` that works the same behind iptables REDIRECT and behind
/// meshbpf (IPv4 through `SOL_IP`, IPv6 through `SOL_IPV6`).
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    original_dst_of(stream.as_raw_fd(), stream.local_addr()?)
}

/// For the sidecar's DNS listener socket: the server the application sent the datagram it
/// received last to. Call it right after `recv_from`, from the same thread. meshbpf answers
/// the same `getsockopt(SO_ORIGINAL_DST)` on the UDP socket (the kernel itself has no UDP
/// counterpart); it fails with the kernel's error when the datagram was not captured.
pub fn dns_query_original_dst(socket: &UdpSocket) -> io::Result<SocketAddr> {
    original_dst_of(socket.as_raw_fd(), socket.local_addr()?)
}

fn original_dst_of(fd: libc::c_int, local: SocketAddr) -> io::Result<SocketAddr> {
    if local.is_ipv4() {
        let sin: libc::sockaddr_in = getsockopt_struct(fd, libc::SOL_IP, libc::SO_ORIGINAL_DST)?;
        Ok(SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
            u16::from_be(sin.sin_port),
        )))
    } else {
        let sin6: libc::sockaddr_in6 =
            getsockopt_struct(fd, libc::SOL_IPV6, libc::IP6T_SO_ORIGINAL_DST)?;
        Ok(SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(sin6.sin6_addr.s6_addr),
            u16::from_be(sin6.sin6_port),
            sin6.sin6_flowinfo,
            sin6.sin6_scope_id,
        )))
    }
}

/// One `getsockopt` whose answer is a whole `T`. (nix's `OriginalDst` would panic on a short
/// answer; this returns an error.)
fn getsockopt_struct<T>(fd: libc::c_int, level: libc::c_int, name: libc::c_int) -> io::Result<T> {
    let mut value = MaybeUninit::<T>::zeroed();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` is valid for writes of `len` bytes and `len` is a valid socklen_t.
    let ret = unsafe { libc::getsockopt(fd, level, name, value.as_mut_ptr().cast(), &mut len) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    if len as usize != size_of::<T>() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("SO_ORIGINAL_DST returned {len} bytes"),
        ));
    }
    // SAFETY: zero-initialised and then filled by the kernel; sockaddr_in(6) is plain data.
    Ok(unsafe { value.assume_init() })
}
