//! A checked pin directory: its path, its safety checks, its state, and private directories
//! made for it.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use libbpf_rs::{MapCore, MapHandle, MapType};

use crate::abi::MeshMeta;
use crate::error::{Context, Error, Result};

use super::*;

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
pub(super) fn bpffs_mount_root(dir: &Path) -> bool {
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
pub(super) fn canonical_prefix(path: &Path) -> Result<PathBuf> {
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
pub(super) fn check_ancestors(parent: &Path) -> std::result::Result<(), String> {
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
pub(super) fn not_ours(path: &Path) -> Result<Option<String>> {
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
pub(super) fn is_meta_map(path: &Path) -> bool {
    MapHandle::from_pinned_path(path).is_ok_and(|map| {
        map.map_type() == MapType::Array
            && map.key_size() == 4
            && map.value_size() as usize == std::mem::size_of::<MeshMeta>()
            && map.max_entries() == 1
    })
}

pub(super) fn dir_names(dir: &Path) -> Result<Vec<String>> {
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
