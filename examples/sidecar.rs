//! A transparent sidecar stand-in: what Envoy's listeners do, in miniature.
//!
//! - Outbound: it accepts on the outbound port (127.0.0.1 and ::1), asks the
//!   accepted socket for its original destination with the same
//!   `getsockopt(SO_ORIGINAL_DST)` that works behind iptables REDIRECT,
//!   connects there, and relays bytes both ways.
//! - Inbound: for each `--inbound PORT` it listens on the pod's own addresses
//!   (`--pod-ip`) and forwards to the application, which meshbpf moved to
//!   loopback.
//! - DNS: on the DNS port (UDP and TCP, 127.0.0.1 and ::1) it forwards each
//!   query to the server the application asked, which it learns with
//!   `meshbpf::dns_query_original_dst` (UDP) or `SO_ORIGINAL_DST` (TCP), and
//!   returns the answer.
//!
//! Run it as the proxy uid (1337): its own connections are then never
//! captured, and meshbpf lets it bind privileged inbound ports.
//!
//! Every event is one line on stdout, for people and tests:
//! `outbound peer=127.0.0.1:40312 original_dst=192.0.2.2:8080 upstream=connected`
//! `inbound peer=192.0.2.11:51234 listener=192.0.2.10:80 upstream=127.0.0.1:80`
//! `dns proto=udp peer=127.0.0.1:40001 original_dst=192.0.2.20:53 answer_bytes=61`
//!
//! Usage: `sidecar [--outbound-port 15001] [--dns-port 15053] [--pod-ip IP]... [--inbound PORT]...
//! [--fastopen QLEN]` (TCP Fast Open on the outbound listeners, as Envoy's
//! `tcp_fast_open_queue_length`).

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;

use nix::libc;
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket,
};
use std::thread;
use std::time::Duration;

const LOOPBACKS: [IpAddr; 2] = [
    IpAddr::V4(Ipv4Addr::LOCALHOST),
    IpAddr::V6(Ipv6Addr::LOCALHOST),
];

fn main() {
    let mut outbound_port: u16 = meshbpf::DEFAULT_OUTBOUND_PORT;
    let mut dns_port: u16 = meshbpf::DEFAULT_DNS_PORT;
    let mut pod_ips: Vec<IpAddr> = Vec::new();
    let mut inbound: Vec<u16> = Vec::new();
    let mut fastopen: Option<libc::c_int> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().unwrap_or_else(|| usage());
        match arg.as_str() {
            "--outbound-port" => outbound_port = value.parse().unwrap_or_else(|_| usage()),
            "--dns-port" => dns_port = value.parse().unwrap_or_else(|_| usage()),
            "--pod-ip" => pod_ips.push(value.parse().unwrap_or_else(|_| usage())),
            "--inbound" => inbound.push(value.parse().unwrap_or_else(|_| usage())),
            "--fastopen" => fastopen = Some(value.parse().unwrap_or_else(|_| usage())),
            _ => usage(),
        }
    }

    let mut listeners: Vec<(TcpListener, Direction)> = Vec::new();
    let mut dns_sockets: Vec<UdpSocket> = Vec::new();
    for ip in LOOPBACKS {
        for (port, direction) in [
            (outbound_port, Direction::Outbound),
            (dns_port, Direction::Dns),
        ] {
            match TcpListener::bind((ip, port)) {
                Ok(listener) => {
                    if let (Some(qlen), Direction::Outbound) = (fastopen, direction) {
                        enable_fastopen(&listener, qlen);
                    }
                    listeners.push((listener, direction))
                }
                Err(err) => fail(&format!(
                    "cannot listen on {}: {err}",
                    SocketAddr::new(ip, port)
                )),
            }
        }
        match UdpSocket::bind((ip, dns_port)) {
            Ok(socket) => dns_sockets.push(socket),
            Err(err) => fail(&format!(
                "cannot listen on udp {}: {err}",
                SocketAddr::new(ip, dns_port)
            )),
        }
    }
    for &port in &inbound {
        for &ip in &pod_ips {
            match TcpListener::bind((ip, port)) {
                Ok(listener) => listeners.push((listener, Direction::Inbound(port))),
                Err(err) => fail(&format!(
                    "cannot listen on {}: {err}",
                    SocketAddr::new(ip, port)
                )),
            }
        }
    }
    for (listener, direction) in &listeners {
        let addr = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        say(format!("listening {}={addr}", direction.name()));
    }
    for socket in &dns_sockets {
        let addr = socket
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        say(format!("listening dns-udp={addr}"));
    }
    thread::scope(|scope| {
        for socket in &dns_sockets {
            scope.spawn(move || serve_dns_udp(socket));
        }
        for (listener, direction) in &listeners {
            let direction = *direction;
            scope.spawn(move || {
                for conn in listener.incoming() {
                    match conn {
                        Ok(stream) => {
                            thread::spawn(move || direction.serve(stream));
                        }
                        Err(err) => eprintln!("sidecar: accept: {err}"),
                    }
                }
            });
        }
    });
}

fn enable_fastopen(listener: &TcpListener, qlen: libc::c_int) {
    // SAFETY: setsockopt(2) reads `qlen`, an int, of the size passed.
    let ret = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_FASTOPEN,
            (&qlen as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if ret < 0 {
        fail(&format!("TCP_FASTOPEN: {}", io::Error::last_os_error()));
    }
}

/// One receiving thread per socket: the original server must be read right after recv_from.
fn serve_dns_udp(socket: &UdpSocket) {
    let mut buf = [0u8; 4096];
    loop {
        let (len, peer) = match socket.recv_from(&mut buf) {
            Ok(got) => got,
            Err(err) => return eprintln!("sidecar: dns recv: {err}"),
        };
        let original = match meshbpf::dns_query_original_dst(socket) {
            Ok(addr) => addr,
            Err(err) => {
                say(format!(
                    "dns proto=udp peer={peer} original_dst=none error={err}"
                ));
                continue;
            }
        };
        let (query, Ok(reply_via)) = (buf[..len].to_vec(), socket.try_clone()) else {
            continue;
        };
        thread::spawn(move || match forward_dns(&query, original) {
            Ok(answer) => {
                say(format!(
                    "dns proto=udp peer={peer} original_dst={original} answer_bytes={}",
                    answer.len()
                ));
                let _ = reply_via.send_to(&answer, peer);
            }
            Err(err) => say(format!(
                "dns proto=udp peer={peer} original_dst={original} error={err}"
            )),
        });
    }
}

/// Sends one query to `server` (from the sidecar's uid: not captured) and waits for its answer.
fn forward_dns(query: &[u8], server: SocketAddr) -> io::Result<Vec<u8>> {
    let any: SocketAddr = if server.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let upstream = UdpSocket::bind(any)?;
    upstream.connect(server)?;
    upstream.set_read_timeout(Some(Duration::from_secs(3)))?;
    upstream.send(query)?;
    let mut buf = vec![0u8; 4096];
    let len = upstream.recv(&mut buf)?;
    buf.truncate(len);
    Ok(buf)
}

#[derive(Clone, Copy)]
enum Direction {
    Outbound,
    Inbound(u16),
    Dns,
}

impl Direction {
    fn name(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound(_) => "inbound",
            Direction::Dns => "dns-tcp",
        }
    }

    fn serve(self, client: TcpStream) {
        let peer = client
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        match self {
            Direction::Dns => {
                match meshbpf::original_dst(&client) {
                    Ok(original) => match TcpStream::connect(original) {
                        Ok(upstream) => {
                            say(format!("dns proto=tcp peer={peer} original_dst={original} upstream=connected"));
                            relay(client, upstream);
                        }
                        Err(err) => say(format!(
                            "dns proto=tcp peer={peer} original_dst={original} error={err}"
                        )),
                    },
                    Err(err) => say(format!(
                        "dns proto=tcp peer={peer} original_dst=none error={err}"
                    )),
                }
            }
            Direction::Outbound => {
                let original = match meshbpf::original_dst(&client) {
                    Ok(addr) => addr,
                    Err(err) => {
                        return say(format!(
                            "outbound peer={peer} original_dst=none error={err}"
                        ))
                    }
                };
                match TcpStream::connect(original) {
                    Ok(upstream) => {
                        say(format!(
                            "outbound peer={peer} original_dst={original} upstream=connected"
                        ));
                        relay(client, upstream);
                    }
                    Err(err) => say(format!(
                        "outbound peer={peer} original_dst={original} upstream=failed error={err}"
                    )),
                }
            }
            Direction::Inbound(port) => {
                let listener = client
                    .local_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                // The application sits on loopback of the same family, or of the other one if
                // it bound a dual-stack [::] that moved to [::1].
                let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
                let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port);
                let order = if client.local_addr().is_ok_and(|a| a.is_ipv6()) {
                    [v6, v4]
                } else {
                    [v4, v6]
                };
                match order.iter().find_map(|addr| TcpStream::connect(addr).ok()) {
                    Some(upstream) => {
                        let app = upstream
                            .peer_addr()
                            .map(|a| a.to_string())
                            .unwrap_or_default();
                        say(format!(
                            "inbound peer={peer} listener={listener} upstream={app}"
                        ));
                        relay(client, upstream);
                    }
                    None => say(format!(
                        "inbound peer={peer} listener={listener} upstream=failed"
                    )),
                }
            }
        }
    }
}

fn relay(client: TcpStream, upstream: TcpStream) {
    let (Ok(client2), Ok(upstream2)) = (client.try_clone(), upstream.try_clone()) else {
        return;
    };
    let back = thread::spawn(move || pipe(upstream2, client2));
    pipe(client, upstream);
    let _ = back.join();
}

/// Copies until EOF, then passes the half-close on.
///
/// A read may fail with EAGAIN although the socket is blocking: with sockmap acceleration
/// the kernel's sockmap receive path (tcp_bpf_recvmsg) reports a spurious wakeup that way,
/// for example when this socket's own FIN is acknowledged. Like Envoy, which reads
/// non-blocking sockets, the relay waits for readability and reads again.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                wait_readable(&from);
                continue;
            }
            Err(err) => {
                say(format!("relay read error: {err}"));
                break;
            }
        };
        if let Err(err) = to.write_all(&buf[..n]) {
            say(format!("relay write error: {err}"));
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

fn wait_readable(stream: &TcpStream) {
    let mut pfd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; a bounded wait.
    unsafe { libc::poll(&mut pfd, 1, 1000) };
}

fn say(line: String) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn usage() -> ! {
    fail("usage: sidecar [--outbound-port PORT] [--dns-port PORT] [--pod-ip IP]... [--inbound PORT]... [--fastopen QLEN]")
}

fn fail(msg: &str) -> ! {
    eprintln!("sidecar: {msg}");
    std::process::exit(2);
}
