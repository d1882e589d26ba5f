//! The workloads themselves, on plain loopback (no meshbpf, no root): every send and
//! receive method of `stream` moves every byte, and `netprobe connect` reports what a
//! `netprobe serve` saw. When an end-to-end test fails, this tells whether the workload or
//! meshbpf is at fault. (It also makes `cargo test` build these binaries, which the other
//! packages' tests run.)

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Output, Stdio};

/// A server process, killed when dropped.
struct Server {
    child: Child,
    _stdout: BufReader<ChildStdout>,
    addr: String,
}

impl Server {
    /// Starts `program args...` and waits for its `listening=ADDR` line.
    fn start(program: &str, args: &[&str]) -> Server {
        let mut child = Command::new(program)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {program}: {e}"));
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("reading the server");
        let addr = line
            .trim()
            .strip_prefix("listening=")
            .unwrap_or_else(|| panic!("{program} printed {line:?}, not listening=ADDR"))
            .to_string();
        Server {
            child,
            _stdout: stdout,
            addr,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[track_caller]
fn stdout_of(out: Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn stream_moves_every_byte_with_each_send_and_receive_method() {
    let stream = env!("CARGO_BIN_EXE_stream");
    let server = Server::start(stream, &["serve", "127.0.0.1:0"]);
    let run = |args: &[&str]| {
        let mut all = vec!["run", &server.addr, "--size", "300000"];
        all.extend_from_slice(args);
        stdout_of(Command::new(stream).args(&all).output().unwrap())
    };
    for send in ["write", "writev", "sendmsg", "sendfile", "splice", "epoll"] {
        let out = run(&["--op", "upload", "--send", send]);
        assert!(
            out.contains("ok op=upload") && out.contains("bytes=300000"),
            "{send}: {out}"
        );
    }
    for recv in ["read", "small", "peek", "splice", "epoll"] {
        let out = run(&["--op", "download", "--recv", recv]);
        assert!(
            out.contains("ok op=download") && out.contains("bytes=300000"),
            "{recv}: {out}"
        );
    }
    let out = run(&["--op", "abort"]);
    assert!(out.contains("ok op=abort"), "{out}");
}

#[test]
fn netprobe_connect_reports_the_server_it_reached() {
    let netprobe = env!("CARGO_BIN_EXE_netprobe");
    let server = Server::start(netprobe, &["serve", "127.0.0.1:0"]);
    let out = stdout_of(
        Command::new(netprobe)
            .args(["connect", &server.addr, "--message", "hello"])
            .output()
            .unwrap(),
    );
    assert!(out.contains(&format!("peer={}", server.addr)), "{out}");
    assert!(out.contains("msg=hello"), "{out}");
}
