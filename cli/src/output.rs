//! What the commands print: lines to stdout that a closed pipe ends quietly, notes to
//! stderr, JSON.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use serde::Serialize;

/// Writes a line to stdout (`out!(no_newline ...)`: without the newline); a reader that went
/// away (`meshbpf status | head -1`) silences the rest instead of failing the command.
macro_rules! out {
    (no_newline $($arg:tt)*) => {
        $crate::output::write(format_args!($($arg)*), false)?
    };
    ($($arg:tt)*) => {
        $crate::output::write(format_args!($($arg)*), true)?
    };
}

/// Writes a line to stderr; a closed stderr is no reason to stop (nobody would see why).
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// Set once a write found the reader gone.
static CLOSED: AtomicBool = AtomicBool::new(false);

/// Standard output that a closed pipe ends quietly. Rust ignores SIGPIPE, so where `head`
/// has read its lines and exited, a write fails with EPIPE, and `println!` would panic
/// (exit 101, a backtrace). Here the first EPIPE silences every later write, and the
/// command finishes as if its output had been read: the exit code is the command's own
/// (0 when it succeeded), whether or not anyone read all of it.
pub fn write(args: std::fmt::Arguments<'_>, newline: bool) -> anyhow::Result<()> {
    if CLOSED.load(Ordering::Relaxed) {
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    let written = out
        .write_fmt(args)
        .and_then(|()| {
            if newline {
                out.write_all(b"\n")
            } else {
                Ok(())
            }
        })
        .and_then(|()| out.flush());
    match written {
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => {
            CLOSED.store(true, Ordering::Relaxed);
            Ok(())
        }
        other => other.context("writing to standard output"),
    }
}

/// Prints `value` as one line of JSON.
pub fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    out!("{}", serde_json::to_string(value)?);
    Ok(())
}
