//! The receiving side: accepts one migration, places its pages, and takes
//! the guest over only when the source commits.
//!
//! The destination never resumes its copy of the guest before the source's
//! `Commit` (see [`crate::Phase`]). Giving up before `Ready` leaves it
//! [`Phase::Failed`]; losing the source between `Ready` and the commit — or
//! after the source said it stops its VM — leaves it [`Phase::Uncertain`]:
//! the guest may be paused on both sides and the operator decides.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use freehint_memory::GuestRam;
use freehint_types::{DestinationVmm, ErrorChain, PageRun};
use freehint_wire::{BatchEntry, ChannelRole, Frame, Hello, Message, MAX_DEVICE_STATE_BYTES};
use serde::{Deserialize, Serialize};
use tokio::io::BufReader;
use tokio::net::TcpListener;

use crate::transport::{read_into_pages, Channel, Listener, TlsConfig};
use tokio::sync::Barrier;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::error::{cancellable, caught, panic_text};
use crate::fault::hit;
use crate::io::{
    expect_message_within, read_exact, read_frame, write_message, ControlChannel, RawPages,
};
use crate::page_set::PageSet;
use crate::params::MAX_BULK_CHANNELS;
use crate::phase::{Phase, PhaseWatch, Side};
use crate::postcopy::destination::{send_requests, PostcopyDestination};
use crate::postcopy::queue::PlacedReporter;
use crate::postcopy::{send_pending_list, Links};
use crate::{region_descs, MigrateError, PostcopyStats};

/// What the receiver measured, and how the migration ended for it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReceiveStats {
    /// What carried the migration's connections.
    #[serde(default)]
    pub transport: crate::TransportKind,
    /// Bytes read from all sockets.
    pub bytes_received: u64,
    /// Pages written with data from the source.
    pub pages_placed: u64,
    /// Pages the source declared zero.
    pub pages_zero: u64,
    /// Pages the source declared filled with one byte (a poisoning
    /// guest's free pages).
    #[serde(default)]
    pub pages_filled: u64,
    /// Rounds received, the final one included.
    pub rounds: u32,
    /// Bytes of device state loaded.
    pub device_state_bytes: u64,
    /// The source's last free-page-hint cmd_id (the VM's counter goes on
    /// from it here), once `Complete` arrived.
    pub last_cmd_id: Option<u32>,
    /// From the first connection to resuming the VM.
    pub total_time_ms: u64,
    /// How it ended: `completed`, `failed` or `uncertain`.
    pub state: Phase,
    /// Whether this side resumed the guest.
    pub destination_running: bool,
    /// Whether this side holds the whole guest (paused or running): it got
    /// every page and loaded the device state.
    pub guest_complete: bool,
    /// Whether this side holds the whole guest paused and may resume it on
    /// the operator's word (an uncertain handover in which it refused
    /// nothing).
    pub guest_held_paused: bool,
    /// Postcopy's figures, if the source switched to it.
    #[serde(flatten)]
    pub postcopy: PostcopyStats,
}

/// An incoming migration that did not complete, and where it left the
/// guest (`stats.state`).
#[derive(Debug)]
pub struct ReceiveFailure {
    /// What went wrong.
    pub error: MigrateError,
    /// What was measured, and the outcome: [`Phase::Failed`] (this side
    /// never ran the guest) or [`Phase::Uncertain`].
    pub stats: ReceiveStats,
}

impl std::fmt::Display for ReceiveFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.stats.destination_running {
            // Resumed here in postcopy: the guest's newest state is here,
            // and the source's copy is stale.
            return write!(
                f,
                "{}; the guest was resumed here in postcopy and waits for pages that only the source holds: do not resume the source (its copy is stale)",
                ErrorChain(&self.error),
            );
        }
        match (self.stats.state, self.stats.guest_held_paused) {
            (Phase::Uncertain, true) => write!(
                f,
                "{}; outcome uncertain: this side holds the guest paused and the source may have committed or may still hold it paused; resume it on exactly one side",
                ErrorChain(&self.error)
            ),
            (Phase::Uncertain, false) => write!(
                f,
                "{}; the guest was not resumed here and never will be, and the source may hold it paused: resume it on the source",
                ErrorChain(&self.error)
            ),
            _ => write!(f, "{}; the guest was not resumed here", ErrorChain(&self.error)),
        }
    }
}

impl std::error::Error for ReceiveFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// Pages of the destination's RAM that hold data (so that a zero record for
/// them must clear them), shared by the bulk channels.
fn written_pages(ram: &GuestRam) -> Result<PageSet, MigrateError> {
    let written = PageSet::for_ram(ram);
    for (idx, r) in ram.regions().iter().enumerate() {
        for range in r.data_page_ranges()? {
            written.insert(PageRun::new(idx, range.start, range.end - range.start));
        }
    }
    Ok(written)
}

/// Accepts one migration into `ram`.
pub struct Receiver {
    ram: Arc<GuestRam>,
    vmm: Arc<dyn DestinationVmm>,
    accept_timeout: Option<Duration>,
    preallocate: bool,
    written: Option<Arc<PageSet>>,
    phase: PhaseWatch,
    cancel: CancellationToken,
    /// TLS for every connection; `None`: plain TCP.
    tls: Option<Arc<TlsConfig>>,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("phase", &self.phase)
            .finish_non_exhaustive()
    }
}

/// What every bulk channel task shares.
#[derive(Clone)]
struct BulkCtx {
    /// Read page data straight into the mapping (its pages are populated,
    /// so this costs no faults); otherwise read into a buffer and `pwrite`.
    direct: bool,
    ram: Arc<GuestRam>,
    written: Arc<PageSet>,
    barrier: Arc<Barrier>,
    bytes: Arc<AtomicU64>,
    pages_placed: Arc<AtomicU64>,
    pages_zero: Arc<AtomicU64>,
    pages_filled: Arc<AtomicU64>,
    /// Milliseconds since the start at which the source last sent anything.
    last_progress_ms: Arc<AtomicU64>,
    started: Instant,
    /// The last round each channel completed.
    rounds_done: Arc<Vec<AtomicU32>>,
    /// Set once the source switched to postcopy and every channel has
    /// completed its last round: pages are then placed through the VMM's
    /// userfaultfd, never written through our mapping.
    postcopy: Arc<OnceLock<Arc<PostcopyDestination>>>,
    /// The peer timeout, for what this side writes on a bulk channel
    /// (postcopy's reports of placed pages).
    timeout: Duration,
}

impl BulkCtx {
    fn progress(&self) {
        self.last_progress_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// One incoming migration between its phases.
struct Incoming {
    stats: ReceiveStats,
    started: Instant,
    control: Option<ControlChannel>,
    timeout: Duration,
    /// The source said it stops its VM.
    source_stopping: bool,
    /// `resume` was called on the VM (it may run even if it failed).
    resume_attempted: bool,
    resumed: bool,
    bulk_tasks: JoinSet<Result<u32, MigrateError>>,
    ctx: Option<BulkCtx>,
    urgent: Option<Channel>,
    /// Pages still to come, once the source said it switches to postcopy.
    pending: Option<Arc<PageSet>>,
    postcopy: Option<Postcopy>,
    /// The session id every connection of this migration carries.
    session_id: u64,
    /// Duplicates of the sockets (postcopy), to cut them all when one
    /// breaks.
    links: Links,
}

/// A postcopy under way on the destination.
struct Postcopy {
    dest: Arc<PostcopyDestination>,
    tasks: JoinSet<Result<(), MigrateError>>,
    resumed_at: Option<Instant>,
}

impl Receiver {
    /// A receiver that places pages into `ram` and hands the VM to `vmm`.
    /// `accept_timeout` bounds the wait for a source to connect (`None`:
    /// wait as long as it takes); once connected, the source's own timeout
    /// bounds every wait.
    pub fn new(
        ram: Arc<GuestRam>,
        vmm: Arc<dyn DestinationVmm>,
        accept_timeout: Option<Duration>,
    ) -> Self {
        Self {
            ram,
            vmm,
            accept_timeout,
            preallocate: false,
            written: None,
            phase: PhaseWatch::new(Side::Destination),
            cancel: CancellationToken::new(),
            tls: None,
        }
    }

    /// Accepts only TLS connections whose certificate chains to the CA of
    /// `tls` (see [`crate::tls`]); any other connection is refused with a
    /// log line, before a byte of it is read as a frame, and the wait goes
    /// on. `None`, the default: plain TCP, which anyone who can reach the
    /// port can use to write guest RAM.
    pub fn with_tls(mut self, tls: Option<Arc<TlsConfig>>) -> Self {
        self.tls = tls;
        self
    }

    /// Allocate all of the destination's RAM before the source connects
    /// (like QEMU's `-mem-prealloc`), so that placing pages costs no
    /// allocation during the migration.
    pub fn preallocate(mut self, yes: bool) -> Self {
        self.preallocate = yes;
        self
    }

    /// The migration's phase, for whoever watches it.
    pub fn phase_watch(&self) -> PhaseWatch {
        self.phase.clone()
    }

    /// A token that cancels the migration: before the commit the receiver
    /// gives up (and never resumes the guest); after it, it does nothing.
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Uses `token` to cancel the migration (one the caller made before
    /// the receiver existed, so that no cancel can fall between the two).
    pub fn with_cancel_token(mut self, token: CancellationToken) -> Self {
        self.cancel = token;
        self
    }

    /// Surveys the destination RAM and preallocates it if asked to, before
    /// any source connects; [`Self::receive`] does it itself otherwise.
    pub fn prepare(&mut self) -> Result<(), MigrateError> {
        self.written = Some(Self::survey(&self.ram, self.preallocate)?);
        Ok(())
    }

    /// Which pages hold data before anything arrives (a zero record for
    /// them must clear them); taken before preallocation, which only adds
    /// zero pages.
    fn survey(ram: &GuestRam, preallocate: bool) -> Result<Arc<PageSet>, MigrateError> {
        let written = Arc::new(written_pages(ram)?);
        if preallocate {
            for r in ram.regions() {
                r.preallocate()?;
            }
        }
        Ok(written)
    }

    /// Accepts connections on the TCP `listener` until one migration has
    /// completed or failed. The VM is resumed only after the source's
    /// commit.
    pub async fn receive(&self, listener: &TcpListener) -> Result<ReceiveStats, ReceiveFailure> {
        self.receive_on(&Listener::Tcp(listener)).await
    }

    /// [`Self::receive`] on any [`Listener`] (TCP or RDMA).
    pub async fn receive_on(
        &self,
        listener: &Listener<'_>,
    ) -> Result<ReceiveStats, ReceiveFailure> {
        let mut inc = Incoming {
            stats: ReceiveStats {
                transport: if self.tls.is_some() {
                    crate::TransportKind::Tls
                } else {
                    crate::TransportKind::Tcp
                },
                ..Default::default()
            },
            started: Instant::now(),
            control: None,
            timeout: self.accept_timeout.unwrap_or(Duration::from_secs(30)),
            source_stopping: false,
            resume_attempted: false,
            resumed: false,
            bulk_tasks: JoinSet::new(),
            ctx: None,
            urgent: None,
            pending: None,
            postcopy: None,
            session_id: 0,
            links: Links::default(),
        };
        let cancel = self.cancel.clone();
        if let Err(e) = cancellable(&cancel, self.until_commit(listener, &mut inc)).await {
            return Err(self.give_up(inc, e).await);
        }
        let after = caught(self.take_over(&mut inc, listener)).await;
        inc.stats.total_time_ms = inc.started.elapsed().as_millis() as u64;
        inc.stats.destination_running = inc.resumed;
        match after {
            Ok(()) => {
                self.phase.enter(Phase::Completed);
                inc.stats.state = Phase::Completed;
                Ok(inc.stats)
            }
            Err(e)
                if inc.resumed
                    && inc
                        .postcopy
                        .as_ref()
                        .is_some_and(|pc| pc.dest.remaining() > 0) =>
            {
                // The guest runs here but lacks pages only the source has:
                // its vCPUs wait on their faults (the registration stays,
                // so no fault is ever filled with zeros), and the source
                // keeps its copy.
                tracing::error!(
                    "postcopy broke with {} pages still to come: {}; the guest waits on its faults here, the source holds the missing pages",
                    inc.postcopy.as_ref().map_or(0, |pc| pc.dest.remaining()),
                    ErrorChain(&e)
                );
                self.phase.enter(Phase::Uncertain);
                inc.stats.state = Phase::Uncertain;
                Err(ReceiveFailure {
                    error: e,
                    stats: inc.stats,
                })
            }
            Err(e) if inc.resumed => {
                // The guest runs here: the migration is done, whatever
                // failed after that.
                tracing::warn!("after resuming the guest: {}", ErrorChain(&e));
                self.phase.enter(Phase::Completed);
                inc.stats.state = Phase::Completed;
                Ok(inc.stats)
            }
            Err(e) if !inc.resume_attempted => {
                // Nothing was done with the commit yet: refuse it for good,
                // and the source resumes its copy.
                Err(self.give_up(inc, e).await)
            }
            Err(e) => {
                // Resuming failed: the VM may or may not run. Say nothing
                // the source could take for a refusal; the operator decides.
                tracing::error!(
                    "resuming the guest after the source's commit failed: {}; it may be paused here", ErrorChain(&e));
                self.phase.enter(Phase::Uncertain);
                inc.stats.state = Phase::Uncertain;
                inc.stats.guest_held_paused = true;
                Err(ReceiveFailure {
                    error: e,
                    stats: inc.stats,
                })
            }
        }
    }

    /// Everything up to the source's commit.
    async fn until_commit(
        &self,
        listener: &Listener<'_>,
        inc: &mut Incoming,
    ) -> Result<(), MigrateError> {
        let written = match &self.written {
            Some(w) => w.clone(),
            None => Self::survey(&self.ram, self.preallocate)?,
        };
        let local = region_descs(&self.ram);
        // The control channel comes first, then the bulk channels it
        // announces, all with the same session id.
        let (control, hello) = self.accept_control(listener, &local).await?;
        inc.stats.transport = control.kind();
        inc.started = Instant::now();
        inc.session_id = hello.session_id;
        if hello.postcopy {
            inc.links.add(&control);
        }
        inc.timeout = Duration::from_secs(hello.peer_timeout_s.into());
        inc.control = Some(ControlChannel::new(control));
        let (bulk, urgent) = self
            .accept_bulk(listener, &hello, &local, inc.timeout)
            .await?;
        if hello.postcopy {
            for s in bulk.iter().chain(urgent.iter()) {
                inc.links.add(s);
            }
        }
        inc.urgent = urgent;
        self.phase.enter(Phase::Precopy);
        hit("dst.accepted")?;
        let ctx = BulkCtx {
            direct: self.preallocate,
            ram: self.ram.clone(),
            written,
            barrier: Arc::new(Barrier::new(bulk.len())),
            bytes: Arc::new(AtomicU64::new(0)),
            pages_placed: Arc::new(AtomicU64::new(0)),
            pages_zero: Arc::new(AtomicU64::new(0)),
            pages_filled: Arc::new(AtomicU64::new(0)),
            last_progress_ms: Arc::new(AtomicU64::new(0)),
            started: inc.started,
            rounds_done: Arc::new((0..bulk.len()).map(|_| AtomicU32::new(0)).collect()),
            postcopy: Arc::new(OnceLock::new()),
            timeout: inc.timeout,
        };
        let mut tasks = JoinSet::new();
        for (i, s) in bulk.into_iter().enumerate() {
            tasks.spawn(receive_bulk(
                i,
                BufReader::with_capacity(256 << 10, s),
                ctx.clone(),
            ));
        }
        let result = self.receive_pages(inc, &mut tasks, &ctx).await;
        inc.bulk_tasks = tasks;
        inc.ctx = Some(ctx.clone());
        inc.stats.bytes_received = ctx.bytes.load(Ordering::Relaxed);
        inc.stats.pages_placed = ctx.pages_placed.load(Ordering::Relaxed);
        inc.stats.pages_zero = ctx.pages_zero.load(Ordering::Relaxed);
        inc.stats.pages_filled = ctx.pages_filled.load(Ordering::Relaxed);
        let device_state = result?;
        if inc.pending.is_some() {
            self.start_postcopy(inc, &ctx)?;
        }
        hit("dst.before-load")?;
        self.vmm.load_device_state(&device_state, inc.timeout)?;
        inc.stats.device_state_bytes = device_state.len() as u64;
        inc.stats.guest_complete = true;
        hit("dst.after-load")?;
        let control = inc.control.as_mut().expect("accepted above");
        control
            .send(&Message::Ready, "control channel", inc.timeout)
            .await?;
        self.phase.enter(Phase::Ready);
        hit("dst.after-ready")?;
        let control = inc.control.as_mut().expect("accepted above");
        match control.expect(inc.timeout, "the source's commit").await? {
            Message::Commit => Ok(()),
            Message::Error(e) => Err(MigrateError::Peer(e)),
            other => Err(MigrateError::Unexpected(format!(
                "expected the source's commit, got {:?}",
                other.kind()
            ))),
        }
    }

    /// Places pages until the source's `Complete`; returns the device state.
    async fn receive_pages(
        &self,
        inc: &mut Incoming,
        tasks: &mut JoinSet<Result<u32, MigrateError>>,
        ctx: &BulkCtx,
    ) -> Result<Vec<u8>, MigrateError> {
        let timeout = inc.timeout;
        let control = inc.control.as_mut().expect("accepted above");
        let mut device_state = Vec::new();
        let mut last_rounds = Vec::new();
        let mut watchdog = tokio::time::interval(Duration::from_millis(500));
        // Control messages arrive only at the end; meanwhile any bulk
        // channel failing ends the migration, and so does a source that
        // sends nothing on any channel for the whole timeout.
        let (rounds, device_state_bytes, device_state_encoding, last_cmd_id) = loop {
            tokio::select! {
                msg = control.next() => {
                    ctx.progress();
                    match msg.transpose()? {
                        Some(Message::Stopping) => {
                            inc.source_stopping = true;
                            self.phase.enter(Phase::Stopped);
                        }
                        Some(Message::DeviceStateChunk(s)) => {
                            if (device_state.len() + s.len()) as u64 > MAX_DEVICE_STATE_BYTES {
                                return Err(MigrateError::DeviceStateTooLarge {
                                    bytes: (device_state.len() + s.len()) as u64,
                                    max_bytes: MAX_DEVICE_STATE_BYTES,
                                });
                            }
                            device_state.extend_from_slice(&s);
                        }
                        Some(Message::Complete {
                            rounds, device_state_bytes, device_state_encoding, last_cmd_id,
                        }) => break (rounds, device_state_bytes, device_state_encoding, last_cmd_id),
                        Some(Message::PostcopyPending(runs)) => {
                            let pending = inc
                                .pending
                                .get_or_insert_with(|| Arc::new(PageSet::for_ram(&self.ram)));
                            if !inc.source_stopping || inc.stats.postcopy.switched {
                                return Err(MigrateError::Unexpected(
                                    "pending pages outside the switch to postcopy".into()));
                            }
                            for run in runs {
                                if !pending.insert(run) {
                                    return Err(MigrateError::Unexpected(format!(
                                        "pending run {run} lies outside guest RAM")));
                                }
                            }
                        }
                        Some(Message::PostcopySwitch { pending_pages }) => {
                            if inc.urgent.is_none() {
                                return Err(MigrateError::Unexpected(
                                    "the source switched to postcopy without an urgent channel".into()));
                            }
                            let have = inc.pending.as_ref().map_or(0, |p| p.remaining());
                            if have != pending_pages || inc.stats.postcopy.switched {
                                return Err(MigrateError::Unexpected(format!(
                                    "the source announced {pending_pages} pending pages and listed {have}")));
                            }
                            inc.pending.get_or_insert_with(|| Arc::new(PageSet::for_ram(&self.ram)));
                            inc.stats.postcopy.switched = true;
                            inc.stats.postcopy.postcopy_pending_pages = pending_pages;
                        }
                        Some(Message::Error(e)) => return Err(MigrateError::Peer(e)),
                        Some(other) => return Err(MigrateError::Unexpected(format!(
                            "control channel: unexpected {:?}", other.kind()))),
                        None => return Err(MigrateError::Disconnected(
                            "source disconnected before completing the migration".into())),
                    }
                }
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    // A channel ended before completion: fine if it ended
                    // cleanly (the source closes bulk channels before it
                    // sends Complete), fatal otherwise. Its round count is
                    // checked with the others below.
                    last_rounds.push(flatten(done)?);
                }
                _ = watchdog.tick() => {
                    let idle_ms = (ctx.started.elapsed().as_millis() as u64)
                        .saturating_sub(ctx.last_progress_ms.load(Ordering::Relaxed));
                    if idle_ms > timeout.as_millis() as u64 {
                        return Err(MigrateError::Timeout {
                            what: "the source (it sent nothing on any channel)".into(),
                            seconds: timeout.as_secs(),
                        });
                    }
                }
            }
        };
        self.phase.enter(Phase::HandingOver);
        inc.stats.rounds = rounds;
        inc.stats.last_cmd_id = Some(last_cmd_id);
        hit("dst.after-complete")?;
        let device_state = device_state_encoding
            .decode(device_state, device_state_bytes)
            .map_err(MigrateError::protocol("the source's device state"))?;
        if inc.stats.postcopy.switched {
            // The bulk channels stay open for postcopy: wait until each has
            // placed the last round (the switch round).
            let deadline = Instant::now() + timeout;
            while ctx
                .rounds_done
                .iter()
                .any(|r| r.load(Ordering::Acquire) < rounds)
            {
                if let Some(done) = tasks.try_join_next() {
                    last_rounds.push(flatten(done)?);
                    return Err(MigrateError::Unexpected(
                        "a bulk channel closed at the switch to postcopy".into(),
                    ));
                }
                if Instant::now() > deadline {
                    return Err(MigrateError::Timeout {
                        what: "bulk channels to finish the switch round".into(),
                        seconds: timeout.as_secs(),
                    });
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            last_rounds.extend(ctx.rounds_done.iter().map(|r| r.load(Ordering::Acquire)));
        }
        if !inc.stats.postcopy.switched {
            while let Some(done) = tokio::time::timeout(timeout, tasks.join_next())
                .await
                .map_err(|_| MigrateError::Timeout {
                    what: "bulk channels to finish".into(),
                    seconds: timeout.as_secs(),
                })?
            {
                last_rounds.push(flatten(done)?);
            }
        }
        if last_rounds.iter().any(|&r| r != rounds) {
            return Err(MigrateError::Unexpected(format!(
                "source completed after {rounds} rounds but bulk channels ended at rounds {last_rounds:?}"
            )));
        }
        Ok(device_state)
    }

    /// After the commit: resumes the guest (from then on the migration is
    /// completed here), then confirms.
    async fn take_over(
        &self,
        inc: &mut Incoming,
        listener: &Listener<'_>,
    ) -> Result<(), MigrateError> {
        self.phase.enter(Phase::Committed);
        hit("dst.after-commit")?;
        inc.resume_attempted = true;
        self.vmm.resume()?;
        inc.resumed = true;
        if let Some(pc) = inc.postcopy.as_mut() {
            // The guest runs here, and pages are still to come.
            pc.resumed_at = Some(Instant::now());
            self.phase.enter(Phase::Postcopy);
        } else {
            // The guest runs here: that is the outcome, whatever happens to
            // the confirmation.
            self.phase.enter(Phase::Completed);
        }
        hit("dst.after-resume")?;
        let control = inc.control.as_mut().expect("accepted above");
        control
            .send(&Message::Resumed, "control channel", inc.timeout)
            .await?;
        if inc.postcopy.is_some() {
            self.finish_postcopy(inc, listener).await?;
        }
        Ok(())
    }

    /// At the switch to postcopy, before the device state loads (which may
    /// touch guest RAM): discards our copies of the pages still to come,
    /// registers the VMM's RAM for missing faults, and starts the fault
    /// thread and the urgent channel.
    fn start_postcopy(&self, inc: &mut Incoming, ctx: &BulkCtx) -> Result<(), MigrateError> {
        let pending = inc.pending.clone().expect("checked by the caller");
        let pid = self.vmm.postcopy_pid().ok_or_else(|| {
            MigrateError::Postcopy(
                "the destination VMM cannot run a guest before all its RAM has arrived".into(),
            )
        })?;
        // Older copies of pages still to come must go: the guest must
        // fault on them. Nothing maps them yet but our mapping.
        for run in pending.runs() {
            discard_written(ctx, run)?;
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let dest = Arc::new(PostcopyDestination::attach(pid, &self.ram, pending, tx)?);
        dest.spawn_fault_thread()
            .map_err(|e| MigrateError::Postcopy(format!("starting the fault thread: {e}")))?;
        let urgent = inc.urgent.take().expect("checked at the switch");
        let mut tasks = JoinSet::new();
        spawn_urgent(&mut tasks, urgent, rx, inc.timeout, ctx, &dest)?;
        if ctx.postcopy.set(dest.clone()).is_err() {
            return Err(MigrateError::Postcopy("postcopy started twice".into()));
        }
        hit("dst.postcopy-started")?;
        inc.postcopy = Some(Postcopy {
            dest,
            tasks,
            resumed_at: None,
        });
        Ok(())
    }

    /// After the resume in postcopy: places pages until every pending one
    /// is, answers the source's `PostcopyComplete` with ours. A broken link
    /// does not end it (see [`Self::await_source_again`]).
    async fn finish_postcopy(
        &self,
        inc: &mut Incoming,
        listener: &Listener<'_>,
    ) -> Result<(), MigrateError> {
        loop {
            match self.postcopy_session(inc).await {
                Ok(()) => break,
                // A broken link, or a source that spoke out of turn: a new
                // session may still bring the pages the guest waits for.
                Err(e)
                    if e.is_link_loss()
                        || matches!(
                            e,
                            MigrateError::Protocol { .. } | MigrateError::Unexpected(_)
                        ) =>
                {
                    self.await_source_again(inc, listener, e).await?
                }
                Err(e) => return Err(e),
            }
        }
        let timeout = inc.timeout;
        let pc = inc.postcopy.as_mut().expect("checked by the caller");
        let control = inc.control.as_mut().expect("accepted above");
        let ctx = inc.ctx.clone().expect("set before the switch");
        pc.dest.finish();
        let report = pc.dest.report();
        let arrived = pc.dest.pages_arrived();
        let st = &mut inc.stats;
        st.postcopy.take_faults(&report);
        st.postcopy.pages_requested = arrived.requested;
        st.postcopy.pages_read_ahead = arrived.read_ahead;
        st.postcopy.pages_streamed = arrived.streamed;
        st.postcopy.postcopy_ms = pc.resumed_at.map_or(0, |t| t.elapsed().as_millis() as u64);
        st.bytes_received = ctx.bytes.load(Ordering::Relaxed);
        control
            .send(
                &Message::PostcopyComplete(report),
                "control channel",
                timeout,
            )
            .await?;
        pc.tasks.abort_all();
        Ok(())
    }

    /// One postcopy session: until the source has said `PostcopyComplete`
    /// and every pending page is placed.
    async fn postcopy_session(&self, inc: &mut Incoming) -> Result<(), MigrateError> {
        let timeout = inc.timeout;
        let pc = inc.postcopy.as_mut().expect("checked by the caller");
        let control = inc.control.as_mut().expect("accepted above");
        let mut source_done = false;
        let mut watchdog = tokio::time::interval(Duration::from_millis(2));
        let ctx = inc.ctx.clone().expect("set before the switch");
        loop {
            if source_done && pc.dest.remaining() == 0 {
                return Ok(());
            }
            if let Some(e) = pc.dest.fault_error() {
                return Err(MigrateError::Postcopy(e));
            }
            tokio::select! {
                msg = control.next() => match msg.transpose()? {
                    Some(Message::PostcopyComplete(_)) => source_done = true,
                    Some(Message::Error(e)) => return Err(MigrateError::Peer(e)),
                    Some(other) => return Err(MigrateError::Unexpected(format!(
                        "control channel in postcopy: unexpected {:?}", other.kind()))),
                    None => return Err(MigrateError::Disconnected(
                        "the source closed the control channel during postcopy".into())),
                },
                Some(done) = pc.tasks.join_next(), if !pc.tasks.is_empty() => {
                    match done {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return Err(e),
                        Err(j) => return Err(MigrateError::Panic(j.to_string())),
                    }
                }
                Some(done) = inc.bulk_tasks.join_next(), if !inc.bulk_tasks.is_empty() => {
                    flatten(done)?;
                }
                _ = watchdog.tick() => {
                    let idle_ms = (ctx.started.elapsed().as_millis() as u64)
                        .saturating_sub(ctx.last_progress_ms.load(Ordering::Relaxed));
                    if idle_ms > timeout.as_millis() as u64 && pc.dest.remaining() > 0 {
                        return Err(MigrateError::Timeout {
                            what: "the source during postcopy (it sent nothing on any channel)".into(),
                            seconds: timeout.as_secs(),
                        });
                    }
                }
            }
        }
    }

    /// The link broke during postcopy: cuts every old connection, waits for
    /// the old session's tasks to end (so that no page of it is placed
    /// after this side has said which pages it lacks), then for the source
    /// to reconnect, for as long as it takes (the guest here cannot go on
    /// without the pages the source holds; only a cancel, the daemon being
    /// stopped, ends the wait), tells it the pages still lacking and starts
    /// the new session's tasks.
    async fn await_source_again(
        &self,
        inc: &mut Incoming,
        listener: &Listener<'_>,
        why: MigrateError,
    ) -> Result<(), MigrateError> {
        self.phase.enter(Phase::PostcopyPaused);
        inc.stats.postcopy.postcopy_reconnects += 1;
        inc.links.cut();
        let timeout = inc.timeout;
        let pc = inc.postcopy.as_mut().expect("checked by the caller");
        let bulk_tasks = &mut inc.bulk_tasks;
        let old = async {
            while pc.tasks.join_next().await.is_some() {}
            while bulk_tasks.join_next().await.is_some() {}
        };
        if tokio::time::timeout(Duration::from_secs(30), old)
            .await
            .is_err()
        {
            return Err(MigrateError::Postcopy(
                "the old connections' tasks did not end after the link broke".into(),
            ));
        }
        tracing::error!(
            pages_lacking = pc.dest.remaining(),
            "postcopy: the link to the source broke ({}); the guest waits here on its faults for pages only the source holds. Waiting for the source to reconnect: restore the link (the source retries, then waits for `freehint migrate --resume`); never resume it on the source",
            ErrorChain(&why)
        );
        let local = region_descs(&self.ram);
        let (control, hello, bulk, urgent) = loop {
            let accepted = tokio::select! {
                _ = self.cancel.cancelled() => return Err(MigrateError::Cancelled),
                r = accept_resume(listener, self.tls.clone(), inc.session_id, &local, timeout) => r,
            };
            let (control, hello) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("postcopy: a reconnect failed: {}", ErrorChain(&e));
                    continue;
                }
            };
            let mut control = ControlChannel::new(control);
            let told = send_pending_list(&mut control, &pc.dest.lacking(), timeout).await;
            if let Err(e) = told {
                tracing::warn!("postcopy: a reconnect failed: {}", ErrorChain(&e));
                continue;
            }
            match self.accept_bulk(listener, &hello, &local, timeout).await {
                Ok((bulk, Some(urgent))) => break (control, hello, bulk, urgent),
                Ok((_, None)) => unreachable!("a resumed postcopy has an urgent channel"),
                Err(e) => tracing::warn!("postcopy: a reconnect failed: {}", ErrorChain(&e)),
            }
        };
        let ctx = inc.ctx.clone().expect("set before the switch");
        inc.links = Links::of(
            std::iter::once(control.channel())
                .chain(bulk.iter())
                .chain(std::iter::once(&urgent)),
        );
        for (i, s) in bulk
            .into_iter()
            .take(hello.bulk_channels as usize)
            .enumerate()
        {
            inc.bulk_tasks.spawn(receive_bulk(
                i,
                BufReader::with_capacity(256 << 10, s),
                ctx.clone(),
            ));
        }
        let rx = pc.dest.restart_requests();
        spawn_urgent(&mut pc.tasks, urgent, rx, timeout, &ctx, &pc.dest)?;
        inc.control = Some(control);
        ctx.progress();
        self.phase.enter(Phase::Postcopy);
        tracing::info!(
            pages_lacking = pc.dest.remaining(),
            "postcopy: the source is back"
        );
        Ok(())
    }

    /// After a failure before this side acted on a commit: never resumes.
    ///
    /// * The source gave up (its `Error`): it runs the guest.
    /// * We failed (a step, a cancel): we refuse for good with `Error`, and
    ///   the source resumes its copy, committed or not; its own `Error` in
    ///   answer confirms it.
    /// * The source went silent or away: if it had stopped its guest (or
    ///   we hold the whole guest), the outcome is uncertain.
    async fn give_up(&self, mut inc: Incoming, e: MigrateError) -> ReceiveFailure {
        let source_aborted = matches!(e, MigrateError::Peer(_));
        let link_lost = e.is_link_loss();
        let mut confirmed = source_aborted;
        if !source_aborted && !link_lost {
            if let Some(c) = inc.control.as_mut() {
                let wait = inc.timeout.min(Duration::from_secs(10));
                if c.send(&Message::Error(ErrorChain(&e).to_string()), "control", wait)
                    .await
                    .is_ok()
                {
                    confirmed = source_answered_error(c, wait).await;
                }
            }
        }
        let source_may_be_paused = inc.source_stopping || inc.stats.guest_complete;
        let state = if confirmed || !source_may_be_paused {
            Phase::Failed
        } else {
            Phase::Uncertain
        };
        // Only a guest this side refused nothing about may be resumed here.
        inc.stats.guest_held_paused =
            state == Phase::Uncertain && link_lost && inc.stats.guest_complete;
        if state == Phase::Uncertain {
            tracing::error!("incoming migration: {}; outcome uncertain", ErrorChain(&e));
        } else {
            tracing::warn!("incoming migration failed: {}", ErrorChain(&e));
        }
        self.phase.enter(state);
        inc.stats.state = state;
        inc.stats.total_time_ms = inc.started.elapsed().as_millis() as u64;
        ReceiveFailure {
            error: e,
            stats: inc.stats,
        }
    }

    async fn accept_control(
        &self,
        listener: &Listener<'_>,
        local: &[freehint_wire::RegionDesc],
    ) -> Result<(Channel, Hello), MigrateError> {
        let timeout = self.accept_timeout.unwrap_or(Duration::from_secs(30));
        let mut hellos = Hellos::new(timeout, self.tls.clone());
        loop {
            let accepted = match self.accept_timeout {
                Some(t) => tokio::time::timeout(t, hellos.next(listener))
                    .await
                    .map_err(|_| MigrateError::Timeout {
                        what: "a source to connect".into(),
                        seconds: t.as_secs(),
                    })?,
                None => hellos.next(listener).await,
            };
            let (mut s, peer, first) =
                accepted.map_err(MigrateError::io("accepting a connection"))?;
            let ctx = format!("hello from {peer}");
            let mut hello = match first {
                Ok(Message::Hello(h)) => h,
                Ok(other) => {
                    reject(
                        &mut s,
                        format!("{ctx}: expected hello, got {:?}", other.kind()),
                    )
                    .await;
                    continue;
                }
                Err(e) => {
                    tracing::warn!("{ctx}: {}; waiting for another source", ErrorChain(&e));
                    reject(&mut s, format!("{ctx}: {}", ErrorChain(&e))).await;
                    continue;
                }
            };
            if hello.role != ChannelRole::Control {
                // A stray bulk channel of an earlier attempt, say.
                reject(
                    &mut s,
                    format!("{ctx}: first connection must be the control channel"),
                )
                .await;
                continue;
            }
            if hello.regions != local {
                return Err(MigrateError::Layout(
                    reject(
                        &mut s,
                        format!(
                            "source has {:?}, destination has {:?}",
                            hello.regions, local
                        ),
                    )
                    .await,
                ));
            }
            if hello.resume {
                reject(
                    &mut s,
                    format!("{ctx}: no postcopy to resume here (this destination waits for a new migration)"),
                )
                .await;
                continue;
            }
            if hello.postcopy {
                let why = if self.preallocate {
                    Some("the destination preallocates its RAM (--preallocate), so no page could fault: use --mode precopy, or receive without preallocation")
                } else if self.vmm.postcopy_pid().is_none() {
                    Some("this destination cannot run the guest before all its RAM has arrived (no VMM process whose faults it can serve): use --mode precopy")
                } else {
                    None
                };
                match why {
                    Some(why) if hello.postcopy_required => {
                        return Err(MigrateError::Postcopy(
                            reject(&mut s, format!("postcopy refused: {why}")).await,
                        ));
                    }
                    Some(why) => {
                        // Hybrid: the migration goes on, in precopy only.
                        tracing::warn!("postcopy not offered to the source: {why}");
                        hello.postcopy = false;
                    }
                    None => {}
                }
            }
            if hello.bulk_channels == 0 {
                return Err(MigrateError::Unexpected(
                    reject(&mut s, "source announced zero bulk channels".into()).await,
                ));
            }
            if hello.bulk_channels > MAX_BULK_CHANNELS {
                let why = format!(
                    "{ctx}: {} bulk channels announced, at most {MAX_BULK_CHANNELS}",
                    hello.bulk_channels
                );
                tracing::warn!("{why}; waiting for another source");
                reject(&mut s, why).await;
                continue;
            }
            let t = Duration::from_secs(hello.peer_timeout_s.into());
            s.tune(t).map_err(MigrateError::io("socket option"))?;
            let ack = Message::HelloAck {
                postcopy: hello.postcopy,
            };
            write_message(&mut s, &ack, &ctx, t).await?;
            return Ok((s, hello));
        }
    }

    /// Accepts the bulk channels `hello` announced, within `timeout`;
    /// connections of other sessions are turned away, not fatal.
    async fn accept_bulk(
        &self,
        listener: &Listener<'_>,
        hello: &Hello,
        local: &[freehint_wire::RegionDesc],
        timeout: Duration,
    ) -> Result<(Vec<Channel>, Option<Channel>), MigrateError> {
        let n = hello.bulk_channels as usize;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut bulk: Vec<Option<Channel>> = (0..n).map(|_| None).collect();
        let mut urgent: Option<Channel> = None;
        let mut hellos = Hellos::new(timeout, self.tls.clone());
        while bulk.iter().any(|b| b.is_none()) || (hello.postcopy && urgent.is_none()) {
            let (mut s, peer, first) = tokio::time::timeout_at(deadline, hellos.next(listener))
                .await
                .map_err(|_| MigrateError::Timeout {
                    what: "the source's bulk channels".into(),
                    seconds: timeout.as_secs(),
                })?
                .map_err(MigrateError::io("accepting a connection"))?;
            let ctx = format!("hello from {peer}");
            let h = match first {
                Ok(Message::Hello(h)) => h,
                Ok(_) | Err(_) => {
                    tracing::warn!("{ctx}: not a hello; turned away");
                    continue;
                }
            };
            if h.session_id != hello.session_id {
                reject(
                    &mut s,
                    format!("{ctx}: connection from another migration session"),
                )
                .await;
                continue;
            }
            if h.regions != local {
                return Err(MigrateError::Layout(
                    reject(
                        &mut s,
                        format!("source has {:?}, destination has {:?}", h.regions, local),
                    )
                    .await,
                ));
            }
            match h.role {
                ChannelRole::Bulk(i) if (i as usize) < n && bulk[i as usize].is_none() => {
                    s.tune(timeout).map_err(MigrateError::io("socket option"))?;
                    let ack = Message::HelloAck {
                        postcopy: hello.postcopy,
                    };
                    write_message(&mut s, &ack, &ctx, timeout).await?;
                    bulk[i as usize] = Some(s);
                }
                ChannelRole::Urgent if hello.postcopy && urgent.is_none() => {
                    s.tune(timeout).map_err(MigrateError::io("socket option"))?;
                    s.mark_urgent();
                    let ack = Message::HelloAck {
                        postcopy: hello.postcopy,
                    };
                    write_message(&mut s, &ack, &ctx, timeout).await?;
                    urgent = Some(s);
                }
                role => {
                    return Err(MigrateError::Unexpected(
                        reject(
                            &mut s,
                            format!(
                                "unexpected {role:?} connection while waiting for bulk channels"
                            ),
                        )
                        .await,
                    ))
                }
            }
        }
        Ok((bulk.into_iter().flatten().collect(), urgent))
    }
}

/// Runs the urgent channel of a postcopy session on its own thread: page
/// requests (`requests`) out, the pages that answer them in.
fn spawn_urgent(
    tasks: &mut JoinSet<Result<(), MigrateError>>,
    urgent: Channel,
    requests: tokio::sync::mpsc::UnboundedReceiver<(usize, u64)>,
    timeout: Duration,
    ctx: &BulkCtx,
    dest: &Arc<PostcopyDestination>,
) -> Result<(), MigrateError> {
    let (ctx, dest) = (ctx.clone(), dest.clone());
    tasks.spawn(crate::postcopy::on_own_thread(
        "postcopy-urgent",
        urgent,
        move |s| async move {
            let (rd, wr) = s.into_split();
            tokio::select! {
                r = send_requests(wr, requests, timeout) => r,
                r = receive_urgent(BufReader::with_capacity(256 << 10, rd), ctx, dest) => r,
            }
        },
    )?);
    Ok(())
}

/// Waits for the source of session `session_id` to reconnect its postcopy:
/// its control channel, with a `resume` hello. Anything else is turned
/// away, and the wait goes on.
async fn accept_resume(
    listener: &Listener<'_>,
    tls: Option<Arc<TlsConfig>>,
    session_id: u64,
    local: &[freehint_wire::RegionDesc],
    timeout: Duration,
) -> Result<(Channel, Hello), MigrateError> {
    // Each connection says hello in a task of its own: one that says
    // nothing holds up no one else.
    let mut hellos = Hellos::new(timeout, tls);
    loop {
        let (mut s, peer, first) = hellos
            .next(listener)
            .await
            .map_err(MigrateError::io("accepting a connection"))?;
        let ctx = format!("hello from {peer}");
        let hello = match first {
            Ok(Message::Hello(h)) => h,
            Ok(_) | Err(_) => {
                tracing::warn!("{ctx}: not a hello; turned away");
                continue;
            }
        };
        if !hello.resume || hello.session_id != session_id || hello.role != ChannelRole::Control {
            reject(
                &mut s,
                format!("{ctx}: this destination waits for the source of its postcopy (session {session_id}) to reconnect; nothing else"),
            )
            .await;
            continue;
        }
        if hello.regions != local {
            reject(&mut s, format!("{ctx}: another guest RAM layout")).await;
            continue;
        }
        s.tune(timeout).map_err(MigrateError::io("socket option"))?;
        write_message(&mut s, &Message::HelloAck { postcopy: true }, &ctx, timeout).await?;
        return Ok((s, hello));
    }
}

/// Reads what the source says after our error, until it says `Error` (it
/// fails back: `true`) or goes away or silent (`false`).
async fn source_answered_error(control: &mut ControlChannel, wait: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, control.next()).await {
            Ok(Some(Ok(Message::Error(_)))) => return true,
            Ok(Some(Ok(_))) => continue,
            _ => return false,
        }
    }
}

/// Most connections whose first frame is awaited at once while a
/// destination accepts; more are closed at once (a flood of silent
/// connections costs a socket each, not the migration).
const MAX_PENDING_HELLOS: usize = 64;

/// Connections accepted on a listener, each reading its first frame in a
/// task of its own: one that connects and says nothing, or says it slowly,
/// holds up no one else while the real source connects.
struct Hellos {
    /// Each connection after its TLS handshake and first frame; `None`:
    /// refused in the handshake (logged there).
    pending: JoinSet<Option<Accepted>>,
    timeout: Duration,
    tls: Option<Arc<TlsConfig>>,
}

/// A connection that has said its first frame (or failed to).
type Accepted = (Channel, std::net::SocketAddr, Result<Message, MigrateError>);

impl Hellos {
    /// Each connection's TLS handshake, and then its first frame, may take
    /// `timeout`; with `tls`, only connections that pass its checks count.
    fn new(timeout: Duration, tls: Option<Arc<TlsConfig>>) -> Self {
        Self {
            pending: JoinSet::new(),
            timeout,
            tls,
        }
    }

    /// The next connection whose first frame has arrived (or failed), in
    /// the order they complete. Connections still waiting are closed when
    /// this is dropped.
    async fn next(&mut self, listener: &Listener<'_>) -> std::io::Result<Accepted> {
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let (incoming, peer) = accepted?;
                    if self.pending.len() >= MAX_PENDING_HELLOS {
                        tracing::warn!(%peer, "{MAX_PENDING_HELLOS} connections already wait to say hello; closed");
                        continue;
                    }
                    let (timeout, tls) = (self.timeout, self.tls.clone());
                    self.pending.spawn(async move {
                        let mut s = match crate::transport::accepted(incoming, tls.as_deref(), timeout).await {
                            Ok(s) => s,
                            Err(e) => {
                                tracing::warn!(
                                    "refused a connection from {peer}: {}",
                                    ErrorChain(&e)
                                );
                                return None;
                            }
                        };
                        let first = expect_message_within(
                            &mut s,
                            &format!("hello from {peer}"),
                            timeout,
                            freehint_wire::MAX_HELLO_PAYLOAD_BYTES,
                        )
                        .await;
                        Some((s, peer, first))
                    });
                }
                Some(done) = self.pending.join_next(), if !self.pending.is_empty() => {
                    if let Ok(Some(v)) = done {
                        return Ok(v);
                    }
                }
            }
        }
    }
}

/// Tells the peer why it is turned away; returns the reason.
async fn reject(s: &mut Channel, why: String) -> String {
    let _ = write_message(
        s,
        &Message::Error(why.clone()),
        "rejecting a connection",
        Duration::from_secs(2),
    )
    .await;
    why
}

fn flatten(
    r: Result<Result<u32, MigrateError>, tokio::task::JoinError>,
) -> Result<u32, MigrateError> {
    match r {
        Ok(r) => r,
        Err(e) if e.is_panic() => Err(MigrateError::Panic(panic_text(&*e.into_panic()))),
        Err(e) => Err(MigrateError::Unexpected(format!(
            "bulk channel task failed: {}",
            ErrorChain(&e)
        ))),
    }
}

/// Receives one bulk channel until the source closes it; returns the last
/// round it completed.
async fn receive_bulk(
    index: usize,
    mut r: BufReader<Channel>,
    ctx: BulkCtx,
) -> Result<u32, MigrateError> {
    let name = format!("bulk channel {index}");
    let mut round = 0u32;
    let mut frame_buf = Vec::new();
    let mut data: Vec<u8> = Vec::new();
    let mut reporter = PlacedReporter::default();
    let ram = ctx.ram.clone();
    let region_pages =
        move |idx: usize| ram.regions().get(idx).map(|r| (r.page_bytes(), r.pages()));
    loop {
        let Some((frame, frame_bytes)) =
            read_frame(&mut r, &name, Some(&region_pages), &mut frame_buf).await?
        else {
            if ctx.postcopy.get().is_some() {
                // The source reads our reports until we close our end
                // (duplicates of this socket, kept to cut the link, would
                // keep it open).
                use tokio::io::AsyncWriteExt;
                let _ = r.get_mut().shutdown().await;
            }
            return Ok(round);
        };
        ctx.progress();
        ctx.bytes.fetch_add(frame_bytes, Ordering::Relaxed);
        match frame {
            Frame::PageBatch(head) => {
                let region_idx = head.region();
                // Checked to exist by the decoder.
                let region = &ctx.ram.regions()[region_idx];
                let page_bytes = region.page_bytes() as usize;
                if let Some(pc) = ctx.postcopy.get() {
                    // Busy: the CPU time this thread spends reading a
                    // batch that is here whole, and placing it; not
                    // waiting for the wire (on a slow link the rate would
                    // be the link's) nor for a CPU (on a busy host, the
                    // rate of whoever else runs): either way the budget
                    // would be too small to keep the link busy.
                    let data_bytes = head.data_pages() as usize * page_bytes;
                    let here = r.buffer().len() as u64 + r.get_ref().readable_bytes();
                    let mut busy_from = freehint_linux_sys::thread_cpu_time();
                    for piece in BatchPieces::of(head.entries(), page_bytes as u64) {
                        data.resize(piece.data_bytes, 0);
                        read_exact(&mut r, &mut data, &name).await?;
                        if here < data_bytes as u64 {
                            // Not all here at the start: the waiting is
                            // not busy time.
                            busy_from = freehint_linux_sys::thread_cpu_time();
                        }
                        pc.place_batch(
                            region_idx,
                            &piece.entries,
                            &data,
                            page_bytes as u64,
                            false,
                        )?;
                    }
                    ctx.progress();
                    reporter
                        .placed(
                            r.get_mut(),
                            head.pages() * page_bytes as u64,
                            freehint_linux_sys::thread_cpu_time().saturating_sub(busy_from),
                            ctx.timeout,
                            &name,
                        )
                        .await?;
                    continue;
                }
                // hugetlbfs has no write(2): its pages are copied into the
                // mapping either way, so straight from the socket.
                let direct = ctx.direct
                    || matches!(
                        region.page_size(),
                        freehint_memory::PageSize::HugeTlb { .. }
                    );
                for piece in BatchPieces::of(head.entries(), page_bytes as u64) {
                    if !direct {
                        data.resize(piece.data_bytes, 0);
                        read_exact(&mut r, &mut data, &name).await?;
                    }
                    let mut at = 0usize;
                    for entry in &piece.entries {
                        let (page, run) = match *entry {
                            BatchEntry::Zero { first_page, count } => {
                                discard_written(&ctx, PageRun::new(region_idx, first_page, count))?;
                                ctx.pages_zero.fetch_add(count, Ordering::Relaxed);
                                continue;
                            }
                            BatchEntry::Data { first_page, count } => (first_page, count),
                        };
                        if direct {
                            // Straight from the socket into the mapping,
                            // through raw pointers (the decoder checked the
                            // run lies in the region).
                            let dst = RawPages::of(&region.volatile_pages(page, run)?);
                            read_into_pages(&mut r, dst, &name).await?;
                        } else {
                            let len = run as usize * page_bytes;
                            // SAFETY: the destination VM is not running (it
                            // resumes only after the commit, once every
                            // channel has ended), and within a round no other
                            // channel places these pages (each page is sent
                            // at most once a round; rounds end with a
                            // barrier).
                            unsafe { region.write_pages(page, &data[at..at + len])? };
                            at += len;
                        }
                        ctx.written.insert(PageRun::new(region_idx, page, run));
                        ctx.pages_placed.fetch_add(run, Ordering::Relaxed);
                    }
                }
                ctx.progress();
                hit("dst.mid-round")?;
            }
            Frame::Message(Message::Zero(run)) => {
                place_zero_run(&ctx, run, &name)?;
            }
            Frame::Message(Message::Fill { run, byte }) => {
                place_fill_run(&ctx, run, byte, &name)?;
            }
            Frame::Message(Message::RoundEnd { round: got }) => {
                if got != round + 1 {
                    return Err(MigrateError::Unexpected(format!(
                        "{name}: round {got} ended, expected round {}",
                        round + 1
                    )));
                }
                round = got;
                // No channel starts placing round r+1 before every channel
                // has placed round r: a page resent in r+1 on another
                // channel must not be overwritten by its older copy.
                ctx.barrier.wait().await;
                ctx.rounds_done[index].store(round, Ordering::Release);
            }
            Frame::Message(other) => {
                return Err(MigrateError::Unexpected(format!(
                    "{name}: unexpected {} frame on a bulk channel",
                    other.kind().name()
                )))
            }
        }
    }
}

/// Places the pages the source sends on the urgent channel in answer to
/// page requests, until it closes the channel.
async fn receive_urgent(
    mut r: BufReader<crate::transport::ChannelReader>,
    ctx: BulkCtx,
    dest: Arc<PostcopyDestination>,
) -> Result<(), MigrateError> {
    let name = "urgent channel";
    let mut frame_buf = Vec::new();
    let mut data: Vec<u8> = Vec::new();
    let ram = ctx.ram.clone();
    let region_pages =
        move |idx: usize| ram.regions().get(idx).map(|r| (r.page_bytes(), r.pages()));
    loop {
        let Some((frame, frame_bytes)) =
            read_frame(&mut r, name, Some(&region_pages), &mut frame_buf).await?
        else {
            return Ok(());
        };
        ctx.progress();
        ctx.bytes.fetch_add(frame_bytes, Ordering::Relaxed);
        match frame {
            Frame::PageBatch(head) => {
                let page_bytes = ctx.ram.regions()[head.region()].page_bytes();
                for piece in BatchPieces::of(head.entries(), page_bytes) {
                    data.resize(piece.data_bytes, 0);
                    read_exact(&mut r, &mut data, name).await?;
                    dest.place_batch(head.region(), &piece.entries, &data, page_bytes, true)?;
                }
            }
            Frame::Message(other) => {
                return Err(MigrateError::Unexpected(format!(
                    "{name}: unexpected {} frame",
                    other.kind().name()
                )))
            }
        }
    }
}

/// At most this many bytes of page data a receiving channel holds at once,
/// whatever batch its peer sends; more only for one page bigger than this
/// (a 1 GiB huge page, placed whole).
pub const RECEIVE_PIECE_BYTES: u64 = 4 << 20;

/// A page batch's entries cut, in order, into pieces of at most
/// [`RECEIVE_PIECE_BYTES`] of data each (at least one page): data runs are
/// split where needed, zero runs (no data) stay whole.
struct BatchPieces<'a> {
    entries: std::slice::Iter<'a, BatchEntry>,
    /// What is left of a data run cut at the end of the last piece.
    rest: Option<(u64, u64)>,
    page_bytes: u64,
}

/// One piece of a batch: its entries and the bytes of data they carry.
#[derive(Debug, PartialEq, Eq)]
struct BatchPiece {
    entries: Vec<BatchEntry>,
    data_bytes: usize,
}

impl<'a> BatchPieces<'a> {
    fn of(entries: &'a [BatchEntry], page_bytes: u64) -> Self {
        Self {
            entries: entries.iter(),
            rest: None,
            page_bytes: page_bytes.max(1),
        }
    }
}

impl Iterator for BatchPieces<'_> {
    type Item = BatchPiece;

    fn next(&mut self) -> Option<BatchPiece> {
        let max_pages = (RECEIVE_PIECE_BYTES / self.page_bytes).max(1);
        let mut piece = BatchPiece {
            entries: Vec::new(),
            data_bytes: 0,
        };
        let mut pages = 0u64;
        loop {
            let (first_page, count) = match self.rest.take() {
                Some(run) => run,
                None => match self.entries.next() {
                    None => break,
                    Some(&zero @ BatchEntry::Zero { .. }) => {
                        piece.entries.push(zero);
                        continue;
                    }
                    Some(&BatchEntry::Data { first_page, count }) => (first_page, count),
                },
            };
            let take = count.min(max_pages - pages);
            if take > 0 {
                piece.entries.push(BatchEntry::Data {
                    first_page,
                    count: take,
                });
                pages += take;
            }
            if take < count {
                self.rest = Some((first_page + take, count - take));
                break;
            }
        }
        piece.data_bytes = (pages * self.page_bytes) as usize;
        (!piece.entries.is_empty()).then_some(piece)
    }
}

/// Discards the pages of `run` that hold data from an earlier round, so
/// that they read as zero (pages never written are zero already).
fn discard_written(ctx: &BulkCtx, run: PageRun) -> Result<(), MigrateError> {
    let region = &ctx.ram.regions()[run.region];
    let mut written = Vec::new();
    ctx.written.take_run(run, &mut written);
    for w in written {
        region.punch_hole(w.first_page..w.first_page + w.count)?;
    }
    Ok(())
}

/// The region of a zero or fill run `z`, checked to hold it.
fn run_region<'a>(
    ctx: &'a BulkCtx,
    z: PageRun,
    what: &str,
    name: &str,
) -> Result<&'a freehint_memory::RamRegion, MigrateError> {
    let region = ctx.ram.regions().get(z.region).ok_or_else(|| {
        MigrateError::Unexpected(format!(
            "{name}: {what} for region {} which does not exist",
            z.region
        ))
    })?;
    if z.end_page().is_none_or(|end| end > region.pages()) {
        return Err(MigrateError::Unexpected(format!(
            "{name}: {what} {z} is beyond region {} ({} pages)",
            z.region,
            region.pages()
        )));
    }
    Ok(region)
}

fn place_zero_run(ctx: &BulkCtx, z: PageRun, name: &str) -> Result<(), MigrateError> {
    run_region(ctx, z, "zero run", name)?;
    discard_written(ctx, z)?;
    ctx.pages_zero.fetch_add(z.count, Ordering::Relaxed);
    Ok(())
}

/// Writes `byte` into every byte of the pages of `run` (a poisoning
/// guest's free pages), a few pages at a time.
fn place_fill_run(ctx: &BulkCtx, run: PageRun, byte: u8, name: &str) -> Result<(), MigrateError> {
    let region = run_region(ctx, run, "fill run", name)?;
    let page_bytes = region.page_bytes();
    let chunk_pages = (FILL_CHUNK_BYTES / page_bytes).max(1);
    let buf = vec![byte; (chunk_pages.min(run.count) * page_bytes) as usize];
    let mut page = run.first_page;
    let end = run.first_page + run.count;
    while page < end {
        let n = chunk_pages.min(end - page);
        // SAFETY: as for a batch's data pages: the destination VM is not
        // running (it resumes only after the commit), and within a round
        // no other channel places these pages.
        unsafe { region.write_pages(page, &buf[..(n * page_bytes) as usize])? };
        page += n;
    }
    ctx.written.insert(run);
    ctx.pages_filled.fetch_add(run.count, Ordering::Relaxed);
    Ok(())
}

/// Bytes of pattern a fill run writes at a time.
const FILL_CHUNK_BYTES: u64 = 256 << 10;

#[cfg(test)]
mod tests {
    use super::*;

    /// The pages of `entries`, each with whether it carries data, in order.
    fn pages(entries: &[BatchEntry]) -> Vec<(u64, bool)> {
        entries
            .iter()
            .flat_map(|e| match *e {
                BatchEntry::Data { first_page, count } => (first_page..first_page + count)
                    .map(|p| (p, true))
                    .collect::<Vec<_>>(),
                BatchEntry::Zero { first_page, count } => (first_page..first_page + count)
                    .map(|p| (p, false))
                    .collect(),
            })
            .collect()
    }

    #[test]
    fn batch_pieces_keep_every_page_in_order_and_stay_bounded() {
        let data = |first_page, count| BatchEntry::Data { first_page, count };
        let zero = |first_page, count| BatchEntry::Zero { first_page, count };
        let batches: Vec<(Vec<BatchEntry>, u64)> = vec![
            // A hostile peer's one batch of 4096 small pages (16 MiB).
            (vec![data(0, 4096)], 4096),
            (
                vec![
                    data(0, 1000),
                    zero(1000, 5000),
                    data(6000, 1500),
                    data(9000, 1),
                ],
                4096,
            ),
            (vec![zero(0, 10)], 4096),
            // Huge pages: 2 MiB pieces of two pages; 1 GiB, one page each.
            (vec![data(0, 5), zero(5, 1), data(6, 1)], 2 << 20),
            (vec![data(0, 3)], 1 << 30),
        ];
        for (entries, page_bytes) in batches {
            let pieces: Vec<BatchPiece> = BatchPieces::of(&entries, page_bytes).collect();
            let mut again = Vec::new();
            for piece in &pieces {
                assert!(
                    piece.data_bytes as u64 <= RECEIVE_PIECE_BYTES.max(page_bytes),
                    "a piece of {} bytes",
                    piece.data_bytes
                );
                let data_pages = pages(&piece.entries).iter().filter(|p| p.1).count() as u64;
                assert_eq!(piece.data_bytes as u64, data_pages * page_bytes);
                again.extend_from_slice(&piece.entries);
            }
            assert_eq!(pages(&again), pages(&entries), "{entries:?} in pieces");
        }
        assert_eq!(BatchPieces::of(&[], 4096).count(), 0);
        assert_eq!(BatchPieces::of(&[data(0, 4096)], 4096).count(), 4);
    }
}
