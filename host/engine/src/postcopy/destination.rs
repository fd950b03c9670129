//! The destination's side of postcopy: the destination VMM's RAM is
//! registered for MISSING faults through its own userfaultfd (the preload
//! library's); a fault on a page still to come becomes a request on the
//! urgent channel, a fault on a page that will never come (free or zero at
//! the switch) is resolved here at once, and every page is placed
//! atomically with `UFFDIO_COPY` / `UFFDIO_ZEROPAGE`, never written through
//! a mapping the guest can see.
//!
//! Why MISSING and not MINOR faults (`UFFDIO_CONTINUE`): MINOR faults fire
//! on pages already in the page cache, so the page content would have to be
//! written into the RAM file first (through a second mapping) and then
//! mapped: two steps and a window in which a half-written page is in the
//! file. `UFFDIO_COPY` allocates, fills and maps a page in one step, works
//! the same on shmem and hugetlbfs, and needs no second mapping; pages
//! received before the switch are simply present and never fault.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use freehint_dirty_log::{find_placement_userfaultfd, TrackedRange};
use freehint_memory::GuestRam;
use freehint_placement::{MissingPlacer, Placed, PlacementError};
use freehint_wire::{BatchEntry, Message, PostcopyReport};

use super::Latencies;
use crate::page_set::PageSet;
use crate::{vmm_ram_ranges, MigrateError};

/// What the destination counts in postcopy.
#[derive(Debug, Default)]
struct Counters {
    faults_remote: AtomicU64,
    faults_local: AtomicU64,
    pages_placed: AtomicU64,
    pages_requested: AtomicU64,
    pages_read_ahead: AtomicU64,
    pages_streamed: AtomicU64,
}

/// Pages that arrived in postcopy, by how.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct PagesArrived {
    /// On the urgent channel, asked for by a fault.
    pub(crate) requested: u64,
    /// On the urgent channel, unasked: the source's read-ahead.
    pub(crate) read_ahead: u64,
    /// On the bulk channels.
    pub(crate) streamed: u64,
}

/// Where a guest page is in the destination VMM.
struct Mapped {
    address: u64,
    page_bytes: u64,
    /// Pages from this one to the end of its mapped range.
    pages_to_end: u64,
}

/// The destination VMM's RAM during postcopy.
pub(crate) struct PostcopyDestination {
    /// Dropped (unregistering the RAM) only once every pending page is
    /// placed: unregistering earlier would let a waiting fault go on and
    /// read a zero page where the source holds data.
    placer: std::mem::ManuallyDrop<MissingPlacer>,
    ranges: Vec<TrackedRange>,
    /// Pages still to come.
    pending: Arc<PageSet>,
    /// Pages requested (faulted on) so far.
    requested: PageSet,
    fault_at: Mutex<HashMap<(usize, u64), Instant>>,
    latencies: Latencies,
    counters: Counters,
    /// One huge page of zeros, for zero huge pages (`UFFDIO_ZEROPAGE` does
    /// not work on hugetlbfs).
    zero_huge_page: Vec<u8>,
    /// Taken (closing the channel, which ends the urgent channel's work)
    /// once postcopy is over.
    requests: Mutex<Option<tokio::sync::mpsc::UnboundedSender<(usize, u64)>>>,
    stop: AtomicBool,
    /// Why the fault thread stopped early, if it did.
    fault_error: Mutex<Option<String>>,
}

impl std::fmt::Debug for PostcopyDestination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostcopyDestination")
            .field("pending", &self.pending.remaining())
            .finish_non_exhaustive()
    }
}

impl PostcopyDestination {
    /// Takes the userfaultfd of VMM process `pid` and registers its
    /// mappings of `ram` for missing faults. Requests for pages go to
    /// `requests`.
    pub(crate) fn attach(
        pid: i32,
        ram: &GuestRam,
        pending: Arc<PageSet>,
        requests: tokio::sync::mpsc::UnboundedSender<(usize, u64)>,
    ) -> Result<Self, MigrateError> {
        let fd = find_placement_userfaultfd(pid)?;
        let pidfd = freehint_linux_sys::pidfd_open(pid).map_err(|e| {
            MigrateError::Postcopy(format!("pidfd_open of the destination VMM {pid}: {e}"))
        })?;
        let uffd = freehint_linux_sys::pidfd_getfd(&pidfd, fd).map_err(|e| {
            MigrateError::Postcopy(format!(
                "taking the userfaultfd of the destination VMM {pid}: {e}"
            ))
        })?;
        let mut placer = MissingPlacer::new(uffd)?;
        let ranges = vmm_ram_ranges(pid, ram)?;
        for r in &ranges {
            placer.register(r.vaddr_start, r.len_bytes, r.page_bytes)?;
        }
        let huge = ranges
            .iter()
            .map(|r| r.page_bytes)
            .filter(|&b| b > 4096)
            .max()
            .unwrap_or(0);
        Ok(Self {
            placer: std::mem::ManuallyDrop::new(placer),
            ranges,
            pending,
            requested: PageSet::for_ram(ram),
            fault_at: Mutex::new(HashMap::new()),
            latencies: Latencies::default(),
            counters: Counters::default(),
            zero_huge_page: vec![0; huge as usize],
            requests: Mutex::new(Some(requests)),
            stop: AtomicBool::new(false),
            fault_error: Mutex::new(None),
        })
    }

    /// Pages still to come.
    pub(crate) fn remaining(&self) -> u64 {
        self.pending.remaining()
    }

    /// The VMM's address of `page` of `region`, its mapped range's page
    /// size, and how many pages from it on are contiguous there (to the
    /// range's end).
    fn mapped(&self, region: usize, page: u64) -> Option<Mapped> {
        self.ranges.iter().find_map(|r| {
            let pages = r.len_bytes / r.page_bytes;
            (r.region == region && page >= r.first_page && page < r.first_page + pages).then(|| {
                Mapped {
                    address: r.vaddr_start + (page - r.first_page) * r.page_bytes,
                    page_bytes: r.page_bytes,
                    pages_to_end: r.first_page + pages - page,
                }
            })
        })
    }

    /// Region and page of a faulting VMM address.
    fn page_at(&self, address: u64) -> Option<(usize, u64)> {
        self.ranges.iter().find_map(|r| {
            (address >= r.vaddr_start && address < r.vaddr_start + r.len_bytes).then(|| {
                (
                    r.region,
                    r.first_page + (address - r.vaddr_start) / r.page_bytes,
                )
            })
        })
    }

    /// Places one batch (its `data` holds the data pages in order).
    /// `requested`: it came on the urgent channel.
    pub(crate) fn place_batch(
        &self,
        region: usize,
        entries: &[BatchEntry],
        data: &[u8],
        page_bytes: u64,
        requested: bool,
    ) -> Result<(), MigrateError> {
        let mut at = 0usize;
        for entry in entries {
            match *entry {
                BatchEntry::Data { first_page, count } => {
                    let len = (count * page_bytes) as usize;
                    let content = data.get(at..at + len).ok_or_else(|| {
                        MigrateError::Unexpected("page batch shorter than its head".into())
                    })?;
                    at += len;
                    self.place_run(region, first_page, count, Some(content), page_bytes)?;
                }
                BatchEntry::Zero { first_page, count } => {
                    self.place_run(region, first_page, count, None, page_bytes)?;
                }
            }
            let (first_page, n) = match *entry {
                BatchEntry::Data { first_page, count } | BatchEntry::Zero { first_page, count } => {
                    (first_page, count)
                }
            };
            if requested {
                let asked = (first_page..first_page + n)
                    .filter(|&p| self.requested.contains(region, p))
                    .count() as u64;
                self.counters
                    .pages_requested
                    .fetch_add(asked, Ordering::Relaxed);
                self.counters
                    .pages_read_ahead
                    .fetch_add(n - asked, Ordering::Relaxed);
            } else {
                self.counters.pages_streamed.fetch_add(n, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Places `count` pages from `first_page`: `content`, or zeros. Pages
    /// contiguous in the VMM's address space are placed with one call.
    fn place_run(
        &self,
        region: usize,
        first_page: u64,
        count: u64,
        content: Option<&[u8]>,
        page_bytes: u64,
    ) -> Result<(), MigrateError> {
        for page in first_page..first_page + count {
            if !self.pending.contains(region, page) {
                return Err(MigrateError::Postcopy(format!(
                    "the source sent page {page} of region {region}, which is not pending (sent twice, or never listed)"
                )));
            }
        }
        let mut done = 0u64;
        while done < count {
            let page = first_page + done;
            let m = self.mapped(region, page).ok_or_else(|| {
                MigrateError::Postcopy(format!(
                    "page {page} of region {region} is not mapped by the destination VMM"
                ))
            })?;
            let n = m.pages_to_end.min(count - done);
            let placed = match content {
                Some(c) => {
                    let off = (done * page_bytes) as usize;
                    let c = &c[off..off + (n * page_bytes) as usize];
                    self.waiting_for_memory(m.address, c.len() as u64, |done| {
                        self.placer.place(m.address + done, &c[done as usize..])
                    })?
                }
                None => self.place_zero(m.address, page_bytes, n)?,
            };
            if placed == Placed::AlreadyPresent {
                return Err(MigrateError::Postcopy(format!(
                    "a page of region {region} in pages {page}..{} was present before it arrived",
                    page + n
                )));
            }
            for p in page..page + n {
                self.done(region, p);
            }
            done += n;
        }
        Ok(())
    }

    /// Places `pages` zero pages of `page_bytes` from `address`; stops at
    /// the first one already present.
    fn place_zero(
        &self,
        address: u64,
        page_bytes: u64,
        pages: u64,
    ) -> Result<Placed, MigrateError> {
        if page_bytes <= 4096 {
            let len = pages * page_bytes;
            return self.waiting_for_memory(address, len, |done| {
                self.placer.place_zero(address + done, len - done)
            });
        }
        // No UFFDIO_ZEROPAGE on hugetlbfs: a huge page of zeros at a time.
        for i in 0..pages {
            let at = address + i * page_bytes;
            let zeros = &self.zero_huge_page[..page_bytes as usize];
            if self.waiting_for_memory(at, page_bytes, |done| {
                self.placer.place(at + done, &zeros[done as usize..])
            })? == Placed::AlreadyPresent
            {
                return Ok(Placed::AlreadyPresent);
            }
        }
        Ok(Placed::Now)
    }

    /// Runs a placement; while the kernel has no memory for it (`ENOMEM`:
    /// the host is short of memory, or a hugetlbfs pool has no free page of
    /// that size), waits and tries again, saying so every 10 s. The guest
    /// runs here and waits for these pages: giving up would lose it (the
    /// source's copy is stale since the resume), waiting may not. Blocks
    /// the calling thread; ends with the error once postcopy is stopped.
    /// `place(done_bytes)` places from `address + done_bytes` on: a retry
    /// goes on from where the last try stopped.
    fn waiting_for_memory(
        &self,
        address: u64,
        len_bytes: u64,
        place: impl Fn(u64) -> Result<Placed, PlacementError>,
    ) -> Result<Placed, MigrateError> {
        let mut wait = Duration::from_millis(1);
        let mut said: Option<Instant> = None;
        let mut done_bytes = 0;
        loop {
            match place(done_bytes) {
                Err(PlacementError::Place {
                    address: at,
                    source,
                    ..
                }) if source.raw_os_error() == Some(libc::ENOMEM)
                    && !self.stop.load(Ordering::Acquire)
                    && (address..address + len_bytes).contains(&at) =>
                {
                    done_bytes = at - address;
                    if said.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                        tracing::error!(
                            "postcopy: this host has no memory for {len_bytes} bytes of guest pages at {address:#x} (on hugetlbfs: no free huge page of that size); the guest waits for them here; trying again until memory is freed"
                        );
                        said = Some(Instant::now());
                    }
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(Duration::from_secs(1));
                }
                r => return Ok(r?),
            }
        }
    }

    /// A pending page is placed: account for it, and for the fault that
    /// waited on it.
    fn done(&self, region: usize, page: u64) {
        if self.pending.take(region, page) {
            self.counters.pages_placed.fetch_add(1, Ordering::Relaxed);
        }
        if self.requested.contains(region, page) {
            let t = self
                .fault_at
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&(region, page));
            if let Some(t) = t {
                self.latencies.record(t.elapsed().as_micros() as u64);
            }
        }
    }

    /// Handles one fault of the guest.
    fn on_fault(&self, address: u64, at: Instant) -> Result<(), MigrateError> {
        let Some((region, page)) = self.page_at(address) else {
            return Err(MigrateError::Postcopy(format!(
                "fault at {address:#x}, outside guest RAM"
            )));
        };
        if self.pending.contains(region, page) {
            // Still to come: ask for it, once.
            let mut fault_at = self.fault_at.lock().unwrap_or_else(|e| e.into_inner());
            if self.requested.mark(region, page) {
                fault_at.insert((region, page), at);
                drop(fault_at);
                self.counters.faults_remote.fetch_add(1, Ordering::Relaxed);
                // The channel is closed only when postcopy is over.
                if let Some(tx) = &*self.requests.lock().unwrap_or_else(|e| e.into_inner()) {
                    let _ = tx.send((region, page));
                }
            }
            return Ok(());
        }
        // Never coming (free or zero at the switch), or placed meanwhile
        // (then the placement woke the guest and this finds it present).
        let m = self.mapped(region, page).ok_or_else(|| {
            MigrateError::Postcopy(format!("page {page} of region {region} is not mapped"))
        })?;
        if self.place_zero(m.address, m.page_bytes, 1)? == Placed::Now {
            self.counters.faults_local.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Reads the guest's faults until [`Self::stop`]; on an error, records
    /// it (see [`Self::fault_error`]) and stops.
    pub(crate) fn spawn_fault_thread(self: &Arc<Self>) -> std::io::Result<()> {
        let me = self.clone();
        std::thread::Builder::new()
            .name("postcopy-faults".into())
            .spawn(move || {
                super::run_urgently("the fault thread");
                while !me.stop.load(Ordering::Acquire) {
                    let r = me
                        .placer
                        .next_fault(Duration::from_millis(50))
                        .map_err(MigrateError::from)
                        .and_then(|f| match f {
                            Some(f) => me.on_fault(f.address, Instant::now()),
                            None => Ok(()),
                        });
                    if let Err(e) = r {
                        tracing::error!(
                            "postcopy fault handling: {}",
                            freehint_types::ErrorChain(&e)
                        );
                        *me.fault_error.lock().unwrap_or_else(|e| e.into_inner()) =
                            Some(freehint_types::ErrorChain(&e).to_string());
                        return;
                    }
                }
            })
            .map(|_| ())
    }

    /// Why the fault thread stopped early, if it did.
    pub(crate) fn fault_error(&self) -> Option<String> {
        self.fault_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Ends postcopy once every page is placed: unregisters the RAM (a
    /// fault waiting on a page that never comes, free at the switch and
    /// not yet resolved, goes on as an ordinary fault: a zero page), stops
    /// the fault thread and closes the request channel. Does nothing while
    /// pages are still to come: the guest must wait for them, not read
    /// zeros.
    pub(crate) fn finish(&self) {
        if self.pending.remaining() > 0 {
            return;
        }
        self.placer.unregister_all();
        self.stop.store(true, Ordering::Release);
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }

    /// The pages still to come, as runs.
    pub(crate) fn lacking(&self) -> Vec<freehint_types::PageRun> {
        self.pending.runs()
    }

    /// A new request channel, for a new session after a broken link: the
    /// old one went with its connection. Every page requested and not yet
    /// placed is requested again on it.
    pub(crate) fn restart_requests(&self) -> tokio::sync::mpsc::UnboundedReceiver<(usize, u64)> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        // Swapped first: a fault from now on asks on the new channel, and
        // one that asked before is in `requested` for the loop below.
        *self.requests.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx.clone());
        for run in self.requested.runs() {
            for page in run.first_page..run.first_page + run.count {
                if self.pending.contains(run.region, page) {
                    let _ = tx.send((run.region, page));
                }
            }
        }
        rx
    }

    /// The figures so far.
    pub(crate) fn report(&self) -> PostcopyReport {
        let (p50, p99, max) = self.latencies.summary();
        PostcopyReport {
            pages_placed: self.counters.pages_placed.load(Ordering::Relaxed),
            faults_remote: self.counters.faults_remote.load(Ordering::Relaxed),
            faults_local: self.counters.faults_local.load(Ordering::Relaxed),
            fault_latency_us_p50: p50,
            fault_latency_us_p99: p99,
            fault_latency_us_max: max,
        }
    }

    /// Pages that arrived on the urgent channel (asked for, read ahead)
    /// and on the bulk ones.
    pub(crate) fn pages_arrived(&self) -> PagesArrived {
        PagesArrived {
            requested: self.counters.pages_requested.load(Ordering::Relaxed),
            read_ahead: self.counters.pages_read_ahead.load(Ordering::Relaxed),
            streamed: self.counters.pages_streamed.load(Ordering::Relaxed),
        }
    }
}

impl Drop for PostcopyDestination {
    fn drop(&mut self) {
        if self.pending.remaining() == 0 {
            // SAFETY: dropped once, here, and never used again.
            unsafe { std::mem::ManuallyDrop::drop(&mut self.placer) };
        } else {
            tracing::error!(
                pages = self.pending.remaining(),
                "postcopy ends with pages missing: the guest RAM stays registered, so the guest waits on their faults rather than read zeros"
            );
        }
    }
}

/// Writes the page requests that `requests` carries to the urgent channel,
/// those that queued up together in one write.
pub(crate) async fn send_requests(
    mut w: crate::transport::ChannelWriter,
    mut requests: tokio::sync::mpsc::UnboundedReceiver<(usize, u64)>,
    timeout: Duration,
) -> Result<(), MigrateError> {
    use tokio::io::AsyncWriteExt;
    let mut buf = Vec::new();
    while let Some((region, page)) = requests.recv().await {
        buf.clear();
        let mut push = |(region, page): (usize, u64)| {
            Message::PageRequest {
                region: region as u32,
                page,
            }
            .encode(&mut buf)
        };
        push((region, page));
        while let Ok(more) = requests.try_recv() {
            push(more);
        }
        let write = async {
            w.write_all(&buf).await?;
            w.flush().await
        };
        match tokio::time::timeout(timeout, write).await {
            Ok(r) => r.map_err(MigrateError::io("urgent channel: sending page requests"))?,
            Err(_) => {
                return Err(MigrateError::Timeout {
                    what: "the source to take page requests".into(),
                    seconds: timeout.as_secs(),
                })
            }
        }
    }
    Ok(())
}
