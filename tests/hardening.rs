//! The pin directory cannot be turned against meshbpf: planted symbolic links, directories
//! of other tools or users, and detaches stopped half-way never cost a registered pod its
//! capture or its answers.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output};

use common::*;

/// Runs `args` on the host as the unprivileged application user.
fn as_user(args: &[&str]) -> Output {
    let uid = APP_UID.to_string();
    Command::new("setpriv")
        .args(["--reuid", &uid, "--regid", &uid, "--clear-groups", "--"])
        .args(args)
        .output()
        .expect("setpriv")
}

/// A registered pod with its sidecar and a server in another pod.
struct Meshed {
    env: Env,
    client: Pod,
    _server: Proc,
    _sidecar: Proc,
    dest: String,
}

fn meshed() -> Meshed {
    let mut env = Env::new();
    let cgroup = env.cgroup.to_str().unwrap().to_string();
    stdout_of(&env.meshbpf(&["attach", "--cgroup", &cgroup]));
    let client = env.pod("client");
    let server_pod = env.pod("server");
    let server = server_pod.server(&["0.0.0.0:8080"]);
    stdout_of(&env.meshbpf(&["register", "--netns", client.netns.to_str().unwrap()]));
    let sidecar = client.sidecar();
    Meshed {
        dest: server_pod.addr(false, 8080),
        env,
        client,
        _server: server,
        _sidecar: sidecar,
    }
}

impl Meshed {
    /// A connection from the registered pod goes through its sidecar to the right place.
    fn assert_captured(&self) {
        let probe = self.client.connect(&self.dest, &[]);
        assert!(probe.ok, "{probe:?}");
        assert!(probe.get("local").starts_with("127.0.0.1:"), "{probe:?}");
        assert_eq!(probe.get("peer"), self.dest);
        assert!(probe.get("reply").contains("msg="), "{probe:?}");
    }

    fn attach(&self) -> Output {
        let cgroup = self.env.cgroup.to_str().unwrap().to_string();
        self.env.meshbpf(&["attach", "--cgroup", &cgroup])
    }
}

#[test]
fn a_staging_symlink_planted_by_another_user_is_never_followed() {
    if !privileged() {
        return;
    }
    let m = meshed();
    let pin = m.env.pin_dir.to_str().unwrap();
    // The bpffs root is 1777, as after a plain `mount -t bpf`: any user can plant entries.
    let link = format!("{pin}-staging-999999");
    let out = as_user(&["ln", "-s", pin, &link]);
    assert!(out.status.success(), "{out:?}");
    // And a directory of that user's own, whose `links` leads into the live attachment.
    let dir = format!("{pin}-staging-999998");
    assert!(as_user(&["mkdir", &dir]).status.success());
    let links = format!("{pin}/links");
    assert!(as_user(&["ln", "-s", &links, &format!("{dir}/links")])
        .status
        .success());

    // Routine attaches (an agent restart, an upgrade) and a detach of another attachment in
    // the same bpffs.
    stdout_of(&m.attach());
    stdout_of(&m.attach());
    let other = m.env.bpffs.join("other");
    stdout_of(
        &Command::new(cli())
            .args(["detach", "--pin-dir", other.to_str().unwrap()])
            .output()
            .unwrap(),
    );

    let mut hooks = m.env.attached_hooks();
    hooks.sort();
    assert_eq!(hooks, ATTACH_TYPES);
    assert_eq!(
        meshbpf::Mesh::open(&m.env.pin_dir)
            .unwrap()
            .pods()
            .unwrap()
            .len(),
        1
    );
    m.assert_captured();
    // What that user made is theirs: left as it was.
    assert!(fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(fs::symlink_metadata(format!("{dir}/links"))
        .unwrap()
        .file_type()
        .is_symlink());
}

#[test]
fn a_pin_dir_meshbpf_did_not_create_is_refused_and_left_alone() {
    if !privileged() {
        return;
    }
    let env = Env::new();
    let cgroup = env.cgroup.to_str().unwrap().to_string();
    let attach = |pin: &Path| {
        Command::new(cli())
            .args(["attach", "--cgroup", &cgroup, "--pin-dir"])
            .arg(pin)
            .output()
            .unwrap()
    };
    let detach = |pin: &Path| {
        Command::new(cli())
            .args(["detach", "--pin-dir"])
            .arg(pin)
            .output()
            .unwrap()
    };
    let refused = |out: &Output, words: &str| {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(6), "{stderr}");
        assert!(stderr.contains(words), "{stderr}");
    };

    // Another tool's maps, in a root-owned 0700 directory like meshbpf's own.
    let tool = env.bpffs.join("tool");
    fs::create_dir(&tool).unwrap();
    fs::set_permissions(&tool, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let theirs = tool.join("their_map");
    let out = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&theirs)
        .args([
            "type",
            "array",
            "key",
            "4",
            "value",
            "4",
            "entries",
            "1",
            "name",
            "their_map",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    refused(&attach(&tool), "not a meshbpf attachment");
    refused(&detach(&tool), "not a meshbpf attachment");
    assert!(theirs.exists());

    // The bpffs root itself.
    refused(&attach(&env.bpffs), "root of a bpffs mount");
    refused(&detach(&env.bpffs), "root of a bpffs mount");

    // A directory another user made first, where the agent will attach: empty, but theirs.
    let squatted = env.bpffs.join("squatted");
    assert!(as_user(&["mkdir", squatted.to_str().unwrap()])
        .status
        .success());
    refused(&attach(&squatted), "owned by uid 1000");
    assert_eq!(fs::metadata(&squatted).unwrap().uid(), APP_UID);

    // A symbolic link in place of the pin directory, even to a real attachment.
    stdout_of(&attach(&env.pin_dir));
    let alias = env.bpffs.join("alias");
    assert!(as_user(&[
        "ln",
        "-s",
        env.pin_dir.to_str().unwrap(),
        alias.to_str().unwrap()
    ])
    .status
    .success());
    refused(&detach(&alias), "symbolic link");
    let mut hooks = env.attached_hooks();
    hooks.sort();
    assert_eq!(hooks, ATTACH_TYPES);
    for path in [&tool, &squatted, &alias] {
        assert!(fs::symlink_metadata(path).is_ok(), "{path:?} was removed");
    }
}

/// The hooks that only make sense with the ones that answer for them.
const CAPTURE_HOOKS: [&str; 6] = [
    "cgroup_inet4_bind",
    "cgroup_inet6_bind",
    "cgroup_udp4_sendmsg",
    "cgroup_udp6_sendmsg",
    "cgroup_inet4_connect",
    "cgroup_inet6_connect",
];

#[test]
fn a_detach_stopped_at_any_step_never_leaves_capture_without_its_answers() {
    if !privileged() {
        return;
    }
    let m = meshed();
    // Each run makes the k-th unlink(2) of the detach fail, stopping it right there, as a
    // kill at that moment would: after 0, 1, 2 ... of its pins are gone.
    let pins: usize = ["links", "maps"]
        .iter()
        .map(|d| fs::read_dir(m.env.pin_dir.join(d)).unwrap().count())
        .sum();
    for k in 1..=pins {
        let out = Command::new("strace")
            .args(["-f", "-o", "/dev/null", "-e", "trace=unlink,unlinkat", "-e"])
            .arg(format!("inject=unlink,unlinkat:error=EIO:when={k}"))
            .arg(cli())
            .args(["detach", "--pin-dir"])
            .arg(&m.env.pin_dir)
            .output()
            .unwrap();
        assert!(!out.status.success(), "detach did not stop at unlink {k}");
        let hooks = m.env.attached_hooks();
        if CAPTURE_HOOKS.iter().any(|h| hooks.iter().any(|a| a == h)) {
            for answer in ATTACH_TYPES.iter().filter(|h| !CAPTURE_HOOKS.contains(h)) {
                assert!(
                    hooks.iter().any(|a| a == answer),
                    "stopped at unlink {k}: {answer} is gone while {hooks:?} still capture"
                );
            }
        }
        // Whether the connection still goes through the sidecar or already straight, it
        // reaches its destination and getpeername() names it.
        let probe = m.client.connect(&m.dest, &[]);
        assert!(probe.ok, "stopped at unlink {k}: {probe:?}");
        assert_eq!(probe.get("peer"), m.dest, "stopped at unlink {k}");
        assert!(probe.get("reply").contains("msg="), "{probe:?}");
        // The next attach repairs it: every hook attached again, the pod still captured when
        // its registration survived.
        stdout_of(&m.attach());
        let mut hooks = m.env.attached_hooks();
        hooks.sort();
        assert_eq!(hooks, ATTACH_TYPES, "after stopping at unlink {k}");
        stdout_of(
            &m.env
                .meshbpf(&["register", "--netns", m.client.netns.to_str().unwrap()]),
        );
        m.assert_captured();
    }
}
