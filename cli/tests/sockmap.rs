//! Sockmap acceleration between an application and its sidecar must never
//! lose, reorder or stall data: every way programs move bytes, checked byte
//! for byte (length and checksum) through the sidecar stand-in, with
//! acceleration on.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use meshbpf::{AttachOptions, Mesh, PodSettings};

struct World {
    env: Env,
    mesh: Mesh,
    app: Pod,
    server_pod: Pod,
    server_addr: String,
    server: Proc,
    sidecar: Proc,
}

fn world_with(node_sockmap: bool, pod_sockmap: bool) -> World {
    let mut env = Env::new();
    let options = AttachOptions::with_sockmap(node_sockmap);
    let mesh = Mesh::attach_with(&env.cgroup, &env.pin_dir, &options).unwrap();
    let app = env.pod("app");
    let server_pod = env.pod("server");
    let (server, server_addr) = server_pod.stream_server();
    // Every connection accelerated, whatever its first message: the correctness claims
    // must hold on the fast path itself.
    let settings = PodSettings {
        sockmap: pod_sockmap,
        sockmap_min_bytes: 0,
        ..PodSettings::default()
    };
    mesh.register_netns(&app.netns, &settings).unwrap();
    // 100,000 short connections need more ephemeral ports than the default range in this
    // pod's own netns (the node's settings stay untouched).
    let sysctl = |key: &str, value: &str| {
        stdout_of(&app.run(
            0,
            Path::new("/sbin/sysctl"),
            &["-qw", &format!("{key}={value}")],
        ))
    };
    sysctl("net.ipv4.ip_local_port_range", "1024 65000");
    let sidecar = app.sidecar();
    World {
        server_addr,
        env,
        mesh,
        app,
        server_pod,
        server,
        sidecar,
    }
}

fn world() -> World {
    world_with(true, true)
}

/// `stream run` in the application pod; returns (success, output).
fn stream(w: &World, args: &[&str]) -> (bool, String) {
    let mut all = vec!["run", w.server_addr.as_str()];
    all.extend_from_slice(args);
    // Up to 256 MiB each way through the stand-in: a hang guard of its own, not a speed goal
    // (a busy 2-core machine took over 20 s).
    let guard = scaled(Duration::from_secs(90));
    let out = w.app.run_for(guard, APP_UID, &helper("stream"), &all);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn assert_stream(w: &World, args: &[&str]) -> String {
    let (ok, text) = stream(w, args);
    assert!(
        ok,
        "stream {args:?} failed:\n{text}\nsidecar:\n{}\nserver:\n{}",
        w.sidecar.output(),
        w.server.output()
    );
    text
}

#[test]
fn every_send_and_receive_method_keeps_every_byte() {
    if !privileged() {
        return;
    }
    let w = world();
    every_stream_case(&w.server, |args| assert_stream(&w, args));
    // The fast path really carried the application's bytes.
    assert!(counter(&w.mesh, "sockmap_bytes_redirected") > 50_000_000);
    assert_eq!(counter(&w.mesh, "sockmap_add_failed"), 0);
}

/// What `stream --op stall` reports: the bytes the application wrote, without blocking,
/// before the path was full, while the server read nothing; every TCP socket of both pods
/// has its buffers pinned ([`pin_tcp_buffers`]), and the sidecar starts relaying late
/// ([`RELAY_LATE`]).
fn queued_while_stalled(w: &World) -> u64 {
    pin_tcp_buffers(&w.app);
    pin_tcp_buffers(&w.server_pod);
    let args = stall_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    stalled_queue(&with_paused(&w.sidecar, RELAY_LATE, || {
        assert_stream(w, &args)
    }))
}

/// A sidecar that stops reading (here because its upstream stalls) holds the application
/// back as loopback TCP does, through iptables or a pod without sockmap: its writes stop
/// with EAGAIN once the buffers on the way are full. Redirected bytes wait in the sidecar
/// socket's sockmap queue, which the kernel does not bound by a receive buffer: left alone
/// it grows with every write (256 MiB here, all of it), taking the node's TCP memory, until
/// writes fail with ENOMEM. With flow control the queue stays within what TCP would let
/// the sidecar's socket hold (its receive buffer) plus the one message being redirected
/// when the check fired. The bytes all arrive, in order, once the server reads.
///
/// The bound is computed, not compared with a run without sockmap: that run's figure
/// depends on autotuning and timing, as intranode.rs's twin says.
#[test]
fn a_sidecar_that_stops_reading_holds_the_application_back_as_tcp_does() {
    if !privileged() {
        return;
    }
    let plain = queued_while_stalled(&world_with(true, false));
    let w = world();
    let fast = queued_while_stalled(&w);
    // Application -> sidecar -> server: two connections.
    let tcp_holds = tcp_chain_holds(2);
    eprintln!(
        "queued while the sidecar read nothing: {fast} B with sockmap, {plain} B without; \
         TCP's pinned buffers hold at most {tcp_holds} B"
    );
    assert!(
        plain <= tcp_holds,
        "without sockmap the application queued {plain} B, more than the path's pinned TCP \
         buffers hold ({tcp_holds} B): tcp_chain_holds is wrong"
    );
    assert!(counter(&w.mesh, "sockmap_msg_redirected") > 0);
    assert!(
        fast <= tcp_holds + PACKET,
        "with sockmap the application queued {fast} B into a sidecar that read nothing, more \
         than TCP's pinned buffers hold ({tcp_holds} B) plus one message: no flow control \
         ({plain} B without sockmap)"
    );
    assert_eq!(counter(&w.mesh, "sockmap_receiver_behind"), 1);
}

#[test]
fn two_hundred_fifty_six_mib_each_way_is_byte_exact() {
    if !privileged() {
        return;
    }
    let w = world();
    // 4 MiB in the emulated guests.
    let total = scaled_size(256 << 20, 1 << 20);
    let size = total.to_string();
    assert_stream(&w, &["--op", "upload", "--size", &size, "--send", "write"]);
    assert_stream(&w, &["--op", "download", "--size", &size, "--recv", "read"]);
    let (moved, behind) = (
        counter(&w.mesh, "sockmap_bytes_redirected"),
        counter(&w.mesh, "sockmap_receiver_behind"),
    );
    // The stand-in relays the upload to the server over TCP, slower than the application
    // writes: once it holds the pod's tcp_rmem maximum unread, the rest of the upload takes
    // TCP, behind what was redirected (flow control), and must still arrive byte-exact.
    eprintln!("redirected {moved} B; receiver behind: {behind}");
    assert!(
        moved >= total || (behind == 1 && moved >= total / 8),
        "{moved} B redirected, the receiver behind {behind} time(s)"
    );
}

#[test]
fn many_parallel_connections_are_byte_exact() {
    if !privileged() {
        return;
    }
    let w = world();
    for (op, flag, method) in [
        ("upload", "--send", "writev"),
        ("download", "--recv", "epoll"),
        ("halfclose", "--recv", "read"),
    ] {
        let out = assert_stream(
            &w,
            &[
                "--op",
                op,
                "--size",
                "1000000",
                flag,
                method,
                "--parallel",
                "32",
            ],
        );
        assert_eq!(
            out.lines().filter(|l| l.starts_with("ok ")).count(),
            32,
            "{out}"
        );
    }
}

#[test]
fn killing_the_sidecar_mid_stream_ends_the_application_s_stream_without_a_hang() {
    if !privileged() {
        return;
    }
    let mut w = world();
    let huge = (64u64 << 30).to_string();
    for (op, flag, method) in [
        ("upload", "--send", "write"),
        ("download", "--recv", "read"),
    ] {
        let app = w.app.spawn(
            APP_UID,
            &helper("stream"),
            &[
                "run",
                &w.server_addr,
                "--op",
                op,
                "--size",
                &huge,
                flag,
                method,
            ],
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
        drop(std::mem::replace(
            &mut w.sidecar,
            w.app.spawn(0, Path::new("/bin/true"), &[]),
        ));
        // The application ends by itself (Proc::wait fails the test after its timeout).
        let out = app.wait();
        assert!(
            out.contains("fail ") && !out.contains("timed out") && !out.contains("stalled"),
            "{op}: {out}"
        );
        w.sidecar = w.app.sidecar();
    }
}

#[test]
fn only_the_application_s_sends_take_the_fast_path() {
    if !privileged() {
        return;
    }
    let w = world();
    assert_stream(&w, &["--op", "download", "--size", "4000000"]);
    // The application sent a header line; the four megabytes came back over the normal
    // stack, where splice and blocking reads behave.
    let redirected = counter(&w.mesh, "sockmap_bytes_redirected");
    assert!(redirected > 0 && redirected < 100, "{redirected}");
    assert_eq!(counter(&w.mesh, "sockmap_added"), 2);
}

#[test]
fn maps_are_back_at_idle_after_200000_short_connections() {
    if !privileged() {
        return;
    }
    let w = world();
    // 8 × 25,000 connections; 8 × 390 in the emulated guests.
    let each = scaled_count(25000);
    let count = each.to_string();
    let args = [
        "run",
        &w.server_addr,
        "--op",
        "upload",
        "--size",
        "1",
        "--parallel",
        "8",
        "--count",
        &count,
    ];
    let out = stdout_of(&w.app.run_for(
        std::time::Duration::from_secs(180),
        APP_UID,
        &helper("stream"),
        &args,
    ));
    assert_eq!(
        out.lines()
            .filter(|l| l.ends_with(&format!("connections={each}")))
            .count(),
        8,
        "{out}"
    );
    assert!(counter(&w.mesh, "sockmap_added") >= 2 * 8 * each);
    assert_eq!(counter(&w.mesh, "origin_recorded"), 8 * each);
    wait_until(
        || w.mesh.accelerated_sockets() == 0,
        || format!("{} sockets left in sock_hash", w.mesh.accelerated_sockets()),
    );
    wait_until(
        || w.mesh.tracked_connections() == 0,
        || format!("{} origins left", w.mesh.tracked_connections()),
    );
}

#[test]
fn by_default_a_pod_with_sockmap_accelerates_only_connections_whose_first_message_is_large() {
    if !privileged() {
        return;
    }
    let w = world();
    // Acceleration is opt-in per pod (`register --sockmap`); its threshold is the default.
    let defaults = PodSettings {
        sockmap: true,
        ..PodSettings::default()
    };
    assert!(!PodSettings::default().sockmap);
    assert_eq!(
        defaults.sockmap_min_bytes,
        meshbpf::DEFAULT_SOCKMAP_MIN_BYTES
    );
    w.mesh.register_netns(&w.app.netns, &defaults).unwrap();
    // A stream of small writes (first message: header + 64 bytes) stays on the normal stack.
    let small = assert_stream(&w, &["--op", "flood", "--size", "64", "--duration", "0.3"]);
    assert!(small.starts_with("ok op=flood"), "{small}");
    assert_eq!(counter(&w.mesh, "sockmap_left_small_first_msg"), 1);
    assert_eq!(counter(&w.mesh, "sockmap_msg_redirected"), 0);
    // A first write of 64 KiB: accelerated for the whole connection.
    let big = assert_stream(
        &w,
        &["--op", "flood", "--size", "65536", "--duration", "0.3"],
    );
    assert!(big.starts_with("ok op=flood"), "{big}");
    assert_eq!(counter(&w.mesh, "sockmap_left_small_first_msg"), 1);
    assert!(counter(&w.mesh, "sockmap_bytes_redirected") > 65536);
    // The left socket is gone from sock_hash at once, the accelerated ones when they close.
    wait_until(
        || w.mesh.accelerated_sockets() == 0,
        || format!("{} sockets in sock_hash", w.mesh.accelerated_sockets()),
    );
}

#[test]
fn pods_and_nodes_without_sockmap_are_not_accelerated_and_still_correct() {
    if !privileged() {
        return;
    }
    for (node, pod) in [(true, false), (false, true)] {
        let w = world_with(node, pod);
        assert_stream(
            &w,
            &["--op", "upload", "--size", "100000", "--send", "sendfile"],
        );
        assert_stream(
            &w,
            &["--op", "download", "--size", "100000", "--recv", "splice"],
        );
        assert_eq!(counter(&w.mesh, "sockmap_added"), 0);
        assert_eq!(counter(&w.mesh, "sockmap_msg_redirected"), 0);
        let status: serde_json::Value =
            serde_json::from_str(&stdout_of(&w.env.meshbpf(&["status", "--json"]))).unwrap();
        assert_eq!(status["sockmap"], node);
        assert_eq!(status["pods"][0]["sockmap"], pod);
    }
}
