//! A transparent sidecar stand-in: what Envoy's outbound listener does, in
//! miniature. It accepts on the outbound port (127.0.0.1 and ::1), asks the
//! accepted socket for its original destination with the same
//! `getsockopt(SO_ORIGINAL_DST)` that works behind iptables REDIRECT, connects
//! there, and relays bytes both ways. Run it as the proxy uid (1337) so its own
//! upstream connections are not captured.
//!
//! Every event is one line on stdout, for people and tests:
//! `outbound peer=127.0.0.1:40312 original_dst=192.0.2.2:8080 upstream=connected`.
//!
//! Usage: `sidecar [--outbound-port 15001]`

use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::thread;

fn main() {
    let mut outbound_port: u16 = meshbpf::DEFAULT_OUTBOUND_PORT;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--outbound-port", Some(port)) => match port.parse() {
                Ok(port) => outbound_port = port,
                Err(_) => fail(&format!("bad port {port}")),
            },
            _ => fail("usage: sidecar [--outbound-port PORT]"),
        }
    }

    let mut listeners = Vec::new();
    for ip in ["127.0.0.1", "::1"] {
        let addr = SocketAddr::new(ip.parse().expect("literal address"), outbound_port);
        match TcpListener::bind(addr) {
            Ok(listener) => listeners.push(listener),
            Err(err) if ip == "::1" => eprintln!("sidecar: no IPv6 listener ({err})"),
            Err(err) => fail(&format!("cannot listen on {addr}: {err}")),
        }
    }
    for listener in &listeners {
        say(format!(
            "listening outbound={}",
            listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default()
        ));
    }
    thread::scope(|scope| {
        for listener in &listeners {
            scope.spawn(move || {
                for conn in listener.incoming() {
                    match conn {
                        Ok(stream) => {
                            thread::spawn(move || relay(stream));
                        }
                        Err(err) => eprintln!("sidecar: accept: {err}"),
                    }
                }
            });
        }
    });
}

fn relay(client: TcpStream) {
    let peer = client
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    let original = match meshbpf::original_dst(&client) {
        Ok(addr) => addr,
        Err(err) => {
            say(format!(
                "outbound peer={peer} original_dst=none error={err}"
            ));
            return;
        }
    };
    let upstream = match TcpStream::connect(original) {
        Ok(upstream) => upstream,
        Err(err) => {
            say(format!(
                "outbound peer={peer} original_dst={original} upstream=failed error={err}"
            ));
            return;
        }
    };
    say(format!(
        "outbound peer={peer} original_dst={original} upstream=connected"
    ));
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

fn fail(msg: &str) -> ! {
    eprintln!("sidecar: {msg}");
    std::process::exit(2);
}
