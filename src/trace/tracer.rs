//! The live reader: a slot of `trace_ctl` and its ring buffer.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

use libbpf_rs::{MapCore, MapFlags, MapHandle, RingBuffer, RingBufferBuilder};

use crate::abi::{self, map, RawEvent};
use crate::error::{Context, Error, Result};
use crate::mesh::Mesh;
use crate::pins::MAPS_DIR;
use crate::skel::types::consts;

use super::*;

/// How many `trace` readers can run at once.
pub const TRACE_SLOTS: u32 = consts::TRACE_SLOTS.0;

/// How often a reader drains its ring without being woken (the programs wake it only for a
/// batch): the longest a decision waits before [`Tracer::poll`] returns it.
pub const TRACE_DRAIN: Duration = Duration::from_millis(50);

/// A live `meshbpf trace` reader: a slot of its own, whose ring every program writes its
/// decisions to while the reader lives. Dropping it frees the slot.
pub struct Tracer {
    pub(super) ctl: MapHandle,
    pub(super) slot: u32,
    pub(super) ring: RingBuffer<'static>,
    pub(super) _ring_map: MapHandle,
    pub(super) events: Rc<RefCell<VecDeque<TraceEvent>>>,
    pub(super) cookie: Option<u64>,
}

impl Tracer {
    /// The decisions taken since the last call, waiting up to `timeout` for the first.
    ///
    /// The programs wake a reader only when a batch waits in its ring (a wakeup per decision
    /// cost more than the decision itself), so this also drains the ring every
    /// [`TRACE_DRAIN`]: a decision shows up at most that much after it was taken.
    pub fn poll(&mut self, timeout: Duration) -> Result<Vec<TraceEvent>> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let interrupted = match self.ring.poll(left.min(TRACE_DRAIN)) {
                Ok(()) => false,
                // A signal (Ctrl-C) while waiting: the caller decides what to do.
                Err(err) if err.kind() == libbpf_rs::ErrorKind::Interrupted => true,
                Err(err) => return Err(err).context(|| "reading the trace ring".into()),
            };
            self.ring
                .consume()
                .context(|| "reading the trace ring".into())?;
            let mut events = self.events.borrow_mut();
            let out: Vec<TraceEvent> = events
                .drain(..)
                .filter(|e| self.cookie.is_none_or(|c| c == e.netns_cookie))
                .collect();
            if !out.is_empty() || left.is_zero() || interrupted {
                return Ok(out);
            }
        }
    }

    /// The slot this reader holds.
    pub fn slot(&self) -> u32 {
        self.slot
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        let _ = set_slot(&self.ctl, self.slot, None);
    }
}

pub(super) fn ctl_value(ctl: &MapHandle, index: u32) -> Result<u32> {
    let value = ctl
        .lookup(&index.to_ne_bytes(), MapFlags::ANY)
        .context(|| format!("reading {}", map::TRACE_CTL))?;
    Ok(value
        .and_then(|v| <[u8; 4]>::try_from(v.as_slice()).ok())
        .map_or(0, u32::from_ne_bytes))
}

/// Claims (`Some(pid)`) or frees (`None`) a slot: its reader's pid first, then the mask the
/// programs read.
pub(super) fn set_slot(ctl: &MapHandle, slot: u32, pid: Option<u32>) -> Result<()> {
    let write = |index: u32, value: u32| {
        ctl.update(&index.to_ne_bytes(), &value.to_ne_bytes(), MapFlags::ANY)
            .context(|| format!("writing {}", map::TRACE_CTL))
    };
    write(1 + slot, pid.unwrap_or(0))?;
    let mask = ctl_value(ctl, 0)?;
    let bit = 1 << slot;
    write(
        0,
        if pid.is_some() {
            mask | bit
        } else {
            mask & !bit
        },
    )
}

impl Mesh {
    /// Starts a trace reader: from now on every decision of the programs (of the pod with
    /// `netns_cookie`, or of every pod) reaches it. Several readers work at once, up to
    /// [`TRACE_SLOTS`]; a reader whose process died frees its slot for the next.
    pub fn trace(&self, netns_cookie: Option<u64>) -> Result<Tracer> {
        let _lock = self.pin().lock(true)?;
        let maps = self.pin_dir().join(MAPS_DIR);
        let ctl = open(&maps, map::TRACE_CTL)?;
        let alive = |pid: u32| Path::new("/proc").join(pid.to_string()).exists();
        let mut free = None;
        for slot in 0..TRACE_SLOTS {
            let pid = ctl_value(&ctl, 1 + slot)?;
            let taken = ctl_value(&ctl, 0)? & (1 << slot) != 0;
            if taken && pid != 0 && !alive(pid) {
                set_slot(&ctl, slot, None)?; // its reader was killed
            } else if taken {
                continue;
            }
            free = free.or(Some(slot));
        }
        let slot = free.ok_or_else(|| {
            Error::InvalidSetting(format!(
                "{TRACE_SLOTS} `meshbpf trace` readers run already; stop one first"
            ))
        })?;
        let ring_map = open(&maps, ring_name(slot))?;
        let events = Rc::new(RefCell::new(VecDeque::new()));
        let sink = events.clone();
        let mut builder = RingBufferBuilder::new();
        builder
            .add(&ring_map, move |data: &[u8]| {
                if let Some(event) = abi::from_bytes::<RawEvent>(data)
                    .as_ref()
                    .and_then(TraceEvent::from_raw)
                {
                    sink.borrow_mut().push_back(event);
                }
                0
            })
            .context(|| "reading the trace ring".into())?;
        let ring = builder
            .build()
            .context(|| "reading the trace ring".into())?;
        // Empty the ring of what an earlier reader of this slot left, then go live.
        let _ = ring.consume();
        events.borrow_mut().clear();
        set_slot(&ctl, slot, Some(std::process::id()))?;
        Ok(Tracer {
            ctl,
            slot,
            ring,
            _ring_map: ring_map,
            events,
            cookie: netns_cookie,
        })
    }
}

pub(super) fn open(maps: &Path, name: &str) -> Result<MapHandle> {
    let path = maps.join(name);
    MapHandle::from_pinned_path(&path).context(|| format!("opening pinned map {}", path.display()))
}

pub(super) fn ring_name(slot: u32) -> &'static str {
    [
        map::TRACE_RING_0,
        map::TRACE_RING_1,
        map::TRACE_RING_2,
        map::TRACE_RING_3,
    ][slot as usize % 4]
}
