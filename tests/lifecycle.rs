//! attach / detach: idempotent, all or nothing, and leaving nothing behind.

mod common;

use std::fs;
use std::os::fd::AsRawFd;

use common::*;
use libbpf_rs::libbpf_sys;

fn sorted_hooks(env: &Env) -> Vec<String> {
    let mut hooks = env.attached_hooks();
    hooks.sort();
    hooks
}

fn bpffs_entries(env: &Env) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(&env.bpffs)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.retain(|n| n != "maps.debug" && n != "progs.debug");
    names
}

#[test]
fn detach_stops_capture_and_removes_every_pin() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    let mesh = env.attach();
    let client = env.pod("client");
    let server = env.pod("server");
    let _server = server.server(&["0.0.0.0:8080"]);
    mesh.register_netns(&client.netns, &meshbpf::PodSettings::default())
        .unwrap();
    let sidecar = client.sidecar();
    let dest = server.addr(false, 8080);
    assert!(client
        .connect(&dest, &[])
        .get("local")
        .starts_with("127.0.0.1:"));
    assert_eq!(sorted_hooks(&env), ATTACH_TYPES);

    let out = env.meshbpf(&["detach"]);
    assert!(stdout_of(&out).contains("detached"));

    assert!(!env.pin_dir.exists());
    assert!(bpffs_entries(&env).is_empty(), "{:?}", bpffs_entries(&env));
    assert!(
        env.attached_hooks().is_empty(),
        "{:?}",
        env.attached_hooks()
    );
    let after = client.connect(&dest, &[]);
    assert!(
        after.get("local").starts_with(&client.v4.to_string()),
        "{after:?}"
    );
    assert_eq!(sidecar.lines("outbound ").len(), 1);
    // Detaching again is not an error: there is nothing left to do.
    assert!(stdout_of(&env.meshbpf(&["detach"])).contains("nothing attached"));
}

#[test]
fn attach_twice_keeps_one_set_of_programs_and_the_registered_pods() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    let cgroup = env.cgroup.to_str().unwrap().to_string();
    stdout_of(&env.meshbpf(&["attach", "--cgroup", &cgroup]));
    let client = env.pod("client");
    let server = env.pod("server");
    let _server = server.server(&["0.0.0.0:8080"]);
    stdout_of(&env.meshbpf(&["register", "--netns", client.netns.to_str().unwrap()]));
    let before = meshbpf::Mesh::open(&env.pin_dir).unwrap().status().unwrap();

    stdout_of(&env.meshbpf(&["attach", "--cgroup", &cgroup]));

    assert_eq!(sorted_hooks(&env), ATTACH_TYPES);
    let after = meshbpf::Mesh::open(&env.pin_dir).unwrap().status().unwrap();
    assert_eq!(after.pods, before.pods);
    for (old, new) in before.programs.iter().zip(&after.programs) {
        assert_eq!(
            old.link_id, new.link_id,
            "{} got a new link instead of an in-place update",
            old.hook
        );
        assert_ne!(old.prog_id, new.prog_id, "{} was not replaced", old.hook);
    }
    let sidecar = client.sidecar();
    assert_eq!(
        client.connect(&server.addr(false, 8080), &[]).get("peer"),
        server.addr(false, 8080)
    );
    assert_eq!(sidecar.lines("outbound ").len(), 1);
}

#[test]
fn attach_to_another_cgroup_with_the_same_pin_dir_is_refused() {
    if !privileged() {
        return;
    }
    let mut env = Env::new();
    let _mesh = env.attach();
    let other = env.pod("other");
    let err = meshbpf::Mesh::attach(&other.cgroup, &env.pin_dir).unwrap_err();
    assert!(
        matches!(err, meshbpf::Error::AttachedElsewhere { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("detach it first"), "{err}");
}

/// Loads `r0 = 1; exit` as a cgroup/connect6 program and attaches it exclusively (no
/// BPF_F_ALLOW_MULTI): every later attach to that hook of that cgroup fails.
struct ExclusiveConnect6 {
    prog_fd: i32,
    cgroup: fs::File,
}

impl ExclusiveConnect6 {
    fn attach(cgroup: &std::path::Path) -> Self {
        let cgroup = fs::File::open(cgroup).unwrap();
        let insns = [
            // BPF_ALU64 | BPF_MOV | BPF_K, dst r0, imm 1
            libbpf_sys::bpf_insn {
                code: 0xb7,
                _bitfield_align_1: [],
                _bitfield_1: libbpf_sys::bpf_insn::new_bitfield_1(0, 0),
                off: 0,
                imm: 1,
            },
            // BPF_JMP | BPF_EXIT
            libbpf_sys::bpf_insn {
                code: 0x95,
                _bitfield_align_1: [],
                _bitfield_1: libbpf_sys::bpf_insn::new_bitfield_1(0, 0),
                off: 0,
                imm: 0,
            },
        ];
        let mut opts = libbpf_sys::bpf_prog_load_opts {
            sz: std::mem::size_of::<libbpf_sys::bpf_prog_load_opts>() as _,
            expected_attach_type: libbpf_sys::BPF_CGROUP_INET6_CONNECT,
            ..Default::default()
        };
        // SAFETY: the instruction array and options outlive the call; names are NUL-terminated.
        let prog_fd = unsafe {
            libbpf_sys::bpf_prog_load(
                libbpf_sys::BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
                c"blocker".as_ptr(),
                c"GPL".as_ptr(),
                insns.as_ptr(),
                insns.len() as _,
                &mut opts,
            )
        };
        assert!(prog_fd >= 0, "loading the blocker: {prog_fd}");
        // SAFETY: both descriptors are valid; flags 0 = exclusive attach.
        let ret = unsafe {
            libbpf_sys::bpf_prog_attach(
                prog_fd,
                cgroup.as_raw_fd(),
                libbpf_sys::BPF_CGROUP_INET6_CONNECT,
                0,
            )
        };
        assert_eq!(ret, 0, "attaching the blocker");
        ExclusiveConnect6 { prog_fd, cgroup }
    }
}

impl Drop for ExclusiveConnect6 {
    fn drop(&mut self) {
        // SAFETY: detaching and closing descriptors this struct owns.
        unsafe {
            libbpf_sys::bpf_prog_detach2(
                self.prog_fd,
                self.cgroup.as_raw_fd(),
                libbpf_sys::BPF_CGROUP_INET6_CONNECT,
            );
            nix::libc::close(self.prog_fd);
        }
    }
}

#[test]
fn a_failure_halfway_through_attach_leaves_nothing_attached_or_pinned() {
    if !privileged() {
        return;
    }
    let env = Env::new();
    let blocker = ExclusiveConnect6::attach(&env.cgroup);
    assert_eq!(env.attached_hooks(), ["cgroup_inet6_connect"]);

    let out = env.meshbpf(&["attach", "--cgroup", env.cgroup.to_str().unwrap()]);

    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("attaching connect6"), "{stderr}");
    // connect4 was attached before connect6 failed: it must be gone again, and nothing pinned.
    assert_eq!(env.attached_hooks(), ["cgroup_inet6_connect"]);
    assert!(bpffs_entries(&env).is_empty(), "{:?}", bpffs_entries(&env));
    drop(blocker);
    // With the obstacle gone the same command succeeds.
    stdout_of(&env.meshbpf(&["attach", "--cgroup", env.cgroup.to_str().unwrap()]));
    assert_eq!(sorted_hooks(&env), ATTACH_TYPES);
}
