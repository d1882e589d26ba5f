//! The plugin's unit tests: conf parsing, settings, routes, state files.

use super::*;
use meshbpf::Cidr;
use meshbpf::PodSettings;

fn parse(text: &str) -> Result<PluginConf, ErrorResult> {
    PluginConf::parse(text.as_bytes())
}

#[test]
fn conf_keys_and_defaults() {
    let conf = parse(
        r#"{"cniVersion":"1.0.0","name":"k8s","type":"meshbpf-cni","pin_dir":"/sys/fs/bpf/x",
           "mesh":"linkerd","exclude_outbound_ports":[3306,"5432"],"no_dns":true,
           "capabilities":{"io.kubernetes.cri.pod-annotations":true},"cni.dev/other":1}"#,
    )
    .unwrap();
    assert_eq!(conf.pin_dir, Path::new("/sys/fs/bpf/x"));
    assert_eq!(conf.state_dir, Path::new(DEFAULT_STATE_DIR));
    assert_eq!(conf.exclude_namespaces, ["kube-system"]);
    let Decision::Register(r) = conf.decide(None).unwrap() else {
        panic!("skipped")
    };
    let s = r.settings;
    assert_eq!(s.proxy_uids, [2102].into());
    assert_eq!(s.exclude_outbound_ports, [3306, 5432].into());
    assert!(!s.capture_dns);
}

#[test]
fn unknown_keys_bad_values_and_versions_are_refused_by_name() {
    for (text, code, named) in [
        (r#"{"cniVersion":"1.0.0","bogus":17}"#, 2, "\"bogus\": 17"),
        (
            r#"{"cniVersion":"1.0.0","include_outbound_cidrs":"10.0.0.0/40"}"#,
            7,
            "10.0.0.0/40",
        ),
        (
            r#"{"cniVersion":"1.0.0","pin_dir":"relative"}"#,
            7,
            "pin_dir",
        ),
        (
            r#"{"cniVersion":"1.0.0","exclude_namespaces":"kube-system"}"#,
            7,
            "exclude_namespaces",
        ),
        (r#"{"cniVersion":"2.0.0"}"#, 1, "2.0.0"),
        (r#"[1,2]"#, 6, "JSON object"),
        (r#"{"cniVersion":"1.0.0","prevResult":[]}"#, 7, "prevResult"),
    ] {
        let err = parse(text).unwrap_err();
        assert_eq!(err.code, code, "{text}: {err:?}");
        assert!(err.msg.contains(named), "{text}: {err:?}");
    }
}

#[test]
fn prev_result_is_kept_byte_for_byte() {
    let prev =
        "{ \"cniVersion\":\"1.0.0\" ,\n \"ips\": [ {\"address\":\"192.0.2.5/24\"} ],\"z\":1.50}";
    let conf = parse(&format!(r#"{{"cniVersion":"1.0.0","prevResult":{prev}}}"#)).unwrap();
    assert_eq!(prev_result(&conf).unwrap().get(), prev);
}

#[test]
fn annotations_decide_injection_and_settings() {
    let with = |annotations: &str, args: Option<&str>| {
        parse(&format!(
            r#"{{"cniVersion":"1.0.0","runtimeConfig":{{"{ANNOTATIONS_CAPABILITY}":{annotations}}}}}"#
        ))
        .unwrap()
        .decide(args)
    };
    assert!(matches!(with("{}", None), Ok(Decision::Skip(_))));
    // containerd's way of saying "no annotations".
    assert!(matches!(with("null", None), Ok(Decision::Skip(_))));
    let Ok(Decision::Register(r)) = with(
        r#"{"sidecar.istio.io/status":"{}","traffic.sidecar.istio.io/foo":"1","a/b":"c"}"#,
        None,
    ) else {
        panic!("an unknown traffic annotation failed the pod")
    };
    assert_eq!(r.unknown_traffic_keys, ["traffic.sidecar.istio.io/foo"]);
    assert_eq!(r.other_keys, ["a/b"]);
    assert!(matches!(
        with(
            r#"{"sidecar.istio.io/status":"{}","sidecar.istio.io/inject":"False"}"#,
            None
        ),
        Ok(Decision::Skip(_))
    ));
    let Ok(Decision::Register(r)) = with(
        r#"{"sidecar.istio.io/status":"{}","traffic.sidecar.istio.io/excludeOutboundPorts":"3306"}"#,
        Some("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web"),
    ) else {
        panic!("not registered")
    };
    let s = r.settings;
    assert_eq!(s.exclude_outbound_ports, [3306].into());
    let err = with(
        r#"{"sidecar.istio.io/status":"{}","traffic.sidecar.istio.io/includeOutboundIPRanges":"x"}"#,
        None,
    )
    .unwrap_err();
    assert!(err.msg.contains("includeOutboundIPRanges"), "{err:?}");
    assert!(matches!(
        with(
            r#"{"sidecar.istio.io/status":"{}"}"#,
            Some("K8S_POD_NAMESPACE=kube-system")
        ),
        Ok(Decision::Skip(why)) if why.contains("kube-system")
    ));
}

#[test]
fn state_file_names_are_safe_and_distinct() {
    let dir = Path::new("/run/x");
    assert_eq!(
        state_path(dir, "abc.1", "eth0"),
        Path::new("/run/x/abc%2E1.eth0")
    );
    assert_ne!(
        state_path(dir, "a.b", "c"),
        state_path(dir, "a", "b.c"),
        "the separator cannot be forged"
    );
    assert_eq!(
        network_state_dir(dir, "../etc"),
        Path::new("/run/x/%2E%2E%2Fetc")
    );
}

#[test]
fn a_missing_or_unknown_command_is_named_before_the_conf_is_read() {
    for command in [None, Some("FOO")] {
        let env: Environment = command
            .map(|c| ("CNI_COMMAND".to_string(), c.to_string()))
            .into_iter()
            .collect();
        let mut log = Vec::new();
        let out = run(&env, b"{not json", &mut log);
        assert!(!out.ok);
        let json: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(json["code"], code::INVALID_ENVIRONMENT, "{json}");
        assert!(
            json["msg"].as_str().unwrap().contains("CNI_COMMAND"),
            "{json}"
        );
        assert!(String::from_utf8_lossy(&log).contains("error 4"));
    }
}

#[test]
fn a_route_out_of_an_interface_loses_the_longer_prefixes_routed_elsewhere() {
    let c = |t: &str| t.parse::<Cidr>().unwrap();
    let text = |v: Vec<Cidr>| v.iter().map(ToString::to_string).collect::<Vec<_>>();
    // A default route out of net1 while eth0 holds 192.0.2.0/24: everything but that.
    let rest = without(c("0.0.0.0/0"), &[c("192.0.2.0/24"), c("2001:db8::/64")]);
    assert_eq!(rest.len(), 24);
    assert!(rest
        .iter()
        .all(|r| !r.contains("192.0.2.9".parse().unwrap())));
    assert!(rest
        .iter()
        .any(|r| r.contains("192.0.3.1".parse().unwrap())));
    assert!(rest.iter().any(|r| r.contains("10.1.2.3".parse().unwrap())));
    assert_eq!(
        text(without(c("2001:db8::/32"), &[c("2001:db8::/33")])),
        ["2001:db8:8000::/33"]
    );
    // Shorter or unrelated routes elsewhere take nothing; the same prefix takes all.
    assert_eq!(
        text(without(
            c("203.0.113.0/24"),
            &[c("0.0.0.0/0"), c("198.51.100.0/24")]
        )),
        ["203.0.113.0/24"]
    );
    assert!(without(c("203.0.113.0/24"), &[c("203.0.113.0/24")]).is_empty());
}

#[test]
fn settings_diff_names_the_fields() {
    let a = PodSettings::default();
    let b = PodSettings {
        outbound_port: 4140,
        ..Default::default()
    };
    let diff = settings_diff(&a, &b);
    assert!(
        diff.contains("registered outbound_port: 15001")
            && diff.contains("conf gives outbound_port: 4140"),
        "{diff}"
    );
}

#[test]
fn log_times_are_utc_rfc3339_with_microseconds() {
    use std::time::{Duration, UNIX_EPOCH};
    let at = |secs: u64, micros: u32| {
        rfc3339(UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros.into()))
    };
    assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
    // `date -u -d @951825600`: the leap day of a year divisible by 400.
    assert_eq!(at(951_825_600, 7), "2000-02-29T12:00:00.000007Z");
    assert_eq!(at(1_796_601_599, 999_999), "2026-12-06T23:59:59.999999Z");
    assert_eq!(at(4_102_444_800, 0), "2100-01-01T00:00:00.000000Z");
}

#[test]
fn every_log_line_names_its_level_command_container_netns_and_interface() {
    let env: Environment = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c0ffee"),
        ("CNI_NETNS", "/var/run/netns/cni-1234"),
        ("CNI_IFNAME", "eth0"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let mut log = Vec::new();
    let out = run(
        &env,
        br#"{"cniVersion":"1.0.0","name":"n","type":"meshbpf-cni"}"#,
        &mut log,
    );
    assert!(!out.ok, "no prevResult: refused");
    let text = String::from_utf8(log).unwrap();
    let line = text.lines().next().unwrap();
    let (time, rest) = line.split_once(' ').unwrap();
    assert!(time.len() == 27 && time.ends_with('Z'), "{line}");
    assert!(
        rest.starts_with(
            "ERROR meshbpf-cni ADD container=c0ffee netns=/var/run/netns/cni-1234 ifname=eth0: \
             error 7: no prevResult"
        ),
        "{line}"
    );
}
