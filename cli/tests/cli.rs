//! Bad input gets a message naming the fix and an exit code a node agent can act on.

mod common;

use std::os::unix::process::CommandExt;
use std::process::{Command, Output};

use common::*;

const EXIT_NOT_ATTACHED: i32 = 3;
const EXIT_PERMISSION: i32 = 4;
const EXIT_BAD_INPUT: i32 = 6;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn register_of_a_missing_path_names_the_expected_path() {
    if !privileged() {
        return;
    }
    let env = Env::new();
    let out = env.meshbpf(&["register", "--netns", "/proc/999999999/ns/net"]);
    assert_eq!(out.status.code(), Some(EXIT_BAD_INPUT), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no such file") && stderr(&out).contains("/proc/PID/ns/net"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn with_log_format_json_a_failed_command_s_error_is_one_json_line() {
    if !privileged() {
        return;
    }
    let env = Env::new();
    let out = env.meshbpf(&[
        "register",
        "--netns",
        "/proc/999999999/ns/net",
        "--log-format",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(EXIT_BAD_INPUT), "{}", stderr(&out));
    let text = stderr(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text}");
    let line: serde_json::Value = serde_json::from_str(lines[0]).expect("a JSON object");
    assert_eq!(line["level"], "ERROR", "{line}");
    assert_eq!(line["exit_code"], EXIT_BAD_INPUT, "{line}");
    assert!(line["timestamp"].is_string(), "{line}");
    let message = line["message"].as_str().unwrap();
    assert!(message.contains("/proc/PID/ns/net"), "{line}");

    // A format it does not know is bad input, named with the ones it does.
    let out = env.meshbpf(&["status", "--log-format", "yaml"]);
    assert_eq!(out.status.code(), Some(EXIT_BAD_INPUT), "{}", stderr(&out));
    assert!(stderr(&out).contains("text, json"), "{}", stderr(&out));
}

#[test]
fn register_of_a_file_that_is_not_a_netns_is_refused() {
    if !privileged() {
        return;
    }
    let env = Env::new();
    for path in ["/etc/hostname", "/proc/self/ns/mnt"] {
        let out = env.meshbpf(&["register", "--netns", path]);
        assert_eq!(out.status.code(), Some(EXIT_BAD_INPUT), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("is not a network namespace"),
            "{}",
            stderr(&out)
        );
    }
}

#[test]
fn register_of_the_host_netns_is_refused() {
    if !privileged() {
        return;
    }
    // Nothing is attached under this pin dir: even a broken check could not register anything.
    let env = Env::new();
    let out = env.meshbpf(&["register", "--netns", "/proc/self/ns/net"]);
    assert_eq!(out.status.code(), Some(EXIT_BAD_INPUT), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("host's own network namespace")
            && stderr(&out).contains("--allow-host-netns"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn attach_to_a_cgroup_v1_or_plain_directory_says_how_to_mount_cgroup2() {
    if !privileged() {
        return;
    }
    let env = Env::new();
    let mut paths = vec![env.root.clone()];
    paths.extend(meshbpf::mounts_of_type("cgroup").into_iter().take(1));
    for path in paths {
        let out = env.meshbpf(&["attach", "--cgroup", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(EXIT_BAD_INPUT), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("is not a cgroup v2 directory")
                && stderr(&out).contains("mount -t cgroup2"),
            "{}",
            stderr(&out)
        );
        assert!(!env.pin_dir.exists());
    }
    let out = env.meshbpf(&["attach", "--cgroup", "/nonexistent/cgroup"]);
    assert_eq!(out.status.code(), Some(EXIT_BAD_INPUT));
    assert!(
        stderr(&out).contains("no such cgroup directory"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn attach_without_bpffs_says_how_to_mount_it() {
    if !privileged() {
        return;
    }
    let env = Env::new();
    let out = Command::new(cli())
        .args([
            "attach",
            "--cgroup",
            env.cgroup.to_str().unwrap(),
            "--pin-dir",
        ])
        .arg(env.root.join("not-bpffs"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(EXIT_BAD_INPUT), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("not on a bpffs mount")
            && stderr(&out).contains("mount -t bpf bpf /sys/fs/bpf"),
        "{}",
        stderr(&out)
    );
    assert!(env.attached_hooks().is_empty());
}

#[test]
fn commands_without_an_attachment_say_to_attach_first() {
    if !privileged() {
        return;
    }
    let env = Env::new();
    for verb in [&["status"][..], &["list"], &["list", "--json"]] {
        let out = env.meshbpf(verb);
        assert_eq!(
            out.status.code(),
            Some(EXIT_NOT_ATTACHED),
            "{verb:?}: {}",
            stderr(&out)
        );
        assert!(
            stderr(&out).contains("run `meshbpf attach --cgroup PATH` first"),
            "{}",
            stderr(&out)
        );
    }
}

#[test]
fn a_non_root_user_is_told_to_run_as_root() {
    if !privileged() {
        return;
    }
    let env = Env::new();
    for verb in [
        &["attach", "--cgroup", env.cgroup.to_str().unwrap()][..],
        &["status"],
        &["detach"],
    ] {
        let mut cmd = command_via_fd(&cli());
        cmd.args(verb).arg("--pin-dir").arg(&env.pin_dir);
        // SAFETY: only async-signal-safe set*id calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if nix::libc::setgroups(0, std::ptr::null()) < 0
                    || nix::libc::setresgid(65534, 65534, 65534) < 0
                    || nix::libc::setresuid(65534, 65534, 65534) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = cmd.output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(EXIT_PERMISSION),
            "{verb:?}: {}",
            stderr(&out)
        );
        assert!(stderr(&out).contains("needs root"), "{}", stderr(&out));
    }
    assert!(env.attached_hooks().is_empty());
}

#[test]
fn list_and_status_report_registered_pods_and_counters_as_json() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    stdout_of(&env.meshbpf(&["attach", "--cgroup", env.cgroup.to_str().unwrap()]));
    let pod = env.pod("pod");
    let out = stdout_of(&env.meshbpf(&[
        "register",
        "--netns",
        pod.netns.to_str().unwrap(),
        "--proxy-uid",
        "2102",
        "--outbound-port",
        "4140",
    ]));
    let cookie = meshbpf::Netns::open(&pod.netns).unwrap().cookie();
    assert!(out.contains(&format!("netns cookie {cookie}")), "{out}");

    let list: serde_json::Value =
        serde_json::from_str(&stdout_of(&env.meshbpf(&["list", "--json"]))).unwrap();
    assert_eq!(list[0]["netns_cookie"], cookie);
    assert_eq!(list[0]["proxy_uids"], serde_json::json!([2102]));
    assert_eq!(list[0]["outbound_port"], 4140);
    // Every field of the library's Pod, as the library has it.
    let library =
        serde_json::to_value(meshbpf::Mesh::open(&env.pin_dir).unwrap().pods().unwrap()).unwrap();
    assert_eq!(list, library);
    assert_eq!(
        list[0]["addresses"],
        serde_json::json!([pod.v4.to_string(), pod.v6.to_string()])
    );
    assert_eq!(list[0]["inbound_mode"], "redirect");
    assert_eq!(list[0]["include_outbound_cidrs"], "*");

    let status: serde_json::Value =
        serde_json::from_str(&stdout_of(&env.meshbpf(&["status", "--json"]))).unwrap();
    assert_eq!(
        status["programs"].as_array().unwrap().len(),
        ATTACH_TYPES.len()
    );
    assert_eq!(status["pods"].as_array().unwrap().len(), 1);
    assert!(status["counters"]["connect_redirected"].is_u64());
    assert_eq!(status["layout_version"], meshbpf::LAYOUT_VERSION);
    assert!(
        status["cgroup"]
            .as_str()
            .is_some_and(|c| c.contains(env.cgroup.to_str().unwrap())),
        "{status}"
    );

    stdout_of(&env.meshbpf(&["unregister", "--netns", pod.netns.to_str().unwrap()]));
    let list: serde_json::Value =
        serde_json::from_str(&stdout_of(&env.meshbpf(&["list", "--json"]))).unwrap();
    assert_eq!(list, serde_json::json!([]));
}

#[test]
fn register_of_a_fifo_or_a_symlink_loop_is_refused_at_once() {
    if !privileged() {
        return;
    }
    let env = Env::new();
    let fifo = env.root.join("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let a = env.root.join("loop-a");
    let b = env.root.join("loop-b");
    std::os::unix::fs::symlink(&b, &a).unwrap();
    std::os::unix::fs::symlink(&a, &b).unwrap();
    for path in [&fifo, &a] {
        // Bounded: a blocking open of the FIFO would hang here, not fail.
        let out = Command::new("timeout")
            .arg("10")
            .arg(cli())
            .args(["register", "--netns"])
            .arg(path)
            .arg("--pin-dir")
            .arg(&env.pin_dir)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(EXIT_BAD_INPUT),
            "{path:?}: {}",
            stderr(&out)
        );
        assert!(
            stderr(&out).contains("is not a network namespace"),
            "{}",
            stderr(&out)
        );
    }
}

/// Runs `meshbpf ARGS --pin-dir PIN` (`check`: no pin dir) with stdout a pipe whose reader
/// has gone, as `| head -1` leaves it once it has read its line, and with backtraces on.
fn into_closed_pipe(env: &Env, args: &[&str]) -> Output {
    let (reader, writer) = nix::unistd::pipe().unwrap();
    drop(reader);
    let mut cmd = Command::new(cli());
    cmd.args(args);
    if args[0] != "check" {
        cmd.arg("--pin-dir").arg(&env.pin_dir);
    }
    cmd.stdout(writer)
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap()
}

#[test]
fn output_into_a_closed_pipe_ends_quietly_with_the_command_s_own_exit_code() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    stdout_of(&env.meshbpf(&["attach", "--cgroup", env.cgroup.to_str().unwrap()]));
    let pod = env.pod("pod");
    stdout_of(&env.meshbpf(&["register", "--netns", pod.netns.to_str().unwrap()]));
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["list"],
        &["list", "--json"],
        &["check"],
        &["check", "--json"],
        &["gc"],
    ] {
        // What the same command exits with when its output is read.
        let read = if args[0] == "check" {
            Command::new(cli()).args(args).output().unwrap()
        } else {
            env.meshbpf(args)
        };
        assert!(!read.stdout.is_empty(), "{args:?} printed nothing");
        let out = into_closed_pipe(&env, args);
        let err = stderr(&out);
        assert!(
            !err.contains("panicked") && !err.contains("backtrace") && !err.contains("Broken pipe"),
            "{args:?}: {err}"
        );
        assert_eq!(out.status.code(), read.status.code(), "{args:?}: {err}");
        assert_eq!(err, stderr(&read), "{args:?}: only what it says anyway");
    }
    // The attachment is as it was: still one pod, every hook.
    let mesh = meshbpf::Mesh::open(&env.pin_dir).unwrap();
    assert_eq!(mesh.pods().unwrap().len(), 1);
    assert_eq!(env.attached_hooks().len(), ATTACH_TYPES.len());
}
