//! A meshbpf attachment: the programs attached to one cgroup v2, their links
//! and maps pinned under one bpffs directory, so that any later process
//! (`meshbpf register`, a restarted node agent) can reopen them.
//!
//! Pin layout, under the pin directory (default `/sys/fs/bpf/meshbpf`):
//! `maps/<map>` for every map and `links/<hook>` for every program's link.
//! `maps/meta_map` is written last at attach and removed last at detach: its
//! presence means "an attachment lives here", possibly one to repair.

use std::fs;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use libbpf_rs::skel::{OpenSkel, Skel, SkelBuilder};
use libbpf_rs::{Link, MapCore, MapFlags, MapHandle, ProgramType};

use std::collections::BTreeSet;

use crate::abi::{
    self, CidrKey, ConnKey, InboundKey, MeshMeta, OrigDst, RawPodSettings, RuleKey, RuleKind,
    COUNTER_NAMES, LAYOUT_VERSION, MAX_PODS,
};
use crate::error::{Context, Error, Result};
use crate::netns::Netns;
use crate::settings::{Lists, PodSettings};
use crate::skel::{MeshbpfSkel, MeshbpfSkelBuilder};
use crate::system::{self, Privilege};

/// Where links and maps are pinned unless told otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/meshbpf";

const MAPS_DIR: &str = "maps";
const LINKS_DIR: &str = "links";
const META_MAP: &str = "meta_map";
/// Program names in the BPF C start with this; the rest names the hook and its link pin.
const PROG_PREFIX: &str = "handle__";

/// A registered pod: its netns cookie and settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    /// The network namespace's cookie (the `cookie_map` key).
    pub netns_cookie: u64,
    /// Its settings (the `cookie_map` value and its port lists).
    pub settings: PodSettings,
    /// The network namespace's nsfs inode, as `/proc/PID/ns/net -> net:[INODE]` shows it.
    pub netns_inode: u64,
    /// Inbound listener discovery: the ports its applications listen on now, moved to
    /// loopback, for which the sidecar should open inbound listeners.
    pub inbound_listeners: Vec<u16>,
}

/// Options for [`Mesh::attach_with`]: node-wide choices.
#[derive(Clone, Debug)]
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

/// Options for [`Mesh::register_netns_with`].
#[derive(Clone, Debug, Default)]
pub struct RegisterOptions {
    /// Allow registering the host's own network namespace (captures every connection of
    /// the node's processes in the attached cgroup). Off unless asked for explicitly.
    pub allow_host_netns: bool,
}

/// One attached program, as its pinned link reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
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
pub struct Status {
    /// The pin directory.
    pub pin_dir: PathBuf,
    /// The cgroup the programs are attached to, as given at attach.
    pub cgroup_path: String,
    /// That cgroup's id.
    pub cgroup_id: u64,
    /// The map layout version of the pinned maps.
    pub layout_version: u32,
    /// Whether the sockmap fast path is attached.
    pub sockmap: bool,
    /// The attached programs.
    pub programs: Vec<AttachedProgram>,
    /// The registered pods.
    pub pods: Vec<Pod>,
    /// Every counter, by name, summed over CPUs.
    pub counters: Vec<(&'static str, u64)>,
}

/// An attached meshbpf, reached through its pinned maps.
#[derive(Debug)]
pub struct Mesh {
    pin_dir: PathBuf,
    meta: MeshMeta,
    cookie_map: MapHandle,
    pod_rules: MapHandle,
    cidr_include: MapHandle,
    cidr_exclude: MapHandle,
    inbound_ports: MapHandle,
    origin_dst_map: MapHandle,
    sock_hash: MapHandle,
    counters: MapHandle,
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
        system::check_kernel()?;
        crate::probe::require_features()?;
        let (cgroup_dir, cgroup_id) = system::open_cgroup2(cgroup)?;
        system::check_bpffs(pin_dir)?;
        remove_stale_staging(pin_dir)?;

        let meta_pin = pin_dir.join(MAPS_DIR).join(META_MAP);
        if pin_dir.exists() && !meta_pin.exists() {
            // A detach was interrupted: finish it, then attach afresh.
            remove_pins(pin_dir)?;
        }
        if meta_pin.exists() {
            let existing = read_meta(pin_dir)?;
            if existing.cgroup_id != cgroup_id {
                return Err(Error::AttachedElsewhere {
                    pin_dir: pin_dir.into(),
                    attached: meta_cgroup_path(&existing),
                });
            }
            replace_in_place(pin_dir, &cgroup_dir, &existing, options)?;
        } else {
            let meta = new_meta(cgroup, cgroup_id, options);
            match attach_fresh(pin_dir, &cgroup_dir, &meta, options) {
                // Another attach won the race to the pin directory: join it.
                Err(AttachError::PinDirTaken) => {
                    replace_in_place(pin_dir, &cgroup_dir, &read_meta(pin_dir)?, options)?
                }
                Err(AttachError::Failed(err)) => return Err(err),
                Ok(()) => {}
            }
        }
        Mesh::open(pin_dir)
    }

    /// Reopens the attachment pinned under `pin_dir`.
    pub fn open(pin_dir: impl AsRef<Path>) -> Result<Mesh> {
        let pin_dir = pin_dir.as_ref();
        system::require(Privilege::Bpf, "open pinned BPF maps")?;
        system::check_bpffs(pin_dir)?;
        let meta = read_meta(pin_dir)?;
        let map = |name: &str| {
            let path = pin_dir.join(MAPS_DIR).join(name);
            MapHandle::from_pinned_path(&path)
                .context(|| format!("opening pinned map {}", path.display()))
        };
        let counters = map("counters")?;
        if counters.max_entries() as usize != COUNTER_NAMES.len() {
            return Err(Error::LayoutMismatch {
                pin_dir: pin_dir.into(),
                found: format!(
                    "{} (with {} counters)",
                    meta.layout_version,
                    counters.max_entries()
                ),
                expected: LAYOUT_VERSION,
            });
        }
        Ok(Mesh {
            pin_dir: pin_dir.into(),
            meta,
            cookie_map: map("cookie_map")?,
            pod_rules: map("pod_rules")?,
            cidr_include: map("cidr_include")?,
            cidr_exclude: map("cidr_exclude")?,
            inbound_ports: map("inbound_ports")?,
            origin_dst_map: map("origin_dst_map")?,
            sock_hash: map("sock_hash")?,
            counters,
        })
    }

    /// Detaches every program and removes every pin under this attachment's directory.
    pub fn detach(self) -> Result<()> {
        detach(&self.pin_dir).map(|_| ())
    }

    /// The pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Puts the pod whose network namespace is at `netns_path` in the mesh, with `settings`.
    /// Registering again replaces its settings for new connections.
    pub fn register_netns(
        &self,
        netns_path: impl AsRef<Path>,
        settings: &PodSettings,
    ) -> Result<Pod> {
        self.register_netns_with(netns_path, settings, &RegisterOptions::default())
    }

    /// [`Mesh::register_netns`] with options.
    pub fn register_netns_with(
        &self,
        netns_path: impl AsRef<Path>,
        settings: &PodSettings,
        options: &RegisterOptions,
    ) -> Result<Pod> {
        system::require(Privilege::EnterNetns, "read a network namespace's cookie")?;
        settings.validate()?;
        let netns = Netns::open(netns_path)?;
        netns.refuse_host(options.allow_host_netns)?;
        let cookie = netns.cookie();
        let new = list_keys(cookie, &settings.lists());
        let old = self.stored_keys(cookie);
        // New list entries first, then the settings that use them, then the stale entries:
        // a connection decided in between sees the old lists, the new ones or their union.
        for ((map, name), keys) in self.list_maps().into_iter().zip(&new) {
            for key in keys {
                if let Err(err) = map.update(key, &[1], MapFlags::ANY) {
                    self.remove_keys(&new, &old);
                    return Err(map_write_error(err, name));
                }
            }
        }
        let netns_inode = netns.inode()?;
        let raw = RawPodSettings {
            netns_ino: netns_inode,
            ..settings.to_raw()
        };
        if let Err(err) =
            self.cookie_map
                .update(&cookie.to_ne_bytes(), abi::bytes(&raw), MapFlags::ANY)
        {
            self.remove_keys(&new, &old);
            return Err(match is_map_full(&err) {
                true => Error::PodMapFull { max: MAX_PODS },
                false => Error::Bpf {
                    context: "writing cookie_map".into(),
                    cause: err,
                },
            });
        }
        self.remove_keys(&old, &new);
        Ok(Pod {
            netns_cookie: cookie,
            settings: settings.clone(),
            netns_inode,
            inbound_listeners: self.inbound_listeners(cookie)?,
        })
    }

    /// The maps that hold per-pod lists, with their names, in [`ListKeys`] order.
    fn list_maps(&self) -> [(&MapHandle, &'static str); 3] {
        [
            (&self.pod_rules, "pod_rules"),
            (&self.cidr_include, "cidr_include"),
            (&self.cidr_exclude, "cidr_exclude"),
        ]
    }

    /// The keys one pod has in the list maps now.
    fn stored_keys(&self, netns_cookie: u64) -> ListKeys {
        let rules = self
            .pod_rules
            .keys()
            .filter(|k| {
                abi::from_bytes::<RuleKey>(k).is_some_and(|k| k.netns_cookie == netns_cookie)
            })
            .collect();
        let cidrs = |map: &MapHandle| {
            map.keys()
                .filter(|k| {
                    abi::from_bytes::<CidrKey>(k).is_some_and(|k| k.cookie() == netns_cookie)
                })
                .collect()
        };
        [rules, cidrs(&self.cidr_include), cidrs(&self.cidr_exclude)]
    }

    /// Deletes the keys of `these` that are not in `keep`.
    fn remove_keys(&self, these: &ListKeys, keep: &ListKeys) {
        for (((map, _), these), keep) in self.list_maps().into_iter().zip(these).zip(keep) {
            for key in these.difference(keep) {
                let _ = map.delete(key);
            }
        }
    }

    /// One pod's lists, read back from the maps.
    fn lists_of(&self, netns_cookie: u64) -> Lists {
        let [rules, include, exclude] = self.stored_keys(netns_cookie);
        let cidrs = |keys: BTreeSet<Vec<u8>>| {
            keys.iter()
                .filter_map(|k| abi::from_bytes::<CidrKey>(k)?.cidr())
                .collect()
        };
        Lists {
            rules: rules
                .iter()
                .filter_map(|k| abi::from_bytes::<RuleKey>(k))
                .filter_map(|k| RuleKind::from_raw(k.kind).map(|kind| (kind, k.value)))
                .collect(),
            include_cidrs: cidrs(include),
            exclude_cidrs: cidrs(exclude),
        }
    }

    /// Takes the pod whose network namespace is at `netns_path` out of the mesh; returns
    /// whether it was registered. Its connections already captured carry on.
    pub fn unregister_netns(&self, netns_path: impl AsRef<Path>) -> Result<bool> {
        system::require(Privilege::EnterNetns, "read a network namespace's cookie")?;
        let netns = Netns::open(netns_path)?;
        self.unregister_cookie(netns.cookie())
    }

    /// Takes the pod with this netns cookie out of the mesh, with its port lists and
    /// discovered listeners; returns whether it was registered.
    pub fn unregister_cookie(&self, netns_cookie: u64) -> Result<bool> {
        let registered = match self.cookie_map.delete(&netns_cookie.to_ne_bytes()) {
            Ok(()) => true,
            Err(err) if err.kind() == libbpf_rs::ErrorKind::NotFound => false,
            Err(err) => return Err(err).context(|| "deleting from cookie_map".into()),
        };
        self.remove_keys(&self.stored_keys(netns_cookie), &ListKeys::default());
        for key in self.inbound_ports.keys() {
            if abi::from_bytes::<InboundKey>(&key).is_some_and(|k| k.netns_cookie == netns_cookie) {
                let _ = self.inbound_ports.delete(&key);
            }
        }
        Ok(registered)
    }

    /// Inbound listener discovery: the ports the pod's applications listen on now, moved to
    /// loopback by the bind hooks.
    pub fn inbound_listeners(&self, netns_cookie: u64) -> Result<Vec<u16>> {
        let mut ports = BTreeSet::new();
        for key in self.inbound_ports.keys() {
            let Some(parsed) = abi::from_bytes::<InboundKey>(&key) else {
                continue;
            };
            if parsed.netns_cookie != netns_cookie {
                continue;
            }
            let count = self
                .inbound_ports
                .lookup(&key, MapFlags::ANY)
                .context(|| "reading inbound_ports".into())?;
            if count
                .and_then(|v| <[u8; 4]>::try_from(v.as_slice()).ok())
                .is_some_and(|v| u32::from_ne_bytes(v) > 0)
            {
                ports.insert(parsed.port);
            }
        }
        Ok(ports.into_iter().collect())
    }

    /// Unregisters every pod whose network namespace no longer exists (no process in it, no
    /// process holding it open, no bind mount of it), with its lists, listeners and tracked
    /// connections; returns the pods removed.
    pub fn gc(&self) -> Result<Vec<Pod>> {
        system::require(Privilege::Bpf, "garbage-collect registered pods")?;
        // Pods first, then the live namespaces: a pod registered in between is not in the
        // list, so it can never be taken for dead.
        let pods = self.pods()?;
        let live = crate::netns::live_netns_inodes();
        let mut removed = Vec::new();
        for pod in pods {
            if live.contains(&pod.netns_inode) {
                continue;
            }
            self.unregister_cookie(pod.netns_cookie)?;
            for key in self.origin_dst_map.keys() {
                if abi::from_bytes::<ConnKey>(&key)
                    .is_some_and(|k| k.netns_cookie == pod.netns_cookie)
                {
                    let _ = self.origin_dst_map.delete(&key);
                }
            }
            removed.push(pod);
        }
        Ok(removed)
    }

    /// Every registered pod.
    pub fn pods(&self) -> Result<Vec<Pod>> {
        let mut pods = Vec::new();
        for key in self.cookie_map.keys() {
            let Some(value) = self
                .cookie_map
                .lookup(&key, MapFlags::ANY)
                .context(|| "reading cookie_map".into())?
            else {
                continue; // unregistered while we walked the map
            };
            let (Ok(cookie), Some(raw)) = (
                <[u8; 8]>::try_from(key.as_slice()),
                abi::from_bytes::<RawPodSettings>(&value),
            ) else {
                continue;
            };
            let netns_cookie = u64::from_ne_bytes(cookie);
            pods.push(Pod {
                netns_cookie,
                settings: PodSettings::from_parts(&raw, &self.lists_of(netns_cookie)),
                netns_inode: raw.netns_ino,
                inbound_listeners: self.inbound_listeners(netns_cookie)?,
            });
        }
        pods.sort_by_key(|pod| pod.netns_cookie);
        Ok(pods)
    }

    /// The original destination of the captured connection from `client` (the application's
    /// end) to `listener` (the proxy's end) in the pod with `netns_cookie`: the answer the
    /// getsockopt hook gives the proxy.
    pub fn lookup_origin_dst(
        &self,
        netns_cookie: u64,
        client: SocketAddr,
        listener: SocketAddr,
    ) -> Result<Option<SocketAddr>> {
        let key = ConnKey::new(netns_cookie, client, listener);
        let value = self
            .origin_dst_map
            .lookup(abi::bytes(&key), MapFlags::ANY)
            .context(|| "reading origin_dst_map".into())?;
        Ok(value
            .and_then(|v| abi::from_bytes::<OrigDst>(&v))
            .and_then(|dst| dst.to_socket_addr()))
    }

    /// How many connections `origin_dst_map` tracks now.
    pub fn tracked_connections(&self) -> usize {
        self.origin_dst_map.keys().count()
    }

    /// How many sockets `sock_hash` holds now (two per accelerated connection).
    pub fn accelerated_sockets(&self) -> usize {
        self.sock_hash.keys().count()
    }

    /// Every counter, by name, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(&'static str, u64)>> {
        let mut out = Vec::with_capacity(COUNTER_NAMES.len());
        for (index, name) in COUNTER_NAMES.iter().enumerate() {
            let per_cpu = self
                .counters
                .lookup_percpu(&(index as u32).to_ne_bytes(), MapFlags::ANY)
                .context(|| "reading counters".into())?;
            let total = per_cpu
                .unwrap_or_default()
                .iter()
                .filter_map(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
                .map(u64::from_ne_bytes)
                .sum();
            out.push((*name, total));
        }
        Ok(out)
    }

    /// Programs, pods and counters of this attachment.
    pub fn status(&self) -> Result<Status> {
        let mut programs = Vec::new();
        let links = self.pin_dir.join(LINKS_DIR);
        for entry in fs::read_dir(&links).context(|| format!("reading {}", links.display()))? {
            let path = entry
                .context(|| format!("reading {}", links.display()))?
                .path();
            let link = Link::open(&path).context(|| format!("opening link {}", path.display()))?;
            let info = link
                .info()
                .context(|| format!("querying link {}", path.display()))?;
            let hook = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            programs.push(AttachedProgram {
                hook,
                link_id: info.id,
                prog_id: info.prog_id,
            });
        }
        programs.sort_by(|a, b| a.hook.cmp(&b.hook));
        Ok(Status {
            pin_dir: self.pin_dir.clone(),
            cgroup_path: meta_cgroup_path(&self.meta),
            cgroup_id: self.meta.cgroup_id,
            layout_version: self.meta.layout_version,
            sockmap: self.meta.flags & abi::META_F_SOCKMAP != 0,
            programs,
            pods: self.pods()?,
            counters: self.counters()?,
        })
    }
}

/// Detaches every program and removes every pin under `pin_dir`, also when the attachment
/// cannot be opened (another layout, a half-finished attach). Returns whether anything was
/// there.
pub fn detach(pin_dir: impl AsRef<Path>) -> Result<bool> {
    let pin_dir = pin_dir.as_ref();
    system::require(Privilege::Bpf, "detach BPF programs")?;
    system::check_bpffs(pin_dir)?;
    let stale = remove_stale_staging(pin_dir)?;
    if !pin_dir.exists() {
        return Ok(stale);
    }
    drain_sockmap(pin_dir);
    remove_pins(pin_dir)?;
    Ok(true)
}

/// How long detach gives the sidecars to read what sk_msg already redirected to them.
const DRAIN_GRACE: std::time::Duration = std::time::Duration::from_millis(250);

/// Before sock_hash goes (and with it every queue that sockmap redirects into), stop the
/// redirects and give the sidecars a moment to read what is queued: accelerated
/// connections then carry on over the normal stack, losing nothing. Best effort: an
/// attachment that cannot be read (another layout) is removed without it.
fn drain_sockmap(pin_dir: &Path) {
    let Ok((meta_map, mut meta)) = open_meta(pin_dir) else {
        return;
    };
    let Ok(sock_hash) = MapHandle::from_pinned_path(pin_dir.join(MAPS_DIR).join("sock_hash"))
    else {
        return;
    };
    meta.flags |= abi::META_F_DRAINING;
    let drained = meta_map.update(&0u32.to_ne_bytes(), abi::bytes(&meta), MapFlags::ANY);
    if drained.is_ok() && sock_hash.keys().next().is_some() {
        std::thread::sleep(DRAIN_GRACE);
    }
}

/// One pod's keys in the list maps: `pod_rules`, `cidr_include`, `cidr_exclude`.
type ListKeys = [BTreeSet<Vec<u8>>; 3];

/// The keys the list maps hold for `lists` of the pod with `netns_cookie`.
fn list_keys(netns_cookie: u64, lists: &Lists) -> ListKeys {
    let cidrs = |set: &BTreeSet<crate::settings::Cidr>| {
        set.iter()
            .map(|c| abi::bytes(&CidrKey::new(netns_cookie, c)).to_vec())
            .collect()
    };
    [
        lists
            .rules
            .iter()
            .map(|&(kind, value)| abi::bytes(&RuleKey::new(netns_cookie, kind, value)).to_vec())
            .collect(),
        cidrs(&lists.include_cidrs),
        cidrs(&lists.exclude_cidrs),
    ]
}

fn map_write_error(err: libbpf_rs::Error, map: &str) -> Error {
    if is_map_full(&err) {
        Error::InvalidSetting(format!(
            "{map} is full: too many list entries on this node; unregister pods or shorten their lists"
        ))
    } else {
        Error::Bpf {
            context: format!("writing {map}"),
            cause: err,
        }
    }
}

/// A full hash map answers E2BIG to an insert.
fn is_map_full(err: &libbpf_rs::Error) -> bool {
    err.kind() == libbpf_rs::ErrorKind::TooBig
}

/// `meta_map` flags for an attachment made with `options`.
fn meta_flags(options: &AttachOptions) -> u32 {
    if options.sockmap {
        abi::META_F_SOCKMAP
    } else {
        0
    }
}

fn new_meta(cgroup: &Path, cgroup_id: u64, options: &AttachOptions) -> MeshMeta {
    let mut meta = MeshMeta {
        layout_version: LAYOUT_VERSION,
        flags: meta_flags(options),
        cgroup_id,
        ..Default::default()
    };
    let path = fs::canonicalize(cgroup).unwrap_or_else(|_| cgroup.into());
    let bytes = path.as_os_str().as_encoded_bytes();
    // Keep the last byte a NUL; a longer path is cut (the id is what identifies the cgroup).
    let len = bytes.len().min(meta.cgroup_path.len() - 1);
    for (dst, src) in meta.cgroup_path.iter_mut().zip(&bytes[..len]) {
        *dst = *src as _;
    }
    meta
}

fn meta_cgroup_path(meta: &MeshMeta) -> String {
    let bytes: Vec<u8> = meta
        .cgroup_path
        .iter()
        .take_while(|&&b| b != 0)
        .map(|&b| b as u8)
        .collect();
    let path = String::from_utf8_lossy(&bytes);
    format!("{path} (cgroup id {})", meta.cgroup_id)
}

fn read_meta(pin_dir: &Path) -> Result<MeshMeta> {
    open_meta(pin_dir).map(|(_, meta)| meta)
}

/// The pinned `meta_map` and its value, refused unless written by this layout.
fn open_meta(pin_dir: &Path) -> Result<(MapHandle, MeshMeta)> {
    let path = pin_dir.join(MAPS_DIR).join(META_MAP);
    if !path.exists() {
        return Err(Error::NotAttached {
            pin_dir: pin_dir.into(),
        });
    }
    let map =
        MapHandle::from_pinned_path(&path).context(|| format!("opening {}", path.display()))?;
    let value = map
        .lookup(&0u32.to_ne_bytes(), MapFlags::ANY)
        .context(|| format!("reading {}", path.display()))?;
    let meta = value.as_deref().and_then(abi::from_bytes::<MeshMeta>);
    match meta {
        Some(meta) if meta.layout_version == LAYOUT_VERSION => Ok((map, meta)),
        Some(meta) => Err(Error::LayoutMismatch {
            pin_dir: pin_dir.into(),
            found: meta.layout_version.to_string(),
            expected: LAYOUT_VERSION,
        }),
        None => Err(Error::LayoutMismatch {
            pin_dir: pin_dir.into(),
            found: format!("unknown ({} bytes of meta)", value.map_or(0, |v| v.len())),
            expected: LAYOUT_VERSION,
        }),
    }
}

/// The hook a program serves, from its name: `handle__connect4` → `connect4`.
fn hook_name(prog_name: &std::ffi::OsStr) -> String {
    let name = prog_name.to_string_lossy();
    name.strip_prefix(PROG_PREFIX).unwrap_or(&name).to_string()
}

/// Opens the skeleton with every map pinned (or reused) under `maps_dir`, and loads it.
fn load<'obj>(
    open_object: &'obj mut MaybeUninit<libbpf_rs::OpenObject>,
    maps_dir: &Path,
    options: &AttachOptions,
) -> Result<MeshbpfSkel<'obj>> {
    let mut open = MeshbpfSkelBuilder::default()
        .open(open_object)
        .context(|| "opening the BPF object".into())?;
    if let Some(rodata) = open.maps.rodata_data.as_deref_mut() {
        rodata.sockmap_enabled = options.sockmap;
    }
    for mut map in open.open_object_mut().maps_mut() {
        let name = map.name().to_string_lossy().into_owned();
        if name.contains('.') {
            continue; // .rodata and friends belong to this load only
        }
        map.set_pin_path(maps_dir.join(&name))
            .context(|| format!("setting the pin path of {name}"))?;
    }
    open.load().map_err(|cause| {
        if cause.kind() == libbpf_rs::ErrorKind::PermissionDenied {
            Error::PermissionDenied {
                action: "load BPF programs",
                missing: "CAP_BPF or a high enough RLIMIT_MEMLOCK".into(),
            }
        } else {
            Error::Bpf {
                context: "loading the BPF programs (the kernel verifier's log is printed above; \
                          `meshbpf` needs Linux 5.15+ with BTF)"
                    .into(),
                cause,
            }
        }
    })
}

enum AttachError {
    /// Another process created the pin directory first.
    PinDirTaken,
    Failed(Error),
}

impl From<Error> for AttachError {
    fn from(err: Error) -> Self {
        AttachError::Failed(err)
    }
}

/// A staging directory that is removed, with every link in it detached, unless kept.
struct Staging {
    path: PathBuf,
    keep: bool,
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.keep {
            let _ = remove_pins(&self.path);
        }
    }
}

/// bpffs refuses names with a dot, so the staging directory is `<name>-staging-<pid>`.
fn staging_prefix(pin_dir: &Path) -> String {
    let name = pin_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!("{name}-staging-")
}

/// Attaches into a fresh staging directory next to `pin_dir`, then renames it into place,
/// so that `pin_dir` appears complete or not at all.
fn attach_fresh(
    pin_dir: &Path,
    cgroup: &fs::File,
    meta: &MeshMeta,
    options: &AttachOptions,
) -> Result<(), AttachError> {
    let parent = pin_dir.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(parent).context(|| format!("creating {}", parent.display()))?;
    let mut staging = Staging {
        path: parent.join(format!("{}{}", staging_prefix(pin_dir), std::process::id())),
        keep: false,
    };
    let _ = remove_pins(&staging.path);
    for dir in [MAPS_DIR, LINKS_DIR] {
        private_dir(&staging.path.join(dir))?;
    }

    let mut open_object = MaybeUninit::uninit();
    let skel = load(&mut open_object, &staging.path.join(MAPS_DIR), options)?;
    // On an early return the new links are dropped, which detaches them, and `staging`
    // unpins whatever was pinned already.
    attach_programs(&skel, cgroup, &staging.path.join(LINKS_DIR), options)?;
    // meta_map last: it marks the directory complete.
    write_meta(&skel, meta)?;

    match fs::rename(&staging.path, pin_dir) {
        Ok(()) => {
            staging.keep = true;
            Ok(())
        }
        Err(err)
            if matches!(
                err.raw_os_error(),
                Some(nix::libc::EEXIST) | Some(nix::libc::ENOTEMPTY)
            ) =>
        {
            Err(AttachError::PinDirTaken)
        }
        Err(err) => Err(Error::Io {
            context: format!("moving the attachment to {}", pin_dir.display()),
            cause: err,
        }
        .into()),
    }
}

fn write_meta(skel: &MeshbpfSkel<'_>, meta: &MeshMeta) -> Result<()> {
    skel.maps
        .meta_map
        .update(&0u32.to_ne_bytes(), abi::bytes(meta), MapFlags::ANY)
        .context(|| "writing meta_map".into())
}

/// Attaches every program of `skel`, or replaces it in place through its link pinned
/// under `links_dir`, and pins the links it creates there.
///
/// The sk_msg program goes first, onto sock_hash (it has no link before Linux 6.10; the
/// map holds it): a socket takes the map's programs when it enters the map, so every
/// socket sockops adds must find sk_msg already there.
fn attach_programs(
    skel: &MeshbpfSkel<'_>,
    cgroup: &fs::File,
    links_dir: &Path,
    options: &AttachOptions,
) -> Result<()> {
    if options.sockmap {
        let sock_hash = skel.maps.sock_hash.as_fd().as_raw_fd();
        skel.progs
            .handle__sk_msg
            .attach_sockmap(sock_hash)
            .context(|| "attaching sk_msg to sock_hash".into())?;
    }
    let mut created = Vec::new();
    for prog in skel.object().progs_mut() {
        if prog.prog_type() == ProgramType::SkMsg {
            continue;
        }
        let hook = hook_name(prog.name());
        let path = links_dir.join(&hook);
        if path.exists() {
            let mut link =
                Link::open(&path).context(|| format!("opening link {}", path.display()))?;
            link.update_prog(&prog)
                .context(|| format!("replacing the {hook} program"))?;
        } else {
            let link = prog
                .attach_cgroup(cgroup.as_raw_fd())
                .context(|| format!("attaching {hook}"))?;
            created.push((path, link));
        }
    }
    private_dir(links_dir)?;
    for (path, link) in &mut created {
        link.pin(&*path)
            .context(|| format!("pinning {}", path.display()))?;
    }
    Ok(())
}

/// Replaces each program of an existing attachment through its pinned link, keeping the
/// pinned maps; attaches and pins any program whose link is missing.
fn replace_in_place(
    pin_dir: &Path,
    cgroup: &fs::File,
    meta: &MeshMeta,
    options: &AttachOptions,
) -> Result<()> {
    let mut open_object = MaybeUninit::uninit();
    let skel =
        load(&mut open_object, &pin_dir.join(MAPS_DIR), options).map_err(|err| match err {
            Error::Bpf { cause, .. } if cause.kind() == libbpf_rs::ErrorKind::InvalidInput => {
                Error::LayoutMismatch {
                    pin_dir: pin_dir.into(),
                    found: "incompatible pinned maps".into(),
                    expected: LAYOUT_VERSION,
                }
            }
            other => other,
        })?;
    attach_programs(&skel, cgroup, &pin_dir.join(LINKS_DIR), options)?;
    let mut meta = *meta;
    meta.flags = meta_flags(options);
    write_meta(&skel, &meta)
}

/// Creates a directory (and its missing parents inside the pin directory) readable by root
/// only: the pins beneath give control over every pod's traffic. Pins themselves are 0600.
fn private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .context(|| format!("creating {}", dir.display()))
}

/// Removes the staging directories of attaches whose process is gone; returns whether any.
fn remove_stale_staging(pin_dir: &Path) -> Result<bool> {
    let Some(parent) = pin_dir.parent() else {
        return Ok(false);
    };
    let Ok(entries) = fs::read_dir(parent) else {
        return Ok(false);
    };
    let prefix = staging_prefix(pin_dir);
    let mut removed = false;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(&prefix) else {
            continue;
        };
        if Path::new("/proc").join(pid).exists() && pid != std::process::id().to_string() {
            continue; // an attach in progress elsewhere
        }
        remove_pins(&entry.path())?;
        removed = true;
    }
    Ok(removed)
}

/// Detaches every link pinned under `dir`, then removes every pin and directory, with the
/// meta map last.
fn remove_pins(dir: &Path) -> Result<()> {
    let links = dir.join(LINKS_DIR);
    if let Ok(entries) = fs::read_dir(&links) {
        for entry in entries.flatten() {
            let path = entry.path();
            if let Ok(link) = Link::open(&path) {
                // Detach even if another process still holds the link open.
                let _ = link.detach();
            }
            fs::remove_file(&path).context(|| format!("removing {}", path.display()))?;
        }
        fs::remove_dir(&links).context(|| format!("removing {}", links.display()))?;
    }
    let maps = dir.join(MAPS_DIR);
    if let Ok(entries) = fs::read_dir(&maps) {
        let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        paths.sort_by_key(|p| p.ends_with(META_MAP));
        for path in paths {
            fs::remove_file(&path).context(|| format!("removing {}", path.display()))?;
        }
        fs::remove_dir(&maps).context(|| format!("removing {}", maps.display()))?;
    }
    match fs::remove_dir(dir) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(err).context(|| {
            format!(
                "removing {} (does it hold files meshbpf did not create?)",
                dir.display()
            )
        }),
        _ => Ok(()),
    }
}
