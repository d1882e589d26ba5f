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
    // The refusal names the fix: the agent takes the name back, or `mv` it aside by hand.
    refused(&attach(&squatted), "`meshbpf agent` takes the name back");
    refused(&attach(&squatted), "squatted-from-uid-1000");
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

#[test]
fn the_agent_takes_back_a_pin_dir_another_user_made_first_and_keeps_their_entry_whole() {
    if !privileged() {
        return;
    }
    use common::k8s::{Agent, CniDirs};
    let env = Env::new();
    let pin = env.pin_dir.to_str().unwrap().to_string();
    // Another user made the pin directory first, put a directory and a link in it (bpffs
    // holds no plain files), ...
    assert!(as_user(&["mkdir", &pin]).status.success());
    assert!(as_user(&["mkdir", &format!("{pin}/notes")])
        .status
        .success());
    assert!(
        as_user(&["ln", "-s", "/etc/hostname", &format!("{pin}/link")])
            .status
            .success()
    );
    let cgroup = env.cgroup.to_str().unwrap().to_string();
    let out = env.meshbpf(&["attach", "--cgroup", &cgroup]);
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    assert!(env.attached_hooks().is_empty());

    // The agent takes the name back at start and attaches.
    let dirs = CniDirs::new(&env.root);
    let agent = Agent::start(&env, &dirs, "{}", &["--no-discover"]);
    let aside = env.bpffs.join("mesh-from-uid-1000");
    assert!(
        agent
            .log()
            .contains(&format!("moved it, as it was, to {}", aside.display())),
        "{}",
        agent.log()
    );
    let mut hooks = env.attached_hooks();
    hooks.sort();
    assert_eq!(hooks, ATTACH_TYPES, "{}", agent.log());
    let md = fs::symlink_metadata(&env.pin_dir).unwrap();
    assert_eq!((md.uid(), md.mode() & 0o7777), (0, 0o700));
    assert!(meshbpf::Mesh::open(&env.pin_dir).unwrap().pods().is_ok());
    // Their entry is all there, theirs, with nothing followed or changed.
    let md = fs::symlink_metadata(&aside).unwrap();
    assert!(md.is_dir() && md.uid() == APP_UID);
    assert_eq!(fs::metadata(aside.join("notes")).unwrap().uid(), APP_UID);
    assert_eq!(
        fs::read_link(aside.join("link")).unwrap(),
        Path::new("/etc/hostname")
    );
    // Taken back once, it stays meshbpf's: a restart finds it in place, moves nothing.
    drop(agent);
    let agent = Agent::start(&env, &dirs, "{}", &["--no-discover"]);
    assert!(!agent.log().contains("moved it"), "{}", agent.log());
    stdout_of(&env.meshbpf(&["status"]));
}

#[test]
fn a_staging_name_another_user_made_first_is_never_filled_nor_made_the_pin_dir() {
    if !privileged() {
        return;
    }
    let env = Env::new();
    // An agent in a container is pid 1 in its pid namespace: its staging name is easy to
    // guess, and another user makes it first.
    let staging = format!("{}-staging-1", env.pin_dir.display());
    assert!(as_user(&["mkdir", &staging]).status.success());
    let out = Command::new("unshare")
        .args(["--pid", "--fork", "--"])
        .arg(cli())
        .args(["attach", "--cgroup"])
        .arg(&env.cgroup)
        .arg("--pin-dir")
        .arg(&env.pin_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let md = fs::symlink_metadata(&env.pin_dir).unwrap();
    assert_eq!((md.uid(), md.mode() & 0o7777), (0, 0o700));
    let mut hooks = env.attached_hooks();
    hooks.sort();
    assert_eq!(hooks, ATTACH_TYPES);
    let md = fs::symlink_metadata(&staging).unwrap();
    assert_eq!(md.uid(), APP_UID);
    assert_eq!(
        fs::read_dir(&staging).unwrap().count(),
        0,
        "filled: {staging}"
    );
    stdout_of(&env.meshbpf(&["status"]));
}

#[test]
fn the_agent_takes_back_a_pin_dir_name_another_user_made_a_link_and_never_follows_it() {
    if !privileged() {
        return;
    }
    use common::k8s::{Agent, CniDirs};
    let env = Env::new();
    // The other user's link leads to a directory of theirs: neither is touched but moved.
    let theirs = env.bpffs.join("theirs");
    assert!(as_user(&["mkdir", theirs.to_str().unwrap()])
        .status
        .success());
    assert!(as_user(&[
        "ln",
        "-s",
        theirs.to_str().unwrap(),
        env.pin_dir.to_str().unwrap()
    ])
    .status
    .success());
    let dirs = CniDirs::new(&env.root);
    let agent = Agent::start(&env, &dirs, "{}", &["--no-discover"]);
    assert_eq!(
        env.attached_hooks().len(),
        ATTACH_TYPES.len(),
        "{}",
        agent.log()
    );
    let aside = env.bpffs.join("mesh-from-uid-1000");
    assert_eq!(fs::read_link(&aside).unwrap(), theirs);
    assert_eq!(fs::read_dir(&theirs).unwrap().count(), 0);
    assert!(fs::symlink_metadata(&env.pin_dir).unwrap().is_dir());

    // A directory root made (another tool's) is never taken: the agent refuses it.
    drop(agent);
    let tool = env.bpffs.join("tool");
    fs::create_dir(&tool).unwrap();
    fs::write(env.root.join("plugin.json"), "{}").unwrap();
    let out = Command::new(cli())
        .args(["agent", "--no-discover", "--listen", "none", "--cgroup"])
        .arg(&env.cgroup)
        .arg("--pin-dir")
        .arg(&tool)
        .arg("--cni-bin-dir")
        .arg(&dirs.bin)
        .arg("--cni-conf-dir")
        .arg(&dirs.conf)
        .arg("--plugin-conf")
        .arg(env.root.join("plugin.json"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{stderr}");
    assert!(stderr.contains("has mode 755"), "{stderr}");
    assert!(fs::symlink_metadata(&tool).unwrap().is_dir());
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
    for k in kill_points(pins) {
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
