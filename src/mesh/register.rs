//! Registering and unregistering pods, and the addresses they claim in `pod_addrs`.

use std::net::IpAddr;
use std::path::Path;

use libbpf_rs::{MapCore, MapFlags};

use crate::abi::{self, map, InboundKey, PodAddrKey, RuleKey};
use crate::error::{Context, Error, Result};
use crate::mapio;
use crate::netns::Netns;
use crate::pins::{self, PinLock};
use crate::pod::settings::{InboundMode, PodSettings};
use crate::system::{self, Privilege};

use super::*;

impl Mesh {
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
    pub(super) fn claim_addresses(
        &self,
        cookie: u64,
        now: &[IpAddr],
        before: &[IpAddr],
    ) -> Result<()> {
        for ip in now {
            let key = PodAddrKey::new(*ip);
            if let Some(owner) = self.addr_owner(&key)? {
                if owner > cookie && self.raw_pod(owner)?.is_some() {
                    continue;
                }
            }
            self.pod_addrs
                .update(abi::bytes(&key), &cookie.to_ne_bytes(), MapFlags::ANY)
                .map_err(|e| addr_write_error(e, self.cookie_map.max_entries()))?;
        }
        let gone: Vec<IpAddr> = before
            .iter()
            .filter(|ip| !now.contains(ip))
            .copied()
            .collect();
        self.release_addresses(cookie, &gone)
    }

    /// Removes the pod's addresses from `pod_addrs`, those it holds.
    pub(super) fn release_addresses(&self, cookie: u64, addresses: &[IpAddr]) -> Result<()> {
        for ip in addresses {
            let key = PodAddrKey::new(*ip);
            if self.addr_owner(&key)? == Some(cookie) {
                let _ = self.pod_addrs.delete(abi::bytes(&key));
            }
        }
        Ok(())
    }

    /// The cookie of the pod holding an address in `pod_addrs`.
    pub(super) fn addr_owner(&self, key: &PodAddrKey) -> Result<Option<u64>> {
        let value = self
            .pod_addrs
            .lookup(abi::bytes(key), MapFlags::ANY)
            .context(|| format!("reading {}", map::POD_ADDRS))?;
        Ok(value
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(u64::from_ne_bytes))
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

    pub(super) fn unregister_locked(&self, lock: &PinLock, netns_cookie: u64) -> Result<bool> {
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
}
