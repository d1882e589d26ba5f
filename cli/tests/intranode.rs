//! Intra-node acceleration (`register --intra-node`): a connection between the sidecars of
//! two registered pods of the node goes socket to socket, both ways, and loses, reorders or
//! stalls nothing, whatever the applications behind the sidecars do; application sockets,
//! unregistered pods and pods that did not opt in are never touched; it is off by default.
//! Every transfer is checked byte for byte (length and pattern) by `test-support/src/bin/stream.rs`.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use meshbpf::{AttachOptions, InboundMode, Mesh, PodSettings};

/// The stream server's port in the server pod.
const PORT: u16 = 9000;

/// Opted in, bind model: the sidecar stand-in owns pod_ip:9000 (it has no redirect-mode
/// inbound listener; HAProxy takes that role below).
fn opted_in() -> PodSettings {
    PodSettings {
        intra_node: true,
        inbound_mode: InboundMode::Bind,
        ..PodSettings::default()
    }
}

/// A client pod and a server pod, each with its sidecar stand-in; the server pod's
/// application is the stream server on 0.0.0.0:9000 (moved to loopback, behind its sidecar).
struct World {
    env: Env,
    mesh: Mesh,
    client: Pod,
    server: Pod,
    client_sidecar: Proc,
    server_sidecar: Proc,
    app: Proc,
}

fn world_with(options: &AttachOptions, client: &PodSettings, server: &PodSettings) -> World {
    let mut env = Env::new();
    let mesh = Mesh::attach_with(&env.cgroup, &env.pin_dir, options).unwrap();
    let client_pod = env.pod("client");
    let server_pod = env.pod("server");
    mesh.register_netns(&client_pod.netns, client).unwrap();
    mesh.register_netns(&server_pod.netns, server).unwrap();
    let (app, _) = server_pod.stream_server();
    let server_sidecar = inbound_sidecar(&server_pod);
    let client_sidecar = client_pod.sidecar();
    World {
        env,
        mesh,
        client_sidecar,
        server_sidecar,
        app,
        client: client_pod,
        server: server_pod,
    }
}

fn world() -> World {
    world_with(&AttachOptions::default(), &opted_in(), &opted_in())
}

/// The sidecar stand-in of a bind-model pod, owning both its addresses on [`PORT`].
fn inbound_sidecar(pod: &Pod) -> Proc {
    let (v4, v6) = (pod.v4.to_string(), pod.v6.to_string());
    let port = PORT.to_string();
    let proc = pod.spawn(
        PROXY_UID,
        &example("sidecar"),
        &["--pod-ip", &v4, "--pod-ip", &v6, "--inbound", &port],
    );
    proc.wait_for(&format!("listening inbound=[{v6}]:{PORT}"));
    proc
}

/// `stream run` as the application of `pod` to `dest`; returns (success, output).
fn stream_from(pod: &Pod, dest: &str, args: &[&str]) -> (bool, String) {
    let mut all = vec!["run", dest];
    all.extend_from_slice(args);
    let out = pod.run_for(
        std::time::Duration::from_secs(300),
        APP_UID,
        &helper("stream"),
        &all,
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

impl World {
    fn dest(&self, v6: bool) -> String {
        self.server.addr(v6, PORT)
    }

    /// A byte-exact run from the client pod's application that must succeed.
    fn stream(&self, v6: bool, args: &[&str]) -> String {
        let (ok, text) = stream_from(&self.client, &self.dest(v6), args);
        assert!(
            ok,
            "stream {args:?} failed:\n{text}\nserver sidecar:\n{}\nserver:\n{}",
            self.server_sidecar.output(),
            self.app.output()
        );
        text
    }

    fn counter(&self, name: &str) -> u64 {
        counter(&self.mesh, name)
    }
}

/// The large transfers' size: 64 MiB, 1 MiB in the emulated guests ([`scaled_size`]).
fn big() -> u64 {
    scaled_size(64 << 20, 1 << 20)
}

/// (bytes redirected, senders sent back to TCP by flow control) now, for [`carried`].
fn fast_path(mesh: &Mesh) -> (u64, u64) {
    (
        counter(mesh, "intra_node_bytes_redirected"),
        counter(mesh, "sockmap_receiver_behind"),
    )
}

/// Whether, since `before`, the fast path carried `expected` bytes, or flow control sent
/// senders back to TCP, each after its receiver fell behind by the pod's tcp_rmem maximum
/// (sockmap.bpf.c's receiver_behind: 6-32 MiB by default; a stand-in relaying to its
/// application can fall that far behind on a busy machine).
fn carried(mesh: &Mesh, before: (u64, u64), expected: u64) -> bool {
    let (moved, behind) = fast_path(mesh);
    let (moved, behind) = (moved - before.0, behind - before.1);
    moved >= expected || (behind > 0 && moved >= behind << 20)
}

/// Sets a sysctl in the pod's own network namespace.
fn sysctl(pod: &Pod, key: &str, value: &str) {
    stdout_of(&pod.run(
        0,
        Path::new("/sbin/sysctl"),
        &["-qw", &format!("{key}={value}")],
    ));
}

#[test]
fn sidecar_to_sidecar_streams_are_byte_exact_both_ways_with_every_method() {
    if !privileged() {
        return;
    }
    let w = world();
    let connections = every_stream_case(&w.app, |args| w.stream(false, args));
    // Both sidecars' ends of every connection entered, and the bytes crossed socket to
    // socket.
    assert_eq!(w.counter("intra_node_add_failed"), 0);
    assert_eq!(w.counter("intra_node_added"), 2 * connections);
    assert!(w.counter("intra_node_bytes_redirected") > 100_000_000);
    eprintln!(
        "{connections} connections: {} messages redirected, {} first messages without a peer",
        w.counter("intra_node_msg_redirected"),
        w.counter("intra_node_no_peer")
    );
}

/// What `stream --op stall` reports from the client pod's application: the bytes it wrote,
/// without blocking, before the path was full, while the server pod's application read
/// nothing; every TCP socket of both pods has its buffers pinned ([`pin_tcp_buffers`]), and
/// the client's sidecar starts relaying late ([`RELAY_LATE`]).
fn queued_while_stalled(w: &World) -> u64 {
    pin_tcp_buffers(&w.client);
    pin_tcp_buffers(&w.server);
    let args = stall_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = with_paused(&w.client_sidecar, RELAY_LATE, || w.stream(false, &args));
    stalled_queue(&out)
}

/// A sidecar that stops reading (its application stalls) holds the other pod's sidecar,
/// and so the application behind it, back as TCP across the bridge does. Redirected bytes
/// wait in the receiving sidecar's sockmap queue, which the kernel does not bound by a
/// receive buffer: left alone, the sending sidecar's writes all succeed (256 MiB here),
/// taking the node's TCP memory, until they fail with ENOMEM. With flow control the queue
/// stays within what TCP would let the receiving socket hold (its receive buffer) plus the
/// one message being redirected when the check fired, and every byte arrives in order.
///
/// The bound is computed, not compared with a plain-TCP run's figure: that figure depends
/// on autotuning and timing (measured 1.1-24 MB on this machine under load before the
/// buffers were pinned and the measurement waited for a full path).
#[test]
fn a_sidecar_that_stops_reading_holds_its_peer_back_as_tcp_does() {
    if !privileged() {
        return;
    }
    let not_opted_in = PodSettings {
        intra_node: false,
        ..opted_in()
    };
    let plain = queued_while_stalled(&world_with(
        &AttachOptions::default(),
        &not_opted_in,
        &not_opted_in,
    ));
    let w = world();
    let fast = queued_while_stalled(&w);
    // Application -> client sidecar -> server sidecar -> application: three connections.
    let tcp_holds = tcp_chain_holds(3);
    eprintln!(
        "queued while the server read nothing: {fast} B intra-node, {plain} B without; \
         TCP's pinned buffers hold at most {tcp_holds} B"
    );
    assert!(
        plain <= tcp_holds,
        "without intra-node acceleration the client queued {plain} B, more than the path's \
         pinned TCP buffers hold ({tcp_holds} B): tcp_chain_holds is wrong"
    );
    assert!(w.counter("intra_node_msg_redirected") > 0);
    assert!(
        fast <= tcp_holds + PACKET,
        "intra-node, the client queued {fast} B toward a server that read nothing, more \
         than TCP's pinned buffers hold ({tcp_holds} B) plus one message: no flow control \
         ({plain} B without intra-node)"
    );
    assert_eq!(w.counter("sockmap_receiver_behind"), 1);
}

#[test]
fn sixty_four_mib_each_way_in_parallel_is_byte_exact_and_accelerated_both_ways() {
    if !privileged() {
        return;
    }
    let w = world();
    let size = big().to_string();
    for v6 in [false, true] {
        // Upload: the client's sidecar sends; download: the server's sidecar sends.
        for (op, flag, method, sender) in [
            ("upload", "--send", "write", "client"),
            ("download", "--recv", "read", "server"),
            ("halfclose", "--recv", "epoll", "both"),
        ] {
            let before = fast_path(&w.mesh);
            let out = w.stream(
                v6,
                &["--op", op, "--size", &size, flag, method, "--parallel", "4"],
            );
            assert_eq!(
                out.lines().filter(|l| l.starts_with("ok ")).count(),
                4,
                "{out}"
            );
            let each_way = if sender == "both" { 2 } else { 1 };
            assert!(
                carried(&w.mesh, before, each_way * 4 * big()),
                "v6 {v6} {op}: {:?} bytes redirected, senders behind since {before:?} \
                 (the {sender}'s sidecar sends)",
                fast_path(&w.mesh)
            );
        }
    }
    // Nothing left in sock_hash once the connections are closed.
    wait_until(
        || w.mesh.accelerated_sockets() == 0,
        || format!("{} sockets in sock_hash", w.mesh.accelerated_sockets()),
    );
}

#[test]
fn one_byte_to_sixty_four_mib_in_parallel_connections_is_byte_exact() {
    if !privileged() {
        return;
    }
    let w = world();
    // Every size at once, each in 4 parallel connections, both directions.
    let dest = w.dest(false);
    let sizes = [1, 7, 65536, 1000000, big() / 4, big()].map(|n: u64| n.to_string());
    std::thread::scope(|s| {
        let runs: Vec<_> = sizes
            .iter()
            .flat_map(|size| {
                [
                    ("upload", "--send", "writev"),
                    ("download", "--recv", "read"),
                ]
                .map(|(op, flag, method)| {
                    let args = ["--op", op, "--size", size, flag, method, "--parallel", "4"];
                    let (client, dest) = (&w.client, &dest);
                    s.spawn(move || (op, size, stream_from(client, dest, &args)))
                })
            })
            .collect();
        for run in runs {
            let (op, size, (ok, out)) = run.join().unwrap();
            assert!(ok, "{op} {size}: {out}");
            assert_eq!(
                out.lines().filter(|l| l.starts_with("ok ")).count(),
                4,
                "{out}"
            );
        }
    });
    assert_eq!(w.counter("intra_node_add_failed"), 0);
    assert!(carried(&w.mesh, (0, 0), 2 * 4 * big()));
}

#[test]
fn two_pods_using_the_same_source_port_to_the_same_peer_each_get_their_own_bytes() {
    if !privileged() {
        return;
    }
    let mut w = world();
    let second = w.env.pod("second");
    w.mesh.register_netns(&second.netns, &opted_in()).unwrap();
    let _second_sidecar = second.sidecar();
    // Two ephemeral ports in each client pod, and two connections from each: both pods'
    // sidecars connect to the server's address from port 40000 (and 40001) at once.
    for pod in [&w.client, &second] {
        sysctl(pod, "net.ipv4.ip_local_port_range", "40000 40001");
    }
    let dest = w.dest(false);
    let size = big().to_string();
    std::thread::scope(|s| {
        let runs: Vec<_> = [&w.client, &second]
            .into_iter()
            .flat_map(|pod| {
                [("download", "--recv"), ("upload", "--send")].map(|(op, flag)| {
                    let (dest, size) = (&dest, &size);
                    s.spawn(move || {
                        let args = ["--op", op, "--size", size, flag, "epoll"];
                        (&pod.name, op, stream_from(pod, dest, &args))
                    })
                })
            })
            .collect();
        for run in runs {
            let (pod, op, (ok, out)) = run.join().unwrap();
            assert!(ok && out.starts_with("ok "), "{pod} {op}: {out}");
        }
    });
    let from_40000 = w
        .server_sidecar
        .lines("inbound ")
        .into_iter()
        .filter(|l| l.contains(":40000 "))
        .count();
    assert_eq!(from_40000, 2, "{}", w.server_sidecar.output());
    assert_eq!(w.counter("intra_node_add_failed"), 0);
    assert!(carried(&w.mesh, (0, 0), 4 * big()));
}

#[test]
fn an_unregistered_pod_and_a_pod_that_did_not_opt_in_are_untouched() {
    if !privileged() {
        return;
    }
    let mut w = world();
    // Servers in a pod nobody registered, and in a registered pod without --intra-node,
    // each behind its sidecar (the latter) or on its own (the former).
    let plain = w.env.pod("plain");
    let (_plain_app, plain_dest) = plain.stream_server();
    let other = w.env.pod("other");
    w.mesh
        .register_netns(
            &other.netns,
            &PodSettings {
                inbound_mode: InboundMode::Bind,
                ..PodSettings::default()
            },
        )
        .unwrap();
    let (_other_app, _) = other.stream_server();
    let _other_sidecar = inbound_sidecar(&other);
    let other_dest = other.addr(false, PORT);
    for dest in [&plain_dest, &other_dest] {
        for (op, flag, method) in [
            ("upload", "--send", "sendfile"),
            ("download", "--recv", "splice"),
            ("halfclose", "--recv", "splice"),
        ] {
            let (ok, out) = stream_from(
                &w.client,
                dest,
                &["--op", op, "--size", "1000000", flag, method],
            );
            assert!(ok, "{dest} {op}: {out}");
        }
    }
    // And the other way: clients in those pods to the opted-in server pod.
    let server_dest = w.dest(false);
    for pod in [&plain, &other] {
        let (ok, out) = stream_from(
            pod,
            &server_dest,
            &["--op", "download", "--size", "1000000", "--recv", "splice"],
        );
        assert!(ok, "{}: {out}", pod.name);
    }
    assert_eq!(w.counter("intra_node_added"), 0);
    assert_eq!(w.counter("intra_node_msg_redirected"), 0);
    assert_eq!(w.mesh.accelerated_sockets(), 0);
}

#[test]
fn an_application_socket_never_receives_redirected_bytes() {
    if !privileged() {
        return;
    }
    // The client pod's application connects to the server pod directly (its port is
    // excluded from outbound capture): the server's sidecar end qualifies, the
    // application's end does not, and so nothing is redirected in either direction.
    let client = PodSettings {
        exclude_outbound_ports: [PORT].into(),
        ..opted_in()
    };
    let w = world_with(&AttachOptions::default(), &client, &opted_in());
    for (op, flag, method) in [
        ("download", "--recv", "splice"),
        ("download", "--recv", "read"),
        ("halfclose", "--recv", "splice"),
        ("upload", "--send", "splice"),
    ] {
        let out = w.stream(false, &["--op", op, "--size", "4000000", flag, method]);
        assert!(out.starts_with("ok "), "{out}");
    }
    // Reached directly: the server's sidecar saw the application's own address.
    assert!(
        w.server_sidecar
            .output()
            .contains(&format!("inbound peer={}:", w.client.v4)),
        "{}",
        w.server_sidecar.output()
    );
    assert_eq!(w.counter("intra_node_added"), 4);
    assert_eq!(w.counter("intra_node_no_peer"), 4);
    assert_eq!(w.counter("intra_node_msg_redirected"), 0);
}

#[test]
fn an_unregistered_peer_is_no_longer_accelerated_and_registering_again_resumes_it() {
    if !privileged() {
        return;
    }
    let w = world();
    let upload = || w.stream(false, &["--op", "upload", "--size", "1000000"]);
    upload();
    assert_eq!(w.counter("intra_node_added"), 2);
    // Unregistered, the server pod's address is no pod's any more: its sidecar still
    // serves, the normal stack carries it.
    assert!(w.mesh.unregister_netns(&w.server.netns).unwrap());
    upload();
    assert_eq!(w.counter("intra_node_added"), 2);
    let listed = stdout_of(&w.env.meshbpf(&["list", "--json"]));
    assert!(listed.contains("\"intra_node\":true"), "{listed}");
    // Registered again (its earlier binds stay where they were moved).
    w.mesh.register_netns(&w.server.netns, &opted_in()).unwrap();
    upload();
    assert_eq!(w.counter("intra_node_added"), 4);
    // gc keeps both pods' addresses: their namespaces live.
    assert!(w.mesh.gc().unwrap().is_empty());
    upload();
    assert_eq!(w.counter("intra_node_added"), 6);
}

#[test]
fn without_the_opt_in_or_with_sockmap_off_nothing_is_accelerated() {
    if !privileged() {
        return;
    }
    let bind = PodSettings {
        inbound_mode: InboundMode::Bind,
        ..PodSettings::default()
    };
    assert!(!PodSettings::default().intra_node);
    let no_sockmap = AttachOptions::with_sockmap(false);
    for (options, client, server) in [
        // Off by default.
        (AttachOptions::default(), &bind, &bind),
        // Both ends must opt in.
        (AttachOptions::default(), &opted_in(), &bind),
        (AttachOptions::default(), &bind, &opted_in()),
        // attach --no-sockmap: the node's switch.
        (no_sockmap, &opted_in(), &opted_in()),
    ] {
        let w = world_with(&options, client, server);
        w.stream(false, &["--op", "upload", "--size", "1000000"]);
        w.stream(
            false,
            &["--op", "download", "--size", "1000000", "--recv", "splice"],
        );
        assert_eq!(w.counter("intra_node_added"), 0);
        assert_eq!(w.counter("intra_node_msg_redirected"), 0);
        let listed: serde_json::Value =
            serde_json::from_str(&stdout_of(&w.env.meshbpf(&["list", "--json"]))).unwrap();
        let flags: Vec<bool> = listed
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["intra_node"].as_bool().unwrap())
            .collect();
        assert_eq!(
            flags.iter().filter(|f| **f).count(),
            [client, server].iter().filter(|s| s.intra_node).count()
        );
    }
}

#[test]
fn detach_and_agent_restart_mid_transfer_lose_nothing() {
    if !privileged() {
        return;
    }
    let World {
        env,
        mesh,
        client,
        server,
        client_sidecar: _client_sidecar,
        server_sidecar: _server_sidecar,
        app: _app,
    } = world();
    let dest = server.addr(false, PORT);
    // 256 MiB (16 MiB in the emulated guests), acted on once an eighth of it was redirected.
    let total = scaled_size(256 << 20, 16 << 20);
    let size = total.to_string();
    let cgroup = env.cgroup.to_str().unwrap().to_string();
    // Read through the pins only: a map handle held open here would keep sock_hash alive
    // after detach, and detach would not have to drain anything.
    let redirected = || {
        let mesh = Mesh::open(&env.pin_dir).unwrap();
        counter(&mesh, "intra_node_bytes_redirected")
    };
    drop(mesh);
    for step in ["restart", "detach"] {
        std::thread::scope(|s| {
            let runs: Vec<_> = [
                ("upload", "--send", "write"),
                ("download", "--recv", "read"),
            ]
            .map(|(op, flag, method)| {
                let (client, dest, size) = (&client, &dest, &size);
                s.spawn(move || {
                    let args = ["--op", op, "--size", size, flag, method, "--parallel", "2"];
                    stream_from(client, dest, &args)
                })
            })
            .into();
            // Mid-transfer: bytes are crossing socket to socket.
            let before = redirected();
            wait_until(
                || redirected() > before + total / 8,
                || "nothing accelerated yet".into(),
            );
            match step {
                // The node agent restarting runs attach again: programs replaced in place.
                "restart" => stdout_of(&env.meshbpf(&["attach", "--cgroup", &cgroup])),
                _ => stdout_of(&env.meshbpf(&["detach"])),
            };
            for run in runs {
                let (ok, out) = run.join().unwrap();
                assert!(ok, "after {step}: {out}");
                assert_eq!(
                    out.lines().filter(|l| l.starts_with("ok ")).count(),
                    2,
                    "after {step}: {out}"
                );
            }
        });
    }
    // Connections made after detach take the normal path: not captured at all.
    let (ok, out) = stream_from(&client, &dest, &["--op", "upload", "--size", "1000"]);
    assert!(ok, "{out}");
}

#[test]
fn detach_while_a_slow_reader_s_sidecar_holds_redirected_bytes_loses_none_of_them() {
    if !privileged() {
        return;
    }
    let World {
        env,
        mesh,
        client,
        server,
        client_sidecar: _client_sidecar,
        server_sidecar: _server_sidecar,
        app: _app,
    } = world();
    let sock_hash =
        libbpf_rs::MapHandle::from_pinned_path(env.pin_dir.join("maps/sock_hash")).unwrap();
    let id = {
        use libbpf_rs::MapCore;
        sock_hash.info().unwrap().info.id.to_string()
    };
    drop((mesh, sock_hash));
    let loaded = || {
        Command::new("bpftool")
            .args(["map", "show", "id", &id])
            .output()
            .unwrap()
            .status
            .success()
    };
    let dest = server.addr(false, PORT);
    let redirected = || {
        counter(
            &Mesh::open(&env.pin_dir).unwrap(),
            "intra_node_bytes_redirected",
        )
    };
    // The application reads seven bytes at a time: its sidecar's upstream socket holds much
    // of what the server's sidecar redirected to it (no window holds the sender back), and
    // reads it only as the application makes room.
    // 24 MB, 6 MB in the emulated guests: seven-byte reads of it still outlast the detach.
    let size = scaled_size(24_000_000, 6_000_000);
    std::thread::scope(|s| {
        let run = s.spawn(|| {
            let size = size.to_string();
            let args = ["--op", "download", "--size", &size, "--recv", "small"];
            stream_from(&client, &dest, &args)
        });
        wait_until(
            || redirected() >= size,
            || "the download was not accelerated".into(),
        );
        stdout_of(&env.meshbpf(&["detach"]));
        // Unpinned, sock_hash lives on with the queue in it while its sockets do.
        assert!(loaded(), "sock_hash went with bytes queued in it");
        let (ok, out) = run.join().unwrap();
        assert!(ok, "{out}");
    });
    // ... and goes with the last of them.
    wait_until(
        || !loaded(),
        || format!("sock_hash (id {id}) outlived its sockets"),
    );
}

/// Both pods' sidecar is HAProxy (Debian's, unmodified): outbound on 127.0.0.1:15001 to
/// the original destination, inbound on 15006 (Istio's redirect mode) through to the
/// application from 127.0.0.6, as Envoy's virtualInbound does.
const HAPROXY: &str = "global
    maxconn 512
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend outbound
    bind 127.0.0.1:15001
    default_backend original_dst
frontend inbound
    bind 0.0.0.0:15006
    default_backend passthrough
backend original_dst
    server original_dst 0.0.0.0:0
backend passthrough
    server original 0.0.0.0:0 source 127.0.0.6
";

fn haproxy(env: &Env, pod: &Pod) -> Proc {
    let cfg = write_file(env, "intranode-haproxy.cfg", HAPROXY);
    let proc = pod.spawn(
        PROXY_UID,
        Path::new("/usr/sbin/haproxy"),
        &["-db", "-f", cfg.to_str().unwrap()],
    );
    wait_until(
        || {
            let out = sh(Command::new("ip").args(["netns", "exec", &pod.name, "ss", "-Hltn"]));
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.contains(":15001 ") && text.contains(":15006 ")
        },
        || format!("haproxy did not listen: {}", proc.output()),
    );
    proc
}

#[test]
fn haproxy_sidecars_in_redirect_mode_are_accelerated_byte_exact() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    let mesh = env.attach();
    let (client, server) = (env.pod("client"), env.pod("server"));
    let settings = PodSettings {
        intra_node: true,
        ..PodSettings::default()
    };
    assert_eq!(settings.inbound_mode, InboundMode::Redirect);
    for pod in [&client, &server] {
        mesh.register_netns(&pod.netns, &settings).unwrap();
    }
    let (app, dest) = server.stream_server();
    let _sidecars = [haproxy(&env, &client), haproxy(&env, &server)];
    let size = big().to_string();
    for (op, flag, method, parallel) in [
        ("upload", "--send", "sendfile", "4"),
        ("download", "--recv", "splice", "4"),
        ("halfclose", "--recv", "read", "4"),
        ("upload", "--send", "write", "1"),
        ("download", "--recv", "epoll", "1"),
    ] {
        let before = fast_path(&mesh);
        let (ok, out) = stream_from(
            &client,
            &dest,
            &[
                "--op",
                op,
                "--size",
                &size,
                flag,
                method,
                "--parallel",
                parallel,
            ],
        );
        assert!(ok, "{op} {method}: {out}\nserver:\n{}", app.output());
        let n: u64 = parallel.parse().unwrap();
        assert!(carried(&mesh, before, n * big()), "{op}: not accelerated");
    }
    assert_eq!(counter(&mesh, "intra_node_add_failed"), 0);
}
