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
    /// How many connections and pods the maps hold; unset bounds keep an existing
    /// attachment's, or take the defaults.
    pub sizes: MapSizes,
}

impl Default for AttachOptions {
    fn default() -> Self {
        AttachOptions {
            sockmap: true,
            sizes: MapSizes::default(),
        }
    }
}

impl AttachOptions {
    /// The defaults with the sockmap fast path on or off.
    pub fn with_sockmap(sockmap: bool) -> Self {
        AttachOptions {
            sockmap,
            ..Default::default()
        }
    }

    /// These options with the maps sized as `sizes` says.
    pub fn with_sizes(self, sizes: MapSizes) -> Self {
        AttachOptions { sizes, ..self }
    }
}

/// The bounds of the preallocated maps, sized to the node (`attach --max-connections`,
/// `--max-pods`). `None` keeps what an existing attachment has, or takes the default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapSizes {
    /// Live captured connections (`origin_dst_map`), default [`DEFAULT_MAX_CONNECTIONS`].
    pub max_connections: Option<u32>,
    /// Registered pods (`cookie_map`, and the per-pod maps in proportion), default
    /// [`DEFAULT_MAX_PODS`].
    pub max_pods: Option<u32>,
}

/// `origin_dst_map`'s bound when `--max-connections` is not given.
pub const DEFAULT_MAX_CONNECTIONS: u32 = crate::abi::MAX_TRACKED_CONNS;
/// `cookie_map`'s bound when `--max-pods` is not given.
pub const DEFAULT_MAX_PODS: u32 = crate::abi::MAX_PODS;
/// The largest `--max-connections` (16 Mi connections: 2 GiB of map, far beyond a node).
pub const MAX_CONNECTIONS_LIMIT: u32 = 1 << 24;
/// The largest `--max-pods`.
pub const MAX_PODS_LIMIT: u32 = 1 << 16;
/// The smallest `--max-connections`: below a few per CPU, the LRU map's per-CPU free lists
/// evict entries a proxy still needs.
pub const MIN_CONNECTIONS: u32 = 64;

impl MapSizes {
    /// Checks each bound given against its range.
    pub fn validate(&self) -> crate::error::Result<()> {
        let check = |flag: &str, value: Option<u32>, min: u32, max: u32| match value {
            Some(n) if !(min..=max).contains(&n) => Err(crate::error::Error::InvalidSetting(
                format!("{flag} {n}: give a number from {min} to {max}"),
            )),
            _ => Ok(()),
        };
        check(
            "--max-connections",
            self.max_connections,
            MIN_CONNECTIONS,
            MAX_CONNECTIONS_LIMIT,
        )?;
        check("--max-pods", self.max_pods, 1, MAX_PODS_LIMIT)
    }

    /// The bound of map `name` these sizes give (both set), or `None` for a map of fixed
    /// size. The per-pod maps keep their default ratio to `cookie_map` (two addresses, up to
    /// four listeners and sixteen list entries per pod on average), with floors so that one
    /// pod with long lists still fits on a small node.
    pub(crate) fn entries_of(&self, name: &str) -> Option<u32> {
        use crate::abi::map;
        let pods = self.max_pods?;
        let conns = self.max_connections?;
        Some(match name {
            map::ORIGIN_DST_MAP => conns,
            map::COOKIE_MAP => pods,
            map::POD_ADDRS => 2 * pods,
            map::INBOUND_PORTS => (4 * pods).max(1024),
            map::CIDR_INCLUDE | map::CIDR_EXCLUDE => (4 * pods).max(4096),
            map::POD_RULES => (16 * pods).max(8192),
            _ => return None,
        })
    }

    /// These sizes with every unset bound taken from `pinned` (the bound of a pinned map
    /// by name, where there is one), else the default.
    pub(crate) fn resolve(&self, pinned: impl Fn(&str) -> Option<u32>) -> MapSizes {
        use crate::abi::map;
        MapSizes {
            max_connections: self
                .max_connections
                .or_else(|| pinned(map::ORIGIN_DST_MAP))
                .or(Some(DEFAULT_MAX_CONNECTIONS)),
            max_pods: self
                .max_pods
                .or_else(|| pinned(map::COOKIE_MAP))
                .or(Some(DEFAULT_MAX_PODS)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::map;
    use crate::skel::types::consts;

    #[test]
    fn default_sizes_are_the_bounds_compiled_in_so_no_attachment_is_resized_by_default() {
        let sizes = MapSizes::default().resolve(|_| None);
        for (name, bound) in [
            (map::ORIGIN_DST_MAP, consts::MAX_TRACKED_CONNS.0),
            (map::COOKIE_MAP, consts::MAX_PODS.0),
            (map::POD_ADDRS, consts::MAX_POD_ADDRS.0),
            (map::INBOUND_PORTS, consts::MAX_INBOUND_PORTS.0),
            (map::CIDR_INCLUDE, consts::MAX_POD_CIDRS.0),
            (map::CIDR_EXCLUDE, consts::MAX_POD_CIDRS.0),
            (map::POD_RULES, consts::MAX_POD_RULES.0),
        ] {
            assert_eq!(sizes.entries_of(name), Some(bound), "{name}");
        }
        assert_eq!(sizes.entries_of(map::SOCK_HASH), None);
    }

    #[test]
    fn an_unset_bound_keeps_the_pinned_one_and_a_given_one_wins() {
        let pinned = |name: &str| (name == map::ORIGIN_DST_MAP).then_some(4096);
        let kept = MapSizes::default().resolve(pinned);
        assert_eq!(kept.max_connections, Some(4096));
        assert_eq!(kept.max_pods, Some(DEFAULT_MAX_PODS));
        let given = MapSizes {
            max_connections: Some(1 << 20),
            max_pods: Some(110),
        };
        assert_eq!(given.resolve(pinned), given);
        assert_eq!(given.entries_of(map::POD_RULES), Some(8192));
        assert_eq!(given.entries_of(map::POD_ADDRS), Some(220));
    }

    #[test]
    fn bounds_out_of_range_are_refused_naming_the_flag() {
        for (sizes, flag) in [
            (
                MapSizes {
                    max_connections: Some(MIN_CONNECTIONS - 1),
                    max_pods: None,
                },
                "--max-connections",
            ),
            (
                MapSizes {
                    max_connections: None,
                    max_pods: Some(MAX_PODS_LIMIT + 1),
                },
                "--max-pods",
            ),
        ] {
            let err = sizes.validate().err().map(|e| e.to_string());
            assert!(err.as_deref().is_some_and(|e| e.contains(flag)), "{err:?}");
        }
        assert!(MapSizes::default().validate().is_ok());
    }
}
