//! A CNI's socket load balancer beside meshbpf: socketlb.bpf.c (a Service VIP translated to
//! a backend at connect/sendmsg, reversed at getpeername/recvmsg, in the style of Cilium's
//! socket-LB), compiled with clang when a test asks for it and attached to a cgroup the way
//! a CNI agent does, before or after meshbpf. Its links are dropped (detached) with it.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;

use libbpf_rs::{libbpf_sys as sys, Link, MapCore, MapFlags, Object, ObjectBuilder};

use super::*;

/// What the balancer counts, by hook (its `stats` map's slots).
#[derive(Clone, Copy, Debug)]
pub enum LbHook {
    Connect4 = 0,
    Connect6,
    Sendmsg4,
    Sendmsg6,
    Getpeername4,
    Getpeername6,
    Recvmsg4,
    Recvmsg6,
}

/// The loaded balancer, attached to one cgroup.
pub struct SocketLb {
    links: Vec<Link>,
    object: Object,
    pub cgroup: PathBuf,
}

/// A clang of at least 16: `MESHBPF_CLANG`, `clang`, or a versioned one (as build/clang.rs).
fn clang() -> PathBuf {
    let mut candidates: Vec<String> = std::env::var("MESHBPF_CLANG").into_iter().collect();
    candidates.push("clang".into());
    candidates.extend((16..=30).rev().map(|v| format!("clang-{v}")));
    candidates
        .into_iter()
        .find(|c| {
            Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(PathBuf::from)
        .expect("no clang to build the test's socket load balancer: apt-get install clang-19")
}

/// `struct lb_addr`: the address, the port as a sock_addr context holds it (network order in
/// the low 16 bits), the family.
fn lb_addr(addr: SocketAddr) -> Vec<u8> {
    let mut raw = [0u8; 16];
    let family: u32 = match addr.ip() {
        IpAddr::V4(v4) => {
            raw[..4].copy_from_slice(&v4.octets());
            2
        }
        IpAddr::V6(v6) => {
            raw.copy_from_slice(&v6.octets());
            10
        }
    };
    let mut out = raw.to_vec();
    out.extend_from_slice(&u32::from(addr.port().to_be()).to_ne_bytes());
    out.extend_from_slice(&family.to_ne_bytes());
    out
}

impl SocketLb {
    /// Compiles and loads the balancer, and attaches its eight programs to `cgroup` (plain
    /// links, as a CNI's agent makes them), or with `BPF_F_PREORDER` if `preorder`.
    #[track_caller]
    pub fn attach(env: &Env, cgroup: &Path, preorder: bool) -> SocketLb {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/common/socketlb.bpf.c");
        let arch = match std::env::consts::ARCH {
            "aarch64" => "arm64",
            _ => "x86",
        };
        let vmlinux = super::repo_root().join("vmlinux").join(arch);
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let obj = env.root.join(format!(
            "socketlb-{}.bpf.o",
            SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        sh(Command::new(clang())
            .args(["-O2", "-g", "-target", "bpf", "-Wall", "-I"])
            .arg(&vmlinux)
            .arg("-c")
            .arg(&src)
            .arg("-o")
            .arg(&obj));
        let object = ObjectBuilder::default()
            .open_file(&obj)
            .expect("opening the socket LB")
            .load()
            .expect("loading the socket LB");
        let dir = File::open(cgroup).expect("opening the LB's cgroup");
        let mut links = Vec::new();
        for prog in object.progs_mut() {
            let link = if preorder {
                let opts = sys::bpf_cgroup_opts {
                    sz: std::mem::size_of::<sys::bpf_cgroup_opts>() as _,
                    flags: sys::BPF_F_PREORDER,
                    ..Default::default()
                };
                use libbpf_rs::AsRawLibbpf;
                // SAFETY: the program outlives the call; a new link or NULL.
                let ptr = unsafe {
                    sys::bpf_program__attach_cgroup_opts(
                        prog.as_libbpf_object().as_ptr(),
                        dir.as_raw_fd(),
                        &opts,
                    )
                };
                let ptr = std::ptr::NonNull::new(ptr).unwrap_or_else(|| {
                    panic!(
                        "attaching the LB with BPF_F_PREORDER: {}",
                        std::io::Error::last_os_error()
                    )
                });
                // SAFETY: a link libbpf just made, owned by nothing else.
                unsafe { Link::from_ptr(ptr) }
            } else {
                prog.attach_cgroup(dir.as_raw_fd())
                    .expect("attaching the socket LB")
            };
            links.push(link);
        }
        SocketLb {
            links,
            object,
            cgroup: cgroup.into(),
        }
    }

    /// A Service: `vip` is translated to `backend`.
    #[track_caller]
    pub fn service(&self, vip: SocketAddr, backend: SocketAddr) {
        let map = self
            .object
            .maps()
            .find(|m| m.name() == "services")
            .expect("services map");
        map.update(&lb_addr(vip), &lb_addr(backend), MapFlags::ANY)
            .expect("adding a service");
    }

    /// How often the balancer translated (or reversed) at `hook`.
    #[track_caller]
    pub fn count(&self, hook: LbHook) -> u64 {
        let map = self
            .object
            .maps()
            .find(|m| m.name() == "stats")
            .expect("stats map");
        let value = map
            .lookup(&(hook as u32).to_ne_bytes(), MapFlags::ANY)
            .expect("reading stats")
            .unwrap_or_default();
        u64::from_ne_bytes(value.try_into().unwrap_or_default())
    }

    /// The kernel's ids of its programs.
    pub fn prog_ids(&self) -> Vec<u32> {
        self.links
            .iter()
            .map(|l| l.info().expect("link info").prog_id)
            .collect()
    }

    /// Detaches it (a CNI agent restarting), leaving the object loaded.
    pub fn detach(&mut self) {
        self.links.clear();
    }
}
