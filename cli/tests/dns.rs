//! DNS capture, end to end: a real dnsmasq in its own pod, the real `dig` in a
//! registered pod, and the sidecar stand-in's DNS forwarder in between.

mod common;

use std::path::Path;

use common::*;
use meshbpf::PodSettings;

const NAME: &str = "web.mesh.test";
const ANSWER_V4: &str = "192.0.2.99";
const ANSWER_V6: &str = "2001:db8::99";

struct World {
    env: Env,
    mesh: meshbpf::Mesh,
    dns: Pod,
    _dnsmasq: Proc,
}

/// A mesh, and a pod running dnsmasq that answers for NAME on port 53, IPv4 and IPv6.
fn world() -> World {
    let mut env = Env::new();
    let mesh = env.attach();
    let dns = env.pod("dns");
    let dnsmasq = dnsmasq(&dns, NAME, ANSWER_V4, ANSWER_V6, &["--log-queries"]);
    World {
        env,
        mesh,
        dns,
        _dnsmasq: dnsmasq,
    }
}

/// A registered client pod with its sidecar running.
fn registered_client(w: &mut World) -> (Pod, Proc) {
    let client = w.env.pod("client");
    w.mesh
        .register_netns(&client.netns, &PodSettings::default())
        .unwrap();
    let sidecar = client.sidecar();
    (client, sidecar)
}

fn dig(pod: &Pod, uid: u32, args: &[&str]) -> String {
    let mut all = vec!["+time=3", "+tries=1"];
    all.extend_from_slice(args);
    stdout_of(&pod.run(uid, Path::new("/usr/bin/dig"), &all))
}

/// `dig @SERVER NAME TYPE [+tcp]` reports the answer and the server it asked.
fn assert_dig_answers(out: &str, server: &str, answer: &str, proto: &str) {
    assert!(
        out.lines()
            .any(|l| l.starts_with(NAME) && l.ends_with(answer)),
        "no answer {answer}:\n{out}"
    );
    assert!(
        out.contains(&format!(";; SERVER: {server}#53({server}) ({proto})")),
        "{out}"
    );
}

#[test]
fn dig_in_a_registered_pod_is_answered_through_the_sidecar_v4_v6_udp_tcp() {
    if !privileged() {
        return;
    }
    let mut w = world();
    let (client, sidecar) = registered_client(&mut w);
    let (v4, v6) = (w.dns.v4.to_string(), w.dns.v6.to_string());
    let cases = [
        (v4.as_str(), "A", ANSWER_V4, false),
        (v6.as_str(), "AAAA", ANSWER_V6, false),
        (v4.as_str(), "A", ANSWER_V4, true),
        (v6.as_str(), "AAAA", ANSWER_V6, true),
    ];
    for (i, (server, qtype, answer, tcp)) in cases.into_iter().enumerate() {
        let at = format!("@{server}");
        let mut args = vec![at.as_str(), NAME, qtype];
        if tcp {
            args.push("+tcp");
        }
        let out = dig(&client, APP_UID, &args);
        assert_dig_answers(&out, server, answer, if tcp { "TCP" } else { "UDP" });
        let seen = sidecar.lines("dns ");
        assert_eq!(seen.len(), i + 1, "{seen:?}");
        let original = std::net::SocketAddr::new(server.parse().unwrap(), 53);
        let proto = if tcp { "tcp" } else { "udp" };
        assert!(
            seen[i].starts_with(&format!("dns proto={proto} ")),
            "{seen:?}"
        );
        assert!(
            seen[i].contains(&format!("original_dst={original} ")),
            "{seen:?}"
        );
    }
    assert_eq!(counter(&w.mesh, "dns_redirected"), 4);
    assert_eq!(counter(&w.mesh, "dns_reply_restored"), 2);
}

#[test]
fn unconnected_and_connected_udp_queries_see_the_server_they_asked() {
    if !privileged() {
        return;
    }
    let mut w = world();
    let (client, sidecar) = registered_client(&mut w);
    let mut expected = 0;
    for (v6, qtype, answer) in [(false, "A", ANSWER_V4), (true, "AAAA", ANSWER_V6)] {
        let server = w.dns.addr(v6, 53);
        for connected in [false, true] {
            let mut args = vec!["dns", server.as_str(), NAME, qtype];
            if connected {
                args.push("--connected");
            }
            let out = client.run(APP_UID, &helper("netprobe"), &args);
            let probe = stdout_of(&out);
            // recvfrom() (unconnected) or getpeername() (connected) name the server asked.
            assert!(probe.contains(&format!("from={server}\n")), "{probe}");
            assert!(probe.contains(&format!("answer={answer}\n")), "{probe}");
            expected += 1;
            assert_eq!(
                sidecar.lines("dns proto=udp").len(),
                expected,
                "{}",
                sidecar.output()
            );
        }
    }
    assert_eq!(counter(&w.mesh, "dns_query_origin_found"), 4);
}

#[test]
fn sidecar_queries_go_straight_to_the_server() {
    if !privileged() {
        return;
    }
    let mut w = world();
    let (client, sidecar) = registered_client(&mut w);
    let server = w.dns.v4.to_string();
    let out = dig(&client, PROXY_UID, &[&format!("@{server}"), NAME, "A"]);
    assert_dig_answers(&out, &server, ANSWER_V4, "UDP");
    assert!(sidecar.lines("dns ").is_empty(), "{}", sidecar.output());
    assert_eq!(counter(&w.mesh, "dns_redirected"), 0);
}

#[test]
fn unregistered_pods_and_pods_without_dns_capture_query_the_server_directly() {
    if !privileged() {
        return;
    }
    let mut w = world();
    let plain = w.env.pod("plain");
    let no_dns = w.env.pod("nodns");
    let settings = PodSettings {
        capture_dns: false,
        ..PodSettings::default()
    };
    w.mesh.register_netns(&no_dns.netns, &settings).unwrap();
    let server = w.dns.v4.to_string();
    for pod in [&plain, &no_dns] {
        let sidecar = pod.sidecar();
        for args in [&[][..], &["+tcp"]] {
            let mut all = vec![format!("@{server}"), NAME.into(), "A".into()];
            all.extend(args.iter().map(|a| a.to_string()));
            let all: Vec<&str> = all.iter().map(String::as_str).collect();
            let out = dig(pod, APP_UID, &all);
            assert_dig_answers(
                &out,
                &server,
                ANSWER_V4,
                if args.is_empty() { "UDP" } else { "TCP" },
            );
        }
        assert!(sidecar.lines("dns ").is_empty(), "{}", sidecar.output());
    }
    assert_eq!(counter(&w.mesh, "dns_redirected"), 0);
}

#[test]
fn ipv4_mapped_server_addresses_see_the_server_they_asked() {
    if !privileged() {
        return;
    }
    let mut w = world();
    let (client, sidecar) = registered_client(&mut w);
    // A dual-stack (AF_INET6) socket asking an IPv4 server by its IPv4-mapped address.
    let server = format!("[::ffff:{}]:53", w.dns.v4);
    for connected in [false, true] {
        let mut args = vec!["dns", server.as_str(), NAME, "A"];
        if connected {
            args.push("--connected");
        }
        let probe = stdout_of(&client.run(APP_UID, &helper("netprobe"), &args));
        assert!(probe.contains(&format!("from={server}\n")), "{probe}");
        assert!(probe.contains(&format!("answer={ANSWER_V4}\n")), "{probe}");
    }
    let seen = sidecar.lines("dns proto=udp");
    assert_eq!(seen.len(), 2, "{}", sidecar.output());
    let asked = format!("original_dst={}:53 ", w.dns.v4);
    assert!(seen.iter().all(|l| l.contains(&asked)), "{seen:?}");
}
