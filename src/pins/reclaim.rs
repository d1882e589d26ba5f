//! Taking the pin directory's name back from another user who made it first.

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{Context, Error, Result};

use super::*;

/// The uid of the non-root user who made `path` in `parent`, a sticky world-writable
/// directory (a bpffs mounted by hand: 1777), if that is what it is: the one case where
/// the name was taken from meshbpf rather than given to it by root.
pub(super) fn taken_by(path: &Path, parent: &Path) -> Option<u32> {
    let parent_md = fs::symlink_metadata(parent).ok()?;
    let md = fs::symlink_metadata(path).ok()?;
    let euid = nix::unistd::geteuid().as_raw();
    let open_to_all = parent_md.mode() & 0o1002 == 0o1002;
    (open_to_all && md.uid() != 0 && md.uid() != euid).then_some(md.uid())
}

/// Where [`reclaim`] moves an entry that `uid` made at `path`: `<name>-from-uid-<uid>`
/// beside it (bpffs allows no dot in a name).
pub(super) fn aside_name(path: &Path, uid: u32) -> PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!("{name}-from-uid-{uid}"))
}

/// Takes the pin directory's name back from another user who made it first (a non-root
/// user, in a sticky world-writable parent such as a bpffs mounted by hand): their entry, whatever it is (a directory with content, a link, a file),
/// is moved whole to `<name>-from-uid-<uid>` (or that name and a number) by one atomic
/// exchange with a new empty directory of meshbpf's own, so the name is never free in
/// between; nothing of theirs is read, followed or deleted. Returns where their entry
/// went; none when the name was not taken (anything else wrong with the directory is for
/// the attach to refuse, as before).
pub fn reclaim(path: &Path) -> Result<Option<PathBuf>> {
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
