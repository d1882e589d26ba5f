//! The library's one error type: each variant says what went wrong and what to do.

use std::io;
use std::path::PathBuf;

/// A `Result` whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The cause of a failed BPF operation, as the BPF library reported it. Boxed, so that no
/// type of that library (libbpf-rs) is part of meshbpf's API: a dependent's tree need not
/// hold the same libbpf-rs version.
pub type BoxedError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in meshbpf, with the fix in the message. New variants may
/// come in any release: match with a `_` arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The netns path does not exist.
    #[error(
        "{path}: no such file; give a pod's network namespace, such as /proc/PID/ns/net or \
         /run/netns/NAME"
    )]
    NetnsNotFound {
        /// The path given.
        path: PathBuf,
    },

    /// The path exists but is not a network namespace.
    #[error(
        "{path} is not a network namespace ({found}); give /proc/PID/ns/net of a process in the \
         pod, or /run/netns/NAME"
    )]
    NotANetns {
        /// The path given.
        path: PathBuf,
        /// What it is instead.
        found: String,
    },

    /// Registering the host's network namespace was refused.
    #[error(
        "{path} is the host's own network namespace: registering it would capture every \
         connection of this node; refused (pass --allow-host-netns only if that is really meant)"
    )]
    HostNetns {
        /// The path given.
        path: PathBuf,
    },

    /// The cgroup path does not exist.
    #[error("{path}: no such cgroup directory{hint}")]
    CgroupNotFound {
        /// The path given.
        path: PathBuf,
        /// Where a cgroup v2 mount was found, if any.
        hint: String,
    },

    /// The cgroup path is not on a cgroup v2 mount.
    #[error(
        "{path} is not a cgroup v2 directory (it is on {found}){hint}; mount one with \
         `mount -t cgroup2 none DIR` and pass DIR (or a child of it)"
    )]
    CgroupNotV2 {
        /// The path given.
        path: PathBuf,
        /// The filesystem found there.
        found: String,
        /// Where a cgroup v2 mount was found, if any.
        hint: String,
    },

    /// The pin directory is not on a bpffs mount.
    #[error(
        "{dir} is not on a bpffs mount; mount one with `mount -t bpf bpf /sys/fs/bpf`, or choose \
         a --pin-dir under an existing bpffs mount"
    )]
    BpffsNotMounted {
        /// The pin directory given.
        dir: PathBuf,
    },

    /// The pin directory is not one meshbpf may safely use.
    #[error(
        "pin directory {path} {why}; meshbpf keeps its pins in a root-owned directory of mode \
         0700 inside bpffs and never follows links there: choose another --pin-dir (or remove \
         the entry if you know what made it)"
    )]
    PinDirUnsafe {
        /// The pin directory given.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },

    /// Another user created the pin directory's name before meshbpf did.
    #[error(
        "pin directory {path} is {what} owned by uid {uid}, who made it before meshbpf did (a bpffs \
         mounted by hand is mode 1777: any user may create entries in it); meshbpf will not \
         use it. `meshbpf agent` takes the name back at start, moving that entry whole to \
         {aside}; by hand: `mv {path} {aside}`, then attach again (or choose another \
         --pin-dir). Mounting bpffs with `-o mode=0700` keeps other users out"
    )]
    PinDirTaken {
        /// The pin directory given.
        path: PathBuf,
        /// What it is: a directory, a symbolic link ...
        what: &'static str,
        /// Who made it.
        uid: u32,
        /// Where to move it.
        aside: PathBuf,
    },

    /// The pin directory holds something meshbpf did not create.
    #[error(
        "{path} holds {found}: it is not a meshbpf attachment, so meshbpf will not touch it; \
         choose another --pin-dir"
    )]
    NotOurPinDir {
        /// The pin directory given.
        path: PathBuf,
        /// What was found there.
        found: String,
    },

    /// The process lacks the capabilities the operation needs.
    #[error("meshbpf needs root to {action} (missing {missing}); run it as root")]
    PermissionDenied {
        /// What was being done.
        action: &'static str,
        /// The capabilities that are missing.
        missing: String,
    },

    /// The kernel lacks something meshbpf needs.
    #[error("kernel lacks {feature}: {detail}; meshbpf needs Linux 5.15 or newer with BTF (CONFIG_DEBUG_INFO_BTF=y)")]
    MissingKernelFeature {
        /// The feature.
        feature: String,
        /// What was found.
        detail: String,
    },

    /// The kernel's verifier rejected one of meshbpf's programs.
    #[error(
        "the kernel's verifier rejected the BPF program {program} ({errno}): this kernel lacks \
         something it needs, or meshbpf has a bug; run `meshbpf check`, and report the kernel \
         (uname -r) with the verifier's log, which ends:\n{log_tail}"
    )]
    VerifierRejected {
        /// The program's name in the BPF object, such as `handle__connect4`.
        program: String,
        /// The error the load returned.
        errno: String,
        /// The verifier's whole log.
        log: String,
        /// Its last lines, where the verifier says why.
        log_tail: String,
    },

    /// The kernel refused to load programs although the process has the capabilities.
    #[error(
        "the kernel refused to load BPF programs ({cause}; libbpf: {detail}) although this \
         process has CAP_BPF and CAP_NET_ADMIN: a security module (SELinux, AppArmor) or kernel \
         lockdown forbids BPF here; allow it for meshbpf"
    )]
    LoadRefused {
        /// libbpf's messages.
        detail: String,
        /// The error the load returned (part of the message, so not also a `source()`).
        cause: BoxedError,
    },

    /// Nothing is attached under the pin directory.
    #[error("nothing is attached under {pin_dir}; run `meshbpf attach --cgroup PATH` first")]
    NotAttached {
        /// The pin directory.
        pin_dir: PathBuf,
    },

    /// The pin directory holds an attachment to another cgroup.
    #[error(
        "{pin_dir} already holds an attachment to {attached}; detach it first (`meshbpf detach \
         --pin-dir {pin_dir}`) or use another --pin-dir"
    )]
    AttachedElsewhere {
        /// The pin directory.
        pin_dir: PathBuf,
        /// The cgroup it is attached to.
        attached: String,
    },

    /// The pinned maps were written by a build this one cannot read or upgrade.
    #[error(
        "{pin_dir} holds map layout {found}, this build uses layout {expected}: {}",
        layout_advice(found, *expected, *oldest_upgradable, pin_dir)
    )]
    LayoutMismatch {
        /// The pin directory.
        pin_dir: PathBuf,
        /// The layout found.
        found: String,
        /// The layout this build uses.
        expected: u32,
        /// The oldest layout this build upgrades from in place.
        oldest_upgradable: u32,
    },

    /// Upgrading the pinned maps to this build's layout failed.
    #[error(
        "upgrading the attachment's map layout failed: {0}; the previous programs and maps \
         stay in force, and running `meshbpf attach` again resumes the upgrade"
    )]
    MigrationFailed(String),

    /// `cookie_map` is full.
    #[error("cannot register: {max} pods are registered already, the most cookie_map holds; unregister pods, run `meshbpf gc`, or attach again with a larger `--max-pods`")]
    PodMapFull {
        /// The bound.
        max: u32,
    },

    /// A setting is out of range.
    #[error("invalid setting: {0}")]
    InvalidSetting(String),

    /// The network namespace is not a registered pod's.
    #[error(
        "{path} is not registered with meshbpf; register it first (`meshbpf register --netns \
         {path} ...`)"
    )]
    NotRegistered {
        /// The path given.
        path: PathBuf,
    },

    /// Istio's `Sidecar` resource was asked for a pod that is not in bind mode.
    #[error(
        "{path} is registered with inbound mode {mode}: the Sidecar resource (one Envoy listener \
         per port, captureMode NONE) is for bind mode, where the applications' listeners move \
         to loopback; register the pod with --inbound-mode bind, or keep redirect mode, which \
         stock Istio serves without a Sidecar resource"
    )]
    NotBindMode {
        /// The path given.
        path: PathBuf,
        /// The pod's inbound mode.
        mode: String,
    },

    /// Istio's `Sidecar` resource was asked for a bind-mode pod with no listener discovered.
    #[error(
        "no inbound listener discovered in {path} yet: the Sidecar resource lists the ports its \
         applications listen on; start them (a wildcard bind made after registration is \
         discovered), then ask again"
    )]
    NoInboundListeners {
        /// The path given.
        path: PathBuf,
    },

    /// A CNI network configuration file cannot be read as one.
    #[error(
        "{path}: {reason}; the primary CNI plugin writes this file: fix it, or let that plugin \
         write it again"
    )]
    CniConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A CNI network configuration is a symbolic link that cannot be followed.
    #[error(
        "{path} is a symbolic link to {target}, which {reason}; meshbpf edits the file a \
         network configuration links to (the link stays): mount the directory it leads to into \
         the agent as well, or make {path} a plain file"
    )]
    CniConfigLink {
        /// The link.
        path: PathBuf,
        /// Where it leads.
        target: PathBuf,
        /// What is wrong there.
        reason: String,
    },

    /// The primary CNI plugin rewrote its file faster than meshbpf could edit it.
    #[error(
        "{path} was rewritten {rounds} times while meshbpf edited it, each time before meshbpf \
         could finish; its newest version stays, and meshbpf tries again at its next change \
         (is another tool rewriting it in a loop?)"
    )]
    CniConfigBusy {
        /// The file.
        path: PathBuf,
        /// How many versions meshbpf tried.
        rounds: usize,
    },

    /// A libbpf operation failed.
    #[error("{context}: {cause}")]
    Bpf {
        /// What was being done.
        context: String,
        /// libbpf's error (part of the message, so not also a `source()`).
        cause: BoxedError,
    },

    /// A system call failed.
    #[error("{context}: {cause}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error (part of the message, so not also a `source()`).
        cause: io::Error,
    },
}

/// What to do about a layout this build does not use, by how it compares.
fn layout_advice(found: &str, expected: u32, oldest: u32, pin_dir: &std::path::Path) -> String {
    let pin = pin_dir.display();
    match found.parse::<u32>() {
        Ok(found) if found < expected && found >= oldest => "run `meshbpf attach` with this \
            build to upgrade it (it keeps every registration and live connection), or use the \
            build that attached it"
            .to_string(),
        Ok(found) if found < expected => format!(
            "this build upgrades layouts {oldest} and later only; use an intermediate release \
             first, or `meshbpf detach --pin-dir {pin}` (registered pods must then be \
             registered again)"
        ),
        Ok(_) => format!(
            "it was attached by a newer meshbpf, which this build cannot downgrade; use that \
             build, or `meshbpf detach --pin-dir {pin}` (registered pods must then be \
             registered again)"
        ),
        Err(_) => format!(
            "this build cannot read it; `meshbpf detach --pin-dir {pin}` removes it \
             (registered pods must then be registered again)"
        ),
    }
}

/// Attaches a description of what was being done to a lower-level error.
pub(crate) trait Context<T> {
    /// Wraps the error with `context`.
    fn context(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for std::result::Result<T, libbpf_rs::Error> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|cause| Error::Bpf {
            context: context(),
            cause: cause.into(),
        })
    }
}

impl<T> Context<T> for std::result::Result<T, io::Error> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|cause| Error::io(context(), cause))
    }
}

impl<T> Context<T> for std::result::Result<T, nix::Error> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|errno| Error::io(context(), errno))
    }
}

impl Error {
    /// A failed system call ([`Error::Io`]): what was being done, and the OS error.
    pub fn io(context: String, cause: impl Into<io::Error>) -> Error {
        Error::Io {
            context,
            cause: cause.into(),
        }
    }
}
