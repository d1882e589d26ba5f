//! `meshbpf gc` identifies pods by netns cookie: the kernel gives a new namespace the nsfs
//! inode of one just gone, so an inode says nothing about a pod. Alone in its test binary:
//! other tests making and deleting namespaces at the same time would take the inode first.

mod common;

use std::fs;
use std::process::Command;

use common::*;

#[test]
fn gc_tells_a_dead_pod_from_a_new_namespace_that_took_its_inode() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    let mesh = env.attach();
    let dead = env.pod("dead");
    let registered = mesh
        .register_netns(&dead.netns, &meshbpf::PodSettings::default())
        .unwrap();
    sh(Command::new("ip").args(["netns", "del", &dead.name]));
    // The kernel hands a freed nsfs inode to the next namespace made anywhere (once the
    // dead one is cleaned up, asynchronously): make namespaces, keeping them, until some
    // live network namespace has the dead pod's inode — ours, or another test's.
    struct Made(Vec<String>);
    impl Drop for Made {
        fn drop(&mut self) {
            for name in &self.0 {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
    let mut made = Made(Vec::new());
    let taken = || {
        fs::read_dir("/run/netns").unwrap().flatten().any(|e| {
            use std::os::unix::fs::MetadataExt;
            fs::metadata(e.path()).is_ok_and(|m| m.ino() == registered.netns_inode)
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !taken() {
        assert!(
            std::time::Instant::now() < deadline,
            "no namespace took inode {}",
            registered.netns_inode
        );
        let name = format!("{}-fill{}", dead.name, made.0.len());
        sh(Command::new("ip").args(["netns", "add", &name]));
        made.0.push(name);
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    sh(Command::new("ip").args(["netns", "add", &dead.name]));

    let removed = mesh.gc().unwrap();
    assert_eq!(removed.len(), 1, "{removed:?}");
    assert_eq!(removed[0].netns_cookie, registered.netns_cookie);
    assert!(mesh.pods().unwrap().is_empty());
    // By cookie, too.
    let again = mesh
        .register_netns(&dead.netns, &meshbpf::PodSettings::default())
        .unwrap();
    let out = env.meshbpf(&["unregister", "--cookie", &again.netns_cookie.to_string()]);
    assert!(stdout_of(&out).contains("unregistered"));
    assert!(mesh.pods().unwrap().is_empty());
}
