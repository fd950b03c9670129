//! Where the balloon's hints go, and the extra dirty logs of a QEMU
//! migration.

use std::sync::{Arc, Mutex, RwLock};

use freehint_balloon::BalloonHandle;
use freehint_dirty_log::{DirtyLog, DirtyLogError};
use freehint_hint_filter::HintFilter;
use freehint_types::{CmdId, GpaRange, HintOutcome, HintSink, PageRun, RamRange};

use crate::gpa_map::GpaMap;

struct Target {
    filter: Arc<HintFilter>,
    map: GpaMap,
}

/// The balloon backend lives as long as the VM; a [`HintFilter`] only as
/// long as one migration. `HintSlot` is the backend's sink for the VM's
/// whole life: it hands hints to the current migration's filter,
/// translated from guest-physical addresses to RAM-file offsets, and drops
/// them (as stale) when no migration runs.
#[derive(Default)]
pub struct HintSlot {
    target: RwLock<Option<Target>>,
}

impl HintSlot {
    /// Sends hints to `filter` (translated by `map`) from now on.
    pub fn attach(&self, filter: Arc<HintFilter>, map: GpaMap) {
        *self.target.write().unwrap_or_else(|e| e.into_inner()) = Some(Target { filter, map });
    }

    /// Drops hints from now on.
    pub fn detach(&self) {
        *self.target.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn with_target(
        &self,
        ranges: &[GpaRange],
        apply: impl FnOnce(&HintFilter, &[RamRange]) -> HintOutcome,
    ) -> HintOutcome {
        let guard = self.target.read().unwrap_or_else(|e| e.into_inner());
        let Some(t) = guard.as_ref() else {
            return HintOutcome {
                hint_ranges_dropped_stale: ranges.len() as u64,
                ..HintOutcome::default()
            };
        };
        let mut translated = Vec::with_capacity(ranges.len());
        let mut invalid = 0;
        for r in ranges {
            if !t.map.translate(*r, &mut translated) {
                invalid += 1;
            }
        }
        let mut out = apply(&t.filter, &translated);
        out.hint_ranges_rejected_invalid += invalid;
        out
    }
}

impl HintSink for HintSlot {
    fn free_page_hints(&self, cmd_id: CmdId, ranges: &[GpaRange]) -> HintOutcome {
        self.with_target(ranges, |f, r| f.apply_hints(cmd_id, r))
    }

    fn reported_free(&self, ranges: &[GpaRange]) -> HintOutcome {
        self.with_target(ranges, |f, r| f.apply_reported(r))
    }

    fn filled_free_page_hints(&self, cmd_id: CmdId, ranges: &[GpaRange], byte: u8) -> HintOutcome {
        self.with_target(ranges, |f, r| f.apply_filled_hints(cmd_id, r, byte))
    }
}

/// The pages the balloon backend itself writes: its used rings. QEMU's
/// userfaultfd sees only QEMU's own writes, so every sync reports these
/// pages as written; the last sync comes after QEMU stopped the rings
/// (`GET_VRING_BASE` on `stop`), so their final content is sent. A handful
/// of pages per round, a superset of what the backend wrote.
pub struct UsedRingLog {
    handle: BalloonHandle,
    map: GpaMap,
    page_bytes: u64,
}

impl UsedRingLog {
    /// The used rings of `handle`'s device, in RAM-file pages of
    /// `page_bytes` (region 0).
    pub fn new(handle: BalloonHandle, map: GpaMap, page_bytes: u64) -> Self {
        Self {
            handle,
            map,
            page_bytes,
        }
    }
}

impl DirtyLog for UsedRingLog {
    fn sync(&mut self, sink: &mut dyn FnMut(PageRun)) -> Result<(), DirtyLogError> {
        let mut file_ranges = Vec::new();
        for ring in self.handle.used_ring_ranges() {
            if !self.map.translate(ring, &mut file_ranges) {
                tracing::warn!(%ring, "a used ring is outside guest RAM; not tracked");
            }
        }
        for r in file_ranges {
            let first = r.start / self.page_bytes;
            let last = (r.start + r.len_bytes - 1) / self.page_bytes;
            sink(PageRun::new(0, first, last - first + 1));
        }
        Ok(())
    }
}

/// A dirty log that outlives one migration: the kernel lets a userfaultfd
/// be initialised once, so the daemon attaches to QEMU once and lends the
/// log to every migration attempt.
#[derive(Clone)]
pub struct SharedDirtyLog(pub Arc<Mutex<Box<dyn DirtyLog>>>);

impl DirtyLog for SharedDirtyLog {
    fn sync(&mut self, sink: &mut dyn FnMut(PageRun)) -> Result<(), DirtyLogError> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).sync(sink)
    }
}
