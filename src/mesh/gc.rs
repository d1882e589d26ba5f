//! Garbage collection: forgetting pods whose network namespace is gone.

use std::collections::BTreeMap;

use libbpf_rs::{MapCore, MapFlags};

use crate::abi::{self, map, ConnKey, PodAddrKey, RawPodSettings, RuleKey};
use crate::error::Result;
use crate::mapio;
use crate::pins::{self};
use crate::system::{self, Privilege};

use super::*;

impl Mesh {
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
    pub(super) fn sync_addresses(&self, registered: &BTreeMap<u64, RawPodSettings>) -> Result<()> {
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
                .map_err(|e| addr_write_error(e, self.cookie_map.max_entries()))?;
        }
        Ok(())
    }
}
