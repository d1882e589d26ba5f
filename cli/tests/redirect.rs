//! Istio's inbound model (redirect mode, `--mesh istio`'s default): every inbound connection
//! to a captured port of the pod reaches the sidecar's one inbound listener (15006) — here
//! an unmodified HAProxy configured like Envoy's virtualInbound (original destination,
//! upstream from 127.0.0.6 / ::6) — and through it the application, which keeps its own
//! binds. Each test runs the same in a pod behind istio-iptables' rules (no meshbpf hook
//! sees it): the reference behaviour.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;

/// The nat rules istio-iptables installs for `-p 15001 -z 15006 -u 1337 -m REDIRECT -i '*'
/// -b '*' -d 15090,15021,15020,9090` (plus the uid's gid, as the injector's template does),
/// IPv4; the IPv6 set has ::6/128 and ::1/128 for 127.0.0.6/32 and 127.0.0.1/32.
const ISTIO_IPTABLES: &str = "*nat
:ISTIO_INBOUND - [0:0]
:ISTIO_REDIRECT - [0:0]
:ISTIO_IN_REDIRECT - [0:0]
:ISTIO_OUTPUT - [0:0]
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 9090 -j RETURN
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
COMMIT
";

/// Envoy's inbound side, as an unmodified HAProxy: one listener on 15006 per family, and a
/// passthrough to the original destination from 127.0.0.6 / ::6.
const ENVOY_LIKE: &str = "global
    maxconn 512
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend inbound4
    bind 0.0.0.0:15006
    default_backend passthrough4
frontend inbound6
    bind :::15006 v6only
    default_backend passthrough6
backend passthrough4
    server original 0.0.0.0:0 source 127.0.0.6
backend passthrough6
    server original ipv6@[::]:0 source [::6]:0
";

/// The two pods compared: one registered with meshbpf in redirect mode, one behind
/// istio-iptables. Both have ::6 on lo, which Envoy's IPv6 passthrough binds.
struct World {
    env: Env,
    meshed: Pod,
    iptables: Pod,
    client: Pod,
}

fn world() -> World {
    let mut env = Env::new();
    let _mesh = env.attach();
    let meshed = env.pod("meshed");
    let iptables = env.pod_outside("iptables");
    let client = env.pod("client");
    stdout_of(&env.meshbpf(&[
        "register",
        "--netns",
        meshed.netns.to_str().unwrap(),
        "--exclude-inbound-ports",
        "9090",
        // The gid istio-iptables is given (-g 1337, as ISTIO_IPTABLES above); meshbpf's
        // default proxy gid list is empty.
        "--proxy-gid",
        "1337",
    ]));
    for (rules, restore) in [
        (ISTIO_IPTABLES.to_string(), "iptables-restore"),
        (
            ISTIO_IPTABLES
                .replace("127.0.0.6/32", "::6/128")
                .replace("127.0.0.1/32", "::1/128"),
            "ip6tables-restore",
        ),
    ] {
        let file = write_file(&env, restore, &rules);
        sh(Command::new("sh").arg("-c").arg(format!(
            "ip netns exec {} {restore} < {}",
            iptables.name,
            file.display()
        )));
    }
    // istio-init puts ::6 on lo for Envoy's IPv6 passthrough; `register` does it for the
    // meshed pod.
    sh(Command::new("ip").args(["-n", &iptables.name, "addr", "add", "::6/128", "dev", "lo"]));
    World {
        env,
        meshed,
        iptables,
        client,
    }
}

fn envoy_like(env: &Env, pod: &Pod) -> Proc {
    let cfg = write_file(env, "envoy-like.cfg", ENVOY_LIKE);
    let proc = pod.spawn(
        PROXY_UID,
        std::path::Path::new("/usr/sbin/haproxy"),
        &["-db", "-f", cfg.to_str().unwrap()],
    );
    // Ready when both listeners are.
    wait_until(
        || {
            let out = sh(Command::new("ip").args([
                "netns", "exec", &pod.name, "ss", "-Hltn", "sport", "=", ":15006",
            ]));
            String::from_utf8_lossy(&out.stdout).lines().count() == 2
        },
        || format!("haproxy did not listen: {}", proc.output()),
    );
    proc
}

/// The address the application saw a client's connection come from, or the error.
fn seen_by_app(client: &Pod, dest: &str) -> String {
    let probe = client.connect(dest, &[]);
    if !probe.ok {
        return if probe.stderr.contains("refused") {
            "refused".into()
        } else {
            format!("failed: {}", probe.stderr)
        };
    }
    let reply = probe.get("reply");
    let saw = reply
        .split_whitespace()
        .find_map(|w| w.strip_prefix("saw="))
        .unwrap_or("?");
    // The client's own address, or the passthrough source: the port does not matter.
    let (ip, _) = saw.rsplit_once(':').unwrap_or((saw, ""));
    ip.trim_start_matches('[').trim_end_matches(']').to_string()
}

#[test]
fn an_unmodified_proxy_on_15006_serves_inbound_as_behind_istio_iptables() {
    if !privileged() {
        return;
    }
    let w = world();
    for (pod, name) in [(&w.meshed, "meshbpf"), (&w.iptables, "istio-iptables")] {
        let app = pod.server(&[
            "0.0.0.0:8080",
            "[::]:8081",
            "0.0.0.0:9090",
            "0.0.0.0:15008",
            "0.0.0.0:15020",
            "[::]:15021",
            "0.0.0.0:15090",
        ]);
        // Listeners the bind model could not close: the pod's own address, and a socket
        // that never called bind().
        let own_ip = pod.server(&[&pod.addr(false, 7070)]);
        let unbound = pod.spawn(APP_UID, &helper("netprobe"), &["autolisten"]);
        unbound.wait_for("listening=");
        let port = unbound.lines("listening=")[0]
            .rsplit(':')
            .next()
            .unwrap()
            .to_string();
        let sidecar = envoy_like(&w.env, pod);
        let mut via_sidecar = vec![
            (pod.addr(false, 8080), "127.0.0.6"),
            (pod.addr(false, 7070), "127.0.0.6"),
            (pod.addr(false, port.parse().unwrap()), "127.0.0.6"),
        ];
        // IPv6: HAProxy asks SO_ORIGINAL_DST at SOL_IP only, then takes the local address
        // (haproxy sock_inet_get_dst()); behind ip6tables' REDIRECT that is pod_ip:15006, so it
        // loops to itself, where Envoy asks IP6T_SO_ORIGINAL_DST. With sk_lookup the local
        // address is the original one: meshbpf serves it.
        if pod.name == w.meshed.name {
            via_sidecar.push((pod.addr(true, 8081), "::6"));
        }
        for (dest, seen) in &via_sidecar {
            assert_eq!(seen_by_app(&w.client, dest), *seen, "{name}: {dest}");
        }
        // An excluded port goes straight: the application sees the client.
        let excluded = pod.addr(false, 9090);
        assert_eq!(
            seen_by_app(&w.client, &excluded),
            w.client.v4.to_string(),
            "{name}"
        );
        // The mesh ports (ISTIO_INBOUND's --dport 15008/15090/15021/15020 -j RETURN) go
        // straight to a listener on them, IPv4 and IPv6.
        for dest in [
            pod.addr(false, 15008),
            pod.addr(false, 15020),
            pod.addr(true, 15021),
            pod.addr(false, 15090),
        ] {
            let from = if dest.starts_with('[') {
                w.client.v6.to_string()
            } else {
                w.client.v4.to_string()
            };
            assert_eq!(seen_by_app(&w.client, &dest), from, "{name}: {dest}");
        }
        // The pod's own calls on loopback and to its own address go straight too.
        for (dest, seen) in [
            ("127.0.0.1:8080".to_string(), "127.0.0.1".to_string()),
            (pod.addr(false, 8080), pod.v4.to_string()),
        ] {
            assert_eq!(seen_by_app(pod, &dest), seen, "{name}: the pod to {dest}");
        }
        // With the sidecar gone, nothing reaches the application around it.
        drop(sidecar);
        for (dest, _) in &via_sidecar {
            assert_eq!(seen_by_app(&w.client, dest), "refused", "{name}: {dest}");
        }
        assert_eq!(seen_by_app(&w.client, &excluded), w.client.v4.to_string());
        drop((app, own_ip, unbound));
    }
}

#[test]
fn the_inbound_listener_is_answered_the_original_destination_v4_and_v6_as_behind_istio_iptables() {
    if !privileged() {
        return;
    }
    let w = world();
    // Envoy asks SO_ORIGINAL_DST (SOL_IP) on an IPv4 connection and IP6T_SO_ORIGINAL_DST
    // (SOL_IPV6) on an IPv6 one, right after accept.
    for (v6, listen, port) in [(false, "0.0.0.0:15006", 8080), (true, "[::]:15006", 8081)] {
        let answers: Vec<_> = [&w.meshed, &w.iptables]
            .into_iter()
            .map(|pod| {
                let dest = pod.addr(v6, port);
                let answers = probe_accepted(pod, listen, &w.client, &dest);
                assert_eq!(
                    answers["original_dst"],
                    format!("ok:{}", sockaddr_hex(dest.parse().unwrap())),
                    "{}: {dest}: {answers:?}",
                    pod.name
                );
                // Each pod's own address, checked above; the rest must match.
                let mut answers = answers;
                answers.remove("original_dst");
                answers
            })
            .collect();
        // Every other answer (a NULL or short buffer, the other level, plain options) is
        // the one the kernel gives behind REDIRECT.
        assert_eq!(answers[0], answers[1], "v6 {v6}: meshbpf vs istio-iptables");
    }
}

/// Which server a connection from the pod reached: `inbound` (a recorder on the inbound
/// listener's port, as the proxy uid) or `app` (the application, on 8080, 8081, 15008), or
/// how it failed.
fn reached(pod: &Pod, uid: u32, dest: &str, bind: Option<&str>) -> String {
    let mut args = vec!["connect", dest];
    if let Some(src) = bind {
        args.extend_from_slice(&["--bind", src]);
    }
    reply_tag(pod.run(uid, &helper("netprobe"), &args))
}

/// [`reached`] with the group `gid` and the user `uid` (the proxy's gid, another uid).
fn reached_with_gid(pod: &Pod, uid: u32, gid: u32, dest: &str) -> String {
    let netprobe = helper("netprobe");
    let (uid, gid) = (uid.to_string(), gid.to_string());
    let args = [
        "--reuid",
        &uid,
        "--regid",
        &gid,
        "--clear-groups",
        netprobe.to_str().unwrap(),
        "connect",
        dest,
    ];
    reply_tag(pod.run(0, Path::new("/usr/bin/setpriv"), &args))
}

/// The tag of the server a `netprobe connect` reached, or how it failed.
fn reply_tag(out: Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("reply=tag="))
        .and_then(|t| t.split_whitespace().next())
        .map(str::to_string)
        .unwrap_or_else(|| format!("failed: {}", String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn istio_output_loopback_rules_hold_row_by_row() {
    if !privileged() {
        return;
    }
    let w = world();
    // A host outside the pod (another pod on the bridge), for the rows not over lo.
    let _remote = w.client.spawn(
        APP_UID,
        &helper("netprobe"),
        &["serve", "--tag", "remote", "0.0.0.0:8080", "[::]:8081"],
    );
    let remote4 = w.client.addr(false, 8080);
    let remote6 = w.client.addr(true, 8081);
    for (pod, name) in [(&w.meshed, "meshbpf"), (&w.iptables, "istio-iptables")] {
        let _outbound = pod.spawn(
            PROXY_UID,
            &helper("netprobe"),
            &["serve", "--tag", "outbound", "[::]:15001"],
        );
        let _app = pod.spawn(
            APP_UID,
            &helper("netprobe"),
            &[
                "serve",
                "--tag",
                "app",
                "0.0.0.0:8080",
                "[::]:8081",
                "0.0.0.0:15008",
            ],
        );
        let _inbound = pod.spawn(
            PROXY_UID,
            &helper("netprobe"),
            &["serve", "--tag", "inbound", "[::]:15006"],
        );
        for (port, tag) in [(15006, "inbound"), (15001, "outbound")] {
            wait_until(
                || reached(pod, 0, &format!("127.0.0.1:{port}"), None) == tag,
                || format!("{name}: the {tag} recorder does not answer"),
            );
        }
        let own4 = pod.addr(false, 8080);
        let own6 = pod.addr(true, 8081);
        // (uid, bound source, destination) -> which server, after istio-iptables' rules
        // (notes in the ISTIO_OUTPUT chain above). The destination decides the interface:
        // the pod's own addresses and loopback go out over lo, the remote host over eth0.
        let rows: [(u32, Option<&str>, String, &str); 15] = [
            // -o lo ! -d 127.0.0.1/32 ! --dport 15008 --uid-owner 1337 -> ISTIO_IN_REDIRECT
            (PROXY_UID, None, own4.clone(), "inbound"),
            (PROXY_UID, None, "127.0.0.6:8080".into(), "inbound"),
            // ... but not 127.0.0.1, and not 15008
            (PROXY_UID, None, "127.0.0.1:8080".into(), "app"),
            (PROXY_UID, None, pod.addr(false, 15008), "app"),
            // -o lo -s 127.0.0.6/32 -> RETURN: Envoy's inbound passthrough
            (PROXY_UID, Some("127.0.0.6:0"), own4.clone(), "app"),
            // -o lo ! --uid-owner 1337 -> RETURN: the application over lo
            (APP_UID, None, own4.clone(), "app"),
            (APP_UID, None, "127.0.0.6:8080".into(), "app"),
            (APP_UID, None, "127.0.0.1:8080".into(), "app"),
            // IPv6: the same over ::1 and the pod's own IPv6 address
            (PROXY_UID, None, own6.clone(), "inbound"),
            (PROXY_UID, None, "[::1]:8081".into(), "app"),
            (APP_UID, None, own6.clone(), "app"),
            // Not over lo: -m owner --uid-owner 1337 -> RETURN (the sidecar's upstream) ...
            (PROXY_UID, None, remote4.clone(), "remote"),
            (PROXY_UID, None, remote6.clone(), "remote"),
            // ... and anyone else -> ISTIO_REDIRECT (15001)
            (APP_UID, None, remote4.clone(), "outbound"),
            (APP_UID, None, remote6.clone(), "outbound"),
        ];
        for (uid, bind, dest, expected) in &rows {
            assert_eq!(
                reached(pod, *uid, dest, *bind),
                *expected,
                "{name}: uid {uid} from {bind:?} to {dest}"
            );
        }
        // The same rules by group (-m owner --gid-owner 1337): the proxy's gid with another uid.
        let gid_rows: [(String, &str); 5] = [
            // -o lo ! --uid-owner 1337 -> RETURN comes before the gid's ISTIO_IN_REDIRECT:
            // over lo, the gid alone is not sent to the inbound listener
            (own4.clone(), "app"),
            (own6.clone(), "app"),
            // -m owner --gid-owner 1337 -> RETURN: not captured to another host
            (remote4.clone(), "remote"),
            (remote6.clone(), "remote"),
            ("127.0.0.1:8080".into(), "app"),
        ];
        for (dest, expected) in &gid_rows {
            assert_eq!(
                reached_with_gid(pod, APP_UID, PROXY_UID, dest),
                *expected,
                "{name}: uid {APP_UID} gid {PROXY_UID} to {dest}"
            );
        }
    }
}

#[test]
fn istio_validation_passes_as_behind_istio_iptables_and_fails_without_capture() {
    if !privileged() {
        return;
    }
    let mut w = world();
    let plain = w.env.pod("plain");
    for (pod, name, expected) in [
        (&w.meshed, "meshbpf", "validation=ok"),
        (&w.iptables, "istio-iptables", "validation=ok"),
        (&plain, "no capture", "validation=failed timeout"),
    ] {
        // istio-validation checks IPv4, and IPv6 too in a dual-stack pod.
        for args in [&["validate"][..], &["validate", "--v6"]] {
            let out = pod.run(PROXY_UID, &helper("netprobe"), args);
            assert!(
                stdout_of(&out).contains(expected),
                "{name}: {args:?}: {}",
                stdout_of(&out)
            );
        }
    }
}

/// `--inbound-ports` restricts redirect mode as istio-iptables' `-b` does: a port in the list
/// goes to the inbound listener, any other reaches its listener directly.
#[test]
fn only_the_inbound_ports_given_go_to_the_inbound_listener() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    let _mesh = env.attach();
    let pod = env.pod("meshed");
    let client = env.pod("client");
    stdout_of(&env.meshbpf(&[
        "register",
        "--netns",
        pod.netns.to_str().unwrap(),
        "--inbound-ports",
        "8080",
    ]));
    let _app = pod.spawn(
        APP_UID,
        &helper("netprobe"),
        &["serve", "--tag", "app", "0.0.0.0:8080", "[::]:8081"],
    );
    let _inbound = pod.spawn(
        PROXY_UID,
        &helper("netprobe"),
        &["serve", "--tag", "inbound", "[::]:15006"],
    );
    wait_until(
        || reached(&pod, 0, "127.0.0.1:15006", None) == "inbound",
        || "the recorder does not answer".into(),
    );
    for (v6, port, expected) in [
        (false, 8080, "inbound"),
        (false, 8081, "app"),
        (true, 8080, "inbound"),
        (true, 8081, "app"),
    ] {
        let dest = pod.addr(v6, port);
        assert_eq!(reached(&client, APP_UID, &dest, None), expected, "{dest}");
    }
}

/// In redirect mode an IPv6 pod gets ::6 on lo (Envoy's IPv6 passthrough source), as
/// istio-init gives it; a caller without CAP_NET_ADMIN is refused, naming it, and the pod is
/// not half registered. An IPv4-only pod needs nothing (127.0.0.6 is in 127/8).
#[test]
fn an_ipv6_pod_gets_its_passthrough_address_and_without_cap_net_admin_is_refused() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    let mesh = env.attach();
    let pod = env.pod("v6");
    let lo_has_6 = |pod: &Pod| {
        let out = sh(Command::new("ip").args(["-n", &pod.name, "-6", "addr", "show", "dev", "lo"]));
        String::from_utf8_lossy(&out.stdout).contains("inet6 ::6/128")
    };
    assert!(!lo_has_6(&pod));
    let netns = pod.netns.to_str().unwrap();
    let out = Command::new("setpriv")
        .args(["--bounding-set", "-net_admin", "--"])
        .arg(cli())
        .args(["register", "--netns", netns, "--pin-dir"])
        .arg(&env.pin_dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("CAP_NET_ADMIN"),
        "{out:?}"
    );
    assert!(mesh.pods().unwrap().is_empty(), "half registered");
    for map in mesh.map_usage().unwrap() {
        if ["cookie_map", "pod_rules", "cidr_include", "cidr_exclude"].contains(&map.name) {
            assert_eq!(map.entries, Some(0), "{}", map.name);
        }
    }

    stdout_of(&env.meshbpf(&["register", "--netns", netns]));
    assert!(lo_has_6(&pod));
    // Again (an update): already there is fine.
    stdout_of(&env.meshbpf(&["register", "--netns", netns]));
    // The bind model does not add it.
    let other = env.pod("bindmode");
    let other_ns = other.netns.to_str().unwrap();
    stdout_of(&env.meshbpf(&["register", "--netns", other_ns, "--inbound-mode", "bind"]));
    assert!(!lo_has_6(&other));
}

/// The uids (real, effective, saved, filesystem) of the process listening on `port` in `pod`
/// (`ss -p` in its netns, then /proc/PID/status).
fn listener_uids(pod: &Pod, port: u16) -> String {
    let out = sh(Command::new("ip").args([
        "netns",
        "exec",
        &pod.name,
        "ss",
        "-Hltnp",
        "sport",
        "=",
        &format!(":{port}"),
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(pid) = text
        .split("pid=")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
    else {
        return format!("nobody listens: {text}");
    };
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .map(|u| u.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// A sidecar that binds as root and then drops to the proxy uid (HAProxy's `uid`/`gid`
/// directives: bind(), listen(), then setgid(), setuid(), as strace shows) serves inbound in
/// redirect mode, as behind istio-iptables, whose REDIRECT sends to whoever listens on 15006.
#[test]
fn an_inbound_proxy_that_binds_as_root_and_drops_to_the_proxy_uid_serves_inbound() {
    if !privileged() {
        return;
    }
    let w = world();
    let config = ENVOY_LIKE.replace("global\n", "global\n    uid 1337\n    gid 1337\n");
    let cfg = write_file(&w.env, "envoy-like-root.cfg", &config);
    for (pod, name) in [(&w.meshed, "meshbpf"), (&w.iptables, "istio-iptables")] {
        let _app = pod.server(&["0.0.0.0:8080", "[::]:8081"]);
        let sidecar = pod.spawn(
            0,
            Path::new("/usr/sbin/haproxy"),
            &["-db", "-f", cfg.to_str().unwrap()],
        );
        wait_until(
            || listener_uids(pod, 15006) == "1337 1337 1337 1337",
            || {
                format!(
                    "{name}: haproxy did not drop to uid 1337: {}",
                    sidecar.output()
                )
            },
        );
        let mut via_sidecar = vec![(pod.addr(false, 8080), "127.0.0.6")];
        // IPv6 as in an_unmodified_proxy_on_15006_serves_inbound_as_behind_istio_iptables:
        // behind ip6tables HAProxy loops to itself.
        if pod.name == w.meshed.name {
            via_sidecar.push((pod.addr(true, 8081), "::6"));
        }
        for (dest, seen) in &via_sidecar {
            assert_eq!(
                seen_by_app(&w.client, dest),
                *seen,
                "{name}: {dest}: {}",
                sidecar.output()
            );
        }
    }
}

/// What identifies the sidecar's inbound listener: a socket bound by the proxy uid (or gid),
/// or by root. An application's uid listening on the inbound port never gets the pod's
/// inbound connections (behind istio-iptables it would: REDIRECT knows no owner); with no
/// sidecar listening, they are refused.
#[test]
fn an_application_uid_listening_on_the_inbound_port_never_takes_inbound() {
    if !privileged() {
        return;
    }
    let w = world();
    let mesh = meshbpf::Mesh::open(&w.env.pin_dir).unwrap();
    let _app = w.meshed.server(&["0.0.0.0:8080", "[::]:8081"]);
    let squatter = w.meshed.spawn(
        APP_UID,
        &helper("netprobe"),
        &["serve", "--tag", "squatter", "[::]:15006"],
    );
    squatter.wait_for("listening=");
    // It is there, dual-stack: the pod's own call to it on loopback reaches it.
    assert_eq!(
        reached(&w.meshed, APP_UID, "127.0.0.1:15006", None),
        "squatter"
    );
    let refused = counter(&mesh, "inbound_refused");
    for v6 in [false, true] {
        let dest = w.meshed.addr(v6, if v6 { 8081 } else { 8080 });
        assert_eq!(seen_by_app(&w.client, &dest), "refused", "{dest}");
        let direct = reached(&w.client, APP_UID, &w.meshed.addr(v6, 15006), None);
        assert!(
            direct.starts_with("failed:") && direct.contains("refused"),
            "v6 {v6}: {direct}"
        );
    }
    assert_eq!(counter(&mesh, "inbound_refused") - refused, 4);
}
