//! The workloads of the demo and the end-to-end tests: a server, a client and
//! a getsockopt prober, each printing `key=value` lines of what it saw.
//!
//! ```text
//! netprobe serve [--tag NAME] ADDR...        # reply "[tag=NAME ]from=LOCAL saw=PEER msg=..."
//! netprobe sendto ADDR                      # one UDP datagram (a DNS query) to ADDR, with
//!                                            # sendto(), waiting for nothing
//! netprobe autolisten                       # listen() with no bind (the kernel picks
//!                                            # 0.0.0.0:PORT); answers as serve
//! netprobe validate [--v6]                   # what Istio's istio-validation init container
//!                                            # checks (run as the proxy uid): prints
//!                                            # validation=ok or validation=failed
//! netprobe http ADDR...                      # HTTP/1.1: 200 "served by LOCAL to PEER"
//! netprobe connect DEST [--bind SRC] [--message TEXT] [--fastopen] [--mptcp]
//!                                            # prints local=, sockname=, peer=, reply=
//! netprobe bind ADDR                        # bind (TCP, no listen): prints bound= or the errno
//! netprobe dns SERVER NAME [A|AAAA] [--connected]
//!                                            # one DNS query over UDP, with sendto() or
//!                                            # connect()+send(): prints from=, rcode=, answer=
//! netprobe sockopts --listen ADDR [--hold] [--wait-for PATH]
//!                                            # accept one connection, run getsockopt probes on
//!                                            # it (once PATH exists); --hold keeps it open
//! netprobe reuse tcp FIRST SECOND [--unspec]  # one TCP socket connects to FIRST (may fail),
//!                                            # [dissolves with connect(AF_UNSPEC)], then to
//!                                            # SECOND: prints first=, local=, peer=, reply=
//! netprobe rebind FIRST SECOND              # one TCP socket binds FIRST (may fail), then
//!                                            # SECOND, listens and holds: prints first=, bound=
//! netprobe reuse udp-dns FIRST SECOND         # sendto() a DNS query to FIRST, then connect()
//!                                            # the same UDP socket to SECOND: prints peer=
//! ```
//!
//! `local=` is where the socket really is, from the kernel's socket table
//! (`/proc/net/tcp`); `sockname=` is what getsockname() tells the application (meshbpf
//! makes a captured socket report the pod's address, as behind iptables).

use std::io::{self, BufRead, BufReader, Write};
use std::mem::size_of;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::thread;
use std::time::Duration;

use nix::libc;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("serve") => match &args[1..] {
            [flag, tag, addrs @ ..] if flag == "--tag" => {
                TAG.set(tag.clone()).ok();
                serve(addrs, answer)
            }
            addrs => serve(addrs, answer),
        },
        Some("validate") => validate(&args[1..]),
        Some("autolisten") => autolisten(),
        Some("sendto") => match args.get(1) {
            Some(addr) => sendto_once(addr),
            None => Err("sendto ADDR".into()),
        },
        Some("http") => serve(&args[1..], answer_http),
        Some("connect") => connect(&args[1..]),
        Some("sockopts") => sockopts(&args[1..]),
        Some("bind") => bind_only(&args[1..]),
        Some("dns") => dns(&args[1..]),
        Some("reuse") => reuse(&args[1..]),
        Some("rebind") => rebind(&args[1..]),
        _ => Err("usage: netprobe serve [--tag NAME] ADDR... | validate [--v6] | autolisten | sendto ADDR | http ADDR... | connect DEST [--bind SRC] [--message TEXT] | bind ADDR | dns SERVER NAME [A|AAAA] [--connected] | sockopts --listen ADDR [--hold] [--wait-for PATH] | reuse tcp|udp-dns FIRST SECOND [--unspec] | rebind FIRST SECOND".into()),
    };
    if let Err(err) = result {
        eprintln!("netprobe: {err}");
        std::process::exit(1);
    }
}

type Result<T> = std::result::Result<T, String>;

fn parse_addr(text: &str) -> Result<SocketAddr> {
    text.parse().map_err(|_| format!("bad address {text}"))
}

fn say(line: String) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn serve(addrs: &[String], handler: fn(TcpStream)) -> Result<()> {
    let listeners = addrs
        .iter()
        .map(|a| TcpListener::bind(parse_addr(a)?).map_err(|e| format!("bind {a}: {e}")))
        .collect::<Result<Vec<_>>>()?;
    for l in &listeners {
        say(format!(
            "listening={}",
            l.local_addr().map_err(|e| e.to_string())?
        ));
    }
    thread::scope(|scope| {
        for listener in &listeners {
            scope.spawn(move || {
                for stream in listener.incoming().flatten() {
                    thread::spawn(move || handler(stream));
                }
            });
        }
    });
    Ok(())
}

/// The local and the peer address of a connection, as text.
fn ends(stream: &TcpStream) -> (String, String) {
    let text = |a: std::io::Result<SocketAddr>| a.map(|a| a.to_string()).unwrap_or_default();
    (text(stream.local_addr()), text(stream.peer_addr()))
}

/// `serve --tag NAME`: the name each reply starts with (`tag=NAME `), to tell servers apart.
static TAG: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn answer(stream: TcpStream) {
    let (local, peer) = ends(&stream);
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let tag = TAG.get().map(|t| format!("tag={t} ")).unwrap_or_default();
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        if writeln!(writer, "{tag}from={local} saw={peer} msg={line}").is_err() {
            return;
        }
    }
}

/// One DNS query for `NAME` to `SERVER`, unconnected (`sendto`/`recvfrom`) or connected.
fn dns(args: &[String]) -> Result<()> {
    let server = parse_addr(args.first().ok_or("dns needs a server address")?)?;
    let name = args.get(1).ok_or("dns needs a name")?;
    let qtype: u16 = if args.iter().any(|a| a == "AAAA") {
        28
    } else {
        1
    };
    let connected = args.iter().any(|a| a == "--connected");
    let any: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let socket = std::net::UdpSocket::bind(any).map_err(|e| e.to_string())?;
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let query = dns_query(0x4d42, name, qtype);
    let mut buf = [0u8; 4096];
    let (len, from) = if connected {
        socket
            .connect(server)
            .map_err(|e| format!("connect {server}: {e}"))?;
        socket.send(&query).map_err(|e| format!("send: {e}"))?;
        let len = socket.recv(&mut buf).map_err(|e| format!("receive: {e}"))?;
        // getpeername(): where the connected socket says it talks to.
        (len, socket.peer_addr().map_err(|e| e.to_string())?)
    } else {
        socket
            .send_to(&query, server)
            .map_err(|e| format!("sendto {server}: {e}"))?;
        socket
            .recv_from(&mut buf)
            .map_err(|e| format!("recvfrom: {e}"))?
    };
    say(format!("from={from}"));
    let (rcode, answer) = dns_answer(&buf[..len], qtype).ok_or("malformed DNS reply")?;
    say(format!("rcode={rcode}"));
    say(format!(
        "answer={}",
        answer
            .map(|ip| ip.to_string())
            .unwrap_or_else(|| "none".into())
    ));
    Ok(())
}

/// A DNS query message (RFC 1035 4.1): header with RD set, one question of class IN.
fn dns_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut msg = Vec::with_capacity(32 + name.len());
    for word in [id, 0x0100, 1, 0, 0, 0] {
        msg.extend_from_slice(&word.to_be_bytes());
    }
    for label in name.trim_end_matches('.').split('.') {
        msg.push(label.len() as u8);
        msg.extend_from_slice(label.as_bytes());
    }
    msg.push(0);
    msg.extend_from_slice(&qtype.to_be_bytes());
    msg.extend_from_slice(&1u16.to_be_bytes());
    msg
}

/// The rcode and the first answer record of type `qtype`, if any.
fn dns_answer(msg: &[u8], qtype: u16) -> Option<(u8, Option<std::net::IpAddr>)> {
    let word = |at: usize| Some(u16::from_be_bytes([*msg.get(at)?, *msg.get(at + 1)?]));
    let rcode = msg.get(3)? & 0x0f;
    let (questions, answers) = (word(4)?, word(6)?);
    let mut at = 12;
    let skip_name = |mut at: usize| -> Option<usize> {
        loop {
            let len = *msg.get(at)?;
            if len & 0xc0 == 0xc0 {
                return Some(at + 2);
            }
            at += 1 + len as usize;
            if len == 0 {
                return Some(at);
            }
        }
    };
    for _ in 0..questions {
        at = skip_name(at)? + 4;
    }
    for _ in 0..answers {
        at = skip_name(at)?;
        let (rtype, rdlen) = (word(at)?, word(at + 8)? as usize);
        let data = msg.get(at + 10..at + 10 + rdlen)?;
        at += 10 + rdlen;
        match (rtype == qtype, rdlen) {
            (true, 4) => {
                return Some((
                    rcode,
                    Some(std::net::IpAddr::from(<[u8; 4]>::try_from(data).ok()?)),
                ))
            }
            (true, 16) => {
                return Some((
                    rcode,
                    Some(std::net::IpAddr::from(<[u8; 16]>::try_from(data).ok()?)),
                ))
            }
            _ => {}
        }
    }
    Some((rcode, None))
}

/// Binds a TCP socket and reports the address it got, or the error (`bind_error=EACCES`).
fn bind_only(args: &[String]) -> Result<()> {
    use nix::sys::socket::{
        bind, getsockname, socket, AddressFamily, SockFlag, SockType, SockaddrStorage,
    };
    let addr = parse_addr(args.first().ok_or("bind needs an address")?)?;
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| e.to_string())?;
    match bind(fd.as_raw_fd(), &SockaddrStorage::from(addr)) {
        Ok(()) => {
            let local: SockaddrStorage = getsockname(fd.as_raw_fd()).map_err(|e| e.to_string())?;
            say(format!("bound={local}"));
        }
        Err(errno) => say(format!("bind_error={errno:?}")),
    }
    Ok(())
}

/// One HTTP/1.1 exchange: reads the request head, answers 200 naming both ends, closes.
fn answer_http(stream: TcpStream) {
    let (local, peer) = ends(&stream);
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
        if line == "\r\n" || line == "\n" {
            break;
        }
        line.clear();
    }
    let body = format!("served by {local} to {peer}\n");
    let _ = write!(
        writer,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

fn connect(args: &[String]) -> Result<()> {
    let dest = parse_addr(args.first().ok_or("connect needs a destination")?)?;
    let mut bind = None;
    let mut message = "hello".to_string();
    let (mut fastopen, mut mptcp) = (false, false);
    let mut rest = args[1..].iter();
    while let Some(flag) = rest.next() {
        match flag.as_str() {
            "--fastopen" => fastopen = true,
            "--mptcp" => mptcp = true,
            "--bind" | "--message" => {
                let value = rest.next().ok_or(format!("{flag} needs a value"))?;
                match flag.as_str() {
                    "--bind" => bind = Some(parse_addr(value)?),
                    _ => message = value.clone(),
                }
            }
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    let mut sent = false;
    let stream = match (bind, fastopen || mptcp) {
        (None, false) => TcpStream::connect_timeout(&dest, Duration::from_secs(5))
            .map_err(|e| format!("connect {dest}: {e}"))?,
        (Some(src), _) => connect_from(src, dest)?,
        (None, true) => {
            sent = fastopen;
            connect_special(dest, mptcp, fastopen.then(|| format!("{message}\n")))?
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    say_local(&stream)?;
    say(format!(
        "peer={}",
        stream.peer_addr().map_err(|e| e.to_string())?
    ));
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    if !sent {
        writeln!(writer, "{message}").map_err(|e| format!("send: {e}"))?;
    }
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .map_err(|e| format!("receive: {e}"))?;
    say(format!("reply={}", reply.trim_end()));
    Ok(())
}

/// An MPTCP socket and/or a TCP Fast Open connect, whose SYN carries `data`
/// (`sendto(MSG_FASTOPEN)`).
fn connect_special(dest: SocketAddr, mptcp: bool, data: Option<String>) -> Result<TcpStream> {
    use nix::sys::socket::{connect, sendto, MsgFlags, SockaddrStorage};
    let family = if dest.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let protocol = if mptcp { libc::IPPROTO_MPTCP } else { 0 };
    // SAFETY: plain socket(2); the result is checked before it is wrapped.
    let raw = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, protocol) };
    if raw < 0 {
        return Err(format!("socket: {}", io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a fresh descriptor nothing else owns.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    let addr = SockaddrStorage::from(dest);
    match data {
        Some(data) => {
            let flags = MsgFlags::from_bits_retain(libc::MSG_FASTOPEN);
            sendto(fd.as_raw_fd(), data.as_bytes(), &addr, flags)
                .map_err(|e| format!("sendto(MSG_FASTOPEN) {dest}: {e}"))?;
        }
        None => connect(fd.as_raw_fd(), &addr).map_err(|e| format!("connect {dest}: {e}"))?,
    }
    Ok(TcpStream::from(fd))
}

/// A connect from a fixed source address and port (SO_REUSEADDR, so tests can reuse it).
fn connect_from(src: SocketAddr, dest: SocketAddr) -> Result<TcpStream> {
    use nix::sys::socket::{
        bind, connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType,
        SockaddrStorage,
    };
    let family = if src.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| e.to_string())?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(|e| e.to_string())?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(src)).map_err(|e| format!("bind {src}: {e}"))?;
    connect(fd.as_raw_fd(), &SockaddrStorage::from(dest))
        .map_err(|e| format!("connect {dest}: {e}"))?;
    Ok(TcpStream::from(fd))
}

/// Accepts one connection and prints, for each getsockopt a proxy or a tool might make on
/// it, `probe NAME=ok:HEX` or `probe NAME=err:ERRNO`.
fn sockopts(args: &[String]) -> Result<()> {
    let usage = || "sockopts --listen ADDR [--hold] [--wait-for PATH]".to_string();
    let (mut listen, mut hold, mut wait_for) = (None, false, None);
    let mut rest = args.iter();
    while let Some(flag) = rest.next() {
        match flag.as_str() {
            "--listen" => listen = Some(parse_addr(rest.next().ok_or_else(usage)?)?),
            "--hold" => hold = true,
            "--wait-for" => wait_for = Some(rest.next().ok_or_else(usage)?.clone()),
            _ => return Err(usage()),
        }
    }
    let listen = listen.ok_or_else(usage)?;
    let listener = TcpListener::bind(listen).map_err(|e| format!("bind {listen}: {e}"))?;
    say(format!("listening={listen}"));
    let (stream, peer) = listener.accept().map_err(|e| e.to_string())?;
    say(format!("accepted peer={peer}"));
    // Ask later, when told to (a file appears): the connection is live all along.
    if let Some(path) = wait_for {
        while !std::path::Path::new(&path).exists() {
            thread::sleep(Duration::from_millis(10));
        }
    }
    let fd = stream.as_raw_fd();
    let v4 = listen.is_ipv4();
    let (own_level, other_level) = if v4 {
        (libc::SOL_IP, libc::SOL_IPV6)
    } else {
        (libc::SOL_IPV6, libc::SOL_IP)
    };
    let addr_len = if v4 {
        size_of::<libc::sockaddr_in>()
    } else {
        size_of::<libc::sockaddr_in6>()
    };
    let probes: [(&str, libc::c_int, libc::c_int, usize); 8] = [
        (
            "original_dst",
            own_level,
            meshbpf::SO_ORIGINAL_DST,
            addr_len,
        ),
        // A NULL buffer (len 0 asks getsockopt_raw for one): EFAULT behind iptables.
        (
            "original_dst_null_buffer",
            own_level,
            meshbpf::SO_ORIGINAL_DST,
            0,
        ),
        (
            "original_dst_short_buffer",
            own_level,
            meshbpf::SO_ORIGINAL_DST,
            8,
        ),
        (
            "original_dst_other_level",
            other_level,
            meshbpf::SO_ORIGINAL_DST,
            28,
        ),
        ("so_type", libc::SOL_SOCKET, libc::SO_TYPE, 4),
        ("tcp_nodelay", libc::IPPROTO_TCP, libc::TCP_NODELAY, 4),
        (
            "ip_tos_or_tclass",
            own_level,
            if v4 { libc::IP_TOS } else { libc::IPV6_TCLASS },
            4,
        ),
        // Larger than a page: the hook must let big option values through untouched.
        (
            "tcp_info_two_pages",
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            8192,
        ),
    ];
    for (name, level, optname, len) in probes {
        let result = match getsockopt_raw(fd, level, optname, len) {
            // TCP_INFO carries timings and counters: report its length only.
            Ok(bytes) if optname == libc::TCP_INFO => format!("ok:len{}", bytes.len()),
            Ok(bytes) => format!(
                "ok:{}",
                bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
            ),
            Err(errno) => format!("err:{errno}"),
        };
        say(format!("probe {name}={result}"));
    }
    say("probes done".into());
    if hold {
        loop {
            thread::park();
        }
    }
    Ok(())
}

fn getsockopt_raw(
    fd: libc::c_int,
    level: libc::c_int,
    optname: libc::c_int,
    len: usize,
) -> std::result::Result<Vec<u8>, i32> {
    // len 0: a NULL optval with the length of a sockaddr_in6, as a careless caller makes it.
    let (mut buf, mut optlen) = match len {
        0 => (
            Vec::new(),
            size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        ),
        _ => (vec![0u8; len], len as libc::socklen_t),
    };
    let ptr = if len == 0 {
        std::ptr::null_mut()
    } else {
        buf.as_mut_ptr().cast()
    };
    // SAFETY: `ptr` is NULL (the kernel must not write there and says EFAULT if it would) or
    // valid for writes of `optlen` bytes.
    let ret = unsafe { libc::getsockopt(fd, level, optname, ptr, &mut optlen) };
    if ret < 0 {
        return Err(io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    buf.truncate(optlen as usize);
    Ok(buf)
}

/// One socket, two connects (see the usage at the top): what the second one shows must not
/// depend on the first.
fn reuse(args: &[String]) -> Result<()> {
    use nix::sys::socket::{
        connect, getpeername, getsockname, sendto, socket, AddressFamily, MsgFlags, SockFlag,
        SockType, SockaddrStorage,
    };
    let [kind, first, second, rest @ ..] = args else {
        return Err("reuse tcp|udp-dns FIRST SECOND [--unspec]".into());
    };
    let (first, second) = (parse_addr(first)?, parse_addr(second)?);
    let unspec = rest.iter().any(|a| a == "--unspec");
    let family = if second.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let tcp = match kind.as_str() {
        "tcp" => true,
        "udp-dns" => false,
        other => return Err(format!("reuse: unknown kind {other}")),
    };
    let kind = if tcp {
        SockType::Stream
    } else {
        SockType::Datagram
    };
    let fd = socket(family, kind, SockFlag::SOCK_CLOEXEC, None).map_err(|e| e.to_string())?;
    let first_addr = SockaddrStorage::from(first);
    let outcome = if tcp {
        connect(fd.as_raw_fd(), &first_addr).map(|_| ())
    } else {
        let query = dns_query(0x4d43, "example.test", 1);
        sendto(fd.as_raw_fd(), &query, &first_addr, MsgFlags::empty()).map(|_| ())
    };
    say(match outcome {
        Ok(()) => "first=ok".into(),
        Err(errno) => format!("first=err:{errno:?}"),
    });
    if unspec {
        // connect(2) with AF_UNSPEC dissolves the association (TCP: disconnect).
        let addr = libc::sockaddr {
            sa_family: libc::AF_UNSPEC as libc::sa_family_t,
            sa_data: [0; 14],
        };
        // SAFETY: `addr` is a valid sockaddr of the length passed.
        let ret = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                &addr,
                size_of::<libc::sockaddr>() as libc::socklen_t,
            )
        };
        if ret < 0 {
            return Err(format!(
                "connect(AF_UNSPEC): {}",
                io::Error::last_os_error()
            ));
        }
    }
    connect(fd.as_raw_fd(), &SockaddrStorage::from(second))
        .map_err(|e| format!("connect {second}: {e}"))?;
    let local: SockaddrStorage = getsockname(fd.as_raw_fd()).map_err(|e| e.to_string())?;
    let peer: SockaddrStorage = getpeername(fd.as_raw_fd()).map_err(|e| e.to_string())?;
    say(format!(
        "local={}",
        kernel_local(fd.as_raw_fd()).unwrap_or(local.to_string())
    ));
    say(format!("sockname={local}"));
    say(format!("peer={peer}"));
    if tcp {
        // A server that answers lines answers this one; one that does not (a getsockopt
        // prober) leaves `reply_error=`.
        let stream = TcpStream::from(fd);
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?;
        let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
        writeln!(writer, "hello").map_err(|e| format!("send: {e}"))?;
        let mut reply = String::new();
        match BufReader::new(stream).read_line(&mut reply) {
            Ok(_) => say(format!("reply={}", reply.trim_end())),
            Err(err) => say(format!("reply_error={err}")),
        }
    }
    Ok(())
}

/// One TCP socket, two binds: the first may fail (a port in use), the second holds; then it
/// listens until killed.
fn rebind(args: &[String]) -> Result<()> {
    use nix::sys::socket::{
        bind, getsockname, listen, socket, AddressFamily, Backlog, SockFlag, SockType,
        SockaddrStorage,
    };
    let [first, second] = args else {
        return Err("rebind FIRST SECOND".into());
    };
    let (first, second) = (parse_addr(first)?, parse_addr(second)?);
    let family = if second.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| e.to_string())?;
    say(match bind(fd.as_raw_fd(), &SockaddrStorage::from(first)) {
        Ok(()) => "first=ok".into(),
        Err(errno) => format!("first=err:{errno:?}"),
    });
    bind(fd.as_raw_fd(), &SockaddrStorage::from(second))
        .map_err(|e| format!("bind {second}: {e}"))?;
    listen(&fd, Backlog::new(16).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    let local: SockaddrStorage = getsockname(fd.as_raw_fd()).map_err(|e| e.to_string())?;
    say(format!("bound={local}"));
    loop {
        thread::park();
    }
}

/// Prints `local=` (the kernel's socket table) and `sockname=` (getsockname()).
fn say_local(stream: &TcpStream) -> Result<()> {
    let sockname = stream.local_addr().map_err(|e| e.to_string())?;
    let local = kernel_local(stream.as_raw_fd()).unwrap_or(sockname.to_string());
    say(format!("local={local}"));
    say(format!("sockname={sockname}"));
    Ok(())
}

/// The local address of the TCP socket `fd` as the kernel's socket table lists it (by the
/// socket's inode in /proc/net/tcp and tcp6), whatever getsockname() says.
fn kernel_local(fd: std::os::fd::RawFd) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(format!("/proc/self/fd/{fd}")).ok()?.ino();
    for (table, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        let text = std::fs::read_to_string(table).ok()?;
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.get(9).and_then(|i| i.parse::<u64>().ok()) != Some(ino) {
                continue;
            }
            let (addr, port) = fields.get(1)?.split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            // Each 32-bit word is in host order.
            let words: Vec<u32> = (0..addr.len() / 8)
                .map(|i| u32::from_str_radix(&addr[8 * i..8 * i + 8], 16).unwrap_or(0))
                .collect();
            let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
            let ip = if v6 {
                std::net::IpAddr::from(<[u8; 16]>::try_from(bytes.as_slice()).ok()?)
            } else {
                std::net::IpAddr::from(<[u8; 4]>::try_from(bytes.as_slice()).ok()?)
            };
            return Some(SocketAddr::new(ip, port).to_string());
        }
    }
    None
}

/// What Istio's `istio-validation` init container checks (istio/istio
/// tools/istio-iptables/pkg/validation/validator.go): listening on 127.0.0.1:15001 and
/// 127.0.0.1:15006 ([::1] with --v6), a connection from 127.0.0.1:0 to 127.0.0.6:15002
/// ([::6]) must land there with SO_ORIGINAL_DST port 15002; it gives up after 5 s.
fn validate(args: &[String]) -> Result<()> {
    let v6 = args.iter().any(|a| a == "--v6");
    let (lo, target) = if v6 {
        ("[::1]", "[::6]:15002")
    } else {
        ("127.0.0.1", "127.0.0.6:15002")
    };
    let listeners: Vec<TcpListener> = [15001, 15006]
        .iter()
        .filter_map(|port| TcpListener::bind(format!("{lo}:{port}")).ok())
        .collect();
    if listeners.is_empty() {
        return Err("no listener available".into());
    }
    let (found, seen) = std::sync::mpsc::channel::<u16>();
    for listener in listeners {
        let found = found.clone();
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                if let Ok(dst) = meshbpf::original_dst(&stream) {
                    let _ = found.send(dst.port());
                }
            }
        });
    }
    let target = parse_addr(target)?;
    thread::spawn(move || loop {
        let src = parse_addr(&format!("{lo}:0")).unwrap_or(target);
        if let Ok(stream) = connect_from(src, target) {
            drop(stream);
        }
        thread::sleep(Duration::from_secs(1));
    });
    match seen.recv_timeout(Duration::from_secs(5)) {
        Ok(15002) => say("validation=ok".into()),
        Ok(port) => say(format!("validation=failed original_port={port}")),
        Err(_) => say("validation=failed timeout".into()),
    }
    Ok(())
}

/// A listener that never called bind(): listen() binds it to 0.0.0.0 and a port of the
/// kernel's choosing. Answers as `serve`.
fn autolisten() -> Result<()> {
    use nix::sys::socket::{
        getsockname, listen, socket, AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage,
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| e.to_string())?;
    listen(&fd, Backlog::new(16).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    let local: SockaddrStorage = getsockname(fd.as_raw_fd()).map_err(|e| e.to_string())?;
    say(format!("listening={local}"));
    for stream in TcpListener::from(fd).incoming().flatten() {
        thread::spawn(move || answer(stream));
    }
    Ok(())
}

/// One DNS query to `addr` with sendto() on an unconnected socket; no answer awaited.
fn sendto_once(addr: &str) -> Result<()> {
    let addr = parse_addr(addr)?;
    let any = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let socket = std::net::UdpSocket::bind(any).map_err(|e| e.to_string())?;
    socket
        .send_to(&dns_query(0x4d44, "example.test", 1), addr)
        .map_err(|e| format!("sendto {addr}: {e}"))?;
    say("sent=1".into());
    Ok(())
}
