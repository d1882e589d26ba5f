//! `.context(...)` on the agent's system calls: their errors become the library's
//! [`Error::Io`], with what was being done.

use std::io;

use meshbpf::{Error, Result};

/// Adds what was being done to a failed system call's error (`io::Error`, `nix::Error`).
pub(crate) trait Context<T> {
    /// The error as [`Error::Io`], with `context` (called only on error).
    fn context(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: Into<io::Error>> Context<T> for std::result::Result<T, E> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|cause| Error::io(context(), cause))
    }
}
