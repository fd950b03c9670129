//! Live figures of an outgoing migration, for progress bars, `freehint
//! status` and scripts.
//!
//! The sender keeps a [`ProgressWatch`] up to date at round boundaries and
//! hands it the live byte counter of the round under way; whoever watches
//! calls [`ProgressWatch::get`] as often as it likes. Pages left and hint
//! counters come straight from the hint filter, so they move while a round
//! runs too.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use freehint_hint_filter::HintFilter;
use serde::{Deserialize, Serialize};

use crate::{MigrationStats, Phase, PhaseWatch};

/// A snapshot of an outgoing migration. Every field name carries its unit.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Progress {
    /// The phase (`setup`, `precopy`, `stopped`, … `completed`).
    pub phase: Phase,
    /// The precopy round under way or last done (0 before the first).
    pub round: u32,
    /// Time since the migration started (frozen once it ended).
    pub elapsed_ms: u64,
    /// Size of guest RAM.
    pub guest_ram_bytes: u64,
    /// Bytes written to the destination so far, headers included.
    pub bytes_sent: u64,
    /// Pages still to send in this round or the next, times their page
    /// size (pages written again go back on the list).
    pub bytes_left: u64,
    /// Sending rate of the round under way (or of the last one).
    pub rate_bytes_per_s: u64,
    /// How long the guest would be stopped if it switched over now:
    /// `bytes_left` at the sender's bandwidth estimate. Once the migration
    /// completed, the downtime it had.
    pub estimated_downtime_ms: u64,
    /// Pages free-page hints took off the send list.
    pub hint_pages_cleared: u64,
    /// Bytes of guest memory covered by applied hints.
    pub hinted_bytes: u64,
    /// Pages free page reporting took off the send list.
    pub reported_pages_cleared: u64,
}

/// Reads the byte count of the round under way.
type RoundBytes = Box<dyn Fn() -> u64 + Send + Sync>;

#[derive(Default)]
struct Inner {
    started: Option<Instant>,
    phase: Option<PhaseWatch>,
    filter: Option<Arc<HintFilter>>,
    guest_ram_bytes: u64,
    /// Bytes on the wire when the round under way started (or at the last
    /// round boundary).
    base_bytes: u64,
    /// The live counter of the round under way, if one runs.
    round: Option<(Instant, RoundBytes)>,
    /// Rate of the last round done.
    last_rate_bytes_per_s: f64,
    /// The sender's bandwidth estimate, for the downtime estimate.
    bandwidth_bytes_per_s: f64,
    /// Figures frozen when the migration ended.
    finished: Option<(u64, u64, u64)>,
}

/// The live [`Progress`] of one outgoing migration, shared between the
/// sender and whoever watches it. Cloning gives another handle on the same
/// migration; a watch no sender updates reports zeros.
#[derive(Clone, Default)]
pub struct ProgressWatch(Arc<Mutex<Inner>>);

impl std::fmt::Debug for ProgressWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ProgressWatch").field(&self.get()).finish()
    }
}

impl ProgressWatch {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The figures now. Cheap enough to call several times a second (it
    /// counts the pages left under the hint lock: microseconds per GiB).
    pub fn get(&self) -> Progress {
        let (mut p, phase, filter, bandwidth) = {
            let inner = self.lock();
            let mut p = Progress {
                guest_ram_bytes: inner.guest_ram_bytes,
                bytes_sent: inner.base_bytes,
                rate_bytes_per_s: inner.last_rate_bytes_per_s as u64,
                ..Default::default()
            };
            if let Some((since, bytes)) = &inner.round {
                let round_bytes = bytes();
                p.bytes_sent += round_bytes;
                let secs = since.elapsed().as_secs_f64();
                if secs >= 0.05 {
                    p.rate_bytes_per_s = (round_bytes as f64 / secs) as u64;
                }
            }
            p.elapsed_ms = inner.started.map_or(0, |s| s.elapsed().as_millis() as u64);
            let mut bandwidth = inner.bandwidth_bytes_per_s;
            if bandwidth <= 0.0 {
                bandwidth = p.rate_bytes_per_s as f64;
            }
            if let Some((bytes_sent, elapsed_ms, downtime_ms)) = inner.finished {
                p.bytes_sent = bytes_sent;
                p.elapsed_ms = elapsed_ms;
                p.estimated_downtime_ms = downtime_ms;
                bandwidth = 0.0;
            }
            (p, inner.phase.clone(), inner.filter.clone(), bandwidth)
        };
        // The phase and filter locks are taken after ours is released.
        if let Some(phase) = phase {
            let info = phase.get();
            p.phase = info.phase;
            p.round = info.round;
        }
        if let Some(filter) = filter {
            p.bytes_left = filter.bytes_to_send();
            let h = filter.stats();
            p.hint_pages_cleared = h.pages_skipped_free;
            p.hinted_bytes = h.hinted_bytes;
            p.reported_pages_cleared = h.pages_skipped_reported;
            if bandwidth > 0.0 && !p.phase.is_final() {
                p.estimated_downtime_ms = (p.bytes_left as f64 / bandwidth * 1000.0) as u64;
            }
        }
        p
    }

    /// Starts watching a migration: its phase, its bitmap and hint
    /// counters, and its RAM size. The clock starts now.
    pub(crate) fn attach(&self, phase: &PhaseWatch, filter: &Arc<HintFilter>, ram_bytes: u64) {
        let mut inner = self.lock();
        *inner = Inner {
            started: Some(Instant::now()),
            phase: Some(phase.clone()),
            filter: Some(filter.clone()),
            guest_ram_bytes: ram_bytes,
            ..Default::default()
        };
    }

    /// A round starts with `bytes_on_wire` sent so far; `round_bytes`
    /// reads what it has sent since.
    pub(crate) fn round_started(
        &self,
        bytes_on_wire: u64,
        round_bytes: impl Fn() -> u64 + Send + Sync + 'static,
    ) {
        let mut inner = self.lock();
        inner.base_bytes = bytes_on_wire;
        inner.round = Some((Instant::now(), Box::new(round_bytes)));
    }

    /// A round is done and its bytes are in `bytes_on_wire`;
    /// `bandwidth_bytes_per_s` is the sender's estimate for the downtime.
    pub(crate) fn round_done(&self, bytes_on_wire: u64, bandwidth_bytes_per_s: f64) {
        let mut inner = self.lock();
        if let Some((since, bytes)) = inner.round.take() {
            let secs = since.elapsed().as_secs_f64().max(1e-6);
            inner.last_rate_bytes_per_s = bytes() as f64 / secs;
        }
        inner.base_bytes = bytes_on_wire;
        inner.bandwidth_bytes_per_s = bandwidth_bytes_per_s;
    }

    /// The migration ended with `stats`: the figures stop moving.
    pub(crate) fn finished(&self, stats: &MigrationStats) {
        let mut inner = self.lock();
        inner.round = None;
        inner.base_bytes = stats.bytes_on_wire;
        inner.finished = Some((stats.bytes_on_wire, stats.total_time_ms, stats.downtime_ms));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use freehint_hint_filter::{MigrationBitmap, RegionLayout};
    use freehint_types::PageRun;

    use super::*;
    use crate::phase::Side;

    fn filter_with(pages_set: u64) -> Arc<HintFilter> {
        let f = HintFilter::new(MigrationBitmap::new(vec![RegionLayout {
            ram_start: 0,
            page_bytes: 4096,
            pages: 1024,
        }]));
        f.with_bitmap(|bm| bm.set_run(PageRun::new(0, 0, pages_set)));
        Arc::new(f)
    }

    #[test]
    fn an_unattached_watch_reports_zeros() {
        assert_eq!(ProgressWatch::default().get(), Progress::default());
    }

    #[test]
    fn bytes_move_within_a_round_and_settle_at_its_end() {
        let w = ProgressWatch::default();
        let phase = PhaseWatch::new(Side::Source);
        let filter = filter_with(100);
        w.attach(&phase, &filter, 4 << 20);
        phase.enter(Phase::Precopy);
        phase.set_round(1);
        let live = Arc::new(AtomicU64::new(0));
        let l = live.clone();
        w.round_started(1000, move || l.load(Ordering::Relaxed));
        live.store(5000, Ordering::Relaxed);
        let p = w.get();
        assert_eq!((p.phase, p.round), (Phase::Precopy, 1));
        assert_eq!(p.bytes_sent, 6000);
        assert_eq!(p.bytes_left, 100 * 4096);
        assert_eq!(p.guest_ram_bytes, 4 << 20);

        // 409600 bytes left at 4096000 bytes/s: 100 ms.
        w.round_done(6000, 4_096_000.0);
        live.store(99_999, Ordering::Relaxed); // no longer read
        let p = w.get();
        assert_eq!(p.bytes_sent, 6000);
        assert_eq!(p.estimated_downtime_ms, 100);
        assert!(p.rate_bytes_per_s > 0);
    }

    #[test]
    fn an_ended_migration_reports_its_final_figures() {
        let w = ProgressWatch::default();
        let phase = PhaseWatch::new(Side::Source);
        w.attach(&phase, &filter_with(0), 4 << 20);
        w.round_started(0, || 10);
        phase.enter(Phase::Precopy);
        phase.enter(Phase::Failed);
        w.finished(&MigrationStats {
            bytes_on_wire: 777,
            total_time_ms: 1234,
            downtime_ms: 0,
            ..Default::default()
        });
        let p = w.get();
        assert_eq!(p.phase, Phase::Failed);
        assert_eq!((p.bytes_sent, p.elapsed_ms), (777, 1234));
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert_eq!(w.get().elapsed_ms, 1234);
    }

    #[test]
    fn progress_reads_json_with_fields_it_does_not_know_or_lacks() {
        let p: Progress =
            serde_json::from_str(r#"{"phase":"precopy","bytes_sent":5,"future_field_bytes":1}"#)
                .unwrap();
        assert_eq!((p.phase, p.bytes_sent, p.round), (Phase::Precopy, 5, 0));
    }
}
