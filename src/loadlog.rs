//! libbpf's messages while a BPF object loads, kept so that a failed load is reported by its
//! cause: the verifier's log of the program it rejected, a pinned map of another shape, or a
//! refusal to load at all. The errno alone cannot tell them apart: the verifier rejects with
//! EACCES or EINVAL, which are also what missing privileges and a pinned map of another shape
//! give.
//!
//! libbpf prints through one process-wide callback. The first load installs one
//! ([`libbpf_rs::set_print`]) that keeps the messages of a load running on the same thread
//! and hands every other message to the callback that was there before (by default
//! libbpf-rs's, which prints to stderr).

use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::{Mutex, Once, PoisonError};

use libbpf_rs::{PrintCallback, PrintLevel};

use crate::error::Error;

thread_local! {
    /// The messages of the load running on this thread, if one is.
    static KEPT: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// The callback that was installed before ours, which gets every message not kept.
static PREVIOUS: Mutex<Option<(PrintLevel, PrintCallback)>> = Mutex::new(None);

/// The most lines of the verifier's log an error message shows: its verdict is at the end.
const LOG_TAIL_LINES: usize = 20;

fn print(level: PrintLevel, msg: String) {
    let kept = KEPT.with(|kept| match kept.borrow_mut().as_mut() {
        Some(text) => {
            text.push_str(&msg);
            true
        }
        None => false,
    });
    if !kept {
        let previous = *PREVIOUS.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((min_level, callback)) = previous {
            if level <= min_level {
                callback(level, msg);
            }
        }
    }
}

/// Runs `load` with libbpf's messages on this thread kept; returns its result and them.
pub(crate) fn capturing<T>(load: impl FnOnce() -> T) -> (T, String) {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let previous = libbpf_rs::get_print();
        // Kept messages include libbpf's informational ones; the rest go on at the level the
        // previous callback asked for.
        let level = previous.map_or(PrintLevel::Info, |(level, _)| level.max(PrintLevel::Info));
        *PREVIOUS.lock().unwrap_or_else(PoisonError::into_inner) = previous;
        libbpf_rs::set_print(Some((level, print)));
    });
    KEPT.with(|kept| *kept.borrow_mut() = Some(String::new()));
    let result = load();
    let log = KEPT
        .with(|kept| kept.borrow_mut().take())
        .unwrap_or_default();
    (result, log)
}

/// Hands messages kept during a load that succeeded on, as if they had never been kept.
pub(crate) fn pass_on(log: &str) {
    if !log.is_empty() {
        print(PrintLevel::Warn, log.to_string());
    }
}

/// What made a load fail, as libbpf's messages tell it.
#[derive(Debug, PartialEq, Eq)]
enum Cause {
    /// The verifier rejected `program`; `log` is its log.
    Verifier { program: String, log: String },
    /// A map pinned at `path` has another shape than the object's map of that name.
    PinnedMap { path: PathBuf },
    /// Something else; `lines` are libbpf's warnings.
    Other { lines: Vec<String> },
}

fn cause(log: &str) -> Cause {
    const BEGIN: &str = "': -- BEGIN PROG LOAD LOG --\n";
    const END: &str = "-- END PROG LOAD LOG --";
    if let Some(begin) = log.find(BEGIN) {
        let program = log[..begin]
            .rsplit_once("prog '")
            .map_or("?", |(_, name)| name)
            .to_string();
        let rest = &log[begin + BEGIN.len()..];
        let text = rest.find(END).map_or(rest, |end| &rest[..end]);
        return Cause::Verifier {
            program,
            log: text.trim_end().to_string(),
        };
    }
    const REUSE: &str = "couldn't reuse pinned map at '";
    if let Some(at) = log.find(REUSE) {
        let rest = &log[at + REUSE.len()..];
        if let Some(end) = rest.find("': parameter mismatch") {
            return Cause::PinnedMap {
                path: PathBuf::from(&rest[..end]),
            };
        }
    }
    Cause::Other {
        lines: log
            .lines()
            .map(|l| l.strip_prefix("libbpf: ").unwrap_or(l).trim().to_string())
            .filter(|l| !l.is_empty())
            .collect(),
    }
}

/// The last `n` lines of `text`, with a note of how many came before.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let skip = lines.len().saturating_sub(n);
    let shown = lines[skip..].join("\n");
    if skip == 0 {
        shown
    } else {
        format!("[{skip} earlier lines]\n{shown}")
    }
}

/// The error for a load of `what` that failed with `error`, by the cause `log` (libbpf's
/// messages during the load) tells.
pub(crate) fn load_error(what: &str, error: libbpf_rs::Error, log: &str) -> Error {
    match cause(log) {
        Cause::Verifier { program, log } => Error::VerifierRejected {
            program,
            errno: error.to_string(),
            log_tail: tail(&log, LOG_TAIL_LINES),
            log,
        },
        Cause::PinnedMap { path } => {
            let name = path.file_name().map_or_else(
                || path.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            );
            // Maps are pinned as <pin dir>/maps/<name>.
            let pin_dir = path
                .parent()
                .and_then(std::path::Path::parent)
                .map_or_else(|| path.clone(), PathBuf::from);
            Error::LayoutMismatch {
                pin_dir,
                found: format!("of another shape (its {name} differs from this build's)"),
                expected: crate::abi::LAYOUT_VERSION,
                oldest_upgradable: crate::abi::OLDEST_UPGRADABLE_LAYOUT,
            }
        }
        Cause::Other { lines } if error.kind() == libbpf_rs::ErrorKind::PermissionDenied => {
            match crate::system::require(crate::system::Privilege::Bpf, "load BPF programs") {
                Err(missing) => missing,
                Ok(()) => Error::LoadRefused {
                    detail: lines.join("; "),
                    cause: error.into(),
                },
            }
        }
        Cause::Other { lines } if !lines.is_empty() => Error::Bpf {
            context: format!("{what} (libbpf: {})", lines.join("; ")),
            cause: error.into(),
        },
        Cause::Other { .. } => Error::Bpf {
            context: what.to_string(),
            cause: error.into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What libbpf 1.7 prints when the verifier rejects a program (libbpf.c,
    /// bpf_object_load_prog), after a warning of its own.
    const REJECTED: &str = "libbpf: prog 'handle__connect4': BPF program load failed: -EACCES\n\
        libbpf: prog 'handle__connect4': -- BEGIN PROG LOAD LOG --\n\
        0: R1=ctx() R10=fp0\n; int handle__connect4(struct bpf_sock_addr *ctx)\n\
        0: (b7) r0 = 1\n1: (61) r2 = *(u32 *)(r1 +96)\ninvalid bpf_context access off=96 size=4\n\
        processed 2 insns (limit 1000000) max_states_per_insn 0 total_states 0 peak_states 0 mark_read 0\n\
        -- END PROG LOAD LOG --\n\
        libbpf: prog 'handle__connect4': failed to load: -EACCES\n\
        libbpf: failed to load object 'meshbpf_bpf'\n";

    #[test]
    fn a_verifier_rejection_is_reported_with_the_program_and_its_log_not_as_missing_privileges() {
        let err = load_error(
            "loading",
            libbpf_rs::Error::from_raw_os_error(nix::libc::EACCES),
            REJECTED,
        );
        let text = err.to_string();
        assert!(
            matches!(&err, Error::VerifierRejected { program, log, .. }
                if program == "handle__connect4" && log.ends_with("mark_read 0")),
            "{err:?}"
        );
        assert!(
            text.contains("handle__connect4") && text.contains("invalid bpf_context access"),
            "{text}"
        );
        assert!(
            !text.contains("CAP_BPF") && !text.contains("MEMLOCK"),
            "{text}"
        );
    }

    #[test]
    fn a_pinned_map_of_another_shape_is_a_layout_mismatch_naming_the_map() {
        let log = "libbpf: couldn't reuse pinned map at '/sys/fs/bpf/meshbpf/maps/cookie_map': \
            parameter mismatch\nlibbpf: map 'cookie_map': can't reuse pinned map\n";
        let err = load_error(
            "loading",
            libbpf_rs::Error::from_raw_os_error(nix::libc::EINVAL),
            log,
        );
        assert!(
            matches!(&err, Error::LayoutMismatch { pin_dir, .. }
                if pin_dir == std::path::Path::new("/sys/fs/bpf/meshbpf")),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains("cookie_map") && text.contains("meshbpf detach"),
            "{text}"
        );
    }

    #[test]
    fn an_invalid_argument_without_a_map_mismatch_is_not_called_a_layout_mismatch() {
        let log = "libbpf: prog 'handle__sk_lookup': BPF program load failed: -EINVAL\n\
            libbpf: prog 'handle__sk_lookup': -- BEGIN PROG LOAD LOG --\n\
            program of this type cannot use helper bpf_get_netns_cookie#122\n\
            -- END PROG LOAD LOG --\n";
        let err = load_error(
            "loading",
            libbpf_rs::Error::from_raw_os_error(nix::libc::EINVAL),
            log,
        );
        assert!(
            matches!(&err, Error::VerifierRejected { program, .. } if program == "handle__sk_lookup"),
            "{err:?}"
        );
        assert!(err.to_string().contains("bpf_get_netns_cookie#122"));
    }

    #[test]
    fn other_failures_carry_libbpf_s_own_words() {
        let log = "libbpf: map 'sock_hash': failed to create: -ENOMEM\n";
        let err = load_error(
            "loading the BPF programs",
            libbpf_rs::Error::from_raw_os_error(nix::libc::ENOMEM),
            log,
        );
        let text = err.to_string();
        assert!(
            text.contains("loading the BPF programs") && text.contains("sock_hash"),
            "{text}"
        );
    }

    #[test]
    fn a_long_log_is_shown_by_its_end() {
        let log: String = (0..100).map(|i| format!("line {i}\n")).collect();
        let shown = tail(&log, 3);
        assert_eq!(shown, "[97 earlier lines]\nline 97\nline 98\nline 99");
    }
}
