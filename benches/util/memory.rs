//! Memory: what the kernel charges for meshbpf's maps (`memlock` in the map's fdinfo, which
//! since Linux 6.4 is the map's own estimate of its usage), what a captured connection adds
//! outside the maps (socket-local storage is charged to its socket's option memory, `ss -m`
//! `o`), and what iptables' conntrack holds per connection; with many live connections and
//! with many registered pods.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use libbpf_rs::{MapCore, MapHandle};

use crate::common::{Pod, Proc, APP_UID};

use super::in_netns;

/// One pinned map: its type, bound and charged memory.
#[derive(Clone, Debug)]
pub struct MapMemory {
    pub name: String,
    pub kind: String,
    pub max_entries: u32,
    pub bytes: u64,
}

/// Every map pinned under `pin_dir/maps`, by name.
pub fn maps(pin_dir: &Path) -> BTreeMap<String, MapMemory> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(pin_dir.join("maps")).expect("reading the pinned maps") {
        let path = entry.expect("reading the pinned maps").path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let map = MapHandle::from_pinned_path(&path).expect("opening a pinned map");
        let fdinfo =
            std::fs::read_to_string(format!("/proc/self/fdinfo/{}", map.as_fd().as_raw_fd()))
                .unwrap_or_default();
        let bytes = fdinfo
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        out.insert(
            name.clone(),
            MapMemory {
                name,
                kind: format!("{:?}", map.map_type()),
                max_entries: map.max_entries(),
                bytes,
            },
        );
    }
    out
}

/// The sum of every map's charged memory.
pub fn total(maps: &BTreeMap<String, MapMemory>) -> u64 {
    maps.values().map(|m| m.bytes).sum()
}

/// Established TCP sockets in the pod and the sum of their option memory (`skmem` `o`):
/// where socket-local storage (sk_storage) is charged.
pub fn socket_option_memory(pod: &Pod) -> (u64, u64) {
    let out = in_netns(pod, &["ss", "-Htmn", "state", "established"]);
    let mut sockets = 0;
    let mut bytes = 0;
    for line in out.lines() {
        let Some(skmem) = line.split("skmem:(").nth(1) else {
            continue;
        };
        sockets += 1;
        bytes += skmem
            .trim_end_matches(')')
            .split(',')
            .find_map(|f| f.strip_prefix('o'))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    (sockets, bytes)
}

/// Conntrack entries in the pod's network namespace (0 where conntrack never loaded).
pub fn conntrack_entries(pod: &Pod) -> u64 {
    in_netns(
        pod,
        &[
            "sh",
            "-c",
            "cat /proc/sys/net/netfilter/nf_conntrack_count 2>/dev/null || echo 0",
        ],
    )
    .trim()
    .parse()
    .unwrap_or(0)
}

/// The size of one conntrack entry (the `nf_conntrack` slab's object size), if known.
pub fn conntrack_entry_bytes() -> Option<u64> {
    let slabinfo = std::fs::read_to_string("/proc/slabinfo").ok()?;
    let line = slabinfo.lines().find(|l| l.starts_with("nf_conntrack "))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Starts the connection holder (this benchmark's own binary, `hold DEST N`) as the
/// application in `pod`: N connections to DEST, one HTTP request on each, then kept open
/// until it is killed. Returns once all are open.
pub fn hold(pod: &Pod, dest: &str, host_path: &str, n: usize) -> Proc {
    let exe = std::env::current_exe().expect("benchmark binary");
    let proc = pod.spawn(APP_UID, &exe, &["hold", dest, host_path, &n.to_string()]);
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    while !proc.output().contains("held=") {
        let out = proc.output();
        assert!(
            !out.contains("hold failed") && std::time::Instant::now() < deadline,
            "holding {n} connections in {}: {out}",
            pod.name
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    proc
}

/// The holder's body, run when the benchmark binary is started as `hold DEST PATH N`:
/// prints `held=N` once every connection has had its answer, then waits to be killed.
pub fn hold_main(args: &[String]) {
    let (Some(dest), Some(path), Some(n)) = (
        args.first(),
        args.get(1),
        args.get(2).and_then(|n| n.parse::<usize>().ok()),
    ) else {
        println!("hold failed: usage: hold DEST PATH N");
        std::process::exit(2);
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n");
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        let result = TcpStream::connect(dest.as_str()).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            s.write_all(request.as_bytes())?;
            let mut buf = [0u8; 4096];
            match s.read(&mut buf)? {
                0 => Err(std::io::Error::other("closed before answering")),
                _ => Ok(s),
            }
        });
        match result {
            Ok(s) => held.push(s),
            Err(e) => {
                println!("hold failed at connection {i}: {e}");
                std::process::exit(1);
            }
        }
    }
    println!("held={}", held.len());
    let _ = std::io::stdout().flush();
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// `n` new, empty network namespaces, held open by descriptor only (no bind mount, no
/// process): they go away when the descriptors are closed, also if the benchmark dies.
/// Made on a thread of their own, which ends in the last one.
pub fn empty_netns(n: usize) -> Vec<OwnedFd> {
    std::thread::spawn(move || {
        let mut fds = Vec::with_capacity(n);
        for _ in 0..n {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("unshare(CLONE_NEWNET)");
            let file = std::fs::File::open("/proc/thread-self/ns/net").expect("opening a netns");
            fds.push(OwnedFd::from(file));
        }
        fds
    })
    .join()
    .expect("making network namespaces")
}

/// The path through which this process reaches a descriptor, for `register --netns`.
pub fn fd_path(fd: &OwnedFd) -> String {
    format!("/proc/{}/fd/{}", std::process::id(), fd.as_raw_fd())
}
