//! A transparent sidecar stand-in: what Envoy's listeners do, in miniature.
//!
//! - Outbound: it accepts on the outbound port (127.0.0.1 and ::1), asks the
//!   accepted socket for its original destination with the same
//!   `getsockopt(SO_ORIGINAL_DST)` that works behind iptables REDIRECT,
//!   connects there, and relays bytes both ways.
//! - Inbound: for each `--inbound PORT` it listens on the pod's own addresses
//!   (`--pod-ip`) and forwards to the application, which meshbpf moved to
//!   loopback.
//!
//! Run it as the proxy uid (1337): its own connections are then never
//! captured, and meshbpf lets it bind privileged inbound ports.
//!
//! Every event is one line on stdout, for people and tests:
//! `outbound peer=127.0.0.1:40312 original_dst=192.0.2.2:8080 upstream=connected`
//! `inbound peer=192.0.2.11:51234 listener=192.0.2.10:80 upstream=127.0.0.1:80`
//!
//! Usage: `sidecar [--outbound-port 15001] [--pod-ip IP]... [--inbound PORT]...`

use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::thread;

fn main() {
    let mut outbound_port: u16 = meshbpf::DEFAULT_OUTBOUND_PORT;
    let mut pod_ips: Vec<IpAddr> = Vec::new();
    let mut inbound: Vec<u16> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().unwrap_or_else(|| usage());
        match arg.as_str() {
            "--outbound-port" => outbound_port = value.parse().unwrap_or_else(|_| usage()),
            "--pod-ip" => pod_ips.push(value.parse().unwrap_or_else(|_| usage())),
            "--inbound" => inbound.push(value.parse().unwrap_or_else(|_| usage())),
            _ => usage(),
        }
    }

    let mut listeners: Vec<(TcpListener, Direction)> = Vec::new();
    for ip in [
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ] {
        match TcpListener::bind((ip, outbound_port)) {
            Ok(listener) => listeners.push((listener, Direction::Outbound)),
            Err(err) if ip.is_ipv6() => eprintln!("sidecar: no IPv6 outbound listener ({err})"),
            Err(err) => fail(&format!("cannot listen on {ip}:{outbound_port}: {err}")),
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
    thread::scope(|scope| {
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

#[derive(Clone, Copy)]
enum Direction {
    Outbound,
    Inbound(u16),
}

impl Direction {
    fn name(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound(_) => "inbound",
        }
    }

    fn serve(self, client: TcpStream) {
        let peer = client
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        match self {
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
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let _ = io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
}

fn say(line: String) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn usage() -> ! {
    fail("usage: sidecar [--outbound-port PORT] [--pod-ip IP]... [--inbound PORT]...")
}

fn fail(msg: &str) -> ! {
    eprintln!("sidecar: {msg}");
    std::process::exit(2);
}
