//! The source's side of postcopy: page requests answered first, on their
//! own connection; the other pending pages streamed on the bulk channels
//! from near the last request on.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::transport::Channel;
use freehint_memory::GuestRam;
use freehint_types::{append_run, PageRun};
use freehint_wire::{Frame, Message, HEADER_BYTES};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::task::JoinSet;

use super::queue::{PlacedReports, QueueBudget};
use crate::fault::hit;
use crate::io::read_frame;
use crate::page_set::PageSet;
use crate::sender::{join_channels, BatchWriter};
use crate::MigrateError;

/// Most guest bytes sent after a requested page on the urgent channel:
/// 7 pages of 4 KiB, a fraction of a millisecond on any link this serves;
/// none on huge pages (a 2 MiB page is its own read-ahead). Measured on
/// the real after-job guest (2 GiB, unshaped link, 5 runs each): remote
/// faults' p99 went from 950-2950 µs to 360-750 µs, p50 from ~72 to ~88
/// µs (before the read-ahead had batches of its own).
pub(crate) const READ_AHEAD_BYTES: u64 = 28 << 10;

/// Where the background stream goes next: the page after the last one
/// requested (0 = no request since the stream last looked).
#[derive(Debug, Default)]
pub(crate) struct StreamHint(AtomicU64);

impl StreamHint {
    fn set(&self, region: usize, page: u64) {
        let v = ((region as u64) << 48 | (page & ((1 << 48) - 1))) + 1;
        self.0.store(v, Ordering::Release);
    }

    fn take(&self) -> Option<(usize, u64)> {
        match self.0.swap(0, Ordering::AcqRel) {
            0 => None,
            v => Some((((v - 1) >> 48) as usize, (v - 1) & ((1 << 48) - 1))),
        }
    }
}

/// What the source's postcopy tasks count.
#[derive(Debug, Default)]
pub(crate) struct SourceCounters {
    pub(crate) bytes: AtomicU64,
    /// Pages taken to answer a request. Counted when taken from the
    /// pending set, so that a page whose write a broken link cut short
    /// counts once here and once in the resent pages of the reconnect.
    pub(crate) pages_requested: AtomicU64,
    /// Pages taken after requested ones and sent with them on the urgent
    /// channel (see `PostcopySource::read_ahead`), counted as
    /// `pages_requested`.
    pub(crate) pages_read_ahead: AtomicU64,
    /// Pages the background stream took, counted as `pages_requested`.
    pub(crate) pages_streamed: AtomicU64,
    /// Of the pages written whole, those sent with their data.
    pub(crate) data_pages: AtomicU64,
    /// Of the pages written whole, those that were zero, sent as entries
    /// without data.
    pub(crate) zero_pages: AtomicU64,
    /// Requests for pages already on their way (or never pending).
    pub(crate) requests_already_sent: AtomicU64,
}

impl SourceCounters {
    fn count_written(&self, sent: &crate::sender::BatchSent) {
        self.bytes.fetch_add(sent.bytes, Ordering::Relaxed);
        self.data_pages
            .fetch_add(sent.data_pages, Ordering::Relaxed);
        self.zero_pages
            .fetch_add(sent.pages - sent.data_pages, Ordering::Relaxed);
    }
}

/// Everything the postcopy tasks of the source share.
#[derive(Clone)]
pub(crate) struct PostcopySource {
    pub(crate) ram: Arc<GuestRam>,
    pub(crate) pending: Arc<PageSet>,
    pub(crate) hint: Arc<StreamHint>,
    pub(crate) counters: Arc<SourceCounters>,
    pub(crate) timeout: Duration,
    /// Sessions so far: 0 until the link first breaks and is reconnected.
    pub(crate) session: u32,
}

/// A whole `PageRequest` frame on the wire.
const REQUEST_FRAME_BYTES: usize = HEADER_BYTES + 16;

impl PostcopySource {
    /// Starts answering page requests on `urgent`, on a thread of its own
    /// (see [`super::on_own_thread`]); the set holds that one task.
    pub(crate) fn spawn_urgent(
        &self,
        urgent: Channel,
    ) -> Result<JoinSet<Result<(), MigrateError>>, MigrateError> {
        let server = self.clone();
        let mut tasks = JoinSet::new();
        tasks.spawn(super::on_own_thread("postcopy-urgent", urgent, move |s| {
            server.serve_requests(s)
        })?);
        Ok(tasks)
    }

    /// Answers page requests on the urgent channel until the destination
    /// closes it. Requests that arrive together are answered together;
    /// a page already sent (or on its way on a bulk channel) is not sent
    /// again.
    pub(crate) async fn serve_requests(self, stream: Channel) -> Result<(), MigrateError> {
        let name = "urgent channel";
        let (rd, wr) = (&stream, &stream);
        let mut rd = BufReader::with_capacity(64 << 10, rd);
        let mut writer = BatchWriter::default();
        let mut frame_buf = Vec::new();
        let mut wanted: Vec<(usize, u64)> = Vec::new();
        loop {
            wanted.clear();
            // One request (waiting for it), then every one already here.
            loop {
                let Some((frame, _)) = read_frame(&mut rd, name, None, &mut frame_buf).await?
                else {
                    return Ok(());
                };
                match frame {
                    Frame::Message(Message::PageRequest { region, page }) => {
                        wanted.push((region as usize, page))
                    }
                    Frame::Message(other) => {
                        return Err(MigrateError::Unexpected(format!(
                            "{name}: unexpected {} frame",
                            other.kind().name()
                        )))
                    }
                    Frame::PageBatch(_) => unreachable!("refused by read_frame"),
                }
                let buffered = rd.buffer().len();
                if buffered < REQUEST_FRAME_BYTES {
                    break;
                }
                // Make sure the next frame is whole in the buffer, so that
                // reading it never waits.
                if rd.fill_buf().await.map_err(MigrateError::io(name))?.len() < REQUEST_FRAME_BYTES
                {
                    break;
                }
            }
            // Group by region, in page order: one batch per region.
            wanted.sort_unstable();
            let mut runs: Vec<PageRun> = Vec::new();
            for &(region, page) in &wanted {
                if region >= self.pending.regions() || page >= self.pending.region_pages(region) {
                    return Err(MigrateError::Unexpected(format!(
                        "{name}: request for page {page} of region {region}, outside guest RAM"
                    )));
                }
                if !self.pending.take(region, page) {
                    self.counters
                        .requests_already_sent
                        .fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                append_run(&mut runs, PageRun::page(region, page));
            }
            if let Some(&(region, page)) = wanted.last() {
                self.hint.set(region, page + 1);
            }
            let taken: u64 = runs.iter().map(|r| r.count).sum();
            self.counters
                .pages_requested
                .fetch_add(taken, Ordering::Relaxed);
            // The faulting vCPUs' pages first, in batches of their own, so
            // their wake-up never waits for the read-ahead.
            self.write_runs(&mut writer, wr, &runs, name).await?;
            let ahead = self.read_ahead(&runs);
            self.counters
                .pages_read_ahead
                .fetch_add(ahead.iter().map(|r| r.count).sum(), Ordering::Relaxed);
            self.write_runs(&mut writer, wr, &ahead, name).await?;
        }
    }

    /// The pages after each of `requested` (runs in page order) that are
    /// still pending, up to [`READ_AHEAD_BYTES`] each, taken from the
    /// pending set. A guest touches the pages after a faulting one soon
    /// (a kernel walking a structure, a program its heap); without this,
    /// the next fault finds its page taken by the background stream that
    /// the request pointed there, and waits behind that channel's queue:
    /// measured on the real after-job guest, 2 GiB, unshaped link, every
    /// remote fault slower than 400 µs was such a page.
    fn read_ahead(&self, requested: &[PageRun]) -> Vec<PageRun> {
        let mut ahead: Vec<PageRun> = Vec::new();
        for r in requested {
            let from = r.first_page + r.count;
            let page_bytes = self.ram.regions()[r.region].page_bytes();
            let to = self
                .pending
                .region_pages(r.region)
                .min(from + READ_AHEAD_BYTES / page_bytes);
            for page in from..to {
                if !self.pending.take(r.region, page) {
                    break;
                }
                append_run(&mut ahead, PageRun::page(r.region, page));
            }
        }
        ahead
    }

    /// Writes `runs` (in region order) on the urgent channel: one batch per
    /// region.
    async fn write_runs(
        &self,
        writer: &mut BatchWriter,
        wr: &Channel,
        runs: &[PageRun],
        name: &str,
    ) -> Result<(), MigrateError> {
        let mut start = 0;
        while start < runs.len() {
            let region = runs[start].region;
            let end = runs[start..]
                .iter()
                .position(|r| r.region != region)
                .map_or(runs.len(), |i| start + i);
            let sent = writer
                .write(wr, &self.ram, region, &runs[start..end], self.timeout, name)
                .await?;
            self.counters.count_written(&sent);
            start = end;
        }
        Ok(())
    }

    /// Streams every pending page over `bulk` (one task a channel), from
    /// the last requested page on whenever a request came; returns the
    /// channels once nothing is pending.
    pub(crate) async fn stream_pending(
        self,
        bulk: Vec<Channel>,
        batch_bytes: u64,
    ) -> Result<Vec<Channel>, MigrateError> {
        let cursor = Arc::new(Mutex::new((0usize, 0u64)));
        let mut tasks = JoinSet::new();
        for (i, stream) in bulk.into_iter().enumerate() {
            let me = self.clone();
            let cursor = cursor.clone();
            tasks.spawn(async move {
                let r = me.stream_one(&stream, &cursor, batch_bytes, i).await;
                (i, r.map(|()| stream))
            });
        }
        join_channels(tasks).await
    }

    async fn stream_one(
        &self,
        stream: &Channel,
        cursor: &Mutex<(usize, u64)>,
        batch_bytes: u64,
        index: usize,
    ) -> Result<(), MigrateError> {
        let name = format!("bulk channel {index} (postcopy)");
        let mut writer = BatchWriter::default();
        let mut runs: Vec<PageRun> = Vec::new();
        let regions = self.pending.regions();
        let mut batches = 0u64;
        let figures = || stream.figures();
        let started = Instant::now();
        let mut budget = QueueBudget::new(
            Duration::ZERO,
            figures().bytes_acked,
            super::queue::QUEUE_TARGET_US,
        );
        let mut placed = PlacedReports::default();
        let least_bytes = 2 * batch_bytes;
        let mut sent_guest_bytes = 0u64;
        while self.pending.remaining() > 0 {
            // Take pages only once both queues have room: a page taken
            // waits behind them until placed, and so does a request for it
            // (the request is not answered twice). See `queue`.
            loop {
                placed.read_available(stream, &name)?;
                let f = figures();
                let limit = budget.limit_bytes(started.elapsed(), f.bytes_acked, f.min_rtt_us);
                let unacknowledged = stream.unacknowledged_bytes();
                if unacknowledged <= limit
                    && placed.has_room(sent_guest_bytes, unacknowledged, least_bytes)
                {
                    break;
                }
                // A report of placed pages, or a millisecond.
                let _ = tokio::time::timeout(Duration::from_millis(1), stream.readable()).await;
            }
            runs.clear();
            let (region, taken) = {
                let mut c = cursor.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(h) = self.hint.take() {
                    *c = h;
                }
                let (region, from) = *c;
                if region >= regions {
                    *c = (0, 0);
                    continue;
                }
                let page_bytes = self.ram.regions()[region].page_bytes();
                let max_pages = (batch_bytes / page_bytes).max(1);
                let (taken, stop) = self.pending.take_from(region, from, max_pages, &mut runs);
                *c = if stop >= self.pending.region_pages(region) {
                    ((region + 1) % regions, 0)
                } else {
                    (region, stop)
                };
                (region, taken)
            };
            if taken == 0 {
                continue;
            }
            self.counters
                .pages_streamed
                .fetch_add(taken, Ordering::Relaxed);
            let sent = writer
                .write(stream, &self.ram, region, &runs, self.timeout, &name)
                .await?;
            self.counters.count_written(&sent);
            sent_guest_bytes += sent.pages * self.ram.regions()[region].page_bytes();
            batches += 1;
            if batches == 1 && self.session == 0 {
                hit("src.postcopy-streaming")?;
            }
            if batches == 2 && self.session == 0 && hit("src.postcopy-link-cut").is_err() {
                return Err(MigrateError::Disconnected(
                    "fault point src.postcopy-link-cut: the link is cut".into(),
                ));
            }
        }
        Ok(())
    }
}

/// Ends postcopy's bulk channels: says the stream is over, then reads
/// the destination's last reports of placed pages until it closes its end
/// (closing with unread reports would reset the connection, and with it
/// pages the destination has not read yet).
pub(crate) async fn close_bulk(bulk: Vec<Channel>, timeout: Duration) -> Result<(), MigrateError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let name = "closing a bulk channel (postcopy)";
    let close = async {
        for mut b in bulk {
            b.shutdown().await.map_err(MigrateError::io(name))?;
            let mut reports = Vec::new();
            b.read_to_end(&mut reports)
                .await
                .map_err(MigrateError::io(name))?;
            PlacedReports::default().take_all(&reports, name)?;
        }
        Ok(())
    };
    tokio::time::timeout(timeout, close)
        .await
        .unwrap_or_else(|_| {
            Err(MigrateError::Timeout {
                what: name.into(),
                seconds: timeout.as_secs(),
            })
        })
}
