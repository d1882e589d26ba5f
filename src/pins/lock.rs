//! The lock that serialises every change to a pin directory.

use std::fs;
use std::os::fd::AsRawFd;

use crate::error::{Context, Error, Result};

use super::*;

/// An advisory lock on a pin directory (on its parent before it exists), released when
/// dropped (or when the process dies).
pub(crate) struct PinLock {
    _dir: fs::File,
}

impl PinDir {
    /// Takes the lock serialising changes to this pin directory: `exclusive` for writers
    /// (attach, detach, register), shared for readers. Creates missing parents (0700) when
    /// `exclusive`.
    pub(crate) fn lock(&self, exclusive: bool) -> Result<PinLock> {
        if exclusive && !self.parent().exists() {
            private_dir(self.parent())?;
            check_ancestors(self.parent()).map_err(|why| Error::PinDirUnsafe {
                path: self.path().to_path_buf(),
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
            let on_parent = fs::symlink_metadata(self.path()).is_err();
            let target = if on_parent {
                self.parent()
            } else {
                self.path()
            };
            let dir = fs::File::open(target).context(|| format!("opening {}", target.display()))?;
            #[allow(deprecated)]
            // nix 0.29's Flock wrapper takes the fd by value; this is simpler.
            nix::fcntl::flock(dir.as_raw_fd(), arg)
                .context(|| format!("locking {}", target.display()))?;
            if !on_parent || fs::symlink_metadata(self.path()).is_err() {
                break dir;
            }
        };
        Ok(PinLock { _dir: dir })
    }
}
