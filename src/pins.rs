//! The pin directory's primitives: where an attachment's links and maps live in bpffs, its
//! lock, loading the programs, its meta map, its links, and its removal (drain, detach).
//! Which of fresh attach, replace in place or upgrade to run is [`crate::attach`]'s choice.
//!
//! Layout, under the pin directory (default `/sys/fs/bpf/meshbpf`): `maps/<map>` for every
//! map and `links/<hook>` for every program's link. `maps/meta_map` is written last at
//! attach and removed last at detach: its presence means "an attachment lives here",
//! possibly one to repair.
//!
//! Safety. bpffs mounted by hand has mode 1777, so other users may create entries next to
//! the pin directory. meshbpf therefore acts only on directories it created: real
//! directories (never a symbolic link), owned by the caller (root), mode 0700, below
//! ancestors that nobody else can rename. Inside such a directory only root can create
//! anything, so paths below it are safe to use once it has been checked. Every change to
//! a pin directory happens under an exclusive `flock` on it (on its parent before the first
//! attach), so concurrent
//! `attach`, `register` and `detach` calls are serialised, and a killed process releases it.
//!
//! Taken names. Another user may also create the pin directory itself first (or a staging
//! directory's name): meshbpf refuses to use it ([`Error::PinDirTaken`]), and creates its
//! staging directories afresh, never into an existing one. [`reclaim`] (the agent runs it at
//! start) takes the pin directory's name back: only an entry of a non-root user, in a
//! sticky world-writable directory (the one way that user could have made it), is moved
//! aside, whole, under a name saying whose it is, by one atomic exchange with a fresh
//! directory of meshbpf's own; nothing of it is read, followed or deleted.
//!
//! Order. A program set is consistent when every hook that captures has the hooks that
//! answer for it: a connection redirected by `connect4` needs `sockops` to publish its
//! original destination and `getsockopt` to hand it to the proxy. Attach therefore goes
//! answers first, capture last, and detach the other way round ([`HOOK_ORDER`]): a kill at
//! any moment leaves at worst answers without capture, which changes nothing for anyone.

use std::fs;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use libbpf_rs::skel::{OpenSkel, Skel, SkelBuilder};
use libbpf_rs::{Link, MapCore, MapFlags, MapHandle, MapType, ProgramType};

use crate::abi::{self, MeshMeta, LAYOUT_VERSION};
use crate::error::{Context, Error, Result};
use crate::skel::{MeshbpfSkel, MeshbpfSkelBuilder};

pub(crate) const MAPS_DIR: &str = "maps";
pub(crate) const LINKS_DIR: &str = "links";
/// Per-pod links: `pods/<netns cookie>`, each pod's sk_lookup program on its netns.
pub(crate) const PODS_DIR: &str = "pods";
pub(crate) const META_MAP: &str = crate::abi::map::META_MAP;
/// Program names in the BPF C start with this; the rest names the hook and its link pin.
const PROG_PREFIX: &str = "handle__";
/// bpffs refuses names with a dot, so a staging directory is `<name>-staging-<pid>`.
const STAGING_INFIX: &str = "-staging-";

/// Every hook with a link, in attach order: the hooks that answer (the original
/// destination to the proxy, the peer's address to the application) and keep books first,
/// the hooks that capture last. Detach goes in reverse. `sk_msg` has no link: it hangs on
/// `sock_hash` and is attached before `sockops` fills that map.
pub(crate) const HOOK_ORDER: [&str; 17] = [
    "getsockopt",
    "getpeername4",
    "getpeername6",
    "getsockname4",
    "getsockname6",
    "recvmsg4",
    "recvmsg6",
    "sock_release",
    "post_bind4",
    "post_bind6",
    "sockops",
    "bind4",
    "bind6",
    "sendmsg4",
    "sendmsg6",
    "connect4",
    "connect6",
];

/// Where `hook` comes in [`HOOK_ORDER`]; a hook this build does not know (a newer build's)
/// comes just before the capturing ones, so that detach removes it right after them.
fn attach_rank(hook: &str) -> usize {
    let first_capture = HOOK_ORDER.iter().position(|h| *h == "bind4").unwrap_or(0);
    HOOK_ORDER
        .iter()
        .position(|h| *h == hook)
        .map_or(2 * first_capture, |i| 2 * i + 1)
}

/// Node-wide choices made at attach.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct AttachOptions {
    /// Attach the sockmap fast path (sk_msg); when off, no socket is accelerated on this
    /// node whatever the pods' settings.
    pub sockmap: bool,
}

impl Default for AttachOptions {
    fn default() -> Self {
        AttachOptions { sockmap: true }
    }
}

impl AttachOptions {
    /// The defaults with the sockmap fast path on or off.
    pub fn with_sockmap(sockmap: bool) -> Self {
        AttachOptions { sockmap }
    }
}

/// A pin directory that has been checked to be safe to use (see the module docs): its
/// path goes through no symbolic link, and its existing ancestors inside bpffs cannot be
/// renamed by other users.
#[derive(Clone, Debug)]
pub(crate) struct PinDir {
    path: PathBuf,
    parent: PathBuf,
}

/// What a pin directory holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PinState {
    /// Nothing: no directory.
    Absent,
    /// An attachment (`maps/meta_map` is there).
    Attached,
    /// What an interrupted detach leaves: empty `maps` / `links` directories at most.
    Remnant,
}

/// An advisory lock on a pin directory (on its parent before it exists), released when
/// dropped (or when the process dies).
pub(crate) struct PinLock {
    _dir: fs::File,
}

impl PinDir {
    /// Checks `path` for use as a pin directory; creates nothing.
    pub(crate) fn new(path: &Path) -> Result<PinDir> {
        let unsafe_dir = |why: String| Error::PinDirUnsafe {
            path: path.into(),
            why,
        };
        let name = match path.file_name() {
            Some(name) if path.file_name() != Some(std::ffi::OsStr::new("..")) => name,
            _ => return Err(unsafe_dir("names no directory".into())),
        };
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let parent = canonical_prefix(parent)?;
        match crate::system::check_bpffs(&parent) {
            Ok(()) => {}
            // The pin directory is itself a bpffs mount: the root of one is refused (it is not
            // meshbpf's to fill); a bind mount of meshbpf's pin directory, as an init
            // container is given, is fine.
            Err(Error::BpffsNotMounted { .. }) if crate::system::check_bpffs(path).is_ok() => {
                if bpffs_mount_root(&parent.join(name)) {
                    return Err(unsafe_dir(format!(
                        "is the root of a bpffs mount; give a directory inside it, such as {}",
                        path.join("meshbpf").display()
                    )));
                }
            }
            Err(Error::BpffsNotMounted { .. }) => {
                return Err(Error::BpffsNotMounted { dir: path.into() })
            }
            Err(other) => return Err(other),
        }
        check_ancestors(&parent).map_err(unsafe_dir)?;
        let pin = PinDir {
            path: parent.join(name),
            parent,
        };
        if let Some(uid) = taken_by(&pin.path, &pin.parent) {
            let link = fs::symlink_metadata(&pin.path).is_ok_and(|m| m.is_symlink());
            return Err(Error::PinDirTaken {
                what: if link { "a symbolic link" } else { "an entry" },
                aside: aside_name(&pin.path, uid),
                path: pin.path,
                uid,
            });
        }
        if let Some(why) = not_ours(&pin.path)? {
            return Err(unsafe_dir(why));
        }
        Ok(pin)
    }

    /// The checked path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The directory holding it (and its staging directories).
    pub(crate) fn parent(&self) -> &Path {
        &self.parent
    }

    /// Takes the lock serialising changes to this pin directory: `exclusive` for writers
    /// (attach, detach, register), shared for readers. Creates missing parents (0700) when
    /// `exclusive`.
    pub(crate) fn lock(&self, exclusive: bool) -> Result<PinLock> {
        if exclusive && !self.parent.exists() {
            private_dir(&self.parent)?;
            check_ancestors(&self.parent).map_err(|why| Error::PinDirUnsafe {
                path: self.path.clone(),
                why,
            })?;
        }
        // The pin directory itself once it exists (the same inode for every mount namespace:
        // an init container's bind mount of it shares the node agent's lock), its parent
        // before (a first attach). Whoever waited on the parent while the first attach made
        // the directory takes the directory's lock instead.
        let arg = if exclusive {
            nix::fcntl::FlockArg::LockExclusive
        } else {
            nix::fcntl::FlockArg::LockShared
        };
        let dir = loop {
            let on_parent = fs::symlink_metadata(&self.path).is_err();
            let target = if on_parent { &self.parent } else { &self.path };
            let dir = fs::File::open(target).context(|| format!("opening {}", target.display()))?;
            #[allow(deprecated)]
            // nix 0.29's Flock wrapper takes the fd by value; this is simpler.
            nix::fcntl::flock(dir.as_raw_fd(), arg)
                .context(|| format!("locking {}", target.display()))?;
            if !on_parent || fs::symlink_metadata(&self.path).is_err() {
                break dir;
            }
        };
        Ok(PinLock { _dir: dir })
    }

    /// What the directory holds; refuses a directory that is not a meshbpf attachment.
    pub(crate) fn state(&self) -> Result<PinState> {
        if fs::symlink_metadata(&self.path).is_err() {
            return Ok(PinState::Absent);
        }
        if let Some(why) = not_ours(&self.path)? {
            return Err(Error::PinDirUnsafe {
                path: self.path.clone(),
                why,
            });
        }
        let meta = self.path.join(MAPS_DIR).join(META_MAP);
        if fs::symlink_metadata(&meta).is_ok() {
            return match is_meta_map(&meta) {
                true => Ok(PinState::Attached),
                false => Err(self.foreign("a map named meta_map that is not meshbpf's")),
            };
        }
        let entries = dir_names(&self.path)?;
        for name in &entries {
            let sub = self.path.join(name);
            let empty_dir = (name == MAPS_DIR || name == LINKS_DIR || name == PODS_DIR)
                && not_ours(&sub)?.is_none()
                && dir_names(&sub)?.is_empty();
            if !empty_dir {
                return Err(self.foreign(&format!("{name:?} and no meshbpf meta_map")));
            }
        }
        Ok(PinState::Remnant)
    }

    fn foreign(&self, found: &str) -> Error {
        Error::NotOurPinDir {
            path: self.path.clone(),
            found: found.into(),
        }
    }

    pub(crate) fn staging_prefix(&self) -> String {
        let name = self.path.file_name().unwrap_or_default().to_string_lossy();
        format!("{name}{STAGING_INFIX}")
    }

    /// Removes the staging directories of attaches that did not finish (their process died:
    /// a live one would hold the lock the caller holds now). Entries of that name that
    /// meshbpf did not create are left alone. Returns whether any was removed.
    pub(crate) fn remove_stale_staging(&self, _lock: &PinLock) -> Result<bool> {
        let prefix = self.staging_prefix();
        let mut removed = false;
        for name in dir_names(&self.parent)? {
            let Some(pid) = name.strip_prefix(&prefix) else {
                continue;
            };
            if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let path = self.parent.join(&name);
            if not_ours(&path)?.is_some() {
                continue; // a symlink, another user's: not ours to touch
            }
            remove_tree(&path)?;
            removed = true;
        }
        Ok(removed)
    }
}

/// Whether `dir` is mounted as the root of a bpffs (mountinfo's root field `/`), rather than
/// a bind mount of a directory inside one.
fn bpffs_mount_root(dir: &Path) -> bool {
    let Ok(mountinfo) = fs::read_to_string("/proc/self/mountinfo") else {
        return true;
    };
    let target = dir.to_string_lossy();
    mountinfo
        .lines()
        .rev()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let dash = fields.iter().position(|f| *f == "-")?;
            let fstype = fields.get(dash + 1)?;
            let point = crate::system::unescape_mountinfo(fields.get(4)?);
            (*fstype == "bpf" && point == target).then(|| fields.get(3).copied())?
        })
        .next()
        .is_none_or(|root| root == "/")
}

/// The longest existing prefix of `path` resolved to its canonical form, with the missing
/// rest appended.
fn canonical_prefix(path: &Path) -> Result<PathBuf> {
    let mut missing = Vec::new();
    let mut probe = path.to_path_buf();
    loop {
        match fs::canonicalize(&probe) {
            Ok(real) => {
                return Ok(missing.iter().rev().fold(real, |p, c| p.join(c)));
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                let (Some(parent), Some(name)) = (probe.parent(), probe.file_name()) else {
                    return Err(err).context(|| format!("resolving {}", path.display()));
                };
                missing.push(name.to_owned());
                probe = if parent.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    parent.to_path_buf()
                };
            }
            Err(err) => return Err(err).context(|| format!("resolving {}", path.display())),
        }
    }
}

/// Refuses ancestors of a pin directory, up to its bpffs mount's root, that another user
/// could rename or replace: owned by someone else, or writable by others without the
/// sticky bit (a hand-mounted bpffs root is 1777: fine).
fn check_ancestors(parent: &Path) -> std::result::Result<(), String> {
    let euid = nix::unistd::geteuid().as_raw();
    let mut dev = None;
    for dir in parent.ancestors() {
        let Ok(md) = fs::symlink_metadata(dir) else {
            continue; // not created yet
        };
        if *dev.get_or_insert(md.dev()) != md.dev() {
            break; // left bpffs
        }
        let shared = md.mode() & 0o022 != 0 && md.mode() & 0o1000 == 0;
        if md.uid() != euid && md.uid() != 0 {
            return Err(format!(
                "lies below {}, owned by uid {}: another user could replace it",
                dir.display(),
                md.uid()
            ));
        }
        if shared {
            return Err(format!(
                "lies below {} (mode {:o}), which other users may write without the sticky bit",
                dir.display(),
                md.mode() & 0o7777
            ));
        }
    }
    Ok(())
}

/// Why `path` is not a directory meshbpf created (a real directory owned by the caller,
/// mode 0700), or `None` when it is — or does not exist.
fn not_ours(path: &Path) -> Result<Option<String>> {
    let md = match fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err).context(|| format!("stat {}", path.display())),
    };
    let euid = nix::unistd::geteuid().as_raw();
    Ok(if md.file_type().is_symlink() {
        Some("is a symbolic link".into())
    } else if !md.is_dir() {
        Some("is not a directory".into())
    } else if md.uid() != euid {
        Some(format!("is owned by uid {}, not by this user", md.uid()))
    } else if md.mode() & 0o077 != 0 {
        Some(format!(
            "has mode {:o}: meshbpf's pin directories are 0700",
            md.mode() & 0o7777
        ))
    } else {
        None
    })
}

/// Whether the pin at `path` is meshbpf's meta map: a one-entry array of `mesh_meta`. Its
/// shape never changes between layouts: it is what tells which layout the rest has.
fn is_meta_map(path: &Path) -> bool {
    MapHandle::from_pinned_path(path).is_ok_and(|map| {
        map.map_type() == MapType::Array
            && map.key_size() == 4
            && map.value_size() as usize == std::mem::size_of::<MeshMeta>()
            && map.max_entries() == 1
    })
}

fn dir_names(dir: &Path) -> Result<Vec<String>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err).context(|| format!("reading {}", dir.display())),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.context(|| format!("reading {}", dir.display()))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    Ok(names)
}

/// Creates a directory (and its missing parents) readable by root only: the pins beneath
/// give control over every pod's traffic.
pub(crate) fn private_dir(dir: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .context(|| format!("creating {}", dir.display()))
}

/// Creates a new directory of mode 0700 in `parent`, named `prefix`, this process's id and
/// random digits: never one that exists already, which another user may have made first
/// to have meshbpf fill a directory of theirs (a pid alone is easy to guess: an agent in a
/// container is often pid 1).
pub(crate) fn fresh_dir(parent: &Path, prefix: &str) -> Result<PathBuf> {
    use std::hash::{BuildHasher, Hasher};
    let pid = std::process::id();
    let mut last = None;
    for _ in 0..16 {
        // RandomState's keys come from the OS's random source (once per thread, then a
        // different key for each call).
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
            % 1_000_000_000;
        let path = parent.join(format!("{prefix}{pid}{random:09}"));
        match fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => return Ok(path),
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => last = Some(err),
            Err(err) => return Err(err).context(|| format!("creating {}", path.display())),
        }
    }
    let err = last.unwrap_or_else(|| std::io::ErrorKind::AlreadyExists.into());
    Err(err).context(|| {
        format!(
            "creating a directory {prefix}{pid}* in {} (16 names taken by others)",
            parent.display()
        )
    })
}

/// The uid of the non-root user who made `path` in `parent`, a sticky world-writable
/// directory (a bpffs mounted by hand: 1777), if that is what it is: the one case where
/// the name was taken from meshbpf rather than given to it by root.
fn taken_by(path: &Path, parent: &Path) -> Option<u32> {
    let parent_md = fs::symlink_metadata(parent).ok()?;
    let md = fs::symlink_metadata(path).ok()?;
    let euid = nix::unistd::geteuid().as_raw();
    let open_to_all = parent_md.mode() & 0o1002 == 0o1002;
    (open_to_all && md.uid() != 0 && md.uid() != euid).then_some(md.uid())
}

/// Where [`reclaim`] moves an entry that `uid` made at `path`: `<name>-from-uid-<uid>`
/// beside it (bpffs allows no dot in a name).
fn aside_name(path: &Path, uid: u32) -> PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!("{name}-from-uid-{uid}"))
}

/// Takes the pin directory's name back from another user who made it first (see
/// [`taken_by`]): their entry, whatever it is (a directory with content, a link, a file),
/// is moved whole to `<name>-from-uid-<uid>` (or that name and a number) by one atomic
/// exchange with a new empty directory of meshbpf's own, so the name is never free in
/// between; nothing of theirs is read, followed or deleted. Returns where their entry
/// went; none when the name was not taken (anything else wrong with the directory is for
/// the attach to refuse, as before).
pub(crate) fn reclaim(path: &Path) -> Result<Option<PathBuf>> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Ok(None);
    };
    let parent = canonical_prefix(if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    })?;
    let path = parent.join(name);
    if crate::system::check_bpffs(&parent).is_err() || check_ancestors(&parent).is_err() {
        return Ok(None);
    }
    // Serialised with every other meshbpf process that creates entries in `parent` first.
    let dir = fs::File::open(&parent).context(|| format!("opening {}", parent.display()))?;
    #[allow(deprecated)]
    // nix 0.29's Flock wrapper takes the fd by value; this is simpler.
    nix::fcntl::flock(dir.as_raw_fd(), nix::fcntl::FlockArg::LockExclusive)
        .context(|| format!("locking {}", parent.display()))?;
    let Some(uid) = taken_by(&path, &parent) else {
        return Ok(None);
    };
    let prefix = format!("{}-reclaim-", name.to_string_lossy());
    let ours = fresh_dir(&parent, &prefix)?;
    let exchanged = nix::fcntl::renameat2(
        None,
        &ours,
        None,
        &path,
        nix::fcntl::RenameFlags::RENAME_EXCHANGE,
    );
    if let Err(errno) = exchanged {
        let _ = fs::remove_dir(&ours);
        return Err(Error::Io {
            context: format!("moving {} (uid {uid}'s) aside", path.display()),
            cause: errno.into(),
        });
    }
    // `ours` now names their entry: give it a name that says whose it is.
    let aside = aside_name(&path, uid);
    for n in 0..16 {
        let to = match n {
            0 => aside.clone(),
            n => PathBuf::from(format!("{}-{n}", aside.display())),
        };
        let renamed = nix::fcntl::renameat2(
            None,
            &ours,
            None,
            &to,
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        );
        match renamed {
            Ok(()) => return Ok(Some(to)),
            Err(nix::errno::Errno::EEXIST) => continue,
            Err(_) => break,
        }
    }
    // The telling names are all taken: theirs stays under the reclaim name.
    Ok(Some(ours))
}

/// Detaches every program (capture first, answers last) and removes every pin under
/// `pin`, also when the attachment cannot be opened (another layout, a half-finished
/// attach); refuses a directory meshbpf did not create. Returns whether anything was there.
pub(crate) fn detach(pin: &PinDir) -> Result<bool> {
    let lock = pin.lock(true)?;
    let stale = pin.remove_stale_staging(&lock)?;
    if pin.state()? == PinState::Absent {
        return Ok(stale);
    }
    drain_sockmap(pin.path());
    remove_tree(pin.path())?;
    Ok(true)
}

/// How long detach gives the sidecars to read what sk_msg already redirected to them.
const DRAIN_GRACE: std::time::Duration = std::time::Duration::from_millis(250);

/// Before the pins go, stop the redirects and give the sidecars a moment to read what is
/// queued: accelerated connections then carry on over the normal stack, behind what was
/// redirected already (a read empties the sockmap queue first). What is still queued is
/// not lost: sock_hash outlives its pin while a socket is in it (each socket's psock holds
/// the sk_msg program, which holds sock_hash) and goes when the last one closes (measured
/// on 6.18, tests/intranode.rs). Best effort: an attachment that cannot be read (another
/// layout) is removed without it.
fn drain_sockmap(pin_dir: &Path) {
    let Ok((meta_map, mut meta)) = open_meta(pin_dir) else {
        return;
    };
    let Ok(sock_hash) =
        MapHandle::from_pinned_path(pin_dir.join(MAPS_DIR).join(crate::abi::map::SOCK_HASH))
    else {
        return;
    };
    meta.flags |= abi::META_F_DRAINING;
    let drained = meta_map.update(&0u32.to_ne_bytes(), abi::bytes(&meta), MapFlags::ANY);
    if drained.is_ok() && sock_hash.keys().next().is_some() {
        std::thread::sleep(DRAIN_GRACE);
    }
}

/// `meta_map` flags for an attachment made with `options`.
pub(crate) fn meta_flags(options: &AttachOptions) -> u32 {
    if options.sockmap {
        abi::META_F_SOCKMAP
    } else {
        0
    }
}

pub(crate) fn new_meta(cgroup: &Path, cgroup_id: u64, options: &AttachOptions) -> MeshMeta {
    let mut meta = MeshMeta {
        layout_version: LAYOUT_VERSION,
        flags: meta_flags(options),
        cgroup_id,
        ..Default::default()
    };
    let path = fs::canonicalize(cgroup).unwrap_or_else(|_| cgroup.into());
    let bytes = path.as_os_str().as_encoded_bytes();
    // Keep the last byte a NUL; a longer path is cut (the id is what identifies the cgroup).
    let len = bytes.len().min(meta.cgroup_path.len() - 1);
    for (dst, src) in meta.cgroup_path.iter_mut().zip(&bytes[..len]) {
        *dst = *src as _;
    }
    meta
}

/// The cgroup an attachment belongs to, as text for messages.
pub(crate) fn meta_cgroup_path(meta: &MeshMeta) -> String {
    let bytes: Vec<u8> = meta
        .cgroup_path
        .iter()
        .take_while(|&&b| b != 0)
        .map(|&b| b as u8)
        .collect();
    let path = String::from_utf8_lossy(&bytes);
    format!("{path} (cgroup id {})", meta.cgroup_id)
}

pub(crate) fn read_meta(pin_dir: &Path) -> Result<MeshMeta> {
    open_meta(pin_dir).map(|(_, meta)| meta)
}

/// The pinned `meta_map` and its value, refused unless written by this layout.
pub(crate) fn open_meta(pin_dir: &Path) -> Result<(MapHandle, MeshMeta)> {
    let (map, meta) = open_meta_of_any_layout(pin_dir)?;
    if meta.layout_version != LAYOUT_VERSION {
        return Err(Error::LayoutMismatch {
            pin_dir: pin_dir.into(),
            found: meta.layout_version.to_string(),
            expected: LAYOUT_VERSION,
            oldest_upgradable: crate::abi::OLDEST_UPGRADABLE_LAYOUT,
        });
    }
    Ok((map, meta))
}

pub(crate) fn read_meta_of_any_layout(pin_dir: &Path) -> Result<MeshMeta> {
    open_meta_of_any_layout(pin_dir).map(|(_, meta)| meta)
}

/// The pinned `meta_map` and its value, whichever layout wrote it (its shape never changes).
fn open_meta_of_any_layout(pin_dir: &Path) -> Result<(MapHandle, MeshMeta)> {
    let path = pin_dir.join(MAPS_DIR).join(META_MAP);
    if fs::symlink_metadata(&path).is_err() {
        return Err(Error::NotAttached {
            pin_dir: pin_dir.into(),
        });
    }
    let map =
        MapHandle::from_pinned_path(&path).context(|| format!("opening {}", path.display()))?;
    let value = map
        .lookup(&0u32.to_ne_bytes(), MapFlags::ANY)
        .context(|| format!("reading {}", path.display()))?;
    match value.as_deref().and_then(abi::from_bytes::<MeshMeta>) {
        Some(meta) => Ok((map, meta)),
        None => Err(Error::LayoutMismatch {
            pin_dir: pin_dir.into(),
            found: format!("unknown ({} bytes of meta)", value.map_or(0, |v| v.len())),
            expected: LAYOUT_VERSION,
            oldest_upgradable: crate::abi::OLDEST_UPGRADABLE_LAYOUT,
        }),
    }
}

/// The hook a program serves, from its name: `handle__connect4` → `connect4`.
fn hook_name(prog_name: &std::ffi::OsStr) -> String {
    let name = prog_name.to_string_lossy();
    name.strip_prefix(PROG_PREFIX).unwrap_or(&name).to_string()
}

/// Opens the skeleton, pins (or reuses) every map where `pin_path` says, and loads it.
pub(crate) fn load<'obj>(
    open_object: &'obj mut MaybeUninit<libbpf_rs::OpenObject>,
    options: &AttachOptions,
    mut pin_path: impl FnMut(&str, &libbpf_rs::OpenMapMut<'_>) -> Result<PathBuf>,
) -> Result<MeshbpfSkel<'obj>> {
    let mut open = MeshbpfSkelBuilder::default()
        .open(open_object)
        .context(|| "opening the BPF object".into())?;
    if let Some(rodata) = open.maps.rodata_data.as_deref_mut() {
        rodata.sockmap_enabled = options.sockmap;
        rodata.syscall_args_readable = crate::probe::syscall_args_readable();
        rodata.mptcp_readable = crate::probe::mptcp_readable();
        rodata.receivers_readable = crate::probe::receivers_readable();
    }
    for mut map in open.open_object_mut().maps_mut() {
        let name = map.name().to_string_lossy().into_owned();
        if name.contains('.') {
            continue; // .rodata and friends belong to this load only
        }
        let path = pin_path(&name, &map)?;
        map.set_pin_path(path)
            .context(|| format!("setting the pin path of {name}"))?;
    }
    load_skel(open, "loading the BPF programs")
}

/// Loads an opened skeleton; a failure is reported by its cause (the verifier's log, a
/// pinned map of another shape, a refusal), as libbpf's messages tell it.
fn load_skel<'obj, T: OpenSkel<'obj>>(open: T, what: &str) -> Result<T::Output> {
    let (loaded, log) = crate::loadlog::capturing(|| open.load());
    match loaded {
        Ok(skel) => {
            crate::loadlog::pass_on(&log);
            Ok(skel)
        }
        Err(cause) => Err(crate::loadlog::load_error(what, cause, &log)),
    }
}

/// Opens the skeleton with every map pinned (or reused) under `maps_dir`, and loads it.
pub(crate) fn load_in<'obj>(
    open_object: &'obj mut MaybeUninit<libbpf_rs::OpenObject>,
    maps_dir: &Path,
    options: &AttachOptions,
) -> Result<MeshbpfSkel<'obj>> {
    load(open_object, options, |name, _| Ok(maps_dir.join(name)))
}

/// A map of a loaded skeleton, by name.
pub(crate) fn skel_map(skel: &MeshbpfSkel<'_>, name: &str) -> Result<MapHandle> {
    let map = skel
        .object()
        .maps()
        .find(|m| m.name() == name)
        .ok_or_else(|| Error::MigrationFailed(format!("the new object has no map {name}")))?;
    MapHandle::try_from(&map).context(|| format!("opening {name}"))
}

pub(crate) fn write_meta(skel: &MeshbpfSkel<'_>, meta: &MeshMeta) -> Result<()> {
    skel.maps
        .meta_map
        .update(&0u32.to_ne_bytes(), abi::bytes(meta), MapFlags::ANY)
        .context(|| "writing meta_map".into())
}

/// Attaches every program of `skel` in [`HOOK_ORDER`], or replaces it in place through its
/// link pinned under `links_dir`, and pins the links it creates there.
///
/// The sk_msg program goes first, onto sock_hash (it has no link before Linux 6.10; the
/// map holds it): a socket takes the map's programs when it enters the map, so every
/// socket sockops adds must find sk_msg already there.
pub(crate) fn attach_programs(
    skel: &MeshbpfSkel<'_>,
    cgroup: &fs::File,
    links_dir: &Path,
    options: &AttachOptions,
) -> Result<()> {
    if options.sockmap {
        let sock_hash = skel.maps.sock_hash.as_fd().as_raw_fd();
        skel.progs
            .handle__sk_msg
            .attach_sockmap(sock_hash)
            .context(|| "attaching sk_msg to sock_hash".into())?;
    }
    let mut progs: Vec<_> = skel
        .object()
        .progs_mut()
        .filter(|prog| prog.prog_type() != ProgramType::SkMsg)
        .map(|prog| (hook_name(prog.name()), prog))
        .collect();
    progs.sort_by_key(|(hook, _)| attach_rank(hook));
    let mut created = Vec::new();
    for (hook, prog) in progs {
        let path = links_dir.join(&hook);
        if let Some(mut link) = live_link(&path)? {
            link.update_prog(&prog)
                .context(|| format!("replacing the {hook} program"))?;
        } else {
            let link = prog
                .attach_cgroup(cgroup.as_raw_fd())
                .context(|| format!("attaching {hook}"))?;
            created.push((path, link));
        }
    }
    private_dir(links_dir)?;
    for (path, link) in &mut created {
        link.pin(&*path)
            .context(|| format!("pinning {}", path.display()))?;
    }
    Ok(())
}

/// The link pinned at `path` if it is still attached to a cgroup. A pin whose link was
/// detached (by a detach that stopped before unpinning it) is removed: its hook needs a
/// new link.
fn live_link(path: &Path) -> Result<Option<Link>> {
    live_link_unless(
        path,
        |info| matches!(info, libbpf_rs::query::LinkTypeInfo::Cgroup(c) if c.cgroup_id == 0),
    )
}

/// The link pinned at `path`, unless `detached` says of its info that the kernel detached
/// it; then its pin is removed.
fn live_link_unless(
    path: &Path,
    detached: impl Fn(&libbpf_rs::query::LinkTypeInfo) -> bool,
) -> Result<Option<Link>> {
    if fs::symlink_metadata(path).is_err() {
        return Ok(None);
    }
    let link = Link::open(path).context(|| format!("opening link {}", path.display()))?;
    let info = link
        .info()
        .context(|| format!("querying link {}", path.display()))?;
    if detached(&info.info) {
        fs::remove_file(path).context(|| format!("removing {}", path.display()))?;
        return Ok(None);
    }
    Ok(Some(link))
}

/// The pinned sk_lookup link of the pod with `netns_cookie`.
fn pod_link_path(pin_dir: &Path, netns_cookie: u64) -> PathBuf {
    pin_dir.join(PODS_DIR).join(netns_cookie.to_string())
}

/// The pod's link, if pinned and still attached (a link whose network namespace is gone is
/// detached by the kernel; its pin is removed here).
fn live_pod_link(path: &Path) -> Result<Option<Link>> {
    live_link_unless(
        path,
        |info| matches!(info, libbpf_rs::query::LinkTypeInfo::NetNs(n) if n.ino == 0),
    )
}

/// Loads the sk_lookup program for the pod with `netns_cookie` (its own copy: the program
/// type cannot ask for its netns cookie), with the attachment's pinned maps.
///
/// `maps_of`: a loaded attachment object whose maps it shares, by name; during an upgrade,
/// the new object's (some of them not pinned yet, still in staging). Without it, the
/// pinned maps.
fn load_pod_program<'obj>(
    open_object: &'obj mut MaybeUninit<libbpf_rs::OpenObject>,
    pin_dir: &Path,
    netns_cookie: u64,
    maps_of: Option<&MeshbpfSkel<'_>>,
) -> Result<crate::skel::lookup::LookupSkel<'obj>> {
    let mut open = crate::skel::lookup::LookupSkelBuilder::default()
        .open(open_object)
        .context(|| "opening the per-pod BPF object".into())?;
    if let Some(rodata) = open.maps.rodata_data.as_deref_mut() {
        rodata.pod_cookie = netns_cookie;
    }
    for mut map in open.open_object_mut().maps_mut() {
        let name = map.name().to_string_lossy().into_owned();
        if name.contains('.') {
            continue;
        }
        if let Some(main) = maps_of {
            let shared = main
                .object()
                .maps()
                .find(|m| m.name().to_string_lossy() == name)
                .ok_or_else(|| {
                    Error::MigrationFailed(format!("the attachment has no map {name}"))
                })?;
            map.reuse_fd(shared.as_fd())
                .context(|| format!("sharing {name} with the pod's program"))?;
            continue;
        }
        let path = pin_dir.join(MAPS_DIR).join(&name);
        if fs::symlink_metadata(&path).is_err() {
            // Not pinned: a map new in the layout an upgrade is migrating to, which this
            // program does not use. Made here, it would pass for one already migrated.
            map.set_autocreate(false)
                .context(|| format!("leaving out {name}"))?;
            continue;
        }
        map.set_pin_path(path)
            .context(|| format!("setting the pin path of {name}"))?;
    }
    load_skel(open, "loading the pod's sk_lookup program")
}

/// Attaches the pod's sk_lookup program to its network namespace (`netns`, an open nsfs
/// file) and pins the link, unless it is there already.
pub(crate) fn attach_pod(
    pin_dir: &Path,
    _lock: &PinLock,
    netns_cookie: u64,
    netns: &fs::File,
) -> Result<()> {
    let path = pod_link_path(pin_dir, netns_cookie);
    if live_pod_link(&path)?.is_some() {
        return Ok(());
    }
    let mut open_object = MaybeUninit::uninit();
    let skel = load_pod_program(&mut open_object, pin_dir, netns_cookie, None)?;
    let mut link = skel
        .progs
        .handle__sk_lookup
        .attach_netns(netns.as_raw_fd())
        .context(|| "attaching sk_lookup to the pod's network namespace".into())?;
    private_dir(&pin_dir.join(PODS_DIR))?;
    link.pin(&path)
        .context(|| format!("pinning {}", path.display()))
}

/// Detaches and unpins the pod's sk_lookup link; returns whether there was one.
pub(crate) fn detach_pod(pin_dir: &Path, _lock: &PinLock, netns_cookie: u64) -> Result<bool> {
    let path = pod_link_path(pin_dir, netns_cookie);
    if fs::symlink_metadata(&path).is_err() {
        return Ok(false);
    }
    if let Ok(link) = Link::open(&path) {
        let _ = link.detach();
    }
    fs::remove_file(&path).context(|| format!("removing {}", path.display()))?;
    Ok(true)
}

/// The cookies of the pods with a pinned sk_lookup link.
pub(crate) fn pods_with_links(pin_dir: &Path) -> Result<Vec<u64>> {
    Ok(dir_names(&pin_dir.join(PODS_DIR))?
        .iter()
        .filter_map(|name| name.parse().ok())
        .collect())
}

/// Replaces every pod's sk_lookup program with this build's, in place, sharing the maps of
/// `maps_of` (the attachment object just loaded: during an upgrade, the new layout's maps).
pub(crate) fn update_pod_programs(pin_dir: &Path, maps_of: &MeshbpfSkel<'_>) -> Result<()> {
    for cookie in pods_with_links(pin_dir)? {
        let Some(mut link) = live_pod_link(&pod_link_path(pin_dir, cookie))? else {
            continue;
        };
        let mut open_object = MaybeUninit::uninit();
        let skel = load_pod_program(&mut open_object, pin_dir, cookie, Some(maps_of))?;
        link.update_prog(&skel.progs.handle__sk_lookup)
            .context(|| format!("replacing the sk_lookup program of pod {cookie}"))?;
    }
    Ok(())
}

/// Detaches every link pinned under `dir` (capture first, answers last), then removes
/// every pin and directory, with the meta map last. `dir` must be one meshbpf created
/// (checked by the caller): nothing below it follows a symbolic link of someone else's.
pub(crate) fn remove_tree(dir: &Path) -> Result<()> {
    // The pods' sk_lookup links capture inbound: they go first.
    let pods = dir.join(PODS_DIR);
    for name in dir_names(&pods)? {
        let path = pods.join(name);
        if let Ok(link) = Link::open(&path) {
            let _ = link.detach();
        }
        fs::remove_file(&path).context(|| format!("removing {}", path.display()))?;
    }
    remove_dir_if_there(&pods)?;
    let links = dir.join(LINKS_DIR);
    let mut hooks = dir_names(&links)?;
    hooks.sort_by_key(|hook| std::cmp::Reverse(attach_rank(hook)));
    for hook in hooks {
        let path = links.join(&hook);
        if let Ok(link) = Link::open(&path) {
            // Detach even if another process still holds the link open.
            let _ = link.detach();
        }
        fs::remove_file(&path).context(|| format!("removing {}", path.display()))?;
    }
    remove_dir_if_there(&links)?;
    let maps = dir.join(MAPS_DIR);
    let mut names = dir_names(&maps)?;
    names.sort_by_key(|name| name == META_MAP);
    for name in names {
        let path = maps.join(name);
        fs::remove_file(&path).context(|| format!("removing {}", path.display()))?;
    }
    remove_dir_if_there(&maps)?;
    remove_dir_if_there(dir)
}

pub(crate) fn remove_dir_if_there(dir: &Path) -> Result<()> {
    match fs::remove_dir(dir) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(err).context(|| {
            format!(
                "removing {} (does it hold files meshbpf did not create?)",
                dir.display()
            )
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_program_has_its_place_in_the_hook_order() {
        let mut object = MaybeUninit::uninit();
        let open = MeshbpfSkelBuilder::default().open(&mut object).unwrap();
        let mut hooks: Vec<String> = open
            .open_object()
            .progs()
            .filter(|p| p.prog_type() != ProgramType::SkMsg)
            .map(|p| hook_name(p.name()))
            .collect();
        hooks.sort();
        let mut known = HOOK_ORDER.map(String::from).to_vec();
        known.sort();
        assert_eq!(hooks, known);
    }

    #[test]
    fn capture_hooks_come_after_every_hook_that_answers_and_unknown_hooks_between() {
        for capture in [
            "bind4", "bind6", "sendmsg4", "sendmsg6", "connect4", "connect6",
        ] {
            for answer in ["getsockopt", "sockops", "getpeername4", "recvmsg6"] {
                assert!(attach_rank(answer) < attach_rank(capture));
            }
            assert!(attach_rank("some_future_hook") < attach_rank(capture));
        }
        assert!(attach_rank("sockops") < attach_rank("some_future_hook"));
    }
}
