//! Postcopy: the guest runs on the destination before all of its RAM has
//! arrived (docs/ARCHITECTURE.md, "Postcopy").
//!
//! * [`source`]: after the switch, answers the destination's page requests
//!   on the urgent channel first, and streams the other pending pages on
//!   the bulk channels from near the last request on.
//! * [`destination`]: registers the destination VMM's RAM for MISSING
//!   faults through its userfaultfd, resolves faults on pages that will
//!   never come (free or zero at the switch) at once, requests the others,
//!   and places every page atomically (`UFFDIO_COPY` / `UFFDIO_ZEROPAGE`).
//! * [`PendingPages`]: which pages are still to cross the wire, shared by
//!   every task of one side; taking a page is atomic, so each page crosses
//!   once and is placed once.

pub(crate) mod destination;
pub(crate) mod queue;
pub(crate) mod source;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use freehint_types::PageRun;

use crate::MigrateError;

/// Real-time priority of the threads on a fault's path (the destination's
/// fault thread and both ends of the urgent channel): low, above every
/// ordinary thread and below the kernel's own real-time threads.
const URGENT_FIFO_PRIORITY: i32 = 1;

/// Makes the calling thread, one on a fault's path, run as soon as it
/// wakes: on a busy host an ordinary thread waits for the running one's
/// time slice (milliseconds) and a guest vCPU waits with it. These threads
/// only move single pages and then block, so they cannot starve the host
/// (and the kernel caps real-time threads at 95% of each second). Without
/// the privilege, postcopy still works, with slower faults.
pub(crate) fn run_urgently(what: &str) {
    if let Err(e) = freehint_linux_sys::set_this_thread_fifo(URGENT_FIFO_PRIORITY) {
        tracing::warn!(
            "postcopy: {what} runs at ordinary priority (SCHED_FIFO refused: {e}); faults may wait behind other threads"
        );
    }
}

/// Runs the urgent channel's work on a thread of its own, with its own
/// runtime: page requests and their answers must never wait for a worker
/// that the bulk channels keep busy placing or sending pages. `stream` is
/// moved onto that runtime. The returned task (of the caller's runtime)
/// ends with the work's result.
pub(crate) fn on_own_thread<F, Fut>(
    name: &str,
    stream: tokio::net::TcpStream,
    work: F,
) -> Result<impl Future<Output = Result<(), MigrateError>>, MigrateError>
where
    F: FnOnce(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), MigrateError>>,
{
    let std_stream = stream
        .into_std()
        .map_err(MigrateError::io("moving the urgent channel to its thread"))?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            run_urgently("the urgent channel's thread");
            let r = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(MigrateError::io("starting the urgent channel's runtime"))
                .and_then(|rt| {
                    rt.block_on(async move {
                        let s = tokio::net::TcpStream::from_std(std_stream)
                            .map_err(MigrateError::io("registering the urgent channel"))?;
                        work(s).await
                    })
                });
            let _ = tx.send(r);
        })
        .map_err(MigrateError::io("starting the urgent channel's thread"))?;
    Ok(async move {
        rx.await.unwrap_or_else(|_| {
            Err(MigrateError::Panic(
                "the urgent channel's thread ended without a result".into(),
            ))
        })
    })
}

/// Sends the pages still to cross as `PostcopyPending` messages, closed by
/// `PostcopySwitch` with their count: the source at the switch, the
/// destination when a broken postcopy reconnects. Returns the bytes written.
pub(crate) async fn send_pending_list(
    control: &mut crate::io::ControlChannel,
    runs: &[PageRun],
    timeout: std::time::Duration,
) -> Result<u64, MigrateError> {
    let what = "the list of pages still to come";
    let mut bytes = 0;
    for chunk in runs.chunks(freehint_wire::MAX_RUNS_PER_MESSAGE) {
        bytes += control
            .send(
                &freehint_wire::Message::PostcopyPending(chunk.to_vec()),
                what,
                timeout,
            )
            .await?;
    }
    let pending_pages = runs.iter().map(|r| r.count).sum();
    bytes += control
        .send(
            &freehint_wire::Message::PostcopySwitch { pending_pages },
            what,
            timeout,
        )
        .await?;
    Ok(bytes)
}

/// The operator's word to a source whose postcopy link broke: reconnect
/// now, to the same destination or to `to` (`freehint migrate --resume`).
/// Cheap to clone; every clone speaks to the same migration.
#[derive(Clone, Debug, Default)]
pub struct PostcopyResume(Arc<ResumeInner>);

#[derive(Debug, Default)]
struct ResumeInner {
    notify: tokio::sync::Notify,
    to: std::sync::Mutex<Option<std::net::SocketAddr>>,
}

impl PostcopyResume {
    /// Asks the source to reconnect now (to `to`, if given). A word given
    /// while the link is up is kept for the next break.
    pub fn resume(&self, to: Option<std::net::SocketAddr>) {
        if to.is_some() {
            *self.0.to.lock().unwrap_or_else(|e| e.into_inner()) = to;
        }
        self.0.notify.notify_one();
    }

    /// Waits for the operator's word; the new destination, if one was named.
    pub(crate) async fn wait(&self) -> Option<std::net::SocketAddr> {
        self.0.notify.notified().await;
        self.0.to.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// Duplicates of the sockets of one postcopy session, to cut them all at
/// once when one breaks: every task on the old connections then ends (on
/// both sides: the peer reads an end of stream) before a new session
/// starts, so no page of the old session is placed after the destination
/// has said which pages it still lacks.
#[derive(Debug, Default)]
pub(crate) struct Links(Vec<std::net::TcpStream>);

impl Links {
    /// Adds a duplicate of `s`'s socket (none if the fd cannot be
    /// duplicated: that connection is then cut only by its peer).
    pub(crate) fn add(&mut self, s: &tokio::net::TcpStream) {
        use std::os::fd::AsFd;
        match s.as_fd().try_clone_to_owned() {
            Ok(fd) => self.0.push(std::net::TcpStream::from(fd)),
            Err(e) => tracing::warn!("postcopy: cannot duplicate a socket to cut it later: {e}"),
        }
    }

    /// Duplicates of every socket of one session.
    pub(crate) fn of<'a>(sockets: impl IntoIterator<Item = &'a tokio::net::TcpStream>) -> Self {
        let mut links = Self::default();
        for s in sockets {
            links.add(s);
        }
        links
    }

    /// Shuts every connection down, both ways.
    pub(crate) fn cut(&mut self) {
        for s in self.0.drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// A set of pages per region, as atomic bits: the pages still to come (or
/// still to send). Any task may take a page; exactly one succeeds.
#[derive(Debug)]
pub(crate) struct PendingPages {
    words: Vec<Vec<AtomicU64>>,
    pages: Vec<u64>,
    remaining: AtomicU64,
}

impl PendingPages {
    /// An empty set shaped like regions of `pages` pages each.
    pub(crate) fn new(pages: &[u64]) -> Self {
        Self {
            words: pages
                .iter()
                .map(|&n| (0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
                .collect(),
            pages: pages.to_vec(),
            remaining: AtomicU64::new(0),
        }
    }

    /// Pages in `region` (0 if it does not exist).
    pub(crate) fn region_pages(&self, region: usize) -> u64 {
        self.pages.get(region).copied().unwrap_or(0)
    }

    /// Regions.
    pub(crate) fn regions(&self) -> usize {
        self.pages.len()
    }

    /// Adds `run`; `false` if it lies outside the regions.
    pub(crate) fn insert(&self, run: PageRun) -> bool {
        let Some(end) = run.end_page() else {
            return false;
        };
        if end > self.region_pages(run.region) {
            return false;
        }
        // A word at a time: the switch lists up to millions of pages, and
        // the guest waits for the list.
        let words = &self.words[run.region];
        let mut fresh = 0u64;
        let mut p = run.first_page;
        while p < end {
            let wi = p / 64;
            let last = end.min((wi + 1) * 64);
            let bits = last - p;
            let mask = if bits == 64 {
                !0
            } else {
                ((1u64 << bits) - 1) << (p % 64)
            };
            let prev = words[wi as usize].fetch_or(mask, Ordering::AcqRel);
            fresh += (mask & !prev).count_ones() as u64;
            p = last;
        }
        self.remaining.fetch_add(fresh, Ordering::AcqRel);
        true
    }

    /// Adds one page; `true` if it was not in the set before.
    pub(crate) fn mark(&self, region: usize, page: u64) -> bool {
        if page >= self.region_pages(region) {
            return false;
        }
        let bit = 1u64 << (page % 64);
        let fresh =
            self.words[region][(page / 64) as usize].fetch_or(bit, Ordering::AcqRel) & bit == 0;
        if fresh {
            self.remaining.fetch_add(1, Ordering::AcqRel);
        }
        fresh
    }

    /// Whether `page` of `region` is in the set.
    pub(crate) fn contains(&self, region: usize, page: u64) -> bool {
        self.words
            .get(region)
            .and_then(|w| w.get((page / 64) as usize))
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (page % 64)) != 0)
    }

    /// Takes `page` out of the set; `true` for the one caller that did.
    pub(crate) fn take(&self, region: usize, page: u64) -> bool {
        if page >= self.region_pages(region) {
            return false;
        }
        let w = &self.words[region][(page / 64) as usize];
        let bit = 1u64 << (page % 64);
        let took = w.fetch_and(!bit, Ordering::AcqRel) & bit != 0;
        if took {
            self.remaining.fetch_sub(1, Ordering::AcqRel);
        }
        took
    }

    /// Takes up to `max_pages` pages of `region` from `from` on (not past
    /// the region's end), appending them to `out` as runs; returns the
    /// pages taken and the page after the last one looked at.
    pub(crate) fn take_from(
        &self,
        region: usize,
        from: u64,
        max_pages: u64,
        out: &mut Vec<PageRun>,
    ) -> (u64, u64) {
        let end = self.region_pages(region);
        let mut taken = 0;
        let mut p = from;
        while p < end && taken < max_pages {
            let wi = (p / 64) as usize;
            let word_end = (wi as u64 + 1) * 64;
            let mut want = !0u64 << (p % 64);
            if word_end > end {
                want &= (1u64 << (end % 64)) - 1;
            }
            let word = &self.words[region][wi];
            if word.load(Ordering::Acquire) & want == 0 {
                p = word_end;
                continue;
            }
            let got = word.fetch_and(!want, Ordering::AcqRel) & want;
            let mut bits = got;
            let mut put_back = 0u64;
            p = word_end;
            while bits != 0 {
                let b = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                let page = wi as u64 * 64 + b;
                if taken == max_pages {
                    // Never take more than asked: give the rest back.
                    if put_back == 0 {
                        p = page;
                    }
                    put_back |= 1 << b;
                    continue;
                }
                taken += 1;
                match out.last_mut() {
                    Some(r) if r.region == region && r.first_page + r.count == page => r.count += 1,
                    _ => out.push(PageRun::page(region, page)),
                }
            }
            if put_back != 0 {
                word.fetch_or(put_back, Ordering::AcqRel);
            }
            self.remaining
                .fetch_sub((got & !put_back).count_ones() as u64, Ordering::AcqRel);
        }
        (taken, p.min(end))
    }

    /// Pages in the set.
    pub(crate) fn remaining(&self) -> u64 {
        self.remaining.load(Ordering::Acquire)
    }

    /// The set as runs (a snapshot).
    pub(crate) fn runs(&self) -> Vec<PageRun> {
        let mut out: Vec<PageRun> = Vec::new();
        for (region, words) in self.words.iter().enumerate() {
            for (wi, w) in words.iter().enumerate() {
                let mut bits = w.load(Ordering::Acquire);
                while bits != 0 {
                    let b = bits.trailing_zeros() as u64;
                    bits &= bits - 1;
                    let page = wi as u64 * 64 + b;
                    match out.last_mut() {
                        Some(r) if r.region == region && r.first_page + r.count == page => {
                            r.count += 1
                        }
                        _ => out.push(PageRun::page(region, page)),
                    }
                }
            }
        }
        out
    }
}

/// Latencies of remote faults, µs, summarised at the end.
#[derive(Debug, Default)]
pub(crate) struct Latencies(std::sync::Mutex<Vec<u64>>);

impl Latencies {
    pub(crate) fn record(&self, us: u64) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(us);
    }

    /// (p50, p99, max) in µs; zeros when nothing was recorded.
    pub(crate) fn summary(&self) -> (u64, u64, u64) {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if v.is_empty() {
            return (0, 0, 0);
        }
        v.sort_unstable();
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        (at(0.50), at(0.99), v[v.len() - 1])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_page_is_taken_once_whichever_way() {
        let p = PendingPages::new(&[200, 10]);
        assert!(p.insert(PageRun::new(0, 3, 100)));
        assert!(p.insert(PageRun::new(0, 50, 10))); // overlaps: not counted twice
        assert!(p.insert(PageRun::new(1, 9, 1)));
        assert!(!p.insert(PageRun::new(1, 9, 2)));
        assert!(!p.insert(PageRun::new(2, 0, 1)));
        assert_eq!(p.remaining(), 101);
        assert!(p.take(0, 70));
        assert!(!p.take(0, 70));
        assert!(!p.take(0, 2));
        assert!(!p.take(0, 5000));
        let mut out = Vec::new();
        let (n, stop) = p.take_from(0, 60, 20, &mut out);
        assert_eq!(n, 20);
        assert_eq!(out, vec![PageRun::new(0, 60, 10), PageRun::new(0, 71, 10)]);
        assert_eq!(stop, 81);
        assert!(p.contains(0, 81));
        assert!(!p.contains(0, 80));
        assert_eq!(p.remaining(), 80);
        out.clear();
        let (n, stop) = p.take_from(0, 0, 1000, &mut out);
        assert_eq!(n, 79);
        assert_eq!(stop, 200);
        assert_eq!(p.remaining(), 1);
        assert_eq!(p.runs(), vec![PageRun::new(1, 9, 1)]);
        assert!(p.take(1, 9));
        assert_eq!(p.remaining(), 0);
        assert!(p.mark(1, 3));
        assert!(!p.mark(1, 3));
        assert!(!p.mark(1, 10));
        assert_eq!(p.remaining(), 1);
    }

    #[test]
    fn concurrent_takers_share_the_pages_exactly() {
        let p = std::sync::Arc::new(PendingPages::new(&[100_000]));
        p.insert(PageRun::new(0, 0, 100_000));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let p = p.clone();
                std::thread::spawn(move || {
                    let mut mine = 0u64;
                    let mut out = Vec::new();
                    let mut at = t * 25_000;
                    loop {
                        if t % 2 == 0 && p.take(0, (at * 7) % 100_000) {
                            mine += 1;
                        }
                        out.clear();
                        let (n, stop) = p.take_from(0, at, 33, &mut out);
                        assert_eq!(n, out.iter().map(|r| r.count).sum::<u64>());
                        mine += n;
                        at = if stop >= 100_000 { 0 } else { stop };
                        if p.remaining() == 0 {
                            return mine;
                        }
                    }
                })
            })
            .collect();
        let total: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(total, 100_000);
    }

    #[test]
    fn latency_summary() {
        let l = Latencies::default();
        assert_eq!(l.summary(), (0, 0, 0));
        for us in 1..=100 {
            l.record(us);
        }
        assert_eq!(l.summary(), (51, 99, 100));
    }
}
