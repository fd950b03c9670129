//! The precopy sender.

use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use freehint_dirty_log::DirtyLog;
use freehint_hint_filter::{Cursor, HintFilter, PageRun, SyncReport};
use freehint_memory::{is_zero_page, GuestRam};
use freehint_types::{CmdId, HintSource};
use freehint_wire::{ChannelRole, Hello, Message, PageBatchHead, ZeroRun, ENTRY_ZERO};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::io::{expect_message, read_message, write_message};
use crate::{region_descs, MigrateError, MigrationParams, MigrationStats, Vmm};

/// Sends a VM's guest RAM to a [`crate::Receiver`] with precopy.
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
}

impl std::fmt::Debug for PrecopySender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrecopySender")
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

/// Counters shared by the channel tasks of one round.
#[derive(Default)]
struct RoundCounters {
    bytes: AtomicU64,
    pages_sent: AtomicU64,
    pages_zero: AtomicU64,
}

struct Channels {
    control_tx: OwnedWriteHalf,
    control_rx: mpsc::UnboundedReceiver<Result<Message, MigrateError>>,
    bulk: Vec<TcpStream>,
}

impl PrecopySender {
    /// A sender for `ram`, whose writes `dirty_log` tracks and whose bitmap
    /// `filter` holds (hints reach `filter` through its
    /// [`freehint_types::HintSink`] implementation). `hint_source`, if any,
    /// is told when hint rounds start and stop.
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
        })
    }

    /// Migrates to the receiver at `dest`. On error the source VM is
    /// running again, its memory untouched.
    pub async fn migrate(mut self, dest: SocketAddr) -> Result<MigrationStats, MigrateError> {
        let mut stopped = false;
        let mut control: Option<OwnedWriteHalf> = None;
        let result = self.run(dest, &mut stopped, &mut control).await;
        if let Err(e) = &result {
            tracing::warn!("migration failed: {e}; failing back");
            if let Some(src) = &self.hint_source {
                if let Err(e) = src.stop_round() {
                    tracing::warn!("could not stop the hint round: {e}");
                }
            }
            if let Some(c) = control.as_mut() {
                let _ = write_message(c, &Message::Error(e.to_string()), "control").await;
            }
            if stopped {
                if let Err(re) = self.vmm.resume() {
                    return Err(MigrateError::Vmm(crate::VmmError(format!(
                        "{e}; and resuming the source VM failed too: {re}"
                    ))));
                }
                tracing::info!("source VM resumed");
            }
        }
        result
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.params.peer_timeout_s)
    }

    async fn connect(&self, dest: SocketAddr, hello: Hello) -> Result<TcpStream, MigrateError> {
        let what = format!("connecting to {dest} ({:?} channel)", hello.role);
        let mut s = tokio::time::timeout(self.timeout(), TcpStream::connect(dest))
            .await
            .map_err(|_| MigrateError::Timeout {
                what: what.clone(),
                seconds: self.params.peer_timeout_s,
            })?
            .map_err(MigrateError::io(what.clone()))?;
        crate::tune_socket(&s).map_err(MigrateError::io(what.clone()))?;
        write_message(&mut s, &Message::Hello(hello), &what).await?;
        match expect_message(&mut s, &format!("{what}: hello answer"), self.timeout()).await? {
            Message::HelloAck => Ok(s),
            Message::Error(e) => Err(MigrateError::Peer(e)),
            other => Err(MigrateError::Unexpected(format!(
                "{what}: expected hello ack, got {:?}",
                other.kind()
            ))),
        }
    }

    async fn open_channels(&self, dest: SocketAddr) -> Result<Channels, MigrateError> {
        let session_id = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ ((std::process::id() as u64) << 32);
        let hello = |role| Hello {
            session_id,
            role,
            bulk_channels: self.params.bulk_channels,
            regions: region_descs(&self.ram),
        };
        let control = self.connect(dest, hello(ChannelRole::Control)).await?;
        let mut bulk = Vec::new();
        for i in 0..self.params.bulk_channels {
            bulk.push(self.connect(dest, hello(ChannelRole::Bulk(i))).await?);
        }
        let (rx_half, control_tx) = control.into_split();
        let (tx, control_rx) = mpsc::unbounded_channel();
        tokio::spawn(watch_control(rx_half, tx));
        Ok(Channels {
            control_tx,
            control_rx,
            bulk,
        })
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
        let report = self
            .filter
            .sync(open_next && self.hint_source.is_some(), |bm| {
                log.sync(&mut |run| {
                    bm.set_run(PageRun {
                        region: run.region,
                        first_page: run.first_page,
                        count: run.count,
                    });
                })
            })?;
        let us = t.elapsed().as_micros() as u64;
        stats.syncs += 1;
        stats.sync_max_us = stats.sync_max_us.max(us);
        stats.sync_mean_us += us; // divided at the end
        if let (Some(id), Some(src)) = (report.opened_epoch, &self.hint_source) {
            src.start_round(id)
                .map_err(|e| crate::VmmError(e.to_string()))?;
        }
        Ok(report)
    }

    async fn run(
        &mut self,
        dest: SocketAddr,
        stopped: &mut bool,
        control_out: &mut Option<OwnedWriteHalf>,
    ) -> Result<MigrationStats, MigrateError> {
        let started = Instant::now();
        let mut stats = MigrationStats {
            guest_ram_bytes: self.ram.size_bytes(),
            ..Default::default()
        };

        // Round 1 sends every populated page; holes go as zero records
        // without being read (reading a tmpfs hole would allocate it).
        let mut zero_runs: Vec<ZeroRun> = Vec::new();
        let mut populated_bytes = 0u64;
        for (idx, region) in self.ram.regions().iter().enumerate() {
            let data = region.data_page_ranges()?;
            populated_bytes +=
                data.iter().map(|r| r.end - r.start).sum::<u64>() * region.page_bytes();
            let mut next = 0;
            self.filter.with_bitmap(|bm| {
                for r in &data {
                    bm.set_run(PageRun {
                        region: idx,
                        first_page: r.start,
                        count: r.end - r.start,
                    });
                }
            });
            for r in data
                .iter()
                .map(|r| (r.start, r.end))
                .chain([(region.pages(), region.pages())])
            {
                if r.0 > next {
                    zero_runs.push(ZeroRun {
                        region: idx as u32,
                        first_page: next,
                        count: r.0 - next,
                    });
                }
                next = r.1;
            }
        }
        // Open the first hint round before connecting, so the guest's
        // report is under way by the time the first pages go out.
        let hints = self.params.hints;
        let first = self.sync(hints, &mut stats)?;
        if let (Some(id), Some(src)) = (first.opened_epoch, &self.hint_source) {
            let filter = self.filter.clone();
            let page_bytes = self.ram.regions().first().map_or(4096, |r| r.page_bytes());
            // Waiting longer than sending every populated page at the floor
            // rate would take never pays (an idle guest's RAM is mostly holes).
            let max_ms = self
                .params
                .hint_wait_ms
                .min(populated_bytes.saturating_mul(1000) / HINT_RATE_FLOOR_BYTES_PER_S);
            stats.hint_wait_ms = wait_for_report(src.as_ref(), id, max_ms, || {
                let h = filter.stats();
                (h.hinted_bytes, h.pages_skipped_free * page_bytes)
            })
            .await;
        }
        // A hole written after the scan is in the dirty log, now merged:
        // it goes as data, so no zero run for it (two records for one page
        // in one round could be placed in either order).
        let mut zero_runs = self.filter.with_bitmap(|bm| {
            let mut still_zero = Vec::new();
            for z in &zero_runs {
                let run = PageRun {
                    region: z.region as usize,
                    first_page: z.first_page,
                    count: z.count,
                };
                bm.unset_subruns(run, &mut still_zero);
            }
            to_zero_runs(&still_zero)
        });
        let Channels {
            control_tx,
            mut control_rx,
            mut bulk,
        } = self.open_channels(dest).await?;
        *control_out = Some(control_tx);

        let mut bandwidth_bytes_per_s: f64 = 0.0;
        let mut round: u32 = 0;
        loop {
            round += 1;
            check_control(&mut control_rx)?;
            let t = Instant::now();
            let counters;
            (bulk, counters) = self
                .send_round(round, bulk, std::mem::take(&mut zero_runs))
                .await?;
            let secs = t.elapsed().as_secs_f64();
            let bytes = counters.bytes.load(Ordering::Relaxed);
            add_counters(&mut stats, &counters);
            if bytes >= 4 << 20 || bandwidth_bytes_per_s == 0.0 {
                let bw = bytes as f64 / secs.max(1e-6);
                bandwidth_bytes_per_s = bandwidth_bytes_per_s.max(bw);
                stats.peak_bandwidth_mib_per_s = stats.peak_bandwidth_mib_per_s.max(bw / 1048576.0);
            }
            let report = self.sync(hints, &mut stats)?;
            zero_runs = to_zero_runs(&report.discarded);
            let left = self.filter.bytes_to_send();
            let estimate_ms = left as f64 / bandwidth_bytes_per_s.max(1.0) * 1000.0;
            tracing::info!(
                round,
                round_bytes = bytes,
                round_ms = (secs * 1000.0) as u64,
                left_bytes = left,
                estimate_ms = estimate_ms as u64,
                "round done"
            );
            // Pages the guest reported free during the round go out as
            // zero runs the receiver punches out of its RAM file: many of
            // them get one more live round rather than the downtime.
            let converged = estimate_ms <= self.params.downtime_target_ms as f64
                && zero_runs.len() <= MAX_ZERO_RUNS_AT_SWITCHOVER
                && round >= self.params.min_rounds;
            if converged || round + 1 >= self.params.max_rounds {
                break;
            }
        }

        // Switchover.
        check_control(&mut control_rx)?;
        // Hints stop first, while the guest (and its balloon device) still
        // runs to see it; hints racing the stop fall to the epoch closed
        // by the final sync.
        if let Some(src) = &self.hint_source {
            if let Err(e) = src.stop_round() {
                tracing::warn!("could not stop the hint round: {e}");
            }
        }
        let stop_at = Instant::now();
        *stopped = true;
        self.vmm.stop()?;
        let report = self.sync(false, &mut stats)?;
        zero_runs.extend(to_zero_runs(&report.discarded));
        round += 1;
        let (bulk, counters) = self.send_round(round, bulk, zero_runs).await?;
        stats.final_round_bytes = counters.bytes.load(Ordering::Relaxed);
        add_counters(&mut stats, &counters);
        for mut b in bulk {
            b.shutdown()
                .await
                .map_err(MigrateError::io("closing a bulk channel"))?;
        }
        let control = control_out.as_mut().expect("set above");
        let state = self.vmm.device_state()?;
        stats.bytes_on_wire += write_message(
            control,
            &Message::DeviceState(state),
            "sending device state",
        )
        .await?;
        stats.bytes_on_wire += write_message(
            control,
            &Message::Complete { rounds: round },
            "sending completion",
        )
        .await?;
        let answer = tokio::time::timeout(self.timeout(), control_rx.recv())
            .await
            .map_err(|_| MigrateError::Timeout {
                what: "the destination to confirm it resumed the VM".into(),
                seconds: self.params.peer_timeout_s,
            })?;
        match answer {
            Some(Ok(Message::Resumed)) => {}
            Some(Ok(Message::Error(e))) => return Err(MigrateError::Peer(e)),
            Some(Ok(other)) => {
                return Err(MigrateError::Unexpected(format!(
                    "expected the destination's confirmation, got {:?}",
                    other.kind()
                )))
            }
            Some(Err(e)) => return Err(e),
            None => {
                return Err(MigrateError::Unexpected(
                    "destination closed the control channel before confirming".into(),
                ))
            }
        }
        stats.downtime_ms = stop_at.elapsed().as_millis() as u64;
        stats.total_time_ms = started.elapsed().as_millis() as u64;
        stats.rounds = round;
        // From here on the destination runs the guest: there is no failing
        // back any more.
        *stopped = false;
        *control_out = None;
        self.vmm.handed_over()?;
        let h = self.filter.stats();
        stats.pages_skipped_free = h.pages_skipped_free;
        stats.pages_skipped_reported = h.pages_skipped_reported;
        stats.hinted_bytes = h.hinted_bytes;
        stats.hints_dropped_stale = h.hints_dropped_stale;
        stats.hints_rejected_invalid = h.hints_rejected_invalid;
        stats.sync_mean_us /= stats.syncs.max(1) as u64;
        Ok(stats)
    }

    /// Sends one round over every bulk channel, then a round-end barrier on
    /// each.
    async fn send_round(
        &self,
        round: u32,
        bulk: Vec<TcpStream>,
        zero_runs: Vec<ZeroRun>,
    ) -> Result<(Vec<TcpStream>, Arc<RoundCounters>), MigrateError> {
        let cursor = Arc::new(Mutex::new(Cursor::default()));
        let counters = Arc::new(RoundCounters::default());
        let mut zero_runs = Some(zero_runs);
        let mut tasks = Vec::new();
        for (i, stream) in bulk.into_iter().enumerate() {
            let job = ChannelJob {
                ram: self.ram.clone(),
                filter: self.filter.clone(),
                cursor: cursor.clone(),
                counters: counters.clone(),
                batch_bytes: self.params.batch_bytes,
                round,
                zero_runs: if i == 0 {
                    zero_runs.take().unwrap_or_default()
                } else {
                    Vec::new()
                },
                context: format!("bulk channel {i}"),
            };
            tasks.push(tokio::spawn(job.run(stream)));
        }
        let mut streams = Vec::new();
        let mut first_err = None;
        for t in tasks {
            match t.await {
                Ok(Ok(s)) => streams.push(s),
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
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
            None => Ok((streams, counters)),
        }
    }
}

fn add_counters(stats: &mut MigrationStats, c: &RoundCounters) {
    stats.bytes_on_wire += c.bytes.load(Ordering::Relaxed);
    stats.pages_sent += c.pages_sent.load(Ordering::Relaxed);
    stats.pages_zero += c.pages_zero.load(Ordering::Relaxed);
}

fn to_zero_runs(runs: &[PageRun]) -> Vec<ZeroRun> {
    runs.iter()
        .map(|r| ZeroRun {
            region: r.region as u32,
            first_page: r.first_page,
            count: r.count,
        })
        .collect()
}

/// Fails if the destination reported an error or went away.
fn check_control(
    rx: &mut mpsc::UnboundedReceiver<Result<Message, MigrateError>>,
) -> Result<(), MigrateError> {
    match rx.try_recv() {
        Ok(Ok(Message::Error(e))) => Err(MigrateError::Peer(e)),
        Ok(Ok(other)) => Err(MigrateError::Unexpected(format!(
            "destination sent {:?} in the middle of the migration",
            other.kind()
        ))),
        Ok(Err(e)) => Err(e),
        Err(mpsc::error::TryRecvError::Empty) => Ok(()),
        Err(mpsc::error::TryRecvError::Disconnected) => Err(MigrateError::Unexpected(
            "destination closed the control channel".into(),
        )),
    }
}

/// Forwards what the destination says on the control channel.
async fn watch_control(
    mut rx: OwnedReadHalf,
    tx: mpsc::UnboundedSender<Result<Message, MigrateError>>,
) {
    loop {
        match read_message(&mut rx, "control channel").await {
            Ok(Some(m)) => {
                if tx.send(Ok(m)).is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        }
    }
}

/// Writes every byte of `bufs`, however the kernel splits the writes.
async fn write_all_vectored(
    stream: &mut TcpStream,
    mut bufs: &mut [IoSlice<'_>],
) -> std::io::Result<()> {
    while !bufs.is_empty() {
        let n = stream.write_vectored(bufs).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

/// What one bulk channel does in one round.
struct ChannelJob {
    ram: Arc<GuestRam>,
    filter: Arc<HintFilter>,
    cursor: Arc<Mutex<Cursor>>,
    counters: Arc<RoundCounters>,
    batch_bytes: u64,
    round: u32,
    zero_runs: Vec<ZeroRun>,
    context: String,
}

impl ChannelJob {
    async fn run(self, mut stream: TcpStream) -> Result<TcpStream, MigrateError> {
        let ctx = self.context.as_str();
        for z in &self.zero_runs {
            let n = write_message(&mut stream, &Message::Zero(*z), ctx).await?;
            self.counters.bytes.fetch_add(n, Ordering::Relaxed);
            self.counters
                .pages_zero
                .fetch_add(z.count, Ordering::Relaxed);
        }
        let mut claimed: Vec<(usize, u64)> = Vec::new();
        // (address, length) of runs of data pages in the mapping.
        let mut spans: Vec<(usize, usize)> = Vec::new();
        let mut head_buf: Vec<u8> = Vec::new();
        // Reused batch after batch: no allocation per batch.
        let mut head = PageBatchHead {
            region: 0,
            entries: Vec::new(),
        };
        loop {
            claimed.clear();
            let n = {
                let mut c = self.cursor.lock().unwrap_or_else(|e| e.into_inner());
                self.filter.claim(&mut c, self.batch_bytes, &mut claimed)
            };
            if n == 0 {
                break;
            }
            let region_idx = claimed[0].0;
            let region = &self.ram.regions()[region_idx];
            let page_bytes = region.page_bytes() as usize;
            head.region = region_idx as u32;
            head.entries.clear();
            // Map each contiguous run for reading with one call (no fault
            // per page), check every page for zero in place, and send the
            // others straight from the mapping: the kernel copies them into
            // the socket, with no copy of ours in between.
            let mut k = 0;
            while k < claimed.len() {
                let first = claimed[k].1;
                let mut run = 1;
                while k + run < claimed.len() && claimed[k + run].1 == first + run as u64 {
                    run += 1;
                }
                region.populate_read(first, run as u64)?;
                k += run;
            }
            spans.clear();
            for &(_, page) in &claimed {
                let ptr = region.page_ptr(page).ok_or_else(|| {
                    MigrateError::Unexpected(format!(
                        "bitmap names page {page} beyond region {region_idx}"
                    ))
                })?;
                // SAFETY: a whole page inside this region's mapping, which
                // lives as long as `self.ram`. The guest may write it while
                // we look; what we send may then be torn or stale, and the
                // dirty log has the page for the next round.
                let bytes = unsafe { std::slice::from_raw_parts(ptr as *const u8, page_bytes) };
                if is_zero_page(bytes) {
                    head.entries.push(page | ENTRY_ZERO);
                    continue;
                }
                head.entries.push(page);
                match spans.last_mut() {
                    Some((start, len)) if *start + *len == ptr as usize => *len += page_bytes,
                    _ => spans.push((ptr as usize, page_bytes)),
                }
            }
            let filled: usize = spans.iter().map(|s| s.1).sum();
            head_buf.clear();
            head.encode(page_bytes as u64, &mut head_buf);
            let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(spans.len() + 1);
            slices.push(IoSlice::new(&head_buf));
            for &(addr, len) in &spans {
                // SAFETY: as above: whole pages inside the live mapping.
                slices.push(IoSlice::new(unsafe {
                    std::slice::from_raw_parts(addr as *const u8, len)
                }));
            }
            write_all_vectored(&mut stream, &mut slices)
                .await
                .map_err(MigrateError::io(ctx))?;
            let data_pages = (filled / page_bytes) as u64;
            self.counters
                .bytes
                .fetch_add((head_buf.len() + filled) as u64, Ordering::Relaxed);
            self.counters
                .pages_sent
                .fetch_add(data_pages, Ordering::Relaxed);
            self.counters
                .pages_zero
                .fetch_add(claimed.len() as u64 - data_pages, Ordering::Relaxed);
        }
        let n = write_message(&mut stream, &Message::RoundEnd { round: self.round }, ctx).await?;
        self.counters.bytes.fetch_add(n, Ordering::Relaxed);
        Ok(stream)
    }
}

/// Waits up to `max_ms` for the guest to finish reporting round `id`;
/// returns how long it waited.
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

/// Waits until the guest has finished its free-page report for round `id`,
/// its hints (once they have started) take pages off the send list slower
/// than [`HINT_RATE_FLOOR_BYTES_PER_S`], or `max_ms` passed; returns the
/// time waited. `progress` reads (bytes hinted, bytes hints took off the
/// send list) so far.
async fn wait_for_report(
    src: &dyn HintSource,
    id: CmdId,
    max_ms: u64,
    progress: impl Fn() -> (u64, u64),
) -> u64 {
    let t = Instant::now();
    let window = Duration::from_millis(HINT_RATE_WINDOW_MS);
    let floor = HINT_RATE_FLOOR_BYTES_PER_S * HINT_RATE_WINDOW_MS / 1000;
    // (start, saved bytes at start) of the current window, once hints came.
    let mut current: Option<(Instant, u64)> = None;
    while t.elapsed() < Duration::from_millis(max_ms) {
        match src.round_reported(id) {
            None | Some(true) => break,
            Some(false) => {
                let (hinted, saved) = progress();
                match current {
                    None if hinted > 0 => current = Some((Instant::now(), saved)),
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
    use freehint_types::HintSourceError;

    /// A guest that never closes its report (or always has, with `done`).
    struct Reporting {
        done: bool,
    }

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
            Some(self.done)
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
    }

    const OPEN: Reporting = Reporting { done: false };

    #[test]
    fn a_finished_report_ends_the_wait_at_once() {
        let waited = runtime().block_on(wait_for_report(
            &Reporting { done: true },
            CmdId(2),
            5000,
            || (0, 0),
        ));
        assert!(waited < 100, "{waited}");
    }

    #[test]
    fn without_any_hint_the_wait_lasts_until_its_cap() {
        // No hint yet is not "hints slowed down": the guest may be slow to
        // start.
        let waited = runtime().block_on(wait_for_report(&OPEN, CmdId(2), 300, || (0, 0)));
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
        let waited = runtime().block_on(wait_for_report(&OPEN, CmdId(2), 10_000, progress));
        assert!((400..2000).contains(&waited), "{waited}");
    }

    #[test]
    fn hints_that_save_nothing_do_not_hold_the_sender() {
        // Hints arrive (for holes) but take nothing off the send list.
        let t = Instant::now();
        let progress = move || (t.elapsed().as_millis() as u64 + 1, 0);
        let waited = runtime().block_on(wait_for_report(&OPEN, CmdId(2), 10_000, progress));
        assert!(waited < 2000, "{waited}");
    }
}
