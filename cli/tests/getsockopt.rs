//! The getsockopt hook answers SO_ORIGINAL_DST for captured connections and
//! leaves every other getsockopt exactly as the kernel answers it.

mod common;

use std::process::Command;

use common::*;

fn passthrough(v6: bool) {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    let mesh = env.attach();
    let registered = env.pod("registered");
    let unregistered = env.pod("unregistered");
    let baseline = env.pod_outside("baseline");
    let server = env.pod("server");
    let _server = server.server(&["0.0.0.0:8080", "[::]:8081"]);
    mesh.register_netns(&registered.netns, &meshbpf::PodSettings::default())
        .unwrap();
    let (listen, dest) = if v6 {
        ("[::1]:15001", server.addr(true, 8081))
    } else {
        ("127.0.0.1:15001", server.addr(false, 8080))
    };

    // The reference: the same connection redirected by iptables, in a pod no hook sees.
    let redirected = env.pod_outside("iptables");
    let (iptables, port) = if v6 {
        ("ip6tables", "8081")
    } else {
        ("iptables", "8080")
    };
    sh(Command::new("ip")
        .args(["netns", "exec", &redirected.name, iptables])
        .args([
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "--dport",
            port,
            "-m",
            "owner",
            "!",
            "--uid-owner",
            "1337",
            "-j",
            "REDIRECT",
            "--to-ports",
            "15001",
        ]));

    // A captured connection, a connection unknown to meshbpf, and one no hook ever saw.
    let known = probe_accepted(&registered, listen, &registered, &dest);
    let unknown = probe_accepted(&unregistered, listen, &unregistered, listen);
    let without = probe_accepted(&baseline, listen, &baseline, listen);
    let behind_iptables = probe_accepted(&redirected, listen, &redirected, &dest);

    assert_eq!(
        known["original_dst"],
        format!("ok:{}", sockaddr_hex(dest.parse().unwrap()))
    );
    // Every answer on the captured connection is the one iptables REDIRECT gives: the
    // original destination, EFAULT for a NULL buffer, EINVAL for a short one, the rest.
    assert_eq!(known, behind_iptables);
    assert!(without["original_dst"].starts_with("err:"), "{without:?}");
    for (name, kernel) in &without {
        if !name.starts_with("original_dst") || name == "original_dst_short_buffer" {
            assert_eq!(
                &known[name], kernel,
                "{name} on a captured connection differs from the kernel's answer"
            );
        }
        assert_eq!(
            &unknown[name], kernel,
            "{name} on an unknown connection differs from the kernel's answer"
        );
    }
    assert_eq!(counter(&mesh, "getsockopt_answered"), 1);
}

#[test]
fn original_dst_is_answered_and_other_ipv4_getsockopts_pass_through() {
    passthrough(false);
}

#[test]
fn original_dst_is_answered_and_other_ipv6_getsockopts_pass_through() {
    passthrough(true);
}

#[test]
fn iptables_save_reads_its_40k_table_unchanged_in_a_registered_pod() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    let mesh = env.attach();
    let pod = env.pod("pod");
    mesh.register_netns(&pod.netns, &meshbpf::PodSettings::default())
        .unwrap();
    // 300 rules make IPT_SO_GET_ENTRIES return far more than a page.
    let mut rules =
        String::from("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    for port in 1000..1300 {
        rules.push_str(&format!("-A OUTPUT -p tcp -m tcp --dport {port} -m comment --comment \"rule {port}\" -j ACCEPT\n"));
    }
    rules.push_str("COMMIT\n");
    let file = write_file(&env, "rules", &rules);
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ip netns exec {} iptables-legacy-restore < {}",
            pod.name,
            file.display()
        ))
        .status()
        .unwrap();
    assert!(status.success());

    let rules_only = |text: &str| {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    // Inside the pod's cgroup, where the getsockopt hook runs ...
    let inside = pod.run(
        0,
        std::path::Path::new("/usr/sbin/iptables-legacy-save"),
        &["-t", "filter"],
    );
    // ... and from outside any attached cgroup.
    let outside = Command::new("ip")
        .args([
            "netns",
            "exec",
            &pod.name,
            "iptables-legacy-save",
            "-t",
            "filter",
        ])
        .output()
        .unwrap();
    let (inside, outside) = (
        rules_only(&stdout_of(&inside)),
        rules_only(&stdout_of(&outside)),
    );
    assert_eq!(
        inside.iter().filter(|l| l.starts_with("-A OUTPUT")).count(),
        300
    );
    assert_eq!(inside, outside);
}
