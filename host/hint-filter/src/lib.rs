//! The migration bitmap and the hint/sync lock.
//!
//! [`HintFilter`] owns the [`MigrationBitmap`] (which pages still have to be
//! sent) behind one mutex. Three things touch the bitmap, all under that
//! mutex:
//!
//! * the sender claims pages to send ([`HintFilter::claim`]): test and clear;
//! * a bitmap sync ([`HintFilter::sync`]) closes the open hint epoch, merges
//!   the dirty log, and opens the next epoch — in that order, without
//!   releasing the lock;
//! * free-page hints ([`HintFilter::apply_hints`]) clear pages, but only if
//!   their cmd_id is the open epoch; any other hint is dropped and counted.
//!
//! Hints arrive in the RAM address space ([`RamRange`]); whoever receives
//! them from the guest translates guest-physical addresses first (the
//! daemon's `GpaMap`), or, for a VM whose two spaces coincide, wraps the
//! filter in an [`IdentityMappedSink`].
//!
//! Why this is enough (docs/ARCHITECTURE.md, "Hints and the dirty log"):
//! a hint for epoch k was
//! generated after the guest saw cmd_id k, which the engine published after
//! the sync that opened k. Any write to the page after the hint was
//! generated is therefore in the dirty log at the sync that closes k, and
//! that sync sets the bit again. A hint that arrives after that sync carries
//! a closed cmd_id and is dropped, so it can never clear a bit the sync set.

#![deny(missing_docs)]

mod bitmap;

pub use bitmap::{MigrationBitmap, RegionLayout};
pub use freehint_types::PageRun;

use std::sync::Arc;

use freehint_types::{CmdId, GpaRange, HintOutcome, HintSink, RamRange};

#[cfg(loom)]
use loom::sync::{Mutex, MutexGuard};
#[cfg(not(loom))]
use std::sync::{Mutex, MutexGuard};

/// Counters of everything the filter did, with units in their names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HintStats {
    /// Hint ranges applied to the bitmap.
    pub hint_ranges_applied: u64,
    /// Hint ranges dropped because their cmd_id was not the open epoch.
    pub hint_ranges_dropped_stale: u64,
    /// Hint ranges rejected as invalid (outside RAM, empty, wrapping).
    pub hint_ranges_rejected_invalid: u64,
    /// Pages that hints cleared while they were still to be sent.
    pub pages_skipped_free: u64,
    /// Bytes of guest memory covered by applied hints.
    pub hinted_bytes: u64,
    /// Pages discarded by free page reporting while still to be sent.
    pub pages_skipped_reported: u64,
    /// Epochs opened.
    pub epochs_opened: u64,
    /// Reported ranges that arrived after the final sync, too late to be
    /// taken into account (the device must be quiet by then: a non-zero
    /// count is a bug in whoever feeds the filter).
    pub reports_after_final_sync: u64,
}

/// What the lock protects.
struct State {
    bitmap: MigrationBitmap,
    open_epoch: Option<CmdId>,
    last_cmd_id: CmdId,
    stats: HintStats,
    /// Pages the guest reported (and the device discarded), or hinted
    /// free while they read as zeros, since the last sync; they become
    /// zero records in the next round. Merged whenever it doubles (see
    /// [`State::note_reported`]), so a guest reporting the same pages in a
    /// loop cannot grow it: at most one run per two pages of RAM.
    reported: Vec<PageRun>,
    /// `reported`'s length at which it is next merged.
    merge_reported_at: usize,
    /// Pages hinted free while every byte of them is `.1` (a poisoning
    /// guest), since the last sync; they become fill records.
    filled: Vec<(PageRun, u8)>,
    /// The final sync has run: nothing may change the bitmap but claims.
    frozen: bool,
}

/// The fewest reported runs [`State::note_reported`] merges.
const MERGE_REPORTED_MIN: usize = 4096;

impl State {
    /// Notes that `run` was discarded by the device, merging the runs
    /// noted so far whenever their number has doubled since the last
    /// merge: amortised O(log n) a run, and the list never holds more
    /// than twice the disjoint runs it stands for.
    fn note_reported(&mut self, run: PageRun) {
        self.reported.push(run);
        if self.reported.len() >= self.merge_reported_at {
            freehint_types::merge_runs(&mut self.reported);
            self.merge_reported_at = (2 * self.reported.len()).max(MERGE_REPORTED_MIN);
        }
    }
}

/// What a sync did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// The epoch the sync closed, if one was open.
    pub closed_epoch: Option<CmdId>,
    /// The epoch it opened, if asked to.
    pub opened_epoch: Option<CmdId>,
    /// Pages to send after the sync.
    pub pages_to_send: u64,
    /// Pages that free page reporting discarded (or hints said read as
    /// zeros) and that were not written since: send them as zero records
    /// in the next round.
    pub discarded: Vec<PageRun>,
    /// Pages hinted free whose every byte is `.1` and that were not written
    /// since: send them as fill records in the next round.
    pub filled: Vec<(PageRun, u8)>,
}

/// Where the sender is in its walk over the bitmap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    /// Region index.
    pub region: usize,
    /// Next page to look at within the region.
    pub page: u64,
}

/// The migration bitmap behind the hint/sync lock.
///
/// # Examples
///
/// The epoch rule: a hint counts only while the epoch it was computed in is
/// open. Each sync closes the epoch, merges the dirty log, and opens the
/// next; a hint of a closed epoch could predate a write the sync just
/// merged, so it is dropped.
///
/// ```
/// use freehint_hint_filter::{HintFilter, MigrationBitmap, PageRun, RegionLayout};
/// use freehint_types::RamRange;
///
/// // 16 pages of 4 KiB, all still to be sent.
/// let mut bitmap = MigrationBitmap::new(vec![RegionLayout { ram_start: 0, page_bytes: 4096, pages: 16 }]);
/// bitmap.set_all();
/// let filter = HintFilter::new(bitmap);
///
/// // Round 1: the sync opens an epoch; publish its cmd_id to the guest.
/// let epoch1 = filter.sync(true, |_| Ok::<_, ()>(())).unwrap().opened_epoch.unwrap();
/// // The guest reports pages 0..4 free, tagged with that cmd_id.
/// let hint = [RamRange::new(0, 4 * 4096)];
/// assert_eq!(filter.apply_hints(epoch1, &hint).pages_cleared, 4);
///
/// // The next sync merges a write to page 2 and opens epoch 2.
/// let epoch2 = filter
///     .sync(true, |bm| {
///         bm.set_run(PageRun::page(0, 2));
///         Ok::<_, ()>(())
///     })
///     .unwrap()
///     .opened_epoch
///     .unwrap();
/// assert_ne!(epoch1, epoch2);
///
/// // A late hint of epoch 1 for page 2 is dropped: page 2 stays to send.
/// let late = filter.apply_hints(epoch1, &[RamRange::new(2 * 4096, 4096)]);
/// assert_eq!(late.hint_ranges_dropped_stale, 1);
/// assert_eq!(filter.pages_to_send(), 16 - 4 + 1);
/// ```
pub struct HintFilter {
    state: Mutex<State>,
}

impl std::fmt::Debug for HintFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HintFilter").finish_non_exhaustive()
    }
}

impl HintFilter {
    /// A filter over `bitmap` with no epoch open, whose first epoch is the
    /// first round id ([`CmdId::MIN_ROUND`]).
    pub fn new(bitmap: MigrationBitmap) -> Self {
        Self::after(bitmap, CmdId(CmdId::MIN_ROUND - 1))
    }

    /// A filter whose epochs continue after `last_cmd_id`: the cmd_id
    /// counter belongs to the VM, not to one migration attempt (Linux
    /// ignores a cmd_id equal to the last it saw, and hints of an earlier
    /// attempt still queued must never match a new epoch).
    pub fn after(bitmap: MigrationBitmap, last_cmd_id: CmdId) -> Self {
        Self {
            state: Mutex::new(State {
                bitmap,
                open_epoch: None,
                last_cmd_id,
                stats: HintStats::default(),
                reported: Vec::new(),
                merge_reported_at: MERGE_REPORTED_MIN,
                filled: Vec::new(),
                frozen: false,
            }),
        }
    }

    /// The last cmd_id this filter opened (or the one it started after).
    pub fn last_cmd_id(&self) -> CmdId {
        self.lock().last_cmd_id
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the bitmap half
        // updated in a way later users could not cope with: every update is
        // a set or clear of whole runs. So a poisoned lock is taken over.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes the open epoch, runs `merge` on the bitmap (merge the dirty
    /// log into it), and, if `open_next`, opens a fresh epoch — all under
    /// the lock. Returns `merge`'s error untouched if it fails; the epoch is
    /// then closed and none is opened.
    ///
    /// After this returns, publish [`SyncReport::opened_epoch`] to the guest
    /// (never before: a hint generated before the sync must not carry it).
    pub fn sync<E>(
        &self,
        open_next: bool,
        merge: impl FnOnce(&mut MigrationBitmap) -> Result<(), E>,
    ) -> Result<SyncReport, E> {
        self.sync_inner(open_next, false, merge)
    }

    /// The last sync, with the VM stopped: closes the open epoch, merges,
    /// and freezes the bitmap: from now on hints are dropped as stale and
    /// reports are refused (and counted in
    /// [`HintStats::reports_after_final_sync`]).
    pub fn final_sync<E>(
        &self,
        merge: impl FnOnce(&mut MigrationBitmap) -> Result<(), E>,
    ) -> Result<SyncReport, E> {
        self.sync_inner(false, true, merge)
    }

    fn sync_inner<E>(
        &self,
        open_next: bool,
        freeze: bool,
        merge: impl FnOnce(&mut MigrationBitmap) -> Result<(), E>,
    ) -> Result<SyncReport, E> {
        let mut st = self.lock();
        let closed_epoch = st.open_epoch.take();
        st.frozen |= freeze;
        merge(&mut st.bitmap)?;
        let reported = std::mem::take(&mut st.reported);
        st.merge_reported_at = MERGE_REPORTED_MIN;
        let mut discarded = Vec::with_capacity(reported.len());
        for run in reported {
            // A page written after it was discarded is set again: it will
            // be sent as data, so no zero record for it.
            st.bitmap.unset_subruns(run, &mut discarded);
        }
        let to_fill = std::mem::take(&mut st.filled);
        let mut filled = Vec::with_capacity(to_fill.len());
        let mut unset = Vec::new();
        for (run, byte) in to_fill {
            unset.clear();
            st.bitmap.unset_subruns(run, &mut unset);
            filled.extend(unset.iter().map(|r| (*r, byte)));
        }
        let opened_epoch = if open_next && !st.frozen {
            let id = st.last_cmd_id.next_round();
            st.last_cmd_id = id;
            st.open_epoch = Some(id);
            st.stats.epochs_opened += 1;
            Some(id)
        } else {
            None
        };
        Ok(SyncReport {
            closed_epoch,
            opened_epoch,
            pages_to_send: st.bitmap.count_set(),
            discarded,
            filled,
        })
    }

    /// Claims pages to send, at most `max_bytes` worth but at least one,
    /// starting at `cursor` and moving it on: the pages are cleared from the
    /// bitmap and appended to `out` as runs of consecutive pages, in
    /// order. Claims come from one region at a time. Returns the number of
    /// pages claimed; 0 means the walk reached the end.
    pub fn claim(&self, cursor: &mut Cursor, max_bytes: u64, out: &mut Vec<PageRun>) -> u64 {
        let mut st = self.lock();
        st.bitmap.take_set(cursor, max_bytes, out)
    }

    /// Bytes still to be sent.
    pub fn bytes_to_send(&self) -> u64 {
        self.lock().bitmap.bytes_set()
    }

    /// The open epoch, if any.
    pub fn open_epoch(&self) -> Option<CmdId> {
        self.lock().open_epoch
    }

    /// Pages still to be sent.
    pub fn pages_to_send(&self) -> u64 {
        self.lock().bitmap.count_set()
    }

    /// The counters.
    pub fn stats(&self) -> HintStats {
        self.lock().stats
    }

    /// Runs `f` on the bitmap under the lock (setup and inspection).
    pub fn with_bitmap<R>(&self, f: impl FnOnce(&mut MigrationBitmap) -> R) -> R {
        f(&mut self.lock().bitmap)
    }

    /// Applies free-page hints tagged `cmd_id`.
    pub fn apply_hints(&self, cmd_id: CmdId, ranges: &[RamRange]) -> HintOutcome {
        self.apply_epoch_hints(cmd_id, ranges, None)
    }

    /// Applies free-page hints tagged `cmd_id` from a guest whose free
    /// pages hold a content it relies on, every byte `byte` (0 under
    /// `init_on_free=1`, the poison byte under `page_poison=1`): such a
    /// page may not be left out, or the destination would keep whatever
    /// an earlier round sent there. So the pages still to be sent are
    /// cleared like any hint's, and become zero (or fill) records in the
    /// round after the next sync, unless written since (then they go as
    /// data, as a reported page does). Pages not still to be sent were
    /// sent with the content they have had since: freeing a page zeroes
    /// or poisons it, a write the dirty log catches.
    pub fn apply_filled_hints(&self, cmd_id: CmdId, ranges: &[RamRange], byte: u8) -> HintOutcome {
        self.apply_epoch_hints(cmd_id, ranges, Some(byte))
    }

    /// Hints tagged `cmd_id`, applied if it is the open epoch: the pages
    /// still to be sent are cleared; with `fill`, they are also queued as
    /// zero (byte 0) or fill records for the round after the next sync.
    fn apply_epoch_hints(
        &self,
        cmd_id: CmdId,
        ranges: &[RamRange],
        fill: Option<u8>,
    ) -> HintOutcome {
        let mut out = HintOutcome::default();
        let mut st = self.lock();
        if st.open_epoch != Some(cmd_id) {
            out.hint_ranges_dropped_stale = ranges.len() as u64;
            st.stats.hint_ranges_dropped_stale += out.hint_ranges_dropped_stale;
            return out;
        }
        let mut still_to_send = Vec::new();
        for r in ranges {
            let Some(runs) = st.bitmap.runs_inside(*r) else {
                tracing::debug!("hint {r} rejected: not inside guest RAM");
                out.hint_ranges_rejected_invalid += 1;
                continue;
            };
            for run in runs {
                let Some(byte) = fill else {
                    out.pages_cleared += st.bitmap.clear_run(run);
                    continue;
                };
                still_to_send.clear();
                st.bitmap.set_subruns(run, &mut still_to_send);
                for z in &still_to_send {
                    out.pages_cleared += st.bitmap.clear_run(*z);
                }
                if byte == 0 {
                    st.reported.extend_from_slice(&still_to_send);
                } else {
                    st.filled.extend(still_to_send.iter().map(|z| (*z, byte)));
                }
            }
            out.hint_ranges_applied += 1;
            st.stats.hinted_bytes += r.len_bytes;
        }
        st.stats.hint_ranges_applied += out.hint_ranges_applied;
        st.stats.hint_ranges_rejected_invalid += out.hint_ranges_rejected_invalid;
        st.stats.pages_skipped_free += out.pages_cleared;
        out
    }

    /// Applies free page reporting: the ranges were discarded by the device.
    pub fn apply_reported(&self, ranges: &[RamRange]) -> HintOutcome {
        let mut out = HintOutcome::default();
        let mut st = self.lock();
        if st.frozen {
            st.stats.reports_after_final_sync += ranges.len() as u64;
            tracing::error!(
                ranges = ranges.len(),
                "free page reports arrived after the final sync; not applied"
            );
            out.hint_ranges_dropped_stale = ranges.len() as u64;
            return out;
        }
        for r in ranges {
            match st.bitmap.runs_inside(*r) {
                Some(runs) => {
                    for run in runs {
                        let cleared = st.bitmap.clear_run(run);
                        out.pages_cleared += cleared;
                        st.stats.pages_skipped_reported += cleared;
                        st.note_reported(run);
                    }
                    out.hint_ranges_applied += 1;
                }
                None => {
                    out.hint_ranges_rejected_invalid += 1;
                    st.stats.hint_ranges_rejected_invalid += 1;
                }
            }
        }
        out
    }
}

/// A [`HintSink`] for a VM whose RAM address space is its guest-physical
/// one (RAM at guest-physical 0, no holes: the simulated VM): hints go to
/// the filter unchanged. A real VMM's hints need its memory map instead.
#[derive(Clone, Debug)]
pub struct IdentityMappedSink(pub Arc<HintFilter>);

impl IdentityMappedSink {
    fn ram_ranges(ranges: &[GpaRange]) -> Vec<RamRange> {
        ranges.iter().map(|r| r.identity()).collect()
    }
}

impl HintSink for IdentityMappedSink {
    fn free_page_hints(&self, cmd_id: CmdId, ranges: &[GpaRange]) -> HintOutcome {
        self.0.apply_hints(cmd_id, &Self::ram_ranges(ranges))
    }

    fn reported_free(&self, ranges: &[GpaRange]) -> HintOutcome {
        self.0.apply_reported(&Self::ram_ranges(ranges))
    }

    fn filled_free_page_hints(&self, cmd_id: CmdId, ranges: &[GpaRange], byte: u8) -> HintOutcome {
        self.0
            .apply_filled_hints(cmd_id, &Self::ram_ranges(ranges), byte)
    }
}
