//! A pod's list maps (`pod_rules`, the CIDR tries): generations written beside the ones in
//! force, switched by one `cookie_map` update, the old ones deleted after.

use std::collections::{BTreeMap, BTreeSet};

use libbpf_rs::{MapCore, MapFlags, MapHandle};

use crate::abi::{self, map, CidrKey, RawPodSettings, RuleKey, RuleKind};
use crate::error::{Context, Error, Result};
use crate::mapio;
use crate::netns::Netns;
use crate::pins::PinLock;
use crate::pod::settings::{InboundMode, Lists, PodSettings};

use super::*;

impl Mesh {
    /// One pod's `cookie_map` value, if it is registered.
    pub(super) fn raw_pod(&self, netns_cookie: u64) -> Result<Option<RawPodSettings>> {
        let value = self
            .cookie_map
            .lookup(&netns_cookie.to_ne_bytes(), MapFlags::ANY)
            .context(|| format!("reading {}", map::COOKIE_MAP))?;
        Ok(value.as_deref().and_then(abi::from_bytes::<RawPodSettings>))
    }

    /// The maps that hold per-pod lists, with their names, in [`ListEntries`] order.
    pub(super) fn list_maps(&self) -> [(&MapHandle, &'static str); 3] {
        [
            (&self.pod_rules, map::POD_RULES),
            (&self.cidr_include, map::CIDR_INCLUDE),
            (&self.cidr_exclude, map::CIDR_EXCLUDE),
        ]
    }

    /// Every pod's entries in the list maps (or only `only`'s), in one pass per map.
    pub(super) fn list_entries(
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
    pub(super) fn switch_lists(
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
                true => Error::PodMapFull {
                    max: self.cookie_map.max_entries(),
                },
                false => Error::Bpf {
                    context: "writing cookie_map".into(),
                    cause: err.into(),
                },
            });
        }
        self.delete_entries(&stored.only(current));
        Ok(raw)
    }

    /// Writes every entry, stopping at the first failure.
    pub(super) fn write_entries(&self, entries: &ListEntries) -> Result<()> {
        for ((map, name), keys) in self.list_maps().into_iter().zip(entries.keys()) {
            for key in keys {
                map.update(&key, &[1], MapFlags::ANY)
                    .map_err(|err| map_write_error(err, name))?;
            }
        }
        Ok(())
    }

    /// Deletes every entry (best effort: one already gone is no error).
    pub(super) fn delete_entries(&self, entries: &ListEntries) {
        for ((map, _), keys) in self.list_maps().into_iter().zip(entries.keys()) {
            for key in keys {
                let _ = map.delete(&key);
            }
        }
    }
}

/// One pod's entries in the list maps: `pod_rules`, `cidr_include`, `cidr_exclude`.
#[derive(Clone, Debug, Default)]
pub(super) struct ListEntries {
    pub(super) rules: Vec<RuleKey>,
    pub(super) include: Vec<CidrKey>,
    pub(super) exclude: Vec<CidrKey>,
    /// The pod's [`RuleKey::lists_changing`] marker is there (never one of `rules`).
    pub(super) changing: bool,
}

impl ListEntries {
    /// The entries that hold `lists` of the pod with `netns_cookie`, in generation `gen`.
    pub(super) fn of(netns_cookie: u64, gen: u16, lists: &Lists) -> Self {
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
    pub(super) fn only(&self, gen: Option<u16>) -> Self {
        self.filtered(|g| Some(g) == gen)
    }

    /// Those of any generation but `gen`.
    pub(super) fn except(&self, gen: Option<u16>) -> Self {
        self.filtered(|g| Some(g) != gen)
    }

    pub(super) fn filtered(&self, keep: impl Fn(u16) -> bool) -> Self {
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
    pub(super) fn keys(&self) -> [Vec<Vec<u8>>; 3] {
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
    pub(super) fn lists(&self) -> Lists {
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
