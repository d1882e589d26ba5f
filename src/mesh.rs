//! A meshbpf attachment seen through its pinned maps: registering pods, listing them,
//! looking up original destinations, reading counters. The pin directory's lifecycle
//! (attach, replace in place, detach) is in `pins.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use libbpf_rs::{Link, MapCore, MapFlags, MapHandle};

use crate::abi::{
    self, map, CidrKey, ConnKey, InboundKey, MeshMeta, OrigDst, PodAddrKey, RawPodSettings,
    RuleKey, RuleKind, COUNTER_NAMES, MAX_PODS,
};
use crate::error::{Context, Error, Result};
use crate::mapio;
use crate::netns::Netns;
use crate::pins::{self, AttachOptions, PinDir, PinLock, PinState, LINKS_DIR, MAPS_DIR};
use crate::settings::{InboundMode, Lists, PodSettings};
use crate::system::{self, Privilege};

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
        system::check_kernel()?;
        crate::probe::require_features()?;
        let (cgroup_dir, cgroup_id) = system::open_cgroup2(cgroup)?;
        let pin = PinDir::new(pin_dir)?;
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
        let netns_inode = netns.inode()?;
        let lock = self.pin.lock(true)?;
        let cookie = netns.cookie();
        let previous = self.raw_pod(cookie)?;
        let current = previous.map(|raw| raw.lists_gen);
        // A pod seen for the first time has no list entries, unless a register or unregister
        // of it was stopped half-way, which left its marker: only then are the whole maps
        // read (one pass each) to find them. Otherwise register costs the same with 10 pods
        // as with 16,384.
        let marker = RuleKey::lists_changing(cookie);
        let stopped = self
            .pod_rules
            .lookup(abi::bytes(&marker), MapFlags::ANY)
            .context(|| format!("reading {}", map::POD_RULES))?
            .is_some();
        self.pod_rules
            .update(abi::bytes(&marker), &[1], MapFlags::ANY)
            .map_err(|err| map_write_error(err, map::POD_RULES))?;
        // (A failed scan returns here with the marker in place.)
        let stored = match previous.is_some() || stopped {
            true => self
                .list_entries(&lock, Some(cookie))?
                .remove(&cookie)
                .unwrap_or_default(),
            false => ListEntries::default(),
        };
        let switched = self.switch_lists(&netns, cookie, current, &stored, settings, netns_inode);
        // Every entry is of the generation in force now, or (an error) the new ones are gone
        // again: either way nothing is left for a scan to find.
        let _ = self.pod_rules.delete(abi::bytes(&marker));
        let raw = switched?;
        self.claim_addresses(
            cookie,
            &raw.addresses(),
            &previous.map(|p| p.addresses()).unwrap_or_default(),
        )?;
        // The pod's sk_lookup program, which hands inbound connections to its sidecar.
        if settings.inbound_mode == InboundMode::None {
            pins::detach_pod(self.pin.path(), &lock, cookie)?;
        } else if crate::probe::sk_lookup_usable() {
            pins::attach_pod(self.pin.path(), &lock, cookie, netns.file())?;
        } else if settings.inbound_mode == InboundMode::Redirect {
            return Err(Error::MissingKernelFeature {
                feature: "sk_lookup programs (Linux 5.9)".into(),
                detail: "inbound redirect mode needs it; register with --inbound-mode bind".into(),
            });
        }
        Ok(Pod {
            netns_cookie: cookie,
            addresses: raw.addresses(),
            settings: settings.clone(),
            netns_inode,
            inbound_listeners: self
                .listeners(&lock, Some(cookie))?
                .remove(&cookie)
                .unwrap_or_default(),
        })
    }

    /// Records the pod's addresses in `pod_addrs` and releases those it had `before` and no
    /// longer has. An address another registered pod holds stays with the newer network
    /// namespace (the larger cookie: cookies only grow), as [`Mesh::gc`] decides too.
    fn claim_addresses(&self, cookie: u64, now: &[IpAddr], before: &[IpAddr]) -> Result<()> {
        for ip in now {
            let key = PodAddrKey::new(*ip);
            if let Some(owner) = self.addr_owner(&key)? {
                if owner > cookie && self.raw_pod(owner)?.is_some() {
                    continue;
                }
            }
            self.pod_addrs
                .update(abi::bytes(&key), &cookie.to_ne_bytes(), MapFlags::ANY)
                .map_err(addr_write_error)?;
        }
        let gone: Vec<IpAddr> = before
            .iter()
            .filter(|ip| !now.contains(ip))
            .copied()
            .collect();
        self.release_addresses(cookie, &gone)
    }

    /// Removes the pod's addresses from `pod_addrs`, those it holds.
    fn release_addresses(&self, cookie: u64, addresses: &[IpAddr]) -> Result<()> {
        for ip in addresses {
            let key = PodAddrKey::new(*ip);
            if self.addr_owner(&key)? == Some(cookie) {
                let _ = self.pod_addrs.delete(abi::bytes(&key));
            }
        }
        Ok(())
    }

    /// The cookie of the pod holding an address in `pod_addrs`.
    fn addr_owner(&self, key: &PodAddrKey) -> Result<Option<u64>> {
        let value = self
            .pod_addrs
            .lookup(abi::bytes(key), MapFlags::ANY)
            .context(|| format!("reading {}", map::POD_ADDRS))?;
        Ok(value
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(u64::from_ne_bytes))
    }

    /// One pod's `cookie_map` value, if it is registered.
    fn raw_pod(&self, netns_cookie: u64) -> Result<Option<RawPodSettings>> {
        let value = self
            .cookie_map
            .lookup(&netns_cookie.to_ne_bytes(), MapFlags::ANY)
            .context(|| format!("reading {}", map::COOKIE_MAP))?;
        Ok(value.as_deref().and_then(abi::from_bytes::<RawPodSettings>))
    }

    /// The maps that hold per-pod lists, with their names, in [`ListEntries`] order.
    fn list_maps(&self) -> [(&MapHandle, &'static str); 3] {
        [
            (&self.pod_rules, map::POD_RULES),
            (&self.cidr_include, map::CIDR_INCLUDE),
            (&self.cidr_exclude, map::CIDR_EXCLUDE),
        ]
    }

    /// Every pod's entries in the list maps (or only `only`'s), in one pass per map.
    fn list_entries(
        &self,
        _lock: &PinLock,
        only: Option<u64>,
    ) -> Result<BTreeMap<u64, ListEntries>> {
        let mut out: BTreeMap<u64, ListEntries> = BTreeMap::new();
        let wanted = |cookie: u64| only.is_none_or(|c| c == cookie);
        for (key, _) in mapio::entries(&self.pod_rules, map::POD_RULES)? {
            if let Some(rule) = abi::from_bytes::<RuleKey>(&key).filter(|k| wanted(k.netns_cookie))
            {
                let pod = out.entry(rule.netns_cookie).or_default();
                match rule.is_marker() {
                    true => pod.changing = true,
                    false => pod.rules.push(rule),
                }
            }
        }
        for (trie, name, include) in [
            (&self.cidr_include, map::CIDR_INCLUDE, true),
            (&self.cidr_exclude, map::CIDR_EXCLUDE, false),
        ] {
            for (key, _) in mapio::entries(trie, name)? {
                let Some(cidr) = abi::from_bytes::<CidrKey>(&key).filter(|k| wanted(k.cookie()))
                else {
                    continue;
                };
                let pod = out.entry(cidr.cookie()).or_default();
                match include {
                    true => pod.include.push(cidr),
                    false => pod.exclude.push(cidr),
                }
            }
        }
        Ok(out)
    }

    /// Register's switch from the lists of generation `current` (none for a pod seen for
    /// the first time) to the next: the pod's `stored` entries of other generations
    /// (leftovers of a stopped register) go, the new generation's entries are written, then
    /// `cookie_map` names that generation, then the previous generation's entries go. On an
    /// error, the new entries are removed again and the pod keeps what it had.
    fn switch_lists(
        &self,
        netns: &Netns,
        cookie: u64,
        current: Option<u16>,
        stored: &ListEntries,
        settings: &PodSettings,
        netns_inode: u64,
    ) -> Result<RawPodSettings> {
        let gen = current.map_or(0, |g| g.wrapping_add(1));
        // Entries of a generation not in force were left by a register stopped half-way:
        // they go first, so that the new generation starts empty.
        self.delete_entries(&stored.except(current));
        let new = ListEntries::of(cookie, gen, &settings.lists());
        if let Err(err) = self.write_entries(&new) {
            self.delete_entries(&new);
            return Err(err);
        }
        let (ip4, ip6) = match netns.addresses() {
            Ok(addresses) => addresses,
            Err(err) => {
                self.delete_entries(&new);
                return Err(err);
            }
        };
        // Envoy's IPv6 inbound passthrough binds ::6, which istio-init puts on lo.
        if settings.inbound_mode == InboundMode::Redirect && ip6.is_some() {
            if let Err(err) = netns.add_loopback_address(INBOUND_PASSTHROUGH_6) {
                self.delete_entries(&new);
                return Err(err);
            }
        }
        let raw = RawPodSettings {
            netns_ino: netns_inode,
            lists_gen: gen,
            pod_ip4: ip4.map_or(0, |ip| u32::from_ne_bytes(ip.octets())),
            pod_ip6: ip6.map_or([0; 4], |ip| abi::ip6_words(&ip)),
            ..settings.to_raw()
        };
        // The switch: from here connections see the new settings and lists together.
        if let Err(err) =
            self.cookie_map
                .update(&cookie.to_ne_bytes(), abi::bytes(&raw), MapFlags::ANY)
        {
            self.delete_entries(&new);
            return Err(match is_map_full(&err) {
                true => Error::PodMapFull { max: MAX_PODS },
                false => Error::Bpf {
                    context: "writing cookie_map".into(),
                    cause: err,
                },
            });
        }
        self.delete_entries(&stored.only(current));
        Ok(raw)
    }

    /// Writes every entry, stopping at the first failure.
    fn write_entries(&self, entries: &ListEntries) -> Result<()> {
        for ((map, name), keys) in self.list_maps().into_iter().zip(entries.keys()) {
            for key in keys {
                map.update(&key, &[1], MapFlags::ANY)
                    .map_err(|err| map_write_error(err, name))?;
            }
        }
        Ok(())
    }

    /// Deletes every entry (best effort: one already gone is no error).
    fn delete_entries(&self, entries: &ListEntries) {
        for ((map, _), keys) in self.list_maps().into_iter().zip(entries.keys()) {
            for key in keys {
                let _ = map.delete(&key);
            }
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
        let lock = self.pin.lock(true)?;
        self.unregister_locked(&lock, netns_cookie)
    }

    fn unregister_locked(&self, lock: &PinLock, netns_cookie: u64) -> Result<bool> {
        let addresses = self
            .raw_pod(netns_cookie)?
            .map(|raw| raw.addresses())
            .unwrap_or_default();
        // Stopped from here on, the pod's entries outlive its registration: the marker
        // tells the next register of this namespace to look for them.
        let marker = RuleKey::lists_changing(netns_cookie);
        self.pod_rules
            .update(abi::bytes(&marker), &[1], MapFlags::ANY)
            .map_err(|err| map_write_error(err, map::POD_RULES))?;
        let registered = match self.cookie_map.delete(&netns_cookie.to_ne_bytes()) {
            Ok(()) => true,
            Err(err) if err.kind() == libbpf_rs::ErrorKind::NotFound => false,
            Err(err) => return Err(err).context(|| format!("deleting from {}", map::COOKIE_MAP)),
        };
        self.release_addresses(netns_cookie, &addresses)?;
        pins::detach_pod(self.pin.path(), lock, netns_cookie)?;
        if let Some(entries) = self
            .list_entries(lock, Some(netns_cookie))?
            .remove(&netns_cookie)
        {
            self.delete_entries(&entries);
        }
        let _ = self.pod_rules.delete(abi::bytes(&marker));
        for (key, _) in mapio::entries(&self.inbound_ports, map::INBOUND_PORTS)? {
            if abi::from_bytes::<InboundKey>(&key).is_some_and(|k| k.netns_cookie == netns_cookie) {
                let _ = self.inbound_ports.delete(&key);
            }
        }
        Ok(registered)
    }

    /// Inbound listener discovery: the ports the pod's applications listen on now, moved to
    /// loopback by the bind hooks.
    pub fn inbound_listeners(&self, netns_cookie: u64) -> Result<Vec<u16>> {
        let lock = self.pin.lock(false)?;
        Ok(self
            .listeners(&lock, Some(netns_cookie))?
            .remove(&netns_cookie)
            .unwrap_or_default())
    }

    /// Every pod's listening ports (or only `only`'s), in one pass.
    fn listeners(&self, _lock: &PinLock, only: Option<u64>) -> Result<BTreeMap<u64, Vec<u16>>> {
        let mut out: BTreeMap<u64, BTreeSet<u16>> = BTreeMap::new();
        for (key, value) in mapio::entries(&self.inbound_ports, map::INBOUND_PORTS)? {
            let Some(key) = abi::from_bytes::<InboundKey>(&key) else {
                continue;
            };
            let count = <[u8; 4]>::try_from(value.as_slice()).map_or(0, u32::from_ne_bytes);
            if count > 0 && only.is_none_or(|c| c == key.netns_cookie) {
                out.entry(key.netns_cookie).or_default().insert(key.port);
            }
        }
        Ok(out
            .into_iter()
            .map(|(cookie, ports)| (cookie, ports.into_iter().collect()))
            .collect())
    }

    /// Unregisters every pod whose network namespace no longer exists (no process in it, no
    /// process holding it open, no bind mount of it), with its lists, listeners and tracked
    /// connections; removes list entries no registered pod uses (left by a register or an
    /// unregister that was stopped half-way). Returns the pods removed.
    pub fn gc(&self) -> Result<Vec<Pod>> {
        system::require(Privilege::EnterNetns, "garbage-collect registered pods")?;
        let lock = self.pin.lock(true)?;
        // Pods first, then the live namespaces: under the lock nothing registers meanwhile,
        // and a namespace made later has a new cookie anyway (cookies are never reused).
        let pods = self.pods_locked(&lock)?;
        let live = crate::netns::live_netns_cookies();
        let mut removed = Vec::new();
        for pod in pods {
            if live.contains(&pod.netns_cookie) {
                continue;
            }
            self.unregister_locked(&lock, pod.netns_cookie)?;
            removed.push(pod);
        }
        let registered = self.raw_pods()?;
        for (cookie, entries) in self.list_entries(&lock, None)? {
            self.delete_entries(&entries.except(registered.get(&cookie).map(|r| r.lists_gen)));
            // What the stopped register or unregister left is gone now.
            if entries.changing {
                let _ = self
                    .pod_rules
                    .delete(abi::bytes(&RuleKey::lists_changing(cookie)));
            }
        }
        let dead = |cookie: u64| !registered.contains_key(&cookie);
        for cookie in pins::pods_with_links(self.pin.path())? {
            if dead(cookie) {
                pins::detach_pod(self.pin.path(), &lock, cookie)?;
            }
        }
        for (key, _) in mapio::entries(&self.origin_dst_map, map::ORIGIN_DST_MAP)? {
            if abi::from_bytes::<ConnKey>(&key).is_some_and(|k| dead(k.netns_cookie)) {
                let _ = self.origin_dst_map.delete(&key);
            }
        }
        self.sync_addresses(&registered)?;
        Ok(removed)
    }

    /// Makes `pod_addrs` hold each registered pod's addresses, an address two pods have
    /// with the newer one (what a register or an unregister stopped half-way, or an
    /// unregister of the newer of two, leaves otherwise).
    fn sync_addresses(&self, registered: &BTreeMap<u64, RawPodSettings>) -> Result<()> {
        let mut wanted: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
        for (&cookie, raw) in registered {
            for ip in raw.addresses() {
                let owner = wanted
                    .entry(abi::bytes(&PodAddrKey::new(ip)).to_vec())
                    .or_insert(cookie);
                *owner = (*owner).max(cookie);
            }
        }
        for (key, value) in mapio::entries(&self.pod_addrs, map::POD_ADDRS)? {
            let owner = <[u8; 8]>::try_from(value.as_slice())
                .ok()
                .map(u64::from_ne_bytes);
            match wanted.get(&key) {
                Some(cookie) if owner == Some(*cookie) => {
                    wanted.remove(&key);
                }
                Some(_) => {}
                None => {
                    let _ = self.pod_addrs.delete(&key);
                }
            }
        }
        for (key, cookie) in wanted {
            self.pod_addrs
                .update(&key, &cookie.to_ne_bytes(), MapFlags::ANY)
                .map_err(addr_write_error)?;
        }
        Ok(())
    }

    /// Every registered pod.
    pub fn pods(&self) -> Result<Vec<Pod>> {
        let lock = self.pin.lock(false)?;
        self.pods_locked(&lock)
    }

    /// Every `cookie_map` entry.
    fn raw_pods(&self) -> Result<BTreeMap<u64, RawPodSettings>> {
        Ok(mapio::entries(&self.cookie_map, map::COOKIE_MAP)?
            .into_iter()
            .filter_map(|(key, value)| {
                let cookie = u64::from_ne_bytes(<[u8; 8]>::try_from(key.as_slice()).ok()?);
                Some((cookie, abi::from_bytes::<RawPodSettings>(&value)?))
            })
            .collect())
    }

    /// One pass over each map, grouped by cookie: linear in the number of entries.
    fn pods_locked(&self, lock: &PinLock) -> Result<Vec<Pod>> {
        let mut lists = self.list_entries(lock, None)?;
        let mut listeners = self.listeners(lock, None)?;
        Ok(self
            .raw_pods()?
            .into_iter()
            .map(|(netns_cookie, raw)| {
                let entries = lists.remove(&netns_cookie).unwrap_or_default();
                Pod {
                    netns_cookie,
                    addresses: raw.addresses(),
                    settings: PodSettings::from_parts(
                        &raw,
                        &entries.only(Some(raw.lists_gen)).lists(),
                    ),
                    netns_inode: raw.netns_ino,
                    inbound_listeners: listeners.remove(&netns_cookie).unwrap_or_default(),
                }
            })
            .collect())
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
            .context(|| format!("reading {}", map::ORIGIN_DST_MAP))?;
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

    /// Entries and capacity of every pinned map.
    pub fn map_usage(&self) -> Result<Vec<MapUsage>> {
        let mut out = Vec::new();
        for name in map::ALL {
            let path = self.pin.path().join(MAPS_DIR).join(name);
            let handle = MapHandle::from_pinned_path(&path)
                .context(|| format!("opening pinned map {}", path.display()))?;
            let entries = match handle.map_type() {
                libbpf_rs::MapType::SkStorage => None,
                _ => Some(mapio::count(&handle, name)?),
            };
            out.push(MapUsage {
                name,
                entries,
                capacity: u64::from(handle.max_entries()),
            });
        }
        Ok(out)
    }

    /// Every counter, by name, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(&'static str, u64)>> {
        let mut out = Vec::with_capacity(COUNTER_NAMES.len());
        for (index, name) in COUNTER_NAMES.iter().enumerate() {
            let per_cpu = self
                .counters
                .lookup_percpu(&(index as u32).to_ne_bytes(), MapFlags::ANY)
                .context(|| format!("reading {}", map::COUNTERS))?;
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

/// One pod's entries in the list maps: `pod_rules`, `cidr_include`, `cidr_exclude`.
#[derive(Clone, Debug, Default)]
struct ListEntries {
    rules: Vec<RuleKey>,
    include: Vec<CidrKey>,
    exclude: Vec<CidrKey>,
    /// The pod's [`RuleKey::lists_changing`] marker is there (never one of `rules`).
    changing: bool,
}

impl ListEntries {
    /// The entries that hold `lists` of the pod with `netns_cookie`, in generation `gen`.
    fn of(netns_cookie: u64, gen: u16, lists: &Lists) -> Self {
        let cidrs = |set: &BTreeSet<crate::cidr::Cidr>| {
            set.iter()
                .map(|c| CidrKey::new(netns_cookie, gen, c))
                .collect()
        };
        ListEntries {
            rules: lists
                .rules
                .iter()
                .map(|&(kind, value)| RuleKey::new(netns_cookie, gen, kind, value))
                .collect(),
            include: cidrs(&lists.include_cidrs),
            exclude: cidrs(&lists.exclude_cidrs),
            changing: false,
        }
    }

    /// Those of generation `gen` (none when `None`).
    fn only(&self, gen: Option<u16>) -> Self {
        self.filtered(|g| Some(g) == gen)
    }

    /// Those of any generation but `gen`.
    fn except(&self, gen: Option<u16>) -> Self {
        self.filtered(|g| Some(g) != gen)
    }

    fn filtered(&self, keep: impl Fn(u16) -> bool) -> Self {
        ListEntries {
            rules: self.rules.iter().filter(|k| keep(k.gen)).copied().collect(),
            include: self
                .include
                .iter()
                .filter(|k| keep(k.gen as u16))
                .copied()
                .collect(),
            exclude: self
                .exclude
                .iter()
                .filter(|k| keep(k.gen as u16))
                .copied()
                .collect(),
            changing: false,
        }
    }

    /// The keys' bytes, per map in [`Mesh::list_maps`] order.
    fn keys(&self) -> [Vec<Vec<u8>>; 3] {
        fn bytes<T: plain::Plain>(keys: &[T]) -> Vec<Vec<u8>> {
            keys.iter().map(|k| abi::bytes(k).to_vec()).collect()
        }
        [
            bytes(&self.rules),
            bytes(&self.include),
            bytes(&self.exclude),
        ]
    }

    /// The lists these entries hold.
    fn lists(&self) -> Lists {
        Lists {
            rules: self
                .rules
                .iter()
                .filter_map(|k| RuleKind::from_raw(k.kind).map(|kind| (kind, k.value)))
                .collect(),
            include_cidrs: self.include.iter().filter_map(|k| k.cidr()).collect(),
            exclude_cidrs: self.exclude.iter().filter_map(|k| k.cidr()).collect(),
        }
    }
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

/// `pod_addrs` holds two addresses per pod; full, it holds those of dead pods too, which
/// `gc` removes.
fn addr_write_error(err: libbpf_rs::Error) -> Error {
    match is_map_full(&err) {
        true => Error::PodMapFull { max: MAX_PODS },
        false => map_write_error(err, map::POD_ADDRS),
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
