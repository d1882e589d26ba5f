//! `meshbpf trace` and `meshbpf explain`: one policy, two views. Real connections of a
//! registered pod, for a matrix of callers, destinations, ports and protocols, each traced
//! live; `explain` of the pod's pinned settings must give the same reason for every one.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use meshbpf::{Hook, PodSettings, Protocol, Query, Reason, TraceEvent, Tracer};

/// The decisions a tracer has seen until `until` holds (or the harness's patience ends).
fn collect(
    tracer: &mut Tracer,
    seen: &mut Vec<TraceEvent>,
    patience: Duration,
    until: impl Fn(&[TraceEvent]) -> bool,
) {
    let deadline = Instant::now() + patience;
    while !until(seen) && Instant::now() < deadline {
        seen.extend(tracer.poll(Duration::from_millis(50)).unwrap());
    }
}

#[test]
fn trace_and_explain_agree_on_every_connection_of_a_matrix() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    let mesh = env.attach();
    let app = env.pod("app");
    let server = env.pod("server");
    let excluded = env.pod("excluded");
    let _servers = server.server(&["0.0.0.0:8080", "0.0.0.0:9100", "[::]:8081"]);
    let settings = PodSettings {
        exclude_outbound_ports: [9100].into(),
        exclude_outbound_cidrs: meshbpf::parse_cidr_list(&format!("{}/32", excluded.v4)).unwrap(),
        ..PodSettings::default()
    };
    let pod = mesh.register_netns(&app.netns, &settings).unwrap();
    let mut tracer = mesh.trace(Some(pod.netns_cookie)).unwrap();
    // Another pod's decisions are not this reader's.
    let other = env.pod("other");
    mesh.register_netns(&other.netns, &PodSettings::default())
        .unwrap();

    let own = app.addr(false, 8080);
    let rows: Vec<(u32, String, Protocol)> = vec![
        (APP_UID, server.addr(false, 8080), Protocol::Tcp),
        (APP_UID, server.addr(true, 8081), Protocol::Tcp),
        (
            APP_UID,
            format!("[::ffff:{}]:8080", server.v4),
            Protocol::Tcp,
        ),
        (APP_UID, server.addr(false, 9100), Protocol::Tcp),
        (APP_UID, excluded.addr(false, 8080), Protocol::Tcp),
        (APP_UID, "127.0.0.1:7777".into(), Protocol::Tcp),
        (APP_UID, own.clone(), Protocol::Tcp),
        (PROXY_UID, server.addr(false, 8080), Protocol::Tcp),
        (PROXY_UID, own.clone(), Protocol::Tcp),
        (PROXY_UID, "127.0.0.1:7777".into(), Protocol::Tcp),
        (APP_UID, server.addr(false, 53), Protocol::Tcp),
        (APP_UID, server.addr(false, 53), Protocol::Udp),
        (APP_UID, server.addr(true, 53), Protocol::Udp),
        (PROXY_UID, server.addr(false, 53), Protocol::Udp),
        (APP_UID, server.addr(false, 5000), Protocol::Udp),
    ];
    let mut seen = Vec::new();
    for (uid, dest, protocol) in &rows {
        let dst: SocketAddr = dest.parse().unwrap();
        let query = Query {
            dst,
            protocol: *protocol,
            uid: *uid,
            gid: *uid,
            source: None,
        };
        let explained = mesh.explain(pod.netns_cookie, &query).unwrap();
        // The real thing: a connect, or a datagram with sendto(); it need not succeed.
        let args: Vec<&str> = match protocol {
            Protocol::Tcp => vec!["connect", dest],
            Protocol::Udp => vec!["sendto", dest],
        };
        let _ = app.run(*uid, &helper("netprobe"), &args);
        let hook = match protocol {
            Protocol::Tcp => Hook::Connect,
            Protocol::Udp => Hook::Sendmsg,
        };
        let this = |e: &TraceEvent| e.hook == hook && e.dst == Some(dst) && e.uid == Some(*uid);
        if explained.reason == Reason::SkipUdpNotDns {
            // Never looked at, so never traced: the programs return before the pod's lookup.
            collect(&mut tracer, &mut seen, Duration::from_secs(1), |_| false);
            assert!(!seen.iter().any(this), "{dest}: {seen:?}");
            continue;
        }
        collect(&mut tracer, &mut seen, Duration::from_secs(10), |s| {
            s.iter().any(this)
        });
        let event = seen
            .iter()
            .find(|e| this(e))
            .unwrap_or_else(|| panic!("uid {uid} {protocol} {dest}: not traced; saw {seen:?}"));
        assert_eq!(
            event.reason, explained.reason,
            "uid {uid} {protocol} {dest}: traced {event} but explained {explained}"
        );
        // Where it went: the same listener port, on loopback.
        assert_eq!(
            event.to.map(|a| a.port()),
            explained.to.map(|a| a.port()),
            "{event}"
        );
        assert!(
            event
                .to
                .is_none_or(|a| a.ip().is_loopback() || a.ip().to_canonical().is_loopback()),
            "{event}"
        );
        assert_eq!(event.netns_cookie, pod.netns_cookie);
        // The caller (run through /proc/self/fd/N, so its comm is that N).
        assert!(event.pid.is_some() && !event.comm.is_empty(), "{event}");
    }
    // Each reason of the matrix, once at least: the matrix covers the policy.
    let reasons: std::collections::BTreeSet<String> =
        seen.iter().map(|e| format!("{:?}", e.reason)).collect();
    for expected in [
        "Captured",
        "CapturedDns",
        "ToInbound",
        "SkipProxy",
        "SkipLoopback",
        "SkipExcludedPort",
        "SkipExcludedCidr",
    ] {
        assert!(
            reasons.contains(expected),
            "{expected} never traced: {reasons:?}"
        );
    }
    assert!(seen.iter().all(|e| e.netns_cookie == pod.netns_cookie));
}

#[test]
fn several_readers_see_every_decision_and_ctrl_c_frees_the_slot() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    let mesh = env.attach();
    let app = env.pod("app");
    let server = env.pod("server");
    let _server = server.server(&["0.0.0.0:8080"]);
    mesh.register_netns(&app.netns, &PodSettings::default())
        .unwrap();
    let mut first = mesh.trace(None).unwrap();
    // The CLI as a second reader, as a user runs it, with JSON lines.
    let mut cli_trace = Command::new(cli())
        .args([
            "trace",
            "--json",
            "--netns",
            app.netns.to_str().unwrap(),
            "--pin-dir",
        ])
        .arg(&env.pin_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // It says so once its slot is live.
    let mut stderr = std::io::BufReader::new(cli_trace.stderr.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stderr, &mut line).unwrap();
    assert!(line.contains("reading slot 1"), "{line}");
    let dest = server.addr(false, 8080);
    let _ = app.run(APP_UID, &helper("netprobe"), &["connect", &dest]);
    let mut seen = Vec::new();
    collect(&mut first, &mut seen, Duration::from_secs(10), |s| {
        s.iter().any(|e| e.reason == Reason::Captured)
    });
    assert!(
        seen.iter().any(|e| e.reason == Reason::Captured),
        "{seen:?}"
    );

    // Ctrl-C: the CLI reader stops, having printed the same decision.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(cli_trace.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = cli_trace.wait_with_output().unwrap();
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut stderr, &mut rest);
    assert!(out.status.success(), "{line}{rest}");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["dst"] == dest.as_str() && l["captured"] == true),
        "{lines:?}"
    );
    // Its slot is free again: with `first` still reading, the next reader takes slot 1.
    let second = mesh.trace(None).unwrap();
    assert_eq!(second.slot(), 1);
    drop(first);
    assert_eq!(mesh.trace(None).unwrap().slot(), 0);
}
