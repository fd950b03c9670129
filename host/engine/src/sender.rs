//! The precopy sender: live rounds, the final round with the VM stopped,
//! and the handover, each a phase function over one [`Attempt`].
//!
//! The handover rule (docs/ARCHITECTURE.md, "The handover"): the destination loads the device state
//! and says `Ready`; the source commits; only a committed destination
//! resumes; a source that has committed never resumes on its own. Any
//! failure before the commit resumes the source untouched; a lost link
//! after it leaves the source paused in [`Phase::Uncertain`].

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::transport::Scheme;
use crate::transport::{Channel, TlsConfig};
use crate::TransportKind;
use freehint_dirty_log::DirtyLog;
use freehint_hint_filter::{Cursor, HintFilter, SyncReport};
use freehint_memory::{is_zero_volatile, GuestRam};
use freehint_types::{merge_runs, CmdId, ErrorChain, HintSource, PageRun, Vmm};
use freehint_wire::{
    ChannelRole, DeviceStateEncoding, Hello, Message, PageBatchHead, MAX_CONTROL_PAYLOAD_BYTES,
    MAX_DEVICE_STATE_BYTES,
};
use tokio::io::AsyncWriteExt;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::error::{cancellable, caught, panic_text};
use crate::fault::hit;
use crate::io::{expect_message, write_message, ControlChannel, IoVecs};
use crate::page_set::PageSet;
use crate::phase::{Phase, PhaseWatch, Side};
use crate::postcopy::source::{PostcopySource, SourceCounters, StreamHint};
use crate::postcopy::{send_pending_list, Links, PostcopyResume};
use crate::progress::ProgressWatch;
use crate::{
    region_descs, MigrateError, MigrationFailure, MigrationMode, MigrationParams, MigrationStats,
};

/// Sends a VM's guest RAM to a [`crate::Receiver`] with precopy and hands
/// the VM over.
///
/// Before [`Self::migrate`], the dirty log must already track the VMM's
/// RAM: every write after that point is caught.
pub struct PrecopySender {
    ram: Arc<GuestRam>,
    filter: Arc<HintFilter>,
    dirty_log: Box<dyn DirtyLog>,
    hint_source: Option<Arc<dyn HintSource>>,
    vmm: Arc<dyn Vmm>,
    params: MigrationParams,
    phase: PhaseWatch,
    cancel: CancellationToken,
    /// TLS for every connection; `None`: plain TCP.
    /// TCP or RDMA ([`Self::with_scheme`]).
    scheme: Scheme,
    tls: Option<Arc<TlsConfig>>,
    progress: ProgressWatch,
    /// Hint rounds still pay: the guest's reports take pages off the send
    /// list (see [`watch_hint_payoff`]). Once they do not, no more rounds
    /// are opened for the rest of the migration.
    hints_paying: Arc<AtomicBool>,
    /// The operator asked for the switch to postcopy now.
    postcopy_now: Arc<AtomicBool>,
    /// The operator's word to reconnect a broken postcopy.
    postcopy_resume: PostcopyResume,
}

impl std::fmt::Debug for PrecopySender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrecopySender")
            .field("params", &self.params)
            .field("phase", &self.phase)
            .finish_non_exhaustive()
    }
}

/// Counters shared by the channel tasks of one round.
#[derive(Default)]
struct RoundCounters {
    bytes: AtomicU64,
    pages_sent: AtomicU64,
    pages_zero: AtomicU64,
    pages_filled: AtomicU64,
}

/// A resumed postcopy's pages still lacking, bulk channels and urgent
/// channel.
type PostcopyChannels = (Arc<PageSet>, Vec<Channel>, Channel);

/// Everything one migration attempt holds between its phases.
struct Attempt {
    stats: MigrationStats,
    started: Instant,
    /// We stopped the VM and have not resumed it.
    vm_stopped: bool,
    stop_at: Option<Instant>,
    control: Option<ControlChannel>,
    bulk: Vec<Channel>,
    /// Zero runs to send at the start of the next round.
    zero_runs: Vec<PageRun>,
    /// Fill runs (pages every byte of which is `.1`) to send at the start
    /// of the next round.
    fill_runs: Vec<(PageRun, u8)>,
    round: u32,
    bandwidth_bytes_per_s: f64,
    /// Bytes of populated guest memory when the migration began.
    populated_bytes: u64,
    /// The urgent channel (postcopy), until the switch.
    urgent: Option<Channel>,
    /// After the switch to postcopy: what the postcopy tasks share, and
    /// the task answering page requests (aborted if the attempt is
    /// dropped).
    postcopy: Option<(PostcopySource, JoinSet<Result<(), MigrateError>>)>,
    /// Hybrid: the lowest downtime estimate so far, and the rounds since
    /// it last fell by a tenth.
    best_estimate_ms: f64,
    stalled_rounds: u32,
    /// The first hint round this attempt opened.
    first_hint_round: Option<CmdId>,
    /// The mode this attempt runs in: the operator's, except that a hybrid
    /// migration to a destination that cannot serve postcopy is precopy.
    mode: MigrationMode,
    /// The destination (the operator may name another to resume a
    /// postcopy), and the session id every connection carries.
    dest: SocketAddr,
    session_id: u64,
    /// Duplicates of the postcopy session's sockets, to cut them all when
    /// one breaks.
    links: Links,
}

impl PrecopySender {
    /// A sender for `ram`, whose writes `dirty_log` tracks and whose bitmap
    /// `filter` holds (hints reach `filter` through its
    /// [`freehint_types::HintSink`] implementation). `hint_source`, if any,
    /// is told when hint rounds start and stop, and gets DONE when a failed
    /// migration is over.
    pub fn new(
        ram: Arc<GuestRam>,
        filter: Arc<HintFilter>,
        dirty_log: Box<dyn DirtyLog>,
        hint_source: Option<Arc<dyn HintSource>>,
        vmm: Arc<dyn Vmm>,
        params: MigrationParams,
    ) -> Result<Self, MigrateError> {
        params.validate()?;
        Ok(Self {
            ram,
            filter,
            dirty_log,
            hint_source,
            vmm,
            params,
            phase: PhaseWatch::new(Side::Source),
            cancel: CancellationToken::new(),
            progress: ProgressWatch::default(),
            hints_paying: Arc::new(AtomicBool::new(true)),
            postcopy_now: Arc::new(AtomicBool::new(false)),
            postcopy_resume: PostcopyResume::default(),
            tls: None,
            scheme: Scheme::Tcp,
        })
    }

    /// Connects over `scheme` ([`Scheme::Tcp`], the default, or
    /// [`Scheme::Rdma`]: page data then goes as references the
    /// destination reads with RDMA READ). RDMA takes no TLS.
    pub fn with_scheme(mut self, scheme: Scheme) -> Self {
        self.scheme = scheme;
        self
    }

    /// Opens every connection with TLS (mutual authentication, see
    /// [`crate::tls`]); `None`, the default: plain TCP, which anyone on
    /// the path can read and change.
    pub fn with_tls(mut self, tls: Option<Arc<TlsConfig>>) -> Self {
        self.tls = tls;
        self
    }

    /// The operator's `freehint migrate --resume`: once the link of a
    /// postcopy has broken, reconnects now (to another address, if given)
    /// rather than after the backoff, or after the source has given up
    /// reconnecting on its own.
    pub fn postcopy_resume_handle(&self) -> PostcopyResume {
        self.postcopy_resume.clone()
    }

    /// A flag that, once set, makes a hybrid or postcopy migration switch
    /// to postcopy at the end of the current round (the operator's
    /// `--postcopy-now`). A precopy migration ignores it.
    pub fn postcopy_now_flag(&self) -> Arc<AtomicBool> {
        self.postcopy_now.clone()
    }

    /// The migration's phase, for whoever watches it.
    pub fn phase_watch(&self) -> PhaseWatch {
        self.phase.clone()
    }

    /// The migration's live figures (bytes sent and left, rate, estimated
    /// downtime, hints), for whoever watches it.
    pub fn progress_watch(&self) -> ProgressWatch {
        self.progress.clone()
    }

    /// A token that cancels the migration: before the commit it fails
    /// back (the source VM runs on, untouched); after it, it does nothing.
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Uses `token` to cancel the migration (one the caller made before
    /// the sender existed, so that no cancel can fall between the two).
    pub fn with_cancel_token(mut self, token: CancellationToken) -> Self {
        self.cancel = token;
        self
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.params.peer_timeout_s)
    }

    /// Migrates to the receiver at `dest` and hands the VM over. On success
    /// the destination runs the guest. On failure, `stats.state` says where
    /// the guest is: [`Phase::Failed`] (the source runs it, untouched) or
    /// [`Phase::Uncertain`] (the source keeps it paused after committing;
    /// the operator decides).
    pub async fn migrate(mut self, dest: SocketAddr) -> Result<MigrationStats, MigrationFailure> {
        let mut at = Attempt {
            stats: MigrationStats {
                guest_ram_bytes: self.ram.size_bytes(),
                transport: match (self.scheme, self.tls.is_some()) {
                    (Scheme::Rdma, _) => TransportKind::Rdma,
                    (Scheme::Tcp, true) => TransportKind::Tls,
                    (Scheme::Tcp, false) => TransportKind::Tcp,
                },
                ..Default::default()
            },
            started: Instant::now(),
            vm_stopped: false,
            first_hint_round: None,
            stop_at: None,
            control: None,
            bulk: Vec::new(),
            zero_runs: Vec::new(),
            fill_runs: Vec::new(),
            round: 0,
            bandwidth_bytes_per_s: 0.0,
            populated_bytes: 0,
            urgent: None,
            postcopy: None,
            best_estimate_ms: f64::INFINITY,
            stalled_rounds: 0,
            mode: self.params.mode,
            dest,
            session_id: 0,
            links: Links::default(),
        };
        let cancel = self.cancel.clone();
        self.progress
            .attach(&self.phase, &self.filter, self.ram.size_bytes());
        if let Err(e) = cancellable(&cancel, self.until_ready(dest, &mut at)).await {
            return Err(self.fail_back(at, e).await);
        }
        // The point of no return: from here on, no cancel, no fail back.
        match caught(self.commit(&mut at)).await {
            // The destination gave up before acting on the commit: it never
            // resumes its copy, so the guest resumes here.
            Err(e @ MigrateError::Peer(_)) => return Err(self.fail_back(at, e).await),
            Err(e) => return Err(self.uncertain(at, e)),
            Ok(()) => {}
        }
        if at.postcopy.is_some() {
            self.phase.enter(Phase::Postcopy);
            if let Err(e) = caught(self.run_postcopy(&mut at)).await {
                return Err(self.uncertain(at, e));
            }
        }
        self.phase.enter(Phase::Completed);
        let after = std::panic::catch_unwind(AssertUnwindSafe(|| hit("src.after-resumed")))
            .unwrap_or_else(|p| Err(MigrateError::Panic(panic_text(&*p))));
        if let Err(e) = after {
            // The destination runs the guest: nothing to undo.
            tracing::warn!("after the handover: {}", ErrorChain(&e));
        }
        if let Err(e) = self.vmm.handed_over() {
            tracing::warn!(
                "releasing the source VMM after the handover: {}",
                ErrorChain(&e)
            );
        }
        Ok(self.outcome(at, Phase::Completed, false, Some(true)))
    }

    /// Everything up to the destination's `Ready`: any error here fails
    /// back.
    async fn until_ready(
        &mut self,
        dest: SocketAddr,
        at: &mut Attempt,
    ) -> Result<(), MigrateError> {
        hit("src.setup")?;
        self.first_round_plan(at).await?;
        self.open_channels(dest, at).await?;
        self.phase.enter(Phase::Precopy);
        hit("src.connected")?;
        let postcopy = match at.mode {
            MigrationMode::Postcopy => true,
            MigrationMode::Precopy | MigrationMode::Hybrid => self.live_rounds(at).await?,
        };
        self.check_device_state_size()?;
        if postcopy {
            self.sync_before_switch(at)?;
        }
        hit("src.before-stop")?;
        self.stop_vm(at).await?;
        hit("src.after-stop")?;
        if postcopy {
            self.switch_round(at).await?;
        } else {
            self.final_round(at).await?;
        }
        hit("src.after-final-round")?;
        self.send_device_state(at).await?;
        hit("src.after-complete")?;
        self.await_ready(at).await?;
        hit("src.after-ready")?;
        Ok(())
    }

    /// Syncs the dirty log into the bitmap under the hint lock, and starts
    /// the next hint round if asked to.
    fn sync(
        &mut self,
        open_next: bool,
        stats: &mut MigrationStats,
    ) -> Result<SyncReport, MigrateError> {
        let t = Instant::now();
        let log = &mut self.dirty_log;
        let merge = |bm: &mut freehint_hint_filter::MigrationBitmap| {
            log.sync(&mut |run| {
                bm.set_run(run);
            })
        };
        let report = if open_next {
            let hinting = self.hint_source.is_some() && self.hints_paying.load(Ordering::Relaxed);
            self.filter.sync(hinting, merge)?
        } else {
            self.filter.final_sync(merge)?
        };
        let us = t.elapsed().as_micros() as u64;
        stats.syncs += 1;
        stats.sync_max_us = stats.sync_max_us.max(us);
        stats.sync_mean_us += us; // divided at the end
        if let (Some(id), Some(src)) = (report.opened_epoch, &self.hint_source) {
            src.start_round(id)?;
        }
        Ok(report)
    }

    /// Marks every populated page to send (holes go as zero records, never
    /// read: reading a tmpfs hole would allocate it), opens the first hint
    /// round and waits while the guest's report pays.
    async fn first_round_plan(&mut self, at: &mut Attempt) -> Result<(), MigrateError> {
        let mut zero_runs: Vec<PageRun> = Vec::new();
        for (idx, region) in self.ram.regions().iter().enumerate() {
            let data = region.data_page_ranges()?;
            at.populated_bytes +=
                data.iter().map(|r| r.end - r.start).sum::<u64>() * region.page_bytes();
            let mut next = 0;
            self.filter.with_bitmap(|bm| {
                for r in &data {
                    bm.set_run(PageRun::new(idx, r.start, r.end - r.start));
                }
            });
            for r in data
                .iter()
                .map(|r| (r.start, r.end))
                .chain([(region.pages(), region.pages())])
            {
                if r.0 > next {
                    zero_runs.push(PageRun::new(idx, next, r.0 - next));
                }
                next = r.1;
            }
        }
        // Open the first hint round before connecting, so the guest's
        // report is under way by the time the first pages go out.
        let first = self.sync(self.params.hints, &mut at.stats)?;
        at.first_hint_round = first.opened_epoch;
        // Pure postcopy has no precopy round for hints to land in: every
        // page the guest has not reported free by the switch is sent.
        let hint_wait_ms = if self.params.mode == MigrationMode::Postcopy {
            self.params.hint_wait_ms.max(POSTCOPY_HINT_WAIT_MS)
        } else {
            self.params.hint_wait_ms
        };
        let waiting = hint_wait_ms > 0;
        if let (Some(id), Some(src), true) = (first.opened_epoch, &self.hint_source, waiting) {
            let filter = self.filter.clone();
            let page_bytes = self.ram.regions().first().map_or(4096, |r| r.page_bytes());
            // Waiting longer than sending every populated page at the floor
            // rate would take never pays (an idle guest's RAM is mostly holes).
            let max_ms = hint_wait_ms
                .min(at.populated_bytes.saturating_mul(1000) / HINT_RATE_FLOOR_BYTES_PER_S);
            // Postcopy has no later round for hints: a guest that cannot
            // say when its report ends is waited for too, while it hints.
            let unknown_end = self.params.mode == MigrationMode::Postcopy;
            at.stats.hint_wait_ms = wait_for_report(src.as_ref(), id, max_ms, unknown_end, || {
                let h = filter.stats();
                (h.hinted_bytes, h.pages_skipped_free * page_bytes)
            })
            .await;
        }
        // A hole written after the scan is in the dirty log, now merged:
        // it goes as data, so no zero run for it (two records for one page
        // in one round could be placed in either order). The first sync's
        // reported-free pages go as zero runs too.
        at.zero_runs = self.filter.with_bitmap(|bm| {
            let mut still_zero = Vec::new();
            for run in &zero_runs {
                bm.unset_subruns(*run, &mut still_zero);
            }
            still_zero
        });
        at.zero_runs.extend(first.discarded);
        merge_runs(&mut at.zero_runs);
        at.fill_runs.extend(first.filled);
        Ok(())
    }

    /// Opens one connection; with the destination's answer whether the
    /// migration may switch to postcopy.
    async fn connect(
        &self,
        dest: SocketAddr,
        hello: Hello,
    ) -> Result<(Channel, bool), MigrateError> {
        let what = format!("connecting to {dest} ({:?} channel)", hello.role);
        let mut s = crate::transport::connect(
            dest,
            self.scheme,
            self.tls.as_deref(),
            Some(&self.ram),
            self.timeout(),
            &what,
        )
        .await?;
        s.tune(self.timeout())
            .map_err(MigrateError::io(what.clone()))?;
        write_message(&mut s, &Message::Hello(hello), &what, self.timeout()).await?;
        match expect_message(&mut s, &format!("{what}: hello answer"), self.timeout()).await? {
            Message::HelloAck { postcopy } => Ok((s, postcopy)),
            Message::Error(e) => Err(MigrateError::Peer(e)),
            other => Err(MigrateError::Unexpected(format!(
                "{what}: expected hello ack, got {:?}",
                other.kind()
            ))),
        }
    }

    async fn open_channels(&self, dest: SocketAddr, at: &mut Attempt) -> Result<(), MigrateError> {
        let session_id = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ ((std::process::id() as u64) << 32);
        at.session_id = session_id;
        let (control, postcopy) = self
            .connect(dest, self.hello(session_id, ChannelRole::Control, false))
            .await?;
        if self.params.mode.may_postcopy() && !postcopy {
            if self.params.mode == MigrationMode::Postcopy {
                return Err(MigrateError::Postcopy(
                    "the destination accepted the migration without postcopy".into(),
                ));
            }
            tracing::warn!(
                "the destination cannot serve postcopy (its log says why): this hybrid migration stays precopy"
            );
            at.mode = MigrationMode::Precopy;
        }
        let urgent = at.mode.may_postcopy();
        (at.bulk, at.urgent) = self
            .open_data_channels(dest, session_id, false, urgent)
            .await?;
        at.control = Some(ControlChannel::new(control));
        Ok(())
    }

    /// The hello of every connection of session `session_id`; `resume`:
    /// reconnecting a postcopy whose link broke.
    fn hello(&self, session_id: u64, role: ChannelRole, resume: bool) -> Hello {
        Hello {
            session_id,
            role,
            bulk_channels: self.params.bulk_channels,
            peer_timeout_s: self.params.peer_timeout_s as u32,
            regions: region_descs(&self.ram),
            postcopy: resume || self.params.mode.may_postcopy(),
            postcopy_required: resume || self.params.mode == MigrationMode::Postcopy,
            resume,
        }
    }

    /// Opens the bulk channels of session `session_id`, then the urgent
    /// one if `urgent`.
    async fn open_data_channels(
        &self,
        dest: SocketAddr,
        session_id: u64,
        resume: bool,
        urgent: bool,
    ) -> Result<(Vec<Channel>, Option<Channel>), MigrateError> {
        let mut bulk = Vec::new();
        for i in 0..self.params.bulk_channels {
            let hello = self.hello(session_id, ChannelRole::Bulk(i), resume);
            bulk.push(self.connect(dest, hello).await?.0);
        }
        let urgent = if urgent {
            let hello = self.hello(session_id, ChannelRole::Urgent, resume);
            let s = self.connect(dest, hello).await?.0;
            s.mark_urgent();
            Some(s)
        } else {
            None
        };
        Ok((bulk, urgent))
    }

    /// Live rounds until the rest fits in the downtime target (or the
    /// round limit is reached); `true` when a hybrid migration should
    /// switch to postcopy instead (the estimate stopped shrinking, the
    /// round limit, or the operator's word).
    async fn live_rounds(&mut self, at: &mut Attempt) -> Result<bool, MigrateError> {
        loop {
            at.round += 1;
            self.phase.set_round(at.round);
            hit("src.round-start")?;
            check_control(at)?;
            let t = Instant::now();
            let zero_runs = std::mem::take(&mut at.zero_runs);
            let watch = self.watch_hints_during_round(at.round);
            let counters = self.send_round(at, zero_runs).await;
            if let Some(w) = watch {
                w.abort();
            }
            let counters = counters?;
            // Measured once the link has delivered the round, so the
            // bandwidth and the downtime estimate count no bytes still
            // queued in the sockets.
            let secs = t.elapsed().as_secs_f64();
            let bytes = counters.bytes.load(Ordering::Relaxed);
            add_counters(&mut at.stats, &counters);
            if bytes >= 4 << 20 || at.bandwidth_bytes_per_s == 0.0 {
                let bw = bytes as f64 / secs.max(1e-6);
                at.bandwidth_bytes_per_s = at.bandwidth_bytes_per_s.max(bw);
                at.stats.peak_bandwidth_mib_per_s =
                    at.stats.peak_bandwidth_mib_per_s.max(bw / 1048576.0);
            }
            hit("src.before-sync")?;
            let report = self.sync(true, &mut at.stats)?;
            // Merged: a guest that reports block after block side by side
            // leaves one run, not one per report, to the convergence test.
            at.zero_runs = report.discarded;
            merge_runs(&mut at.zero_runs);
            at.fill_runs.extend(report.filled);
            let left = self.filter.bytes_to_send();
            let estimate_ms = left as f64 / at.bandwidth_bytes_per_s.max(1.0) * 1000.0;
            tracing::info!(
                round = at.round,
                round_bytes = bytes,
                round_ms = (secs * 1000.0) as u64,
                left_bytes = left,
                estimate_ms = estimate_ms as u64,
                "round done"
            );
            self.progress
                .round_done(at.stats.bytes_on_wire, at.bandwidth_bytes_per_s);
            // Pages the guest reported free during the round go out as
            // zero runs the receiver punches out of its RAM file: many of
            // them get one more live round rather than the downtime.
            let converged = estimate_ms <= self.params.downtime_target_ms as f64
                && at.zero_runs.len() + at.fill_runs.len() <= MAX_ZERO_RUNS_AT_SWITCHOVER
                && at.round >= self.params.min_rounds;
            let mut to_postcopy = false;
            if at.mode == MigrationMode::Hybrid && !converged {
                if estimate_ms < at.best_estimate_ms * 0.9 {
                    at.best_estimate_ms = estimate_ms;
                    at.stalled_rounds = 0;
                } else {
                    at.stalled_rounds += 1;
                }
                to_postcopy = self.postcopy_now.load(Ordering::Relaxed)
                    || at.round + 1 >= self.params.max_rounds
                    || (at.round >= self.params.min_rounds
                        && at.stalled_rounds >= HYBRID_STALLED_ROUNDS);
                if to_postcopy {
                    tracing::info!(
                        round = at.round,
                        estimate_ms = estimate_ms as u64,
                        best_estimate_ms = at.best_estimate_ms as u64,
                        "precopy does not converge: switching to postcopy"
                    );
                }
            }
            if converged || to_postcopy || at.round + 1 >= self.params.max_rounds {
                // What the sockets still hold would otherwise cross the
                // link during the downtime (up to 16 MiB a channel: 130 ms
                // at 1 Gbit/s). The guest runs meanwhile; what it writes
                // goes in the final round.
                at.stats.drain_wait_ms =
                    drain_bulk(&at.bulk, at.bandwidth_bytes_per_s, self.timeout()).await;
                return Ok(to_postcopy);
            }
        }
    }

    /// Refuses, while the VM still runs, a device state too large to move.
    fn check_device_state_size(&self) -> Result<(), MigrateError> {
        if let Some(bytes) = self.vmm.device_state_estimate_bytes()? {
            if bytes > MAX_DEVICE_STATE_BYTES {
                return Err(MigrateError::DeviceStateTooLarge {
                    bytes,
                    max_bytes: MAX_DEVICE_STATE_BYTES,
                });
            }
        }
        Ok(())
    }

    /// While round `round` runs with a hint round open, watches whether the
    /// guest's hints pay (see [`watch_hint_payoff`]); `None` when no hint
    /// round is open.
    fn watch_hints_during_round(&self, round: u32) -> Option<tokio::task::JoinHandle<()>> {
        let src = self.hint_source.clone()?;
        if !self.hints_paying.load(Ordering::Relaxed) || self.filter.open_epoch().is_none() {
            return None;
        }
        let page_bytes = self.ram.regions().first().map_or(4096, |r| r.page_bytes());
        Some(tokio::spawn(watch_hint_payoff(
            self.filter.clone(),
            src,
            page_bytes,
            round,
            self.hints_paying.clone(),
        )))
    }

    /// Tells the destination, stops the hint round (while the guest still
    /// runs to see it; hints racing the stop fall to the epoch the final
    /// sync closes), and stops the VM.
    async fn stop_vm(&mut self, at: &mut Attempt) -> Result<(), MigrateError> {
        check_control(at)?;
        let t = self.timeout();
        let control = at.control.as_mut().expect("channels are open");
        at.stats.bytes_on_wire += control
            .send(&Message::Stopping, "control channel", t)
            .await?;
        if let Some(src) = &self.hint_source {
            if let Err(e) = src.stop_round() {
                tracing::warn!("could not stop the hint round: {}", ErrorChain(&e));
            }
        }
        let stop_at = Instant::now();
        at.stop_at = Some(stop_at);
        // Set first: a stop that fails half-way is still undone.
        at.vm_stopped = true;
        self.vmm.stop()?;
        at.stats.downtime_breakdown.stop_us = stop_at.elapsed().as_micros() as u64;
        self.phase.enter(Phase::Stopped);
        Ok(())
    }

    /// A sync with the guest still running, just before the stop for the
    /// switch to postcopy. Re-protecting the pages the guest wrote since
    /// the last sync is the dear part of a sync (12 ms for the 1.4 GiB a
    /// pure postcopy of a 2 GiB guest harvests at the stop); done here, the
    /// stopped sync only has the last milliseconds' writes left. It closes
    /// the hint epoch: a hint from here on is stale, as it would be after
    /// the stop. Precopy does not need it: its final round sends whatever
    /// the stopped sync finds, and its live rounds already keep that small.
    fn sync_before_switch(&mut self, at: &mut Attempt) -> Result<(), MigrateError> {
        let report = self.sync(false, &mut at.stats)?;
        at.zero_runs.extend(report.discarded);
        merge_runs(&mut at.zero_runs);
        at.fill_runs.extend(report.filled);
        Ok(())
    }

    /// The last sync, with the VM stopped, opening the last round; the
    /// zero runs that round sends.
    fn stopped_sync(&mut self, at: &mut Attempt) -> Result<Vec<PageRun>, MigrateError> {
        let report = self.sync(false, &mut at.stats)?;
        let mut zero_runs = std::mem::take(&mut at.zero_runs);
        zero_runs.extend(report.discarded);
        merge_runs(&mut zero_runs);
        at.fill_runs.extend(report.filled);
        at.round += 1;
        self.phase.set_round(at.round);
        Ok(zero_runs)
    }

    /// The final sync and round, with the VM stopped; closes the bulk
    /// channels.
    async fn final_round(&mut self, at: &mut Attempt) -> Result<(), MigrateError> {
        let started = Instant::now();
        let zero_runs = self.stopped_sync(at)?;
        let counters = self.send_round(at, zero_runs).await?;
        at.stats.final_round_bytes = counters.bytes.load(Ordering::Relaxed);
        add_counters(&mut at.stats, &counters);
        self.progress
            .round_done(at.stats.bytes_on_wire, at.bandwidth_bytes_per_s);
        close_bulk(std::mem::take(&mut at.bulk), self.timeout()).await?;
        at.stats.downtime_breakdown.final_round_us = started.elapsed().as_micros() as u64;
        Ok(())
    }

    /// The switch to postcopy, with the VM stopped: the final sync, the
    /// zero runs it leaves (one round, which keeps the bulk channels open),
    /// then the list of pages still to send, and the urgent channel starts
    /// answering requests.
    async fn switch_round(&mut self, at: &mut Attempt) -> Result<(), MigrateError> {
        let started = Instant::now();
        let zero_runs = self.stopped_sync(at)?;
        // Every page still to send leaves the bitmap: from here on it is
        // sent once, on whichever channel takes it first.
        let runs = self.filter.with_bitmap(|bm| {
            let mut cursor = Cursor::default();
            let mut runs = Vec::new();
            while bm.take_set(&mut cursor, u64::MAX, &mut runs) > 0 {}
            runs
        });
        let pending = Arc::new(PageSet::for_ram(&self.ram));
        for run in &runs {
            pending.insert(*run);
        }
        let counters = self.send_round(at, zero_runs).await?;
        add_counters(&mut at.stats, &counters);
        let t = self.timeout();
        let control = at.control.as_mut().expect("channels are open");
        at.stats.bytes_on_wire += send_pending_list(control, &runs, t).await?;
        at.stats.postcopy.switched = true;
        at.stats.postcopy.postcopy_pending_pages = pending.remaining();
        tracing::info!(
            pending_pages = pending.remaining(),
            runs = runs.len(),
            "switching to postcopy"
        );
        let src = PostcopySource {
            ram: self.ram.clone(),
            pending,
            hint: Arc::new(StreamHint::default()),
            counters: Arc::new(SourceCounters::default()),
            timeout: t,
            session: 0,
        };
        let urgent = at
            .urgent
            .take()
            .ok_or_else(|| MigrateError::Postcopy("no urgent channel was opened".into()))?;
        at.links = Links::of(
            std::iter::once(&urgent)
                .chain(at.bulk.iter())
                .chain(at.control.as_ref().map(|c| c.channel())),
        );
        let tasks = src.spawn_urgent(urgent)?;
        at.postcopy = Some((src, tasks));
        at.stats.downtime_breakdown.final_round_us = started.elapsed().as_micros() as u64;
        Ok(())
    }

    /// After the commit, with the guest running on the destination: streams
    /// every pending page while requests are answered first, then waits for
    /// the destination to confirm it has placed them all. The source VM
    /// stays paused throughout: it holds the only copy of those pages. A
    /// broken link does not end it: the source reconnects and goes on with
    /// the pages the destination still lacks (see [`Self::reconnect`]).
    async fn run_postcopy(&mut self, at: &mut Attempt) -> Result<(), MigrateError> {
        let started = Instant::now();
        let (mut src, mut tasks) = at.postcopy.take().expect("checked by the caller");
        let mut bulk = std::mem::take(&mut at.bulk);
        let report = loop {
            match self.postcopy_session(at, &src, &mut tasks, bulk).await {
                Ok(report) => break report,
                // Only the destination's explicit refusal, or the operator,
                // ends a postcopy here: after anything else (a broken link
                // most often) a new session may still bring the guest its
                // pages, and this side holds the only copy of them.
                Err(e) if !matches!(e, MigrateError::Peer(_) | MigrateError::Cancelled) => {
                    // Every task of the old session ends on its cut socket;
                    // the destination sees the cut too.
                    at.links.cut();
                    tasks.abort_all();
                    self.phase.enter(Phase::PostcopyPaused);
                    at.stats.postcopy.postcopy_reconnects += 1;
                    tracing::warn!(
                        "postcopy: the link broke ({}); the guest waits on the destination for pages only this side holds: reconnecting",
                        ErrorChain(&e)
                    );
                    let (pending, new_bulk, urgent) = self.reconnect(at).await?;
                    // Pages counted as sent (taken from the pending set)
                    // that the destination still lacks go again.
                    at.stats.postcopy.pages_resent +=
                        pending.remaining().saturating_sub(src.pending.remaining());
                    src.pending = pending;
                    src.session += 1;
                    tasks = src.spawn_urgent(urgent)?;
                    bulk = new_bulk;
                    self.phase.enter(Phase::Postcopy);
                }
                Err(e) => return Err(e),
            }
        };
        let c = src.counters.clone();
        tasks.abort_all();
        let st = &mut at.stats;
        st.bytes_on_wire += c.bytes.load(Ordering::Relaxed);
        let pc = &mut st.postcopy;
        pc.pages_requested = c.pages_requested.load(Ordering::Relaxed);
        pc.pages_read_ahead = c.pages_read_ahead.load(Ordering::Relaxed);
        pc.pages_streamed = c.pages_streamed.load(Ordering::Relaxed);
        pc.take_faults(&report);
        pc.postcopy_ms = started.elapsed().as_millis() as u64;
        st.pages_sent += c.data_pages.load(Ordering::Relaxed);
        st.pages_zero += c.zero_pages.load(Ordering::Relaxed);
        st.total_time_ms = at.started.elapsed().as_millis() as u64;
        if report.pages_placed != st.postcopy.postcopy_pending_pages {
            return Err(MigrateError::Postcopy(format!(
                "the destination placed {} of {} pending pages",
                report.pages_placed, st.postcopy.postcopy_pending_pages
            )));
        }
        Ok(())
    }

    /// One postcopy session: streams the pending pages (requests are served
    /// by `tasks` meanwhile), ends the bulk channels, says
    /// `PostcopyComplete` and returns the destination's.
    async fn postcopy_session(
        &self,
        at: &mut Attempt,
        src: &PostcopySource,
        tasks: &mut JoinSet<Result<(), MigrateError>>,
        bulk: Vec<Channel>,
    ) -> Result<freehint_wire::PostcopyReport, MigrateError> {
        let stream = src.clone().stream_pending(bulk, self.params.batch_bytes);
        tokio::pin!(stream);
        let bulk = tokio::select! {
            r = &mut stream => r?,
            Some(done) = tasks.join_next(), if !tasks.is_empty() => return Err(match done {
                Ok(Ok(())) => MigrateError::Disconnected(
                    "the destination closed the urgent channel during postcopy".into()),
                Ok(Err(e)) => e,
                Err(j) => MigrateError::Panic(j.to_string()),
            }),
        };
        let t = self.timeout();
        crate::postcopy::source::close_bulk(bulk, t).await?;
        let c = &src.counters;
        let sent = freehint_wire::PostcopyReport {
            pages_placed: c.pages_requested.load(Ordering::Relaxed)
                + c.pages_read_ahead.load(Ordering::Relaxed)
                + c.pages_streamed.load(Ordering::Relaxed),
            ..Default::default()
        };
        let control = at.control.as_mut().expect("channels are open");
        at.stats.bytes_on_wire += control
            .send(&Message::PostcopyComplete(sent), "ending postcopy", t)
            .await?;
        loop {
            tokio::select! {
                m = control.expect(t, "the destination to place the last pages") => match m? {
                    Message::PostcopyComplete(r) => return Ok(r),
                    Message::Error(e) => return Err(MigrateError::Peer(e)),
                    other => return Err(MigrateError::Unexpected(format!(
                        "expected the destination's PostcopyComplete, got {:?}", other.kind()))),
                },
                Some(done) = tasks.join_next(), if !tasks.is_empty() => match done {
                    // The destination may close the urgent channel once it
                    // has every page.
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(e),
                    Err(j) => return Err(MigrateError::Panic(j.to_string())),
                },
            }
        }
    }

    /// After the link of a postcopy broke: reconnects with backoff for
    /// `postcopy_recovery_s`, then waits for the operator's `freehint
    /// migrate --resume` and tries again, for as long as it takes (the
    /// source never gives the guest up on its own; only a cancel, the
    /// daemon being stopped, ends the wait). Returns the pages the
    /// destination still lacks and the new bulk and urgent channels; the
    /// new control channel is in `at`.
    async fn reconnect(&self, at: &mut Attempt) -> Result<PostcopyChannels, MigrateError> {
        let window = Duration::from_secs(self.params.postcopy_recovery_s);
        let mut deadline = Instant::now() + window;
        let mut delay = Duration::from_millis(100);
        let operator = self.postcopy_resume.clone();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let tried = match hit("src.postcopy-reconnect") {
                Ok(()) => self.resume_session(at).await,
                Err(e) => Err(e),
            };
            match tried {
                Ok(channels) => {
                    tracing::info!(
                        attempt,
                        dest = %at.dest,
                        pages_lacking = channels.0.remaining(),
                        "postcopy: reconnected"
                    );
                    return Ok(channels);
                }
                // The destination answered and refused: it holds no
                // postcopy of this session to resume.
                Err(e @ MigrateError::Peer(_)) => return Err(e),
                Err(e) => tracing::warn!(
                    attempt,
                    "postcopy: reconnecting to {}: {}",
                    at.dest,
                    ErrorChain(&e)
                ),
            }
            let wait = if Instant::now() >= deadline {
                tracing::error!(
                    "postcopy: no link to {} for {} s; the guest waits on the destination for pages only this side holds. Once the link is back, run `freehint migrate --resume` (with --to ADDRESS if the destination moved); never resume it on this side",
                    at.dest,
                    window.as_secs()
                );
                deadline = Instant::now() + window;
                delay = Duration::from_millis(100);
                None
            } else {
                let d = delay;
                delay = (delay * 2).min(Duration::from_secs(2));
                Some(d)
            };
            tokio::select! {
                _ = self.cancel.cancelled() => return Err(MigrateError::Cancelled),
                to = operator.wait() => if let Some(to) = to {
                    at.dest = to;
                },
                _ = tokio::time::sleep(wait.unwrap_or(Duration::from_secs(3600))), if wait.is_some() => {}
            }
        }
    }

    /// One attempt to resume a postcopy: a control channel (the destination
    /// answers with the pages it still lacks), then the bulk and urgent
    /// channels.
    async fn resume_session(&self, at: &mut Attempt) -> Result<PostcopyChannels, MigrateError> {
        let t = self.timeout();
        let (session_id, dest) = (at.session_id, at.dest);
        let (control, _) = self
            .connect(dest, self.hello(session_id, ChannelRole::Control, true))
            .await?;
        let mut control = ControlChannel::new(control);
        let pending = Arc::new(PageSet::for_ram(&self.ram));
        loop {
            match control
                .expect(t, "the pages the destination still lacks")
                .await?
            {
                Message::PostcopyPending(runs) => {
                    for r in runs {
                        if !pending.insert(r) {
                            return Err(MigrateError::Unexpected(format!(
                                "the destination lacks {r:?}, outside guest RAM"
                            )));
                        }
                    }
                }
                Message::PostcopySwitch { pending_pages }
                    if pending_pages == pending.remaining() =>
                {
                    break
                }
                Message::PostcopySwitch { pending_pages } => {
                    return Err(MigrateError::Unexpected(format!(
                        "the destination counts {pending_pages} pages lacking, but lists {}",
                        pending.remaining()
                    )))
                }
                Message::Error(e) => return Err(MigrateError::Peer(e)),
                other => {
                    return Err(MigrateError::Unexpected(format!(
                        "expected the pages the destination lacks, got {:?}",
                        other.kind()
                    )))
                }
            }
        }
        let (bulk, urgent) = self
            .open_data_channels(dest, session_id, true, true)
            .await?;
        let urgent = urgent.expect("asked for");
        at.links = Links::of(
            std::iter::once(control.channel())
                .chain(bulk.iter())
                .chain(std::iter::once(&urgent)),
        );
        at.control = Some(control);
        Ok((pending, bulk, urgent))
    }

    /// Takes the device state and sends it, then `Complete`.
    async fn send_device_state(&mut self, at: &mut Attempt) -> Result<(), MigrateError> {
        let started = Instant::now();
        let state = self.vmm.device_state()?;
        at.stats.downtime_breakdown.device_state_save_us = started.elapsed().as_micros() as u64;
        let sending = Instant::now();
        if state.len() as u64 > MAX_DEVICE_STATE_BYTES {
            return Err(MigrateError::DeviceStateTooLarge {
                bytes: state.len() as u64,
                max_bytes: MAX_DEVICE_STATE_BYTES,
            });
        }
        check_control(at)?;
        let encoding = device_state_encoding(state.len() as u64, at.bandwidth_bytes_per_s);
        let wire = encoding
            .encode(&state)
            .map_err(MigrateError::protocol("encoding the device state"))?;
        at.stats.device_state_wire_bytes = wire.len() as u64;
        let t = self.timeout();
        let control = at.control.as_mut().expect("channels are open");
        for chunk in wire.chunks(MAX_CONTROL_PAYLOAD_BYTES as usize) {
            at.stats.bytes_on_wire += control
                .send(
                    &Message::DeviceStateChunk(chunk.to_vec()),
                    "sending device state",
                    t,
                )
                .await?;
        }
        at.stats.device_state_bytes = state.len() as u64;
        at.stats.bytes_on_wire += control
            .send(
                &Message::Complete {
                    rounds: at.round,
                    device_state_bytes: state.len() as u64,
                    device_state_encoding: encoding,
                    last_cmd_id: self.filter.last_cmd_id().0,
                },
                "sending completion",
                t,
            )
            .await?;
        at.stats.downtime_breakdown.device_state_send_us = sending.elapsed().as_micros() as u64;
        self.phase.enter(Phase::HandingOver);
        Ok(())
    }

    async fn await_ready(&mut self, at: &mut Attempt) -> Result<(), MigrateError> {
        let started = Instant::now();
        let t = self.timeout();
        let control = at.control.as_mut().expect("channels are open");
        match control
            .expect(t, "the destination to load the guest (Ready)")
            .await?
        {
            Message::Ready => {
                at.stats.downtime_breakdown.load_us = started.elapsed().as_micros() as u64;
                self.phase.enter(Phase::Ready);
                Ok(())
            }
            Message::Error(e) => Err(MigrateError::Peer(e)),
            other => Err(MigrateError::Unexpected(format!(
                "expected the destination's Ready, got {:?}",
                other.kind()
            ))),
        }
    }

    /// Commits and waits for the destination's confirmation. An explicit
    /// refusal (the destination gave up before acting on the commit, and
    /// never resumes its copy) is [`MigrateError::Peer`]; anything else
    /// leaves the outcome uncertain.
    async fn commit(&mut self, at: &mut Attempt) -> Result<(), MigrateError> {
        self.phase.enter(Phase::Committed);
        let started = Instant::now();
        let t = self.timeout();
        let control = at.control.as_mut().expect("channels are open");
        at.stats.bytes_on_wire += control
            .send(&Message::Commit, "sending the commit", t)
            .await?;
        hit("src.after-commit")?;
        match control
            .expect(t, "the destination to resume the guest")
            .await?
        {
            Message::Resumed => {}
            Message::Error(e) => return Err(MigrateError::Peer(e)),
            other => {
                return Err(MigrateError::Unexpected(format!(
                    "expected the destination's Resumed, got {:?}",
                    other.kind()
                )))
            }
        }
        at.stats.downtime_breakdown.resume_us = started.elapsed().as_micros() as u64;
        at.stats.downtime_ms = at.stop_at.map_or(0, |s| s.elapsed().as_millis() as u64);
        at.stats.total_time_ms = at.started.elapsed().as_millis() as u64;
        Ok(())
    }

    /// After a failure before the commit: tells the destination, resumes the
    /// VM if we stopped it, and sends the guest DONE (it holds the blocks
    /// it hinted until then).
    async fn fail_back(&mut self, mut at: Attempt, e: MigrateError) -> MigrationFailure {
        tracing::warn!("migration failed: {}; failing back", ErrorChain(&e));
        if let Some(c) = at.control.as_mut() {
            // Best effort, and quick: the peer may be what failed.
            let _ = c
                .send(
                    &Message::Error(ErrorChain(&e).to_string()),
                    "control",
                    Duration::from_secs(2),
                )
                .await;
        }
        let mut error = e;
        let mut source_running = true;
        if at.vm_stopped {
            match self.vmm.resume() {
                Ok(()) => tracing::info!("source VM resumed"),
                Err(re) => {
                    tracing::error!("resuming the source VM failed: {}", ErrorChain(&re));
                    error = MigrateError::ResumeFailed {
                        failure: Box::new(error),
                        source: re,
                    };
                    source_running = false;
                }
            }
        }
        if let Some(src) = &self.hint_source {
            if let Err(e) = src.finish() {
                tracing::warn!(
                    "could not tell the guest that migration is over (DONE): {}",
                    ErrorChain(&e)
                );
            }
        }
        self.phase.enter(Phase::Failed);
        let stats = self.outcome(at, Phase::Failed, source_running, Some(false));
        MigrationFailure { error, stats }
    }

    fn uncertain(&mut self, at: Attempt, e: MigrateError) -> MigrationFailure {
        tracing::error!(
            "after the commit: {}; the source VM stays paused, the destination may run the guest",
            ErrorChain(&e)
        );
        self.phase.enter(Phase::Uncertain);
        let stats = self.outcome(at, Phase::Uncertain, false, None);
        MigrationFailure { error: e, stats }
    }

    fn outcome(
        &self,
        at: Attempt,
        state: Phase,
        source_running: bool,
        destination_running: Option<bool>,
    ) -> MigrationStats {
        let mut stats = at.stats;
        if stats.total_time_ms == 0 {
            stats.total_time_ms = at.started.elapsed().as_millis() as u64;
        }
        stats.rounds = at.round;
        let h = self.filter.stats();
        stats.pages_skipped_free = h.pages_skipped_free;
        stats.pages_skipped_reported = h.pages_skipped_reported;
        stats.hinted_bytes = h.hinted_bytes;
        stats.hint_ranges_dropped_stale = h.hint_ranges_dropped_stale;
        stats.hint_ranges_rejected_invalid = h.hint_ranges_rejected_invalid;
        if let Some(src) = self.hint_source.as_ref().filter(|_| self.params.hints) {
            stats.hint_source = Some(src.name().to_string());
            stats.hint_report_ms = at.first_hint_round.and_then(|id| src.report_ms(id));
            stats.hint_guest_errors = src.guest_errors();
        }
        stats.sync_mean_us /= stats.syncs.max(1) as u64;
        stats.state = state;
        stats.source_running = source_running;
        stats.destination_running = destination_running;
        self.progress.finished(&stats);
        stats
    }

    /// Sends one round over every bulk channel, then a round-end barrier on
    /// each. The channel tasks are aborted if this future is dropped.
    async fn send_round(
        &self,
        at: &mut Attempt,
        zero_runs: Vec<PageRun>,
    ) -> Result<Arc<RoundCounters>, MigrateError> {
        let cursor = Arc::new(Mutex::new(Cursor::default()));
        let counters = Arc::new(RoundCounters::default());
        let live = counters.clone();
        self.progress
            .round_started(at.stats.bytes_on_wire, move || {
                live.bytes.load(Ordering::Relaxed)
            });
        let mut zero_runs = Some(zero_runs);
        let mut fill_runs = Some(std::mem::take(&mut at.fill_runs));
        let mut tasks = JoinSet::new();
        for (i, stream) in std::mem::take(&mut at.bulk).into_iter().enumerate() {
            let job = ChannelJob {
                ram: self.ram.clone(),
                filter: self.filter.clone(),
                cursor: cursor.clone(),
                counters: counters.clone(),
                batch_bytes: self.params.batch_bytes,
                round: at.round,
                zero_runs: if i == 0 {
                    zero_runs.take().unwrap_or_default()
                } else {
                    Vec::new()
                },
                fill_runs: if i == 0 {
                    fill_runs.take().unwrap_or_default()
                } else {
                    Vec::new()
                },
                timeout: self.timeout(),
                context: format!("bulk channel {i}"),
            };
            tasks.spawn(async move { (i, job.run(stream).await) });
        }
        at.bulk = join_channels(tasks).await?;
        Ok(counters)
    }
}

/// Below this link rate the device state is compressed: its ~60% saving on
/// a QEMU guest's state (about 200 KB) takes longer to send than zstd's
/// fastest level takes to compress (0.6 ms for 340 KB). Pure postcopy has
/// no measured rate and compresses.
const COMPRESS_DEVICE_STATE_BELOW_BYTES_PER_S: f64 = 300e6;

/// Smaller device states go raw: there is too little to save.
const COMPRESS_DEVICE_STATE_FROM_BYTES: u64 = 64 << 10;

/// How to send a device state of `state_bytes` over a link measured at
/// `bandwidth_bytes_per_s` (0: not measured).
fn device_state_encoding(state_bytes: u64, bandwidth_bytes_per_s: f64) -> DeviceStateEncoding {
    if state_bytes >= COMPRESS_DEVICE_STATE_FROM_BYTES
        && bandwidth_bytes_per_s < COMPRESS_DEVICE_STATE_BELOW_BYTES_PER_S
    {
        DeviceStateEncoding::Zstd
    } else {
        DeviceStateEncoding::Raw
    }
}

/// Waits for every channel task (each ends with its index and its stream
/// back); the streams in index order, or the first error.
pub(crate) async fn join_channels(
    mut tasks: JoinSet<(usize, Result<Channel, MigrateError>)>,
) -> Result<Vec<Channel>, MigrateError> {
    let mut streams: Vec<Option<Channel>> = Vec::new();
    let mut first_err = None;
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok((i, Ok(s))) => {
                if streams.len() <= i {
                    streams.resize_with(i + 1, || None);
                }
                streams[i] = Some(s);
            }
            Ok((_, Err(e))) => {
                first_err.get_or_insert(e);
            }
            Err(join) if join.is_panic() => {
                first_err.get_or_insert(MigrateError::Panic(panic_text(&*join.into_panic())));
            }
            Err(join) => {
                first_err.get_or_insert(MigrateError::Unexpected(format!(
                    "bulk channel task failed: {join}"
                )));
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(streams.into_iter().flatten().collect()),
    }
}

/// Closes the bulk channels (the receiver reads their end), each within `t`.
async fn close_bulk(bulk: Vec<Channel>, t: Duration) -> Result<(), MigrateError> {
    for mut b in bulk {
        match tokio::time::timeout(t, b.shutdown()).await {
            Ok(r) => r.map_err(MigrateError::io("closing a bulk channel"))?,
            Err(_) => {
                return Err(MigrateError::Timeout {
                    what: "closing a bulk channel".into(),
                    seconds: t.as_secs(),
                })
            }
        }
    }
    Ok(())
}

fn add_counters(stats: &mut MigrationStats, c: &RoundCounters) {
    stats.bytes_on_wire += c.bytes.load(Ordering::Relaxed);
    stats.pages_sent += c.pages_sent.load(Ordering::Relaxed);
    stats.pages_zero += c.pages_zero.load(Ordering::Relaxed);
    stats.pages_filled += c.pages_filled.load(Ordering::Relaxed);
}

/// Fails if the destination reported an error or went away.
fn check_control(at: &mut Attempt) -> Result<(), MigrateError> {
    let Some(c) = at.control.as_mut() else {
        return Ok(());
    };
    match c.try_next()? {
        None => Ok(()),
        Some(Message::Error(e)) => Err(MigrateError::Peer(e)),
        Some(other) => Err(MigrateError::Unexpected(format!(
            "destination sent {:?} in the middle of the migration",
            other.kind()
        ))),
    }
}

/// Below this many bytes left in the bulk sockets, a round counts as
/// delivered (about 2 ms at 1 Gbit/s).
const DRAINED_BYTES: u64 = 256 << 10;

/// Waits until the bulk sockets have delivered what they hold (down to
/// [`DRAINED_BYTES`]), for at most four times as long as that takes at
/// `bandwidth_bytes_per_s` (and 100 ms more, at most `max`); the ms waited.
/// A socket whose
/// queue cannot be read counts as drained: this only shortens the
/// downtime, it never decides correctness.
async fn drain_bulk(bulk: &[Channel], bandwidth_bytes_per_s: f64, max: Duration) -> u64 {
    let queued = || -> u64 { bulk.iter().map(Channel::unacknowledged_bytes).sum() };
    let started = Instant::now();
    let first = queued();
    if first <= DRAINED_BYTES {
        return 0;
    }
    let expected_s = first as f64 / bandwidth_bytes_per_s.max(1.0);
    let limit = (Duration::from_secs_f64((expected_s * 4.0).min(60.0))
        + Duration::from_millis(100))
    .min(max);
    while started.elapsed() < limit && queued() > DRAINED_BYTES {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    started.elapsed().as_millis() as u64
}

/// What one bulk channel does in one round.
struct ChannelJob {
    ram: Arc<GuestRam>,
    filter: Arc<HintFilter>,
    cursor: Arc<Mutex<Cursor>>,
    counters: Arc<RoundCounters>,
    batch_bytes: u64,
    round: u32,
    zero_runs: Vec<PageRun>,
    fill_runs: Vec<(PageRun, u8)>,
    timeout: Duration,
    context: String,
}

impl ChannelJob {
    async fn run(self, mut stream: Channel) -> Result<Channel, MigrateError> {
        let ctx = self.context.as_str();
        for z in &self.zero_runs {
            let n = write_message(&mut stream, &Message::Zero(*z), ctx, self.timeout).await?;
            self.counters.bytes.fetch_add(n, Ordering::Relaxed);
            self.counters
                .pages_zero
                .fetch_add(z.count, Ordering::Relaxed);
        }
        for &(run, byte) in &self.fill_runs {
            let n =
                write_message(&mut stream, &Message::Fill { run, byte }, ctx, self.timeout).await?;
            self.counters.bytes.fetch_add(n, Ordering::Relaxed);
            self.counters
                .pages_filled
                .fetch_add(run.count, Ordering::Relaxed);
        }
        let mut claimed: Vec<PageRun> = Vec::new();
        // Reused batch after batch: no allocation per batch.
        let mut writer = BatchWriter::default();
        let mut batches = 0u64;
        loop {
            claimed.clear();
            let n = {
                let mut c = self.cursor.lock().unwrap_or_else(|e| e.into_inner());
                self.filter.claim(&mut c, self.batch_bytes, &mut claimed)
            };
            let Some(region_idx) = claimed.first().map(|run| run.region) else {
                break;
            };
            let sent = writer
                .write(&stream, &self.ram, region_idx, &claimed, self.timeout, ctx)
                .await?;
            debug_assert_eq!(sent.pages, n);
            self.counters.bytes.fetch_add(sent.bytes, Ordering::Relaxed);
            self.counters
                .pages_sent
                .fetch_add(sent.data_pages, Ordering::Relaxed);
            self.counters
                .pages_zero
                .fetch_add(sent.pages - sent.data_pages, Ordering::Relaxed);
            batches += 1;
            if batches == 1 {
                hit("src.mid-round")?;
            }
        }
        let n = write_message(
            &mut stream,
            &Message::RoundEnd { round: self.round },
            ctx,
            self.timeout,
        )
        .await?;
        self.counters.bytes.fetch_add(n, Ordering::Relaxed);
        Ok(stream)
    }
}

/// What one page batch carried.
pub(crate) struct BatchSent {
    /// Bytes on the wire, head included.
    pub(crate) bytes: u64,
    /// Pages in the batch (data and zero).
    pub(crate) pages: u64,
    /// Pages sent with their data.
    pub(crate) data_pages: u64,
}

/// Writes page batches, reusing its buffers from one batch to the next.
#[derive(Default)]
pub(crate) struct BatchWriter {
    head: PageBatchHead,
    head_buf: Vec<u8>,
    iovs: IoVecs,
    /// Plaintext on its way into TLS (unused on plain TCP).
    bounce: Vec<u8>,
    /// (address, length) of runs of data pages in the mapping.
    spans: Vec<(usize, usize)>,
}

impl BatchWriter {
    /// Sends `runs` (all of region `region_idx`) as one batch on `stream`:
    /// zero pages as zero entries, the others straight from the mapping.
    pub(crate) async fn write(
        &mut self,
        stream: &Channel,
        ram: &GuestRam,
        region_idx: usize,
        runs: &[PageRun],
        timeout: Duration,
        ctx: &str,
    ) -> Result<BatchSent, MigrateError> {
        let region = &ram.regions()[region_idx];
        let page_bytes = region.page_bytes() as usize;
        self.head.reset(region_idx);
        // Map each run for reading with one call (no fault per page),
        // check every page for zero in place, and send the others
        // straight from the mapping: the kernel copies them into the
        // socket, with no copy of ours in between. Guest memory is read
        // only through volatile loads and raw pointers: the guest may
        // write it meanwhile; what we send may then be torn or stale,
        // and the dirty log has the page for the next round.
        self.spans.clear();
        for run in runs {
            region.populate_read(run.first_page, run.count)?;
            for page in run.first_page..run.first_page + run.count {
                let pages = region.volatile_pages(page, 1)?;
                if is_zero_volatile(&pages) {
                    self.head.push_zero(page);
                    continue;
                }
                self.head.push_data(page);
                let addr = pages.ptr_guard().as_ptr() as usize;
                match self.spans.last_mut() {
                    Some((start, len)) if *start + *len == addr => *len += page_bytes,
                    _ => self.spans.push((addr, page_bytes)),
                }
            }
        }
        let filled: usize = self.spans.iter().map(|s| s.1).sum();
        self.head_buf.clear();
        self.head.encode(page_bytes as u64, &mut self.head_buf);
        self.iovs.0.clear();
        self.iovs.0.push(libc::iovec {
            iov_base: self.head_buf.as_mut_ptr().cast(),
            iov_len: self.head_buf.len(),
        });
        for &(addr, len) in &self.spans {
            self.iovs.0.push(libc::iovec {
                iov_base: addr as *mut libc::c_void,
                iov_len: len,
            });
        }
        match tokio::time::timeout(
            timeout,
            stream.write_pages(&mut self.iovs, &mut self.bounce),
        )
        .await
        {
            Ok(r) => r.map_err(MigrateError::io(ctx))?,
            Err(_) => {
                return Err(MigrateError::Timeout {
                    what: format!("{ctx}: the destination to take page data"),
                    seconds: timeout.as_secs(),
                })
            }
        }
        Ok(BatchSent {
            bytes: (self.head_buf.len() + filled) as u64,
            pages: self.head.pages(),
            data_pages: (filled / page_bytes) as u64,
        })
    }
}

/// Pure postcopy waits at least this long for the guest's free-page report
/// before the switch (while the guest still runs on the source; the wait
/// ends sooner once hints slow down, see [`wait_for_report`]).
const POSTCOPY_HINT_WAIT_MS: u64 = 5_000;

/// Hybrid: rounds in a row whose downtime estimate did not fall by a tenth
/// below the best so far, after which precopy counts as not converging.
const HYBRID_STALLED_ROUNDS: u32 = 2;

/// Most zero runs (pages discarded by free page reporting since the last
/// sync) left for the stopped round; with more, one more live round goes
/// first. Measured: 62464 reported pages in the final round cost a real
/// guest about 70 ms of downtime (docs/BENCHMARKS.md).
const MAX_ZERO_RUNS_AT_SWITCHOVER: usize = 64;

/// The sender stops waiting for the guest's free-page report once hints
/// take pages off the send list slower than this: from then on, waiting
/// longer saves fewer bytes than the same time spent sending. Hints that
/// come later still apply, since pages are claimed from the live bitmap.
/// (The tail of a report, fragmented free memory, trickles in; and hints
/// for memory never written, holes in the RAM file, save nothing.)
const HINT_RATE_FLOOR_BYTES_PER_S: u64 = 512 << 20;

/// The window over which the hint rate is measured, from the first hint on.
const HINT_RATE_WINDOW_MS: u64 = 100;

/// How long a postcopy waits for the first hint of a guest that cannot say
/// when its report ends (it may have nothing to report).
const FIRST_HINT_WAIT_MS: u64 = 1_000;

/// Hinted bytes after which [`watch_hint_payoff`] judges a hint round.
const HINT_PAYOFF_SAMPLE_BYTES: u64 = 32 << 20;

/// A hint round pays while at least this share (1/N) of the memory it
/// hints was on the send list.
const HINT_PAYOFF_MIN_SHARE: u64 = 8;

/// Watches the open hint round while a live round sends: once the guest
/// has hinted [`HINT_PAYOFF_SAMPLE_BYTES`] more and less than
/// 1/[`HINT_PAYOFF_MIN_SHARE`] of it was memory still to send, the report
/// is stopped and no more hint rounds are opened (`paying` is cleared).
///
/// Why: a guest that hints its free memory also works for it (Linux with
/// `init_on_alloc=1`, Debian's default, zeroes every block it takes to
/// hint, which costs it CPU and makes the host back memory that was a
/// hole), and hints for holes, memory never written or already sent save
/// nothing. Hints must never cost the migration time.
async fn watch_hint_payoff(
    filter: Arc<HintFilter>,
    src: Arc<dyn HintSource>,
    page_bytes: u64,
    round: u32,
    paying: Arc<AtomicBool>,
) {
    let start = filter.stats();
    loop {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let now = filter.stats();
        let hinted = now.hinted_bytes - start.hinted_bytes;
        if hinted < HINT_PAYOFF_SAMPLE_BYTES {
            continue;
        }
        let saved = (now.pages_skipped_free - start.pages_skipped_free) * page_bytes;
        if saved.saturating_mul(HINT_PAYOFF_MIN_SHARE) < hinted {
            paying.store(false, Ordering::Relaxed);
            tracing::info!(
                round,
                hinted_bytes = hinted,
                saved_bytes = saved,
                "free-page hints do not pay (the guest hints memory that is not to be sent): no more hint rounds"
            );
            if let Err(e) = src.stop_round() {
                tracing::warn!("could not stop the hint round: {}", ErrorChain(&e));
            }
        }
        return;
    }
}

/// Waits until the guest has finished its free-page report for round `id`,
/// its hints (once they have started) take pages off the send list slower
/// than [`HINT_RATE_FLOOR_BYTES_PER_S`], or `max_ms` passed; returns the
/// time waited. `progress` reads (bytes hinted, bytes hints took off the
/// send list) so far. A source that cannot tell when its report ends is not
/// waited for, unless `unknown_end`: then it is waited for as long as its
/// hints pay, and for at most [`FIRST_HINT_WAIT_MS`] for the first one.
async fn wait_for_report(
    src: &dyn HintSource,
    id: CmdId,
    max_ms: u64,
    unknown_end: bool,
    progress: impl Fn() -> (u64, u64),
) -> u64 {
    let t = Instant::now();
    let window = Duration::from_millis(HINT_RATE_WINDOW_MS);
    let floor = HINT_RATE_FLOOR_BYTES_PER_S * HINT_RATE_WINDOW_MS / 1000;
    // (start, saved bytes at start) of the current window, once hints came.
    let mut current: Option<(Instant, u64)> = None;
    while t.elapsed() < Duration::from_millis(max_ms) {
        match src.round_reported(id) {
            Some(true) => break,
            None if !unknown_end => break,
            None | Some(false) => {
                let (hinted, saved) = progress();
                match current {
                    None if hinted > 0 => current = Some((Instant::now(), saved)),
                    None if src.round_reported(id).is_none()
                        && t.elapsed() >= Duration::from_millis(FIRST_HINT_WAIT_MS) =>
                    {
                        break
                    }
                    Some((start, at_start)) if start.elapsed() >= window => {
                        if saved - at_start < floor {
                            tracing::info!(
                                waited_ms = t.elapsed().as_millis() as u64,
                                saved_bytes = saved,
                                "free-page hints slowed down; sending"
                            );
                            break;
                        }
                        current = Some((Instant::now(), saved));
                    }
                    _ => {}
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    }
    let waited = t.elapsed().as_millis() as u64;
    if src.round_reported(id) == Some(false) {
        tracing::info!(
            waited_ms = waited,
            "the guest has not finished its free-page report; sending (later hints still apply)"
        );
    }
    waited
}

#[cfg(test)]
mod tests {
    use super::*;
    use freehint_types::{HintSourceError, RamRange};

    #[test]
    fn device_state_is_compressed_on_slow_or_unmeasured_links_only() {
        use DeviceStateEncoding::{Raw, Zstd};
        let qemu = 340_000;
        assert_eq!(device_state_encoding(qemu, 117e6), Zstd); // 1 Gbit/s
        assert_eq!(device_state_encoding(qemu, 0.0), Zstd); // pure postcopy
        assert_eq!(device_state_encoding(qemu, 1.1e9), Raw); // 10 Gbit/s
        assert_eq!(device_state_encoding(4096, 117e6), Raw);
    }

    /// A guest whose report is never done (`Some(false)`), always done
    /// (`Some(true)`), or that cannot say (`None`, the simulated VM).
    struct Reporting(Option<bool>);

    impl HintSource for Reporting {
        fn start_round(&self, _: CmdId) -> Result<(), HintSourceError> {
            Ok(())
        }
        fn stop_round(&self) -> Result<(), HintSourceError> {
            Ok(())
        }
        fn finish(&self) -> Result<(), HintSourceError> {
            Ok(())
        }
        fn round_reported(&self, _: CmdId) -> Option<bool> {
            self.0
        }

        fn name(&self) -> &'static str {
            "test"
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
    }

    const OPEN: Reporting = Reporting(Some(false));
    const UNKNOWING: Reporting = Reporting(None);

    #[test]
    fn a_finished_report_ends_the_wait_at_once() {
        let waited = runtime().block_on(wait_for_report(
            &Reporting(Some(true)),
            CmdId(2),
            5000,
            false,
            || (0, 0),
        ));
        assert!(waited < 100, "{waited}");
    }

    #[test]
    fn without_any_hint_the_wait_lasts_until_its_cap() {
        // No hint yet is not "hints slowed down": the guest may be slow to
        // start.
        let waited = runtime().block_on(wait_for_report(&OPEN, CmdId(2), 300, false, || (0, 0)));
        assert!((300..2000).contains(&waited), "{waited}");
    }

    #[test]
    fn the_wait_ends_soon_after_hints_slow_below_the_floor() {
        // 1 GiB/s of pages taken off the send list for 400 ms, then nothing.
        let t = Instant::now();
        let progress = move || {
            let ms = (t.elapsed().as_millis() as u64).min(400);
            (ms << 20, ms << 20)
        };
        let waited = runtime().block_on(wait_for_report(&OPEN, CmdId(2), 10_000, false, progress));
        assert!((400..2000).contains(&waited), "{waited}");
    }

    #[test]
    fn hints_that_save_nothing_do_not_hold_the_sender() {
        // Hints arrive (for holes) but take nothing off the send list.
        let t = Instant::now();
        let progress = move || (t.elapsed().as_millis() as u64 + 1, 0);
        let waited = runtime().block_on(wait_for_report(&OPEN, CmdId(2), 10_000, false, progress));
        assert!(waited < 2000, "{waited}");
    }

    #[test]
    fn a_report_of_unknown_end_is_waited_for_only_in_postcopy_while_it_pays() {
        let rt = runtime();
        // Precopy: not at all.
        let waited = rt.block_on(wait_for_report(&UNKNOWING, CmdId(2), 5000, false, || {
            (1, 1)
        }));
        assert!(waited < 100, "{waited}");
        // Postcopy, no hint at all: the first-hint limit.
        let waited = rt.block_on(wait_for_report(&UNKNOWING, CmdId(2), 5000, true, || (0, 0)));
        assert!((FIRST_HINT_WAIT_MS..2000).contains(&waited), "{waited}");
        // Postcopy, 1 GiB/s of hints for 400 ms, then nothing.
        let t = Instant::now();
        let progress = move || {
            let ms = (t.elapsed().as_millis() as u64).min(400);
            (ms << 20, ms << 20)
        };
        let waited = rt.block_on(wait_for_report(
            &UNKNOWING,
            CmdId(2),
            10_000,
            true,
            progress,
        ));
        assert!((400..2000).contains(&waited), "{waited}");
    }

    /// A guest whose report can be told to stop, counting the stops.
    #[derive(Default)]
    struct Stoppable {
        stops: AtomicU64,
    }

    impl HintSource for Stoppable {
        fn start_round(&self, _: CmdId) -> Result<(), HintSourceError> {
            Ok(())
        }
        fn stop_round(&self) -> Result<(), HintSourceError> {
            self.stops.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        fn finish(&self) -> Result<(), HintSourceError> {
            Ok(())
        }
        fn round_reported(&self, _: CmdId) -> Option<bool> {
            Some(false)
        }

        fn name(&self) -> &'static str {
            "test"
        }
    }

    /// A filter over 64 MiB of 4 KiB pages whose first `to_send` pages are
    /// to be sent, with an epoch open.
    fn filter_with_open_epoch(to_send: u64) -> (Arc<HintFilter>, CmdId) {
        use freehint_hint_filter::{MigrationBitmap, RegionLayout};
        let mut bm = MigrationBitmap::new(vec![RegionLayout {
            ram_start: 0,
            page_bytes: 4096,
            pages: 16384,
        }]);
        bm.set_run(PageRun::new(0, 0, to_send));
        let filter = Arc::new(HintFilter::new(bm));
        let epoch = filter
            .sync(true, |_| Ok::<(), ()>(()))
            .unwrap()
            .opened_epoch
            .unwrap();
        (filter, epoch)
    }

    /// Runs the watch while `hint` hints the filter's memory in 4 MiB
    /// blocks from `first_block` on; returns (still paying, stops asked).
    fn watch_while_hinting(filter: Arc<HintFilter>, epoch: CmdId, first_block: u64) -> (bool, u64) {
        let src = Arc::new(Stoppable::default());
        let paying = Arc::new(AtomicBool::new(true));
        runtime().block_on(async {
            let watch = tokio::spawn(watch_hint_payoff(
                filter.clone(),
                src.clone(),
                4096,
                1,
                paying.clone(),
            ));
            for block in first_block..16 {
                filter.apply_hints(epoch, &[RamRange::new(block << 22, 4 << 20)]);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            tokio::time::timeout(Duration::from_secs(5), watch)
                .await
                .expect("the watch judges once enough is hinted")
                .unwrap();
        });
        (
            paying.load(Ordering::Relaxed),
            src.stops.load(Ordering::Relaxed),
        )
    }

    #[test]
    fn hints_for_memory_not_to_be_sent_stop_the_report_and_later_rounds() {
        // Only the first 4 MiB are to be sent; the guest hints the rest.
        let (filter, epoch) = filter_with_open_epoch(1024);
        assert_eq!(watch_while_hinting(filter, epoch, 1), (false, 1));
    }

    #[test]
    fn hints_that_take_pages_off_the_send_list_go_on() {
        // All 64 MiB are to be sent: every hint saves what it covers.
        let (filter, epoch) = filter_with_open_epoch(16384);
        assert_eq!(watch_while_hinting(filter, epoch, 0), (true, 0));
    }
}
