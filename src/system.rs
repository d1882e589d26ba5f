//! What this machine offers: cgroup v2 and bpffs mounts, the kernel's
//! version and BTF, and the calling process's privileges.

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::sys::statfs::statfs;

use crate::error::{Context, Error, Result};

/// Oldest kernel meshbpf supports: netns cookie in sockops and sk_msg (5.15).
pub const MIN_KERNEL: (u32, u32) = (5, 15);

/// A filesystem magic number as a `u64` (its integer type differs between libc targets).
fn magic_at(path: &Path) -> nix::Result<u64> {
    #[allow(clippy::unnecessary_cast)]
    statfs(path).map(|fs| fs.filesystem_type().0 as u64)
}

fn fs_name(magic: u64) -> String {
    use nix::libc;
    #[allow(clippy::unnecessary_cast)]
    let known = [
        (libc::CGROUP2_SUPER_MAGIC as u64, "cgroup2"),
        (libc::CGROUP_SUPER_MAGIC as u64, "cgroup v1"),
        (libc::TMPFS_MAGIC as u64, "tmpfs"),
        (libc::BPF_FS_MAGIC as u64, "bpffs"),
        (libc::SYSFS_MAGIC as u64, "sysfs"),
        (libc::EXT4_SUPER_MAGIC as u64, "ext4"),
    ];
    known
        .iter()
        .find(|(m, _)| *m == magic)
        .map(|(_, name)| name.to_string())
        .unwrap_or_else(|| format!("filesystem {magic:#x}"))
}

/// The mount points of every mounted filesystem of type `fstype`, from /proc/self/mountinfo.
pub fn mounts_of_type(fstype: &str) -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split(' ').nth(4)?;
            (right.split(' ').next()? == fstype)
                .then(|| PathBuf::from(unescape_mountinfo(mount_point)))
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as octal.
pub(crate) fn unescape_mountinfo(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut chars = field.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let digits: String = chars.clone().take(3).collect();
            if let Ok(code) = u8::from_str_radix(&digits, 8) {
                out.push(code as char);
                chars.nth(2);
                continue;
            }
        }
        out.push(c);
    }
    out
}

fn cgroup2_hint() -> String {
    match mounts_of_type("cgroup2").first() {
        Some(mount) => format!("; a cgroup v2 hierarchy is mounted at {}", mount.display()),
        None => String::new(),
    }
}

/// Opens `path` as a cgroup v2 directory; returns it and its cgroup id.
pub(crate) fn open_cgroup2(path: &Path) -> Result<(File, u64)> {
    use std::os::unix::fs::MetadataExt;
    let magic = match magic_at(path) {
        Ok(magic) => magic,
        Err(nix::Error::ENOENT) | Err(nix::Error::ENOTDIR) => {
            return Err(Error::CgroupNotFound {
                path: path.into(),
                hint: cgroup2_hint(),
            })
        }
        Err(err) => return Err(err).context(|| format!("statfs {}", path.display())),
    };
    #[allow(clippy::unnecessary_cast)]
    if magic != nix::libc::CGROUP2_SUPER_MAGIC as u64 {
        return Err(Error::CgroupNotV2 {
            path: path.into(),
            found: fs_name(magic),
            hint: cgroup2_hint(),
        });
    }
    let dir = File::open(path).context(|| format!("opening cgroup {}", path.display()))?;
    // On cgroup v2 the directory's inode number is the cgroup id BPF and bpftool report.
    let id = dir
        .metadata()
        .context(|| format!("stat {}", path.display()))?
        .ino();
    Ok((dir, id))
}

/// Checks that `dir` (or, if it does not exist yet, its nearest existing parent) is on bpffs.
pub(crate) fn check_bpffs(dir: &Path) -> Result<()> {
    let mut probe = dir;
    loop {
        match magic_at(probe) {
            #[allow(clippy::unnecessary_cast)]
            Ok(magic) if magic == nix::libc::BPF_FS_MAGIC as u64 => return Ok(()),
            Ok(_) => return Err(Error::BpffsNotMounted { dir: dir.into() }),
            Err(nix::Error::ENOENT) => match probe.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => probe = parent,
                _ => return Err(Error::BpffsNotMounted { dir: dir.into() }),
            },
            Err(err) => return Err(err).context(|| format!("statfs {}", dir.display())),
        }
    }
}

/// Linux capability numbers (linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// The effective capability set of this process.
fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
            u64::from_str_radix(line["CapEff:".len()..].trim(), 16).ok()
        })
        .unwrap_or(0)
}

/// What an operation needs from the caller.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Privilege {
    /// Load and attach programs, read and write pinned maps: CAP_BPF and CAP_NET_ADMIN
    /// (CAP_SYS_ADMIN covers both).
    Bpf,
    /// Enter another network namespace: CAP_SYS_ADMIN, on top of `Bpf`.
    EnterNetns,
}

/// Refuses early, with a clear message, when the caller lacks what `action` needs.
pub(crate) fn require(privilege: Privilege, action: &'static str) -> Result<()> {
    missing_caps(effective_caps(), privilege).map_or(Ok(()), |missing| {
        Err(Error::PermissionDenied { action, missing })
    })
}

fn missing_caps(caps: u64, privilege: Privilege) -> Option<String> {
    let has = |cap: u32| caps & (1u64 << cap) != 0;
    let mut missing = Vec::new();
    if !has(CAP_SYS_ADMIN) {
        if matches!(privilege, Privilege::EnterNetns) {
            missing.push("CAP_SYS_ADMIN");
        } else {
            if !has(CAP_BPF) {
                missing.push("CAP_BPF");
            }
            if !has(CAP_NET_ADMIN) {
                missing.push("CAP_NET_ADMIN");
            }
        }
    }
    (!missing.is_empty()).then(|| missing.join(", "))
}

/// Checks the running kernel's version (BTF and the rest are `meshbpf check`'s probe).
/// Returns the release string.
pub fn check_kernel() -> Result<String> {
    let release = kernel_release().context(|| "uname".into())?;
    check_release(&release)?;
    Ok(release)
}

fn kernel_release() -> nix::Result<String> {
    nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned())
}

/// The running kernel's (major, minor), (0, 0) when unknown.
pub(crate) fn kernel_version() -> (u32, u32) {
    kernel_release()
        .map(|r| parse_release(&r))
        .unwrap_or((0, 0))
}

/// (major, minor) of a release string such as `6.1.0-18-amd64`.
fn parse_release(release: &str) -> (u32, u32) {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty());
    let mut next = || parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let major = next();
    (major, next())
}

fn check_release(release: &str) -> Result<()> {
    if parse_release(release) < MIN_KERNEL {
        return Err(Error::MissingKernelFeature {
            feature: "the netns cookie in sockops and sk_msg programs (Linux 5.15)".into(),
            detail: format!("this is Linux {release}"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_kernel_is_refused_with_the_version_needed() {
        let err = check_release("5.10.0-28-amd64").unwrap_err().to_string();
        assert!(
            err.contains("5.15") && err.contains("5.10.0-28-amd64"),
            "{err}"
        );
        assert!(check_release("5.15.0").is_ok());
        assert!(check_release("6.1.0-18-amd64").is_ok());
        assert!(check_release("garbage").is_err());
    }

    #[test]
    fn capabilities_needed_are_named() {
        assert_eq!(
            missing_caps(0, Privilege::Bpf).as_deref(),
            Some("CAP_BPF, CAP_NET_ADMIN")
        );
        assert_eq!(
            missing_caps(0, Privilege::EnterNetns).as_deref(),
            Some("CAP_SYS_ADMIN")
        );
        assert_eq!(
            missing_caps(1 << CAP_SYS_ADMIN, Privilege::EnterNetns),
            None
        );
        assert_eq!(
            missing_caps((1 << CAP_BPF) | (1 << CAP_NET_ADMIN), Privilege::Bpf),
            None
        );
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }

    #[test]
    fn non_cgroup2_directory_is_refused_with_mount_hint() {
        let err = open_cgroup2(Path::new("/proc")).unwrap_err().to_string();
        assert!(err.contains("mount -t cgroup2"), "{err}");
    }
}
