//! A meshbpf attachment seen through its pinned maps: registering pods, listing them,
//! looking up original destinations, reading counters. Attaching is
//! [`crate::attach`]'s choice; the pin directory's primitives are in [`crate::pins`].

mod gc;
mod lists;
mod register;
mod status;

use std::path::{Path, PathBuf};

use libbpf_rs::MapHandle;

use crate::abi::{map, MeshMeta};
use crate::error::{Context, Error, Result};
use crate::pins::{self, AttachOptions, PinDir, PinState, MAPS_DIR};
use crate::pod::settings::PodSettings;
use crate::system::{self, Privilege};
#[allow(unused_imports)]
use {gc::*, lists::*, register::*, status::*};

/// Where links and maps are pinned unless told otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/meshbpf";
/// Envoy's IPv6 inbound passthrough source (`InboundPassthroughBindIpv6`).
const INBOUND_PASSTHROUGH_6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

/// A registered pod: its netns cookie and settings. Serialized flat: the settings' fields
/// beside the cookie.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Pod {
    /// The network namespace's cookie (the `cookie_map` key).
    pub netns_cookie: u64,
    /// Its settings (the `cookie_map` value and its port lists).
    #[cfg_attr(feature = "serde", serde(flatten))]
    pub settings: PodSettings,
    /// The network namespace's nsfs inode, as `/proc/PID/ns/net -> net:[INODE]` shows it.
    pub netns_inode: u64,
    /// The pod's own addresses (an IPv4 and an IPv6 one at most), read at register.
    pub addresses: Vec<std::net::IpAddr>,
    /// Inbound listener discovery: the ports its applications listen on now, moved to
    /// loopback, for which the sidecar should open inbound listeners.
    pub inbound_listeners: Vec<u16>,
}

/// Options for [`Mesh::register_netns_with`]; start from `RegisterOptions::default()`.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct RegisterOptions {
    /// Allow registering the host's own network namespace (captures every connection of
    /// the node's processes in the attached cgroup). Off unless asked for explicitly.
    pub allow_host_netns: bool,
}

impl RegisterOptions {
    /// The defaults, with registering the host's own network namespace allowed or not.
    pub fn with_host_netns(allow: bool) -> Self {
        RegisterOptions {
            allow_host_netns: allow,
        }
    }
}

/// One attached program, as its pinned link reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct AttachedProgram {
    /// The hook, such as `connect4` or `sockops`.
    pub hook: String,
    /// The kernel's id of the link.
    pub link_id: u32,
    /// The kernel's id of the program behind it.
    pub prog_id: u32,
}

/// What `meshbpf status` shows.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Status {
    /// The pin directory.
    pub pin_dir: PathBuf,
    /// The cgroup the programs are attached to, as given at attach.
    #[cfg_attr(feature = "serde", serde(rename = "cgroup"))]
    pub cgroup_path: String,
    /// That cgroup's id.
    pub cgroup_id: u64,
    /// The map layout version of the pinned maps.
    pub layout_version: u32,
    /// Whether the sockmap fast path is attached.
    pub sockmap: bool,
    /// The attached programs.
    pub programs: Vec<AttachedProgram>,
    /// Whether meshbpf's capture programs run before every other program on their hooks
    /// (a CNI's socket load balancer): then the sidecar learns the destination the
    /// application asked for. `None` when the cgroup cannot be reached from here to ask.
    pub runs_first: Option<bool>,
    /// The other programs on meshbpf's capture hooks at its cgroup and its ancestors.
    pub other_programs: Vec<crate::order::OtherProgram>,
    /// The registered pods.
    pub pods: Vec<Pod>,
    /// Every counter, by name, summed over CPUs. Serialized as an object, name to value.
    #[cfg_attr(feature = "serde", serde(serialize_with = "counters_object"))]
    pub counters: Vec<(&'static str, u64)>,
}

#[cfg(feature = "serde")]
fn counters_object<S: serde::Serializer>(
    counters: &[(&'static str, u64)],
    serializer: S,
) -> std::result::Result<S::Ok, S::Error> {
    serializer.collect_map(counters.iter().map(|(name, value)| (name, value)))
}

/// How full one pinned map is.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct MapUsage {
    /// The map's name (as pinned under `maps/`).
    pub name: &'static str,
    /// Entries it holds now; `None` for socket storage, which lives on the sockets and cannot
    /// be walked.
    pub entries: Option<u64>,
    /// The most it can hold.
    pub capacity: u64,
}

/// An attached meshbpf, reached through its pinned maps.
#[derive(Debug)]
pub struct Mesh {
    pin: PinDir,
    meta: MeshMeta,
    cookie_map: MapHandle,
    pod_rules: MapHandle,
    cidr_include: MapHandle,
    cidr_exclude: MapHandle,
    inbound_ports: MapHandle,
    origin_dst_map: MapHandle,
    sock_hash: MapHandle,
    counters: MapHandle,
    pod_addrs: MapHandle,
}

impl Mesh {
    /// Loads the programs, attaches them to the cgroup v2 directory `cgroup` and pins
    /// everything under `pin_dir`.
    ///
    /// Idempotent: over an existing attachment to the same cgroup it replaces each program
    /// in place through its pinned link (no window without capture) and keeps the pinned
    /// maps, so registered pods and live connections carry on. A failure leaves nothing
    /// new attached or pinned.
    pub fn attach(cgroup: impl AsRef<Path>, pin_dir: impl AsRef<Path>) -> Result<Mesh> {
        Mesh::attach_with(cgroup, pin_dir, &AttachOptions::default())
    }

    /// [`Mesh::attach`] with node-wide options.
    pub fn attach_with(
        cgroup: impl AsRef<Path>,
        pin_dir: impl AsRef<Path>,
        options: &AttachOptions,
    ) -> Result<Mesh> {
        let (cgroup, pin_dir) = (cgroup.as_ref(), pin_dir.as_ref());
        system::require(Privilege::Bpf, "attach BPF programs")?;
        // Every missing feature by name first (the version check alone names one).
        crate::probe::require_features()?;
        system::check_kernel()?;
        system::open_cgroup2(cgroup)?;
        let pin = PinDir::new(pin_dir)?;
        // A kubelet child of `cgroup` where this kernel cannot otherwise run meshbpf's capture
        // programs before a CNI's already there (crate::order).
        let cgroup = &crate::attach::attach_point(&pin, cgroup)?;
        let (cgroup_dir, cgroup_id) = system::open_cgroup2(cgroup)?;
        crate::attach::attach(&pin, cgroup, &cgroup_dir, cgroup_id, options)?;
        Mesh::open(pin_dir)
    }

    /// Reopens the attachment pinned under `pin_dir`.
    pub fn open(pin_dir: impl AsRef<Path>) -> Result<Mesh> {
        let pin_dir = pin_dir.as_ref();
        system::require(Privilege::Bpf, "open pinned BPF maps")?;
        let pin = PinDir::new(pin_dir)?;
        if pin.state()? != PinState::Attached {
            return Err(Error::NotAttached {
                pin_dir: pin_dir.into(),
            });
        }
        let meta = pins::read_meta(pin.path())?;
        let open = |name: &str| {
            let path = pin.path().join(MAPS_DIR).join(name);
            MapHandle::from_pinned_path(&path)
                .context(|| format!("opening pinned map {}", path.display()))
        };
        Ok(Mesh {
            meta,
            cookie_map: open(map::COOKIE_MAP)?,
            pod_rules: open(map::POD_RULES)?,
            cidr_include: open(map::CIDR_INCLUDE)?,
            cidr_exclude: open(map::CIDR_EXCLUDE)?,
            inbound_ports: open(map::INBOUND_PORTS)?,
            origin_dst_map: open(map::ORIGIN_DST_MAP)?,
            sock_hash: open(map::SOCK_HASH)?,
            counters: open(map::COUNTERS)?,
            pod_addrs: open(map::POD_ADDRS)?,
            pin,
        })
    }

    /// Detaches every program and removes every pin under this attachment's directory.
    pub fn detach(self) -> Result<()> {
        pins::detach(&self.pin).map(|_| ())
    }

    /// The checked pin directory, for the modules that lock it.
    pub(crate) fn pin(&self) -> &PinDir {
        &self.pin
    }

    /// The pin directory.
    pub fn pin_dir(&self) -> &Path {
        self.pin.path()
    }
}

pub(super) fn map_write_error(err: libbpf_rs::Error, map: &str) -> Error {
    if is_map_full(&err) {
        Error::InvalidSetting(format!(
            "{map} is full: too many list entries on this node; unregister pods or shorten their lists"
        ))
    } else {
        Error::Bpf {
            context: format!("writing {map}"),
            cause: err.into(),
        }
    }
}

/// `pod_addrs` holds two addresses per pod; full, it holds those of dead pods too, which
/// `gc` removes.
pub(super) fn addr_write_error(err: libbpf_rs::Error, max_pods: u32) -> Error {
    match is_map_full(&err) {
        true => Error::PodMapFull { max: max_pods },
        false => map_write_error(err, map::POD_ADDRS),
    }
}

/// A full hash map answers E2BIG to an insert.
pub(super) fn is_map_full(err: &libbpf_rs::Error) -> bool {
    err.kind() == libbpf_rs::ErrorKind::TooBig
}

/// Detaches every program and removes every pin under `pin_dir`, also when the attachment
/// cannot be opened (another layout, a half-finished attach); refuses a directory meshbpf
/// did not create. Returns whether anything was there.
pub fn detach(pin_dir: impl AsRef<Path>) -> Result<bool> {
    system::require(Privilege::Bpf, "detach BPF programs")?;
    pins::detach(&PinDir::new(pin_dir.as_ref())?)
}
