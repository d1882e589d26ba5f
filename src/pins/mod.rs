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

mod dir;
mod links;
mod load;
mod lock;
mod meta;
mod pod;
pub(crate) mod reclaim;
mod remove;

pub(crate) use dir::*;
pub(crate) use links::*;
pub(crate) use load::*;
pub(crate) use lock::*;
pub(crate) use meta::*;
pub(crate) use pod::*;
pub(crate) use reclaim::*;
pub(crate) use remove::*;

pub(crate) const MAPS_DIR: &str = "maps";
pub(crate) const LINKS_DIR: &str = "links";
/// Per-pod links: `pods/<netns cookie>`, each pod's sk_lookup program on its netns.
pub(crate) const PODS_DIR: &str = "pods";
pub(crate) const META_MAP: &str = crate::abi::map::META_MAP;
/// Program names in the BPF C start with this; the rest names the hook and its link pin.
const PROG_PREFIX: &str = "handle__";
/// bpffs refuses names with a dot, so a staging directory is `<name>-staging-<pid>`.
const STAGING_INFIX: &str = "-staging-";

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
