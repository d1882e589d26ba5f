//! What an attachment holds: its pods, their inbound listeners, original destinations,
//! map usage and counters.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::SocketAddr;

use libbpf_rs::{Link, MapCore, MapFlags, MapHandle};

use crate::abi::{self, map, ConnKey, InboundKey, OrigDst, RawPodSettings, COUNTER_NAMES};
use crate::error::{Context, Result};
use crate::mapio;
use crate::order::OtherProgram;
use crate::pins::{self, PinLock, LINKS_DIR, MAPS_DIR};
use crate::pod::settings::PodSettings;

use super::*;

impl Mesh {
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
    pub(super) fn listeners(
        &self,
        _lock: &PinLock,
        only: Option<u64>,
    ) -> Result<BTreeMap<u64, Vec<u16>>> {
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

    /// Every registered pod.
    pub fn pods(&self) -> Result<Vec<Pod>> {
        let lock = self.pin.lock(false)?;
        self.pods_locked(&lock)
    }

    /// Every `cookie_map` entry.
    pub(super) fn raw_pods(&self) -> Result<BTreeMap<u64, RawPodSettings>> {
        Ok(mapio::entries(&self.cookie_map, map::COOKIE_MAP)?
            .into_iter()
            .filter_map(|(key, value)| {
                let cookie = u64::from_ne_bytes(<[u8; 8]>::try_from(key.as_slice()).ok()?);
                Some((cookie, abi::from_bytes::<RawPodSettings>(&value)?))
            })
            .collect())
    }

    /// One pass over each map, grouped by cookie: linear in the number of entries.
    pub(super) fn pods_locked(&self, lock: &PinLock) -> Result<Vec<Pod>> {
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

    /// The programs of this attachment, as their pinned links report them, by hook.
    pub fn programs(&self) -> Result<Vec<AttachedProgram>> {
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
        Ok(programs)
    }

    /// The other programs on meshbpf's capture hooks (connect4/6, sendmsg4/6) that processes
    /// in its cgroup run — attached there or on an ancestor, such as a CNI's socket load
    /// balancer — in the kernel's order, each saying whether it runs before meshbpf's.
    pub fn other_programs(&self) -> Result<Vec<OtherProgram>> {
        let ours = self
            .programs()?
            .into_iter()
            .map(|p| (p.hook, p.prog_id))
            .collect();
        crate::order::other_programs(
            &pins::meta_cgroup_dir(&self.meta),
            &ours,
            self.meta.cgroup_id,
        )
    }

    /// What is wrong with the order of programs on meshbpf's capture hooks, naming the fix;
    /// `None` when meshbpf's run before every other program there.
    pub fn order_problem(&self) -> Result<Option<String>> {
        Ok(crate::order::problem(
            &pins::meta_cgroup_path(&self.meta),
            &self.other_programs()?,
        ))
    }

    /// Programs, pods and counters of this attachment.
    pub fn status(&self) -> Result<Status> {
        let programs = self.programs()?;
        // Unknown (null) where the cgroup cannot be reached from here (another mount
        // namespace): the rest of the status still holds.
        let (runs_first, other_programs) = match self.other_programs() {
            Ok(others) => (Some(others.iter().all(|p| !p.runs_before_meshbpf)), others),
            Err(_) => (None, Vec::new()),
        };
        Ok(Status {
            pin_dir: self.pin.path().into(),
            runs_first,
            other_programs,
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
