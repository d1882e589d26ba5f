//! Maps sized to the node (`attach --max-connections`, `--max-pods`): a small attachment
//! behaves as documented when full (docs/src/maps.md), and a re-attach with other sizes
//! moves every registration and live connection to the new maps, or refuses clearly.

mod common;

use std::time::Duration;

use common::*;
use meshbpf::{AttachOptions, MapSizes, Mesh, PodSettings};

/// The bound of the small attachments here.
const SMALL: u32 = 64;
/// More connections than [`SMALL`], fewer than the sidecar stand-in's listen backlog (128),
/// so that all of them are established while it is stopped.
const MORE: usize = 100;

struct World {
    env: Env,
    mesh: Mesh,
    app: Pod,
    _server_pod: Pod,
    server_addr: String,
    _server: Proc,
    sidecar: Proc,
}

fn sized(max_connections: Option<u32>, max_pods: Option<u32>) -> AttachOptions {
    AttachOptions::default().with_sizes(MapSizes {
        max_connections,
        max_pods,
    })
}

fn world(options: &AttachOptions) -> World {
    let mut env = Env::new();
    let mesh = Mesh::attach_with(&env.cgroup, &env.pin_dir, options).unwrap();
    let app = env.pod("app");
    let server_pod = env.pod("server");
    let (server, server_addr) = server_pod.stream_server();
    mesh.register_netns(&app.netns, &PodSettings::default())
        .unwrap();
    let sidecar = app.sidecar();
    World {
        env,
        mesh,
        app,
        _server_pod: server_pod,
        server_addr,
        _server: server,
        sidecar,
    }
}

/// The bound of one pinned map.
fn capacity(mesh: &Mesh, name: &str) -> u64 {
    mesh.map_usage()
        .unwrap()
        .into_iter()
        .find(|m| m.name == name)
        .map(|m| m.capacity)
        .unwrap()
}

impl World {
    /// Starts [`MORE`] connections from the application (one byte each, answered by the
    /// server through the sidecar) while the sidecar is stopped, and returns once every one
    /// is established and its original destination published, none accepted yet; `meanwhile`
    /// runs then, the sidecar still stopped.
    fn unanswered_connections<T>(&self, meanwhile: impl FnOnce() -> T) -> (Proc, T) {
        let parallel = MORE.to_string();
        with_paused(&self.sidecar, scaled(Duration::from_secs(8)), || {
            let before = counter(&self.mesh, "origin_recorded");
            let client = self.app.spawn(
                APP_UID,
                &helper("stream"),
                &[
                    "run",
                    &self.server_addr,
                    "--op",
                    "upload",
                    "--size",
                    "1",
                    "--parallel",
                    &parallel,
                ],
            );
            wait_until(
                || counter(&self.mesh, "origin_recorded") >= before + MORE as u64,
                || {
                    format!(
                        "{} of {MORE} origins recorded",
                        counter(&self.mesh, "origin_recorded") - before
                    )
                },
            );
            assert!(
                self.sidecar.lines("outbound ").is_empty(),
                "the sidecar ran before every connection was made: the machine is too slow \
                 for this test's pause"
            );
            (client, meanwhile())
        })
    }

    /// Waits until the sidecar took all [`MORE`] connections; returns how many it got the
    /// original destination of, and how many not.
    fn answered_and_missed(&self) -> (usize, usize) {
        wait_until(
            || self.sidecar.lines("outbound ").len() >= MORE,
            || format!("the sidecar took:\n{}", self.sidecar.output()),
        );
        let taken = self.sidecar.lines("outbound ");
        let missed = taken
            .iter()
            .filter(|l| l.contains("original_dst=none"))
            .count();
        (taken.len() - missed, missed)
    }
}

#[test]
fn a_node_sized_for_two_pods_refuses_a_third_naming_the_flag() {
    if !privileged() {
        return;
    }
    let mut w = world(&sized(Some(SMALL), Some(2)));
    assert_eq!(capacity(&w.mesh, "origin_dst_map"), u64::from(SMALL));
    assert_eq!(capacity(&w.mesh, "cookie_map"), 2);
    assert_eq!(capacity(&w.mesh, "pod_addrs"), 4);
    let second = w.env.pod("second");
    w.mesh
        .register_netns(&second.netns, &PodSettings::default())
        .unwrap();
    let third = w.env.pod("third");
    let err = w
        .mesh
        .register_netns(&third.netns, &PodSettings::default())
        .err();
    assert!(
        matches!(&err, Some(meshbpf::Error::PodMapFull { max: 2 })),
        "{err:?}"
    );
    let message = err.map(|e| e.to_string()).unwrap_or_default();
    assert!(message.contains("--max-pods"), "{message}");
    // Nothing of the third pod was left behind, and the first still works.
    assert_eq!(w.mesh.pods().unwrap().len(), 2);
    let probe = w.app.connect(&w.server_addr, &[]);
    assert!(
        probe.ok && probe.get("local").starts_with("127.0.0.1:"),
        "{probe:?}"
    );
}

#[test]
fn a_full_origin_map_forgets_the_oldest_unaccepted_connections_and_never_refuses_a_new_one() {
    if !privileged() {
        return;
    }
    let w = world(&sized(Some(SMALL), None));
    let (client, tracked) = w.unanswered_connections(|| w.mesh.tracked_connections());
    // Every connection was captured and published its origin; the map kept at most its
    // bound, the newest.
    assert!(tracked <= SMALL as usize, "{tracked} entries");
    assert_eq!(counter(&w.mesh, "connect_redirected"), MORE as u64);
    assert_eq!(counter(&w.mesh, "origin_update_failed"), 0);
    let (answered, missed) = w.answered_and_missed();
    // The sidecar, late, finds no destination for the connections whose entries went: it
    // is told ENOENT, as behind iptables when conntrack has no entry, and counted.
    assert!(
        missed >= MORE - SMALL as usize && answered >= 1,
        "answered {answered}, missed {missed}:\n{}",
        w.sidecar.output()
    );
    assert_eq!(counter(&w.mesh, "getsockopt_miss"), missed as u64);
    drop(client);
    // A new connection afterwards is captured and answered.
    let probe = w.app.connect(&w.server_addr, &[]);
    assert!(probe.ok, "{probe:?}");
    assert!(w
        .sidecar
        .output()
        .lines()
        .last()
        .unwrap_or("")
        .ends_with("upstream=connected"));
}

#[test]
fn a_reattach_with_other_sizes_keeps_registrations_and_unanswered_connections() {
    if !privileged() {
        return;
    }
    let w = world(&sized(Some(1024), Some(16)));
    let (client, (before, grown, after)) = w.unanswered_connections(|| {
        let before = w.mesh.tracked_connections();
        stdout_of(&w.env.meshbpf(&[
            "attach",
            "--cgroup",
            w.env.cgroup.to_str().unwrap(),
            "--max-connections",
            "4096",
            "--max-pods",
            "32",
        ]));
        let grown = Mesh::open(&w.env.pin_dir).unwrap();
        // Read while the sidecar is still stopped: none of them has ended.
        let after = grown.tracked_connections();
        (before, grown, after)
    });
    assert_eq!((before, after), (MORE, MORE));
    assert_eq!(capacity(&grown, "origin_dst_map"), 4096);
    assert_eq!(capacity(&grown, "cookie_map"), 32);
    assert_eq!(grown.pods().unwrap().len(), 1);
    // Every connection made before gets its original destination from the new map.
    let (answered, missed) = w.answered_and_missed();
    assert_eq!((answered, missed), (MORE, 0), "{}", w.sidecar.output());
    drop(client);
    // Attached again with no size: the sizes stay.
    stdout_of(
        &w.env
            .meshbpf(&["attach", "--cgroup", w.env.cgroup.to_str().unwrap()]),
    );
    let again = Mesh::open(&w.env.pin_dir).unwrap();
    assert_eq!(capacity(&again, "origin_dst_map"), 4096);
    assert_eq!(capacity(&again, "cookie_map"), 32);
    assert!(w.app.connect(&w.server_addr, &[]).ok);
}

#[test]
fn a_reattach_smaller_than_the_live_connections_is_refused_and_changes_nothing() {
    if !privileged() {
        return;
    }
    let w = world(&AttachOptions::default());
    let (client, out) = w.unanswered_connections(|| {
        w.env.meshbpf(&[
            "attach",
            "--cgroup",
            w.env.cgroup.to_str().unwrap(),
            "--max-connections",
            &SMALL.to_string(),
        ])
    });
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("--max-connections {SMALL}"))
            && err.contains(&format!("origin_dst_map holds {MORE} entries"))
            && err.contains("give a larger value"),
        "{err}"
    );
    assert_eq!(
        capacity(&w.mesh, "origin_dst_map"),
        u64::from(meshbpf::DEFAULT_MAX_CONNECTIONS)
    );
    let (answered, missed) = w.answered_and_missed();
    assert_eq!((answered, missed), (MORE, 0), "{}", w.sidecar.output());
    drop(client);
    assert!(w.app.connect(&w.server_addr, &[]).ok);
}

#[test]
fn a_size_out_of_range_is_refused_naming_the_range() {
    if !privileged() {
        return;
    }
    let env = Env::new();
    let cgroup = env.cgroup.to_str().unwrap();
    for (flag, value) in [
        ("--max-connections", "0"),
        ("--max-connections", "16777217"),
        ("--max-pods", "0"),
        ("--max-pods", "many"),
    ] {
        let out = env.meshbpf(&["attach", "--cgroup", cgroup, flag, value]);
        assert_eq!(out.status.code(), Some(6), "{flag} {value}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(flag), "{flag} {value}: {err}");
        assert!(!env.pin_dir.exists(), "{flag} {value}: attached anyway");
    }
    // The library checks the same ranges.
    let err = Mesh::attach_with(&env.cgroup, &env.pin_dir, &sized(Some(1), None)).err();
    assert!(
        matches!(&err, Some(meshbpf::Error::InvalidSetting(m)) if m.contains("--max-connections 1: give a number from 64")),
        "{err:?}"
    );
    assert!(!env.pin_dir.exists());
}
