//! Upgrades of a pinned attachment from an older map layout, with no capture gap.
//!
//! A layout is the shape of every pinned map (meshbpf.h's `MESHBPF_LAYOUT_VERSION`). Each
//! change of layout ships with one [`Step`] here, from the layout before it: a function on a
//! snapshot of the maps it changes, readable and unit-tested on its own. `meshbpf attach`
//! over an older attachment runs the steps in order:
//!
//! 1. Maps whose shape did not change are reused as they are (same kernel object), so live
//!    connections keep their original destinations, sockets and counts. Changed maps are
//!    created beside the old ones, under `<pin>/migrating/`.
//! 2. The maps that only the library writes (registrations, per-pod lists) are read, converted
//!    step by step, and written into the new maps before any new program runs. The caller
//!    holds the pin directory's lock, so no registration changes meanwhile.
//! 3. The programs are swapped through their pinned links in attach order (what answers
//!    first, what captures last): every hook runs either the old program with the old maps or
//!    the new program with the new maps, and both hold the same registrations, so a new
//!    connection of a registered pod is captured and answered throughout.
//! 4. What the old programs counted until their swap is added to the new counters.
//! 5. Commit: each new map's pin replaces the old one (one atomic rename each), maps the new
//!    layout dropped are unpinned, and `meta_map`, whose shape never changes, gets the new
//!    version last. The old maps go when nothing refers to them any more.
//!
//! Because of step 3, a layout's programs must work alongside the previous layout's for the
//! moments of the swap: a connection may be seen by one build's hook at connect and the other
//! build's at established (sockops.bpf.c's `app_established` publishes an origin the previous
//! build did not).
//!
//! A kill at any point leaves a state the next `attach` completes: until `meta_map` says
//! the new version, the migration is redone from the old maps (a map already committed is
//! recognised by its new shape), reusing what the killed run created.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use libbpf_rs::{MapCore, MapFlags, MapHandle, MapType};

use crate::abi::{self, MeshMeta, LAYOUT_VERSION};
use crate::error::{Context, Error, Result};
use crate::mapio;
use crate::pins::{self, AttachOptions, MAPS_DIR, META_MAP};

/// Where a migration creates the new maps, inside the pin directory.
pub(crate) const MIGRATING_DIR: &str = "migrating";

/// The entries of the maps a migration converts, by map name.
pub(crate) type Snapshot = BTreeMap<String, Vec<(Vec<u8>, Vec<u8>)>>;

/// One layout change.
pub(crate) struct Step {
    /// The layout it upgrades from; it produces `from + 1`.
    pub from: u32,
    /// The maps whose entries it rewrites even where their shape stayed the same, and the
    /// maps new in its layout that it fills.
    pub rewrites: &'static [&'static str],
    /// The maps it reads and leaves as they are: their entries are in its snapshot too.
    pub reads: &'static [&'static str],
    /// Converts the snapshot of the old layout's maps (every map whose shape changed, and
    /// those in `rewrites` and `reads`) into the new layout's entries.
    pub convert: fn(&mut Snapshot) -> Result<()>,
}

/// Every step, oldest first. The oldest layout this build upgrades from is the first's.
pub(crate) const STEPS: &[Step] = &[
    Step {
        from: 7,
        rewrites: &[],
        reads: &[],
        convert: v7_to_v8,
    },
    Step {
        from: 8,
        rewrites: &[],
        reads: &[],
        convert: v8_to_v9,
    },
    Step {
        from: 9,
        rewrites: &[abi::map::POD_ADDRS],
        reads: &[abi::map::COOKIE_MAP],
        convert: v9_to_v10,
    },
];

/// Layout 8: each pod's list entries carry the generation of its lists (`lists_gen`), so
/// a re-register switches lists atomically. `pod_rules` kept its size (the generation took
/// the key's padding, zero, which is the first generation) and `cookie_map` too (`lists_gen`
/// took `_pad`); the CIDR tries' key grew by the 32-bit generation between the cookie and the
/// address. The counters map got room for 128 reasons (its entries are carried by index).
fn v7_to_v8(snapshot: &mut Snapshot) -> Result<()> {
    for name in [abi::map::CIDR_INCLUDE, abi::map::CIDR_EXCLUDE] {
        for (key, _) in snapshot.get_mut(name).into_iter().flatten() {
            // v7: prefixlen u32 | cookie u32[2] | addr u32[4]; prefixlen counts the cookie's
            // 64 bits. v8: prefixlen u32 | cookie u32[2] | gen u32 | addr u32[4]; prefixlen
            // counts the cookie's and the generation's 96 bits.
            if key.len() != 28 {
                return Err(Error::MigrationFailed(format!(
                    "{name}: a key of {} bytes, layout 7 has 28",
                    key.len()
                )));
            }
            let prefixlen = u32::from_ne_bytes([key[0], key[1], key[2], key[3]]) + 32;
            let mut new = prefixlen.to_ne_bytes().to_vec();
            new.extend_from_slice(&key[4..12]);
            new.extend_from_slice(&0u32.to_ne_bytes());
            new.extend_from_slice(&key[12..28]);
            *key = new;
        }
    }
    Ok(())
}

// abi's constant, which error messages quote, is the first step's layout.
const _: () = assert!(!STEPS.is_empty() && STEPS[0].from == abi::OLDEST_UPGRADABLE_LAYOUT);

/// Layout 9: a pod's `cookie_map` value also holds its own addresses (`pod_ip4`,
/// `pod_ip6`, read at register; zero — unknown — for pods registered before, until they
/// are registered again), and a new sockhash, `listeners`, feeds the per-pod sk_lookup
/// programs. Pods keep their inbound model: layout 8 knew only the bind model
/// (`POD_F_INBOUND_REDIRECT` is new and unset).
fn v8_to_v9(snapshot: &mut Snapshot) -> Result<()> {
    for (key, value) in snapshot.get_mut(abi::map::COOKIE_MAP).into_iter().flatten() {
        if key.len() != 8 || value.len() != 32 {
            return Err(Error::MigrationFailed(format!(
                "cookie_map: an entry of {}+{} bytes, layout 8 has 8+32",
                key.len(),
                value.len()
            )));
        }
        value.resize(56, 0);
    }
    Ok(())
}

/// Layout 10: `meshbpf trace`'s maps (trace_ctl and a ring per reader) are new and start
/// empty; and intra-node acceleration. A new map, `pod_addrs`, holds each registered pod's
/// own addresses (IPv4 as IPv4-mapped IPv6) with its netns cookie, filled here from the
/// addresses layout 9 kept in `cookie_map` (an address two pods have goes to the newer
/// one, the larger cookie, as register and gc decide). No pod has `POD_F_INTRA_NODE` yet:
/// every value stays as it was.
fn v9_to_v10(snapshot: &mut Snapshot) -> Result<()> {
    let mut owners: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
    for (key, value) in snapshot.get(abi::map::COOKIE_MAP).into_iter().flatten() {
        let (Ok(cookie), Some(raw)) = (
            <[u8; 8]>::try_from(key.as_slice()).map(u64::from_ne_bytes),
            abi::from_bytes::<abi::RawPodSettings>(value),
        ) else {
            return Err(Error::MigrationFailed(format!(
                "cookie_map: an entry of {}+{} bytes, layout 9 has 8+56",
                key.len(),
                value.len()
            )));
        };
        for ip in raw.addresses() {
            let owner = owners
                .entry(abi::bytes(&abi::PodAddrKey::new(ip)).to_vec())
                .or_insert(cookie);
            *owner = (*owner).max(cookie);
        }
    }
    snapshot.insert(
        abi::map::POD_ADDRS.into(),
        owners
            .into_iter()
            .map(|(key, cookie)| (key, cookie.to_ne_bytes().to_vec()))
            .collect(),
    );
    Ok(())
}

/// The steps from layout `from` to this build's, or why there are none.
fn steps_from(pin_dir: &Path, from: u32) -> Result<&'static [Step]> {
    let oldest = abi::OLDEST_UPGRADABLE_LAYOUT;
    if from > LAYOUT_VERSION || from < oldest {
        return Err(Error::LayoutMismatch {
            pin_dir: pin_dir.into(),
            found: from.to_string(),
            expected: LAYOUT_VERSION,
            oldest_upgradable: crate::abi::OLDEST_UPGRADABLE_LAYOUT,
        });
    }
    if from == LAYOUT_VERSION {
        return Ok(&[]);
    }
    let first = STEPS
        .iter()
        .position(|s| s.from == from)
        .ok_or_else(|| Error::MigrationFailed(format!("no step from layout {from}")))?;
    let steps = &STEPS[first..];
    for (i, step) in steps.iter().enumerate() {
        if step.from != from + i as u32 {
            return Err(Error::MigrationFailed(format!(
                "the steps skip layout {}",
                from + i as u32
            )));
        }
    }
    Ok(steps)
}

/// Whether a pinned map's bound differs from what `options.sizes` (resolved) gives it: the
/// attachment is then migrated like a layout change, its entries moving to maps of the new
/// size.
pub(crate) fn resized(pin_dir: &Path, options: &AttachOptions) -> Result<bool> {
    for name in abi::map::ALL {
        let (Some(entries), Ok(pinned)) = (
            options.sizes.entries_of(name),
            MapHandle::from_pinned_path(pin_dir.join(MAPS_DIR).join(name)),
        ) else {
            continue;
        };
        if pinned.max_entries() != entries {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The maps the programs write that a migration converts only when resized (same key and
/// value): entries the old programs write between the snapshot and their swap are caught
/// up afterwards, so none is lost.
const WRITTEN_BY_PROGRAMS: [&str; 2] = [abi::map::ORIGIN_DST_MAP, abi::map::INBOUND_PORTS];

/// The attach option that sizes map `name`, for messages.
fn size_flag(name: &str) -> &'static str {
    if name == abi::map::ORIGIN_DST_MAP {
        "--max-connections"
    } else {
        "--max-pods"
    }
}

/// What a map's kernel object looks like: what must match for a pin to be reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Shape {
    map_type: MapType,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    flags: u32,
}

impl Shape {
    /// The shape of a map in the kernel.
    fn of(map: &MapHandle) -> Shape {
        Shape {
            map_type: map.map_type(),
            key_size: map.key_size(),
            value_size: map.value_size(),
            max_entries: map.max_entries(),
            flags: map.info().map_or(0, |i| i.info.map_flags),
        }
    }

    /// The shape the object defines for a map.
    fn of_open(map: &libbpf_rs::OpenMapMut<'_>) -> Shape {
        Shape {
            map_type: map.map_type(),
            key_size: map.key_size(),
            value_size: map.value_size(),
            max_entries: map.max_entries(),
            flags: map.map_flags(),
        }
    }
}

/// How one map of the new layout gets its contents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Carry {
    /// The old map, as it is.
    Reuse,
    /// Converted by the steps before any new program runs.
    Convert,
    /// Per-CPU counters: the old values are added once the old programs are gone.
    AddCounts,
    /// Starts empty: a new map, or one whose entries only the kernel can make (sockets).
    Empty,
}

/// One map of the new layout.
struct MapPlan {
    name: String,
    carry: Carry,
    /// The old layout's map of that name, if there is one.
    old: Option<MapHandle>,
}

impl MapPlan {
    fn staged(&self, pin_dir: &Path) -> PathBuf {
        pin_dir.join(MIGRATING_DIR).join(&self.name)
    }
}

fn decide(name: &str, new: Shape, old: Option<Shape>, steps: &[Step]) -> Carry {
    let rewritten = steps.iter().any(|s| s.rewrites.contains(&name));
    match old {
        None if rewritten => Carry::Convert,
        None => Carry::Empty,
        Some(old) if old == new && !rewritten => Carry::Reuse,
        Some(_)
            if matches!(
                new.map_type,
                MapType::SkStorage | MapType::Sockhash | MapType::Sockmap
            ) =>
        {
            Carry::Empty
        }
        Some(_) if new.map_type == MapType::PercpuArray => Carry::AddCounts,
        Some(_) => Carry::Convert,
    }
}

/// Upgrades the attachment under `pin_dir`, whose meta says layout `old.layout_version`, to
/// this build's layout (see the module docs). The caller holds the pin directory's lock.
pub(crate) fn upgrade(
    pin_dir: &Path,
    cgroup: &fs::File,
    old: &MeshMeta,
    options: &AttachOptions,
) -> Result<()> {
    let steps = steps_from(pin_dir, old.layout_version)?;
    let staging = pin_dir.join(MIGRATING_DIR);
    pins::private_dir(&staging)?;
    let maps_dir = pin_dir.join(MAPS_DIR);

    let mut plans: Vec<MapPlan> = Vec::new();
    let mut open_object = std::mem::MaybeUninit::uninit();
    let skel = pins::load(&mut open_object, options, |name, map| {
        let new = Shape::of_open(map);
        let old_map = MapHandle::from_pinned_path(maps_dir.join(name)).ok();
        let mut carry = decide(name, new, old_map.as_ref().map(Shape::of), steps);
        // Committed already by a migration that was stopped afterwards: keep it.
        if carry != Carry::Reuse && old_map.as_ref().is_some_and(|m| Shape::of(m) == new) {
            carry = Carry::Reuse;
        }
        let plan = MapPlan {
            name: name.into(),
            carry,
            old: old_map,
        };
        let path = match carry {
            Carry::Reuse => maps_dir.join(name),
            _ => {
                let staged = plan.staged(pin_dir);
                // Made by a migration to another layout, or for another map shape: not ours.
                if MapHandle::from_pinned_path(&staged).is_ok_and(|m| Shape::of(&m) != new) {
                    fs::remove_file(&staged)
                        .context(|| format!("removing {}", staged.display()))?;
                }
                staged
            }
        };
        plans.push(plan);
        Ok(path)
    })?;

    // 2. What only the library writes, converted before any new program runs; and what
    // the programs write, when only its size changed (caught up after the swap).
    let mut snapshot = Snapshot::new();
    for plan in plans.iter().filter(|p| p.carry == Carry::Convert) {
        if let Some(old) = &plan.old {
            snapshot.insert(plan.name.clone(), mapio::entries(old, &plan.name)?);
        }
    }
    let before_swap: Snapshot = WRITTEN_BY_PROGRAMS
        .iter()
        .filter_map(|name| Some(((*name).to_string(), snapshot.get(*name)?.clone())))
        .collect();
    for step in steps {
        // A map a step only reads joins the snapshot when that step comes, in the shape the
        // maps it reuses have: the shape since the step's layout (one converted by an earlier
        // step is there already, converted).
        for name in step.reads {
            let reused = plans
                .iter()
                .find(|p| p.name == *name && p.carry == Carry::Reuse);
            if let (false, Some(old)) = (
                snapshot.contains_key(*name),
                reused.and_then(|p| p.old.as_ref()),
            ) {
                snapshot.insert(name.to_string(), mapio::entries(old, name)?);
            }
        }
        (step.convert)(&mut snapshot)?;
    }
    // A smaller map than its live entries: refused before anything changed.
    for plan in plans.iter().filter(|p| p.carry == Carry::Convert) {
        let staged = pins::skel_map(&skel, &plan.name)?;
        let live = snapshot.get(&plan.name).map_or(0, Vec::len);
        if live > staged.max_entries() as usize {
            return Err(Error::InvalidSetting(format!(
                "{} {}: {} holds {live} entries now, more than {} would hold; give a larger \
                 value, or detach first (which ends the mesh on this node)",
                size_flag(&plan.name),
                staged.max_entries(),
                plan.name,
                staged.max_entries(),
            )));
        }
    }
    for plan in plans.iter().filter(|p| p.carry == Carry::Convert) {
        let staged = pins::skel_map(&skel, &plan.name)?;
        sync(
            &staged,
            &plan.name,
            snapshot.remove(&plan.name).unwrap_or_default(),
        )?;
    }

    // 3. The programs, answers first.
    // Earlier layouts never made their links with BPF_F_PREORDER (crate::order).
    let preorder = pins::attach_programs(
        &skel,
        cgroup,
        &pin_dir.join(pins::LINKS_DIR),
        options,
        false,
    )?;
    pins::update_pod_programs(pin_dir, &skel)?;

    // What the old programs wrote since the snapshot, now that they are gone.
    for plan in plans.iter().filter(|p| p.carry == Carry::Convert) {
        if let (Some(old), Some(before)) = (&plan.old, before_swap.get(&plan.name)) {
            catch_up(old, &pins::skel_map(&skel, &plan.name)?, &plan.name, before)?;
        }
    }

    // 4. What the old programs counted until now.
    for plan in plans.iter().filter(|p| p.carry == Carry::AddCounts) {
        if let Some(old) = &plan.old {
            add_counts(old, &pins::skel_map(&skel, &plan.name)?, &plan.name)?;
        }
    }

    // 5. Commit: new pins over old ones, dropped maps unpinned, the new version last.
    for plan in plans.iter().filter(|p| p.carry != Carry::Reuse) {
        let target = maps_dir.join(&plan.name);
        fs::rename(plan.staged(pin_dir), &target)
            .context(|| format!("moving the new {} into place", plan.name))?;
    }
    for name in dir_names(&maps_dir)? {
        if name != META_MAP && !plans.iter().any(|p| p.name == name) {
            let path = maps_dir.join(&name);
            fs::remove_file(&path).context(|| format!("removing {}", path.display()))?;
        }
    }
    pins::write_meta(
        &skel,
        &MeshMeta {
            layout_version: LAYOUT_VERSION,
            flags: pins::meta_flags(options) | preorder,
            ..*old
        },
    )?;
    remove_staging(pin_dir)
}

/// Removes what a finished migration left of its staging directory (nothing, unless it was
/// stopped between its last rename and this).
pub(crate) fn remove_staging(pin_dir: &Path) -> Result<()> {
    let staging = pin_dir.join(MIGRATING_DIR);
    for name in dir_names(&staging)? {
        let path = staging.join(name);
        fs::remove_file(&path).context(|| format!("removing {}", path.display()))?;
    }
    match fs::remove_dir(&staging) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            Err(err).context(|| format!("removing {}", staging.display()))
        }
        _ => Ok(()),
    }
}

fn dir_names(dir: &Path) -> Result<Vec<String>> {
    match fs::read_dir(dir) {
        Ok(entries) => Ok(entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(err) => Err(err).context(|| format!("reading {}", dir.display())),
    }
}

/// Makes `map` hold exactly `entries` (a migration resumed after a kill may find the map
/// filled by the killed run, from registrations since changed).
fn sync(map: &impl MapCore, name: &str, entries: Vec<(Vec<u8>, Vec<u8>)>) -> Result<()> {
    let keep: std::collections::BTreeSet<&[u8]> = entries.iter().map(|(k, _)| &k[..]).collect();
    for (key, _) in mapio::entries(map, name)? {
        if !keep.contains(&key[..]) {
            let _ = map.delete(&key);
        }
    }
    for (key, value) in &entries {
        map.update(key, value, MapFlags::ANY)
            .context(|| format!("writing the converted {name}"))?;
    }
    Ok(())
}

/// Brings into `new` what the old programs wrote to `old` after `before` was read of it:
/// entries `new` lacks (origin_dst_map: a connection's original destination; kept if `new`
/// has the key, which a new program wrote since), and for a count (inbound_ports' listener
/// counts, 4 bytes) the change since `before` added to `new`'s. An entry the old programs
/// removed since stays in `new` until its own end (LRU eviction for origin_dst_map).
fn catch_up(
    old: &MapHandle,
    new: &impl MapCore,
    name: &str,
    before: &[(Vec<u8>, Vec<u8>)],
) -> Result<()> {
    let count = |v: &[u8]| <[u8; 4]>::try_from(v).map_or(0, |b| i64::from(u32::from_ne_bytes(b)));
    let before: BTreeMap<&[u8], &[u8]> = before.iter().map(|(k, v)| (&k[..], &v[..])).collect();
    let counts = old.value_size() == 4;
    let mut seen = std::collections::BTreeSet::new();
    for (key, value) in mapio::entries(old, name)? {
        let was = before.get(&key[..]).copied();
        if !counts {
            if was.is_none() {
                // BPF_NOEXIST: a new program's entry for that connection wins.
                let _ = new.update(&key, &value, MapFlags::NO_EXIST);
            }
            continue;
        }
        seen.insert(key.clone());
        let delta = count(&value) - was.map_or(0, count);
        if delta != 0 {
            add_count(new, name, &key, delta)?;
        }
    }
    if counts {
        for (key, value) in before.iter().filter(|(k, _)| !seen.contains(**k)) {
            add_count(new, name, key, -count(value))?;
        }
    }
    Ok(())
}

/// Adds `delta` to the 4-byte count at `key` in `map` (never below 0).
fn add_count(map: &impl MapCore, name: &str, key: &[u8], delta: i64) -> Result<()> {
    let now = map
        .lookup(key, MapFlags::ANY)
        .context(|| format!("reading {name}"))?
        .and_then(|v| <[u8; 4]>::try_from(&v[..]).ok())
        .map_or(0, |b| i64::from(u32::from_ne_bytes(b)));
    let sum = u32::try_from((now + delta).max(0)).unwrap_or(u32::MAX);
    map.update(key, &sum.to_ne_bytes(), MapFlags::ANY)
        .context(|| format!("writing {name}"))
}

/// Adds the old per-CPU counters to the new ones, index by index (reasons only ever go at the
/// end of `enum counter`).
fn add_counts(old: &MapHandle, new: &impl MapCore, name: &str) -> Result<()> {
    for index in 0..old.max_entries().min(new.max_entries()) {
        let key = index.to_ne_bytes();
        let (Some(old), Some(mut sum)) = (
            old.lookup_percpu(&key, MapFlags::ANY)
                .context(|| format!("reading the old {name}"))?,
            new.lookup_percpu(&key, MapFlags::ANY)
                .context(|| format!("reading {name}"))?,
        ) else {
            continue;
        };
        for (sum, old) in sum.iter_mut().zip(&old) {
            let (Ok(a), Ok(b)) = (<[u8; 8]>::try_from(&sum[..]), <[u8; 8]>::try_from(&old[..]))
            else {
                continue;
            };
            *sum = (u64::from_ne_bytes(a) + u64::from_ne_bytes(b))
                .to_ne_bytes()
                .to_vec();
        }
        new.update_percpu(&key, &sum, MapFlags::ANY)
            .context(|| format!("writing {name}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v7_cidr_key(prefixlen: u32, cookie: u64, addr: [u8; 16]) -> Vec<u8> {
        let mut key = prefixlen.to_ne_bytes().to_vec();
        key.extend_from_slice(&(cookie as u32).to_ne_bytes());
        key.extend_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
        key.extend_from_slice(&addr);
        key
    }

    #[test]
    fn layout_7_cidr_keys_become_generation_0_keys_of_layout_8() {
        let cidr: crate::cidr::Cidr = "192.0.2.0/24".parse().unwrap();
        let (addr, plen) = cidr.as_v6();
        let cookie = 0x1234_5678_9abc_def0;
        let mut snapshot = Snapshot::new();
        snapshot.insert(
            abi::map::CIDR_EXCLUDE.into(),
            vec![(v7_cidr_key(64 + u32::from(plen), cookie, addr), vec![1])],
        );
        v7_to_v8(&mut snapshot).unwrap();
        let (key, value) = &snapshot[abi::map::CIDR_EXCLUDE][0];
        assert_eq!(value, &vec![1]);
        let new = abi::CidrKey::new(cookie, 0, &cidr);
        assert_eq!(&key[..], abi::bytes(&new));
        assert_eq!(new.cidr(), Some(cidr));
    }

    #[test]
    fn layout_8_pods_keep_every_setting_and_have_no_addresses_yet() {
        let settings = crate::pod::settings::PodSettings {
            inbound_mode: crate::pod::settings::InboundMode::Bind,
            sockmap_min_bytes: 7,
            ..Default::default()
        };
        let v9 = abi::RawPodSettings {
            lists_gen: 3,
            netns_ino: 42,
            ..settings.to_raw()
        };
        // Layout 8's value is layout 9's first 32 bytes.
        let mut snapshot = Snapshot::new();
        snapshot.insert(
            abi::map::COOKIE_MAP.into(),
            vec![(7u64.to_ne_bytes().to_vec(), abi::bytes(&v9)[..32].to_vec())],
        );
        v8_to_v9(&mut snapshot).unwrap();
        let (_, value) = &snapshot[abi::map::COOKIE_MAP][0];
        let got: abi::RawPodSettings = abi::from_bytes(value).unwrap();
        assert_eq!(abi::bytes(&got), abi::bytes(&v9));
        assert!(got.addresses().is_empty());
        let lists = settings.lists();
        assert_eq!(
            crate::pod::settings::PodSettings::from_parts(&got, &lists),
            settings
        );
    }

    #[test]
    fn layout_9_pods_addresses_fill_pod_addrs_the_newer_pod_keeping_a_shared_one() {
        let pod = |ip4: &str, ip6: &str| abi::RawPodSettings {
            pod_ip4: u32::from_ne_bytes(ip4.parse::<std::net::Ipv4Addr>().unwrap().octets()),
            pod_ip6: abi::ip6_words(&ip6.parse().unwrap()),
            ..crate::pod::settings::PodSettings::default().to_raw()
        };
        let entry = |cookie: u64, raw: &abi::RawPodSettings| {
            (cookie.to_ne_bytes().to_vec(), abi::bytes(raw).to_vec())
        };
        let (a, b, c) = (
            pod("192.0.2.10", "2001:db8::10"),
            pod("192.0.2.11", "::"),
            pod("192.0.2.10", "2001:db8::12"),
        );
        let cookie_map = vec![entry(4, &a), entry(5, &b), entry(9, &c)];
        let mut snapshot = Snapshot::new();
        snapshot.insert(abi::map::COOKIE_MAP.into(), cookie_map.clone());
        v9_to_v10(&mut snapshot).unwrap();
        assert_eq!(
            snapshot[abi::map::COOKIE_MAP],
            cookie_map,
            "cookie_map changed"
        );
        let owner = |ip: &str| {
            let key = abi::bytes(&abi::PodAddrKey::new(ip.parse().unwrap())).to_vec();
            snapshot[abi::map::POD_ADDRS]
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| u64::from_ne_bytes(v[..].try_into().unwrap()))
        };
        assert_eq!(owner("192.0.2.10"), Some(9));
        assert_eq!(owner("2001:db8::10"), Some(4));
        assert_eq!(owner("192.0.2.11"), Some(5));
        assert_eq!(owner("2001:db8::12"), Some(9));
        assert_eq!(snapshot[abi::map::POD_ADDRS].len(), 4);
    }

    #[test]
    fn a_key_of_another_size_is_refused() {
        let mut snapshot = Snapshot::new();
        snapshot.insert(abi::map::CIDR_INCLUDE.into(), vec![(vec![0; 32], vec![1])]);
        assert!(v7_to_v8(&mut snapshot).is_err());
    }

    #[test]
    fn steps_chain_from_every_supported_layout_and_refuse_others() {
        let dir = Path::new("/pins");
        assert_eq!(
            steps_from(dir, 7).map(<[Step]>::len).ok(),
            Some(STEPS.len())
        );
        assert_eq!(
            steps_from(dir, LAYOUT_VERSION).map(<[Step]>::len).ok(),
            Some(0)
        );
        for from in [1, 6, LAYOUT_VERSION + 1] {
            let err = steps_from(dir, from).err();
            assert!(matches!(err, Some(Error::LayoutMismatch { .. })), "{err:?}");
        }
        // One step per layout, with nothing skipped, up to this build's.
        for pair in STEPS.windows(2) {
            assert_eq!(pair[0].from + 1, pair[1].from);
        }
        assert_eq!(STEPS.last().map(|s| s.from + 1), Some(LAYOUT_VERSION));
    }

    #[test]
    fn maps_are_reused_converted_counted_or_started_anew_by_shape() {
        let shape = |map_type, key_size, value_size| Shape {
            map_type,
            key_size,
            value_size,
            max_entries: 16,
            flags: 0,
        };
        let hash = shape(MapType::Hash, 8, 8);
        assert_eq!(decide("m", hash, Some(hash), STEPS), Carry::Reuse);
        assert_eq!(decide("m", hash, None, STEPS), Carry::Empty);
        // A new map that a step fills.
        assert_eq!(
            decide(abi::map::POD_ADDRS, hash, None, STEPS),
            Carry::Convert
        );
        assert_eq!(
            decide("m", hash, Some(shape(MapType::Hash, 4, 8)), STEPS),
            Carry::Convert
        );
        let counters = shape(MapType::PercpuArray, 4, 8);
        assert_eq!(
            decide(
                "c",
                counters,
                Some(Shape {
                    max_entries: 8,
                    ..counters
                }),
                STEPS
            ),
            Carry::AddCounts
        );
        let sockets = shape(MapType::Sockhash, 48, 8);
        assert_eq!(
            decide("s", sockets, Some(shape(MapType::Sockhash, 40, 8)), STEPS),
            Carry::Empty
        );
    }
}
