//! Network namespace identity: which namespace a path names, and its cookie,
//! the 64-bit id the BPF programs see through `bpf_get_netns_cookie()`.

use std::fs::File;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};
use nix::sys::socket::{
    recv, send, socket, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType,
};
use nix::sys::statfs::fstatfs;

use crate::error::{Context, Error, Result};

/// The host's network namespace: that of pid 1.
const HOST_NETNS: &str = "/proc/1/ns/net";
/// The inode number of the initial network namespace, fixed at build time of every kernel
/// (`PROC_NET_INIT_INO` in include/linux/proc_ns.h), so the host can be recognised even
/// where /proc/1 may not be read.
const INIT_NET_INO: u64 = 0xEFFF_FFF9;
/// The initial network namespace's cookie where its inode is not fixed (6.1, measured; the
/// 6.18 host has the fixed inode): netns cookies count up from 1 as namespaces are set up, and the initial one is set
/// up first, at boot (measured: cookie 1 in the 6.1.0-57 guest, where a `--network host`
/// container's pid 1 cannot tell the host by /proc/1; 3 on the 6.18 host, whose fixed inode
/// answers first). No other namespace can take it.
const INIT_NET_COOKIE: u64 = 1;

/// An open network namespace and its cookie.
#[derive(Debug)]
pub struct Netns {
    path: PathBuf,
    file: File,
    cookie: u64,
}

impl Netns {
    /// Opens `path` (such as `/proc/PID/ns/net` or `/run/netns/NAME`), checks that it is a
    /// network namespace and reads its cookie.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = open_ns_file(&path).map_err(|err| match err.kind() {
            std::io::ErrorKind::NotFound => Error::NetnsNotFound { path: path.clone() },
            std::io::ErrorKind::PermissionDenied => Error::Io {
                context: format!("opening {}", path.display()),
                cause: err,
            },
            // A symlink loop, a path through a non-directory, a name too long...
            _ => Error::NotANetns {
                path: path.clone(),
                found: format!("it cannot be opened: {err}"),
            },
        })?;
        check_is_netns(&path, &file)?;
        let cookie = match cookie_of(&file) {
            // setns(2) needs CAP_SYS_ADMIN, even into the caller's own namespace.
            Err(err) if err.raw_os_error() == Some(nix::libc::EPERM) => {
                return Err(Error::PermissionDenied {
                    action: "read a network namespace's cookie",
                    missing: "CAP_SYS_ADMIN".into(),
                })
            }
            other => other.context(|| format!("reading the cookie of {}", path.display()))?,
        };
        Ok(Netns { path, file, cookie })
    }

    /// The namespace's cookie, as the BPF programs see it.
    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    /// The namespace's nsfs inode number (as in `/proc/PID/ns/net -> net:[INODE]`).
    pub fn inode(&self) -> Result<u64> {
        Ok(self
            .file
            .metadata()
            .context(|| format!("reading {}", self.path.display()))?
            .ino())
    }

    /// The pod's own addresses: the first global IPv4 and IPv6 address of its interfaces
    /// other than lo (link-local ones are not the pod's address).
    pub fn addresses(&self) -> Result<(Option<Ipv4Addr>, Option<Ipv6Addr>)> {
        let fd = self
            .file
            .as_fd()
            .try_clone_to_owned()
            .context(|| format!("duplicating {}", self.path.display()))?;
        let found = std::thread::scope(|scope| {
            scope
                .spawn(
                    move || -> std::io::Result<(Option<Ipv4Addr>, Option<Ipv6Addr>)> {
                        setns(&fd, CloneFlags::CLONE_NEWNET)?;
                        let (mut v4, mut v6) = (None, None);
                        for ifa in nix::ifaddrs::getifaddrs()? {
                            let Some(addr) = ifa.address else { continue };
                            if ifa.interface_name == "lo" {
                                continue;
                            }
                            if let Some(a) = addr.as_sockaddr_in().map(|a| a.ip()) {
                                if !a.is_loopback() && !a.is_link_local() && !a.is_unspecified() {
                                    v4 = v4.or(Some(a));
                                }
                            }
                            if let Some(a) = addr.as_sockaddr_in6().map(|a| a.ip()) {
                                let link_local = (a.segments()[0] & 0xffc0) == 0xfe80;
                                if !a.is_loopback() && !link_local && !a.is_unspecified() {
                                    v6 = v6.or(Some(a));
                                }
                            }
                        }
                        Ok((v4, v6))
                    },
                )
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("address thread panicked")))
        });
        found.context(|| format!("reading the addresses of {}", self.path.display()))
    }

    /// Adds `ip`/128 to the namespace's lo, as `ip -6 addr add ::6/128 dev lo` (istio-init
    /// does it for Envoy's IPv6 inbound passthrough source, `::6`); already there is fine.
    /// Needs CAP_NET_ADMIN.
    pub(crate) fn add_loopback_address(&self, ip: Ipv6Addr) -> Result<()> {
        let fd = self
            .file
            .as_fd()
            .try_clone_to_owned()
            .context(|| format!("duplicating {}", self.path.display()))?;
        let added = std::thread::scope(|scope| {
            scope
                .spawn(move || -> std::io::Result<()> {
                    setns(&fd, CloneFlags::CLONE_NEWNET)?;
                    rtnetlink_add_address(LOOPBACK_IFINDEX, ip)
                })
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("netlink thread panicked")))
        });
        match added {
            Err(err) if err.raw_os_error() == Some(nix::libc::EEXIST) => Ok(()),
            Err(err) if err.raw_os_error() == Some(nix::libc::EPERM) => {
                Err(Error::PermissionDenied {
                    action: "add ::6 to the pod's lo (Envoy's IPv6 inbound passthrough source)",
                    missing: "CAP_NET_ADMIN (or register with --inbound-mode bind)".into(),
                })
            }
            other => other.context(|| format!("adding {ip}/128 to lo in {}", self.path.display())),
        }
    }

    /// The open namespace file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Refuses the host's own network namespace unless `allow_host` is set.
    pub fn refuse_host(&self, allow_host: bool) -> Result<()> {
        if !allow_host && self.is_host()? {
            return Err(Error::HostNetns {
                path: self.path.clone(),
            });
        }
        Ok(())
    }

    /// Whether this is the host's own network namespace: the kernel's initial one (by its
    /// fixed inode or its cookie), or that of pid 1.
    pub fn is_host(&self) -> Result<bool> {
        let this = self
            .file
            .metadata()
            .context(|| format!("reading {}", self.path.display()))?;
        if this.ino() == INIT_NET_INO || self.cookie == INIT_NET_COOKIE {
            return Ok(true);
        }
        // Where this process is pid 1 (the entrypoint of a container, such as a pod's init
        // container running `register --netns /proc/self/ns/net`), /proc/1 is this very
        // process and says nothing about the host: only the check above applies.
        if std::fs::read_link("/proc/self").is_ok_and(|pid| pid == Path::new("1")) {
            return Ok(false);
        }
        // pid 1's namespace may be hidden from us (a hardened pid 1); the check above holds then.
        Ok(std::fs::metadata(HOST_NETNS)
            .is_ok_and(|host| host.dev() == this.dev() && host.ino() == this.ino()))
    }
}

fn check_is_netns(path: &Path, file: &File) -> Result<()> {
    let fs = fstatfs(file).context(|| format!("statfs {}", path.display()))?;
    // The magic's integer type differs between libc targets; compare as u64.
    #[allow(clippy::unnecessary_cast)]
    let magic = fs.filesystem_type().0 as u64;
    if magic != nix::libc::NSFS_MAGIC as u64 {
        let found = if file.metadata().map(|m| m.is_dir()).unwrap_or(false) {
            "a directory"
        } else {
            "not a namespace file"
        };
        return Err(Error::NotANetns {
            path: path.to_path_buf(),
            found: found.into(),
        });
    }
    let ns_type = ns_type(file);
    if ns_type != nix::libc::CLONE_NEWNET {
        let found = match ns_type {
            nix::libc::CLONE_NEWNS => "a mount namespace".to_string(),
            nix::libc::CLONE_NEWPID => "a pid namespace".to_string(),
            nix::libc::CLONE_NEWUTS => "a uts namespace".to_string(),
            nix::libc::CLONE_NEWIPC => "an ipc namespace".to_string(),
            nix::libc::CLONE_NEWUSER => "a user namespace".to_string(),
            nix::libc::CLONE_NEWCGROUP => "a cgroup namespace".to_string(),
            other => format!("namespace type {other:#x}"),
        };
        return Err(Error::NotANetns {
            path: path.to_path_buf(),
            found,
        });
    }
    Ok(())
}

/// lo is the first interface of every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

/// One RTM_NEWADDR request over rtnetlink (linux/rtnetlink.h, linux/if_addr.h), in the
/// calling thread's network namespace: `ip`/128 on interface `ifindex`.
fn rtnetlink_add_address(ifindex: u32, ip: Ipv6Addr) -> std::io::Result<()> {
    use nix::libc;
    const RTM_NEWADDR: u16 = 20;
    const IFA_ADDRESS: u16 = 1;
    const IFA_LOCAL: u16 = 2;
    const FLAGS: u16 =
        (libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16;
    // nlmsghdr (16) + ifaddrmsg (8) + two rtattrs of 4 + 16 bytes.
    let mut msg = Vec::with_capacity(64);
    msg.extend_from_slice(&64u32.to_ne_bytes());
    msg.extend_from_slice(&RTM_NEWADDR.to_ne_bytes());
    msg.extend_from_slice(&FLAGS.to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    msg.extend_from_slice(&0u32.to_ne_bytes()); // the kernel
    msg.extend_from_slice(&[libc::AF_INET6 as u8, 128, 0, 0]); // family, prefix, flags, scope
    msg.extend_from_slice(&ifindex.to_ne_bytes());
    for kind in [IFA_LOCAL, IFA_ADDRESS] {
        msg.extend_from_slice(&20u16.to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&ip.octets());
    }
    let sock = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )?;
    send(sock.as_raw_fd(), &msg, MsgFlags::empty())?;
    // The acknowledgement: nlmsghdr, then nlmsgerr's error (0, or a negative errno).
    let mut reply = [0u8; 1024];
    let n = recv(sock.as_raw_fd(), &mut reply, MsgFlags::empty())?;
    if n < 20 || u16::from_ne_bytes([reply[4], reply[5]]) != libc::NLMSG_ERROR as u16 {
        return Err(std::io::Error::other("unexpected rtnetlink reply"));
    }
    match i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]) {
        0 => Ok(()),
        err => Err(std::io::Error::from_raw_os_error(-err)),
    }
}

/// The cookie of the namespace `ns`: a socket made inside it reports it through
/// `SO_NETNS_COOKIE`. The switch happens on a short-lived thread so the caller's
/// own namespace never changes.
fn cookie_of(ns: &File) -> std::io::Result<u64> {
    let fd = ns.as_fd().try_clone_to_owned()?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || -> std::io::Result<u64> {
                setns(&fd, CloneFlags::CLONE_NEWNET)?;
                current_cookie()
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("netns cookie thread panicked")))
    })
}

/// The cookies of every network namespace that still exists as far as this node can see:
/// those of processes (`/proc/PID/ns/net`), held open by a process (`/proc/PID/fd/N`), or
/// bind-mounted anywhere (nsfs mounts, such as `/run/netns/NAME`). Identified by cookie,
/// not by nsfs inode: the kernel gives a new namespace the inode of one just gone.
pub(crate) fn live_netns_cookies() -> std::collections::BTreeSet<u64> {
    use std::collections::BTreeSet;
    fn is_net(link: &Path) -> bool {
        std::fs::read_link(link).is_ok_and(|l| l.to_string_lossy().starts_with("net:["))
    }
    let mut candidates = Vec::new();
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for proc in procs.flatten() {
            if !proc
                .file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
            {
                continue;
            }
            let path = proc.path();
            candidates.push(path.join("ns/net"));
            if let Ok(fds) = std::fs::read_dir(path.join("fd")) {
                candidates.extend(fds.flatten().map(|fd| fd.path()).filter(|p| is_net(p)));
            }
        }
    }
    if let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") {
        // Field 4 of an nsfs bind mount is the namespace (`net:[4026532481]`), field 5 where
        // it is mounted.
        candidates.extend(mountinfo.lines().filter_map(|line| {
            let mut fields = line.split(' ');
            let root = fields.nth(3)?;
            let point = fields.next()?;
            root.starts_with("net:[")
                .then(|| PathBuf::from(crate::system::unescape_mountinfo(point)))
        }));
    }
    // One namespace per (device, inode) at this moment; one thread visits each in turn.
    let mut seen = BTreeSet::new();
    let files: Vec<File> = candidates
        .iter()
        .filter_map(|path| open_ns_file(path).ok())
        .filter(|file| {
            file.metadata()
                .is_ok_and(|md| seen.insert((md.dev(), md.ino())))
        })
        .filter(|file| ns_type(file) == nix::libc::CLONE_NEWNET)
        .collect();
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                files
                    .iter()
                    .filter(|file| setns(file, CloneFlags::CLONE_NEWNET).is_ok())
                    .filter_map(|_| current_cookie().ok())
                    .collect()
            })
            .join()
            .unwrap_or_default()
    })
}

/// Opens a would-be namespace file without blocking (a FIFO would block a plain open).
fn open_ns_file(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY)
        .open(path)
}

/// The namespace type of an nsfs file (`CLONE_NEW*`), or -1.
fn ns_type(file: &File) -> nix::libc::c_int {
    // SAFETY: NS_GET_NSTYPE (linux/nsfs.h, Linux 4.11) takes no argument and only reads the
    // fd's namespace type.
    unsafe { nix::libc::ioctl(file.as_raw_fd(), nix::libc::NS_GET_NSTYPE) }
}

/// The cookie of the calling thread's network namespace.
pub fn current_cookie() -> std::io::Result<u64> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    let sock = socket(
        AddressFamily::Unix,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as nix::libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes of the sizes passed. (nix has no
    // wrapper for SO_NETNS_COOKIE, Linux 5.14.)
    let ret = unsafe {
        nix::libc::getsockopt(
            sock.as_raw_fd(),
            nix::libc::SOL_SOCKET,
            nix::libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if ret < 0 {
        let err = std::io::Error::last_os_error();
        return Err(if err.raw_os_error() == Some(nix::libc::ENOPROTOOPT) {
            std::io::Error::other("SO_NETNS_COOKIE is not supported (Linux 5.14+ needed)")
        } else {
            err
        });
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_path_names_the_fix() {
        let err = Netns::open("/nonexistent/ns/net").unwrap_err();
        assert!(matches!(err, Error::NetnsNotFound { .. }));
        assert!(err.to_string().contains("/proc/PID/ns/net"), "{err}");
    }

    #[test]
    fn regular_file_is_not_a_netns() {
        let err = Netns::open("/proc/self/status").unwrap_err();
        assert!(matches!(err, Error::NotANetns { .. }), "{err}");
    }

    #[test]
    fn own_namespace_outside_any_pod_is_the_host() {
        // The test runner runs in the initial network namespace.
        let ns = Netns::open("/proc/self/ns/net").unwrap();
        if ns.file.metadata().unwrap().ino() == INIT_NET_INO {
            assert!(ns.is_host().unwrap());
            assert_eq!(ns.cookie(), current_cookie().unwrap());
        }
    }

    #[test]
    fn other_namespace_types_are_named() {
        let err = Netns::open("/proc/self/ns/uts").unwrap_err();
        assert!(err.to_string().contains("uts namespace"), "{err}");
    }
}
