//! A meshbpf attachment seen through its pinned maps: registering pods, listing them,
//! looking up original destinations, reading counters. The pin directory's lifecycle
//! (attach, replace in place, detach) is in `pins.rs`.

use std::collections::BTreeSet;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use libbpf_rs::{Link, MapCore, MapFlags, MapHandle};

use crate::abi::{
    self, CidrKey, ConnKey, InboundKey, MeshMeta, OrigDst, RawPodSettings, RuleKey, RuleKind,
    COUNTER_NAMES, LAYOUT_VERSION, MAX_PODS,
};
use crate::error::{Context, Error, Result};
use crate::netns::Netns;
use crate::pins::{self, AttachOptions, PinDir, PinState, LINKS_DIR, MAPS_DIR};
use crate::settings::{Lists, PodSettings};
use crate::system::{self, Privilege};

/// Where links and maps are pinned unless told otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/meshbpf";

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
        let pin = PinDir::new(pin_dir)?;
        pins::attach(&pin, cgroup, &cgroup_dir, cgroup_id, options)?;
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
        let map = |name: &str| {
            let path = pin.path().join(MAPS_DIR).join(name);
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
            meta,
            cookie_map: map("cookie_map")?,
            pod_rules: map("pod_rules")?,
            cidr_include: map("cidr_include")?,
            cidr_exclude: map("cidr_exclude")?,
            inbound_ports: map("inbound_ports")?,
            origin_dst_map: map("origin_dst_map")?,
            sock_hash: map("sock_hash")?,
            counters,
            pin,
        })
    }

    /// Detaches every program and removes every pin under this attachment's directory.
    pub fn detach(self) -> Result<()> {
        pins::detach(&self.pin).map(|_| ())
    }

    /// The pin directory.
    pub fn pin_dir(&self) -> &Path {
        self.pin.path()
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
        let links = self.pin.path().join(LINKS_DIR);
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
            pin_dir: self.pin.path().into(),
            cgroup_path: pins::meta_cgroup_path(&self.meta),
            cgroup_id: self.meta.cgroup_id,
            layout_version: self.meta.layout_version,
            sockmap: self.meta.flags & abi::META_F_SOCKMAP != 0,
            programs,
            pods: self.pods()?,
            counters: self.counters()?,
        })
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

/// Detaches every program and removes every pin under `pin_dir`, also when the attachment
/// cannot be opened (another layout, a half-finished attach); refuses a directory meshbpf
/// did not create. Returns whether anything was there.
pub fn detach(pin_dir: impl AsRef<Path>) -> Result<bool> {
    system::require(Privilege::Bpf, "detach BPF programs")?;
    pins::detach(&PinDir::new(pin_dir.as_ref())?)
}
