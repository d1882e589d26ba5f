//! The README's first command: the demo shows what meshbpf did, and leaves the
//! machine as it found it, also when interrupted with Ctrl-C at any moment.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The demo with the binaries this test run built (no second build inside the test).
fn demo() -> Command {
    let bin: PathBuf = cli().parent().expect("target dir").to_path_buf();
    let mut cmd = Command::new("bash");
    cmd.arg(repo_root().join("scripts/demo.sh"))
        .env("MESHBPF_DEMO_BIN", bin)
        .stdin(Stdio::null());
    // SAFETY: only async-signal-safe calls between fork and exec: a session of its own (so
    // Ctrl-C can go to the whole group, as a terminal sends it) and SIGINT at its default
    // (a background test process may have it ignored, which a shell cannot trap).
    unsafe {
        cmd.pre_exec(|| {
            nix::libc::setsid();
            nix::libc::signal(nix::libc::SIGINT, nix::libc::SIG_DFL);
            Ok(())
        });
    }
    cmd
}

/// Nothing the demo creates is left: network namespaces, mounts, its /run directory.
fn leftovers() -> Vec<String> {
    let mut left = Vec::new();
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    left.extend(
        String::from_utf8_lossy(&netns.stdout)
            .lines()
            .filter(|l| l.starts_with("mbdemo-"))
            .map(str::to_string),
    );
    left.extend(
        std::fs::read_to_string("/proc/mounts")
            .unwrap()
            .lines()
            .filter(|l| l.contains("meshbpf-demo"))
            .map(str::to_string),
    );
    if Path::new("/run/meshbpf-demo").exists() {
        left.push("/run/meshbpf-demo".into());
    }
    left
}

#[test]
fn the_demo_shows_captured_traffic_and_cleans_up_even_when_interrupted() {
    if !privileged() {
        return;
    }
    // Only one demo at a time on a machine: its names are fixed.
    let started = Instant::now();
    let out = demo().output().unwrap();
    let total = started.elapsed();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "CAPTURED",
        "getsockname() says 192.0.2.10:",
        "getpeername() 192.0.2.12:8080",
        "untouched",
        "through the sidecar",
        "straight to the server",
        "original_dst=192.0.2.12:8080",
        "original_dst=192.0.2.13:53",
        "got 127.0.0.1:80",
        "connect_redirected",
        "captured: to the sidecar's outbound listener",
        "inbound: wildcard bind moved to loopback",
        "skipped: the sidecar's own socket",
        "(include_outbound_cidrs is *)",
    ] {
        assert!(
            text.contains(expected),
            "the demo did not show {expected:?}:\n{text}"
        );
    }
    assert!(leftovers().is_empty(), "{:?}", leftovers());

    // Ctrl-C (twice, as impatient people do) at moments spread over the whole run.
    for i in 1..=6u32 {
        let at = total.mul_f64(f64::from(i) / 7.0);
        let mut child = demo()
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(at);
        for _ in 0..2 {
            // SAFETY: signalling the process group of a child this test started.
            unsafe { nix::libc::kill(-(child.id() as i32), nix::libc::SIGINT) };
            std::thread::sleep(Duration::from_millis(50));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "the demo did not stop after Ctrl-C"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            leftovers().is_empty(),
            "interrupted after {at:?}: {:?}",
            leftovers()
        );
    }
}
