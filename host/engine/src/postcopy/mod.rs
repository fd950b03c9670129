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
//! * [`PageSet`](crate::page_set::PageSet) holds the pages still to
//!   cross the wire, shared by every task of one side; taking a page is
//!   atomic, so each page crosses once and is placed once.

pub(crate) mod destination;
pub(crate) mod queue;
pub(crate) mod source;

use std::future::Future;
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
    stream: crate::transport::Channel,
    work: F,
) -> Result<impl Future<Output = Result<(), MigrateError>>, MigrateError>
where
    F: FnOnce(crate::transport::Channel) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), MigrateError>>,
{
    let detached = stream
        .detach()
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
                        let s = detached
                            .attach()
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
pub(crate) struct Links(Vec<crate::transport::LinkCut>);

impl Links {
    /// Adds a way to cut `s` (none if it cannot be made: that connection
    /// is then cut only by its peer).
    pub(crate) fn add(&mut self, s: &crate::transport::Channel) {
        self.0.extend(s.cut_handle());
    }

    /// Ways to cut every connection of one session.
    pub(crate) fn of<'a>(
        channels: impl IntoIterator<Item = &'a crate::transport::Channel>,
    ) -> Self {
        let mut links = Self::default();
        for s in channels {
            links.add(s);
        }
        links
    }

    /// Shuts every connection down, both ways.
    pub(crate) fn cut(&mut self) {
        for s in self.0.drain(..) {
            s.cut();
        }
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
    fn latency_summary() {
        let l = Latencies::default();
        assert_eq!(l.summary(), (0, 0, 0));
        for us in 1..=100 {
            l.record(us);
        }
        assert_eq!(l.summary(), (51, 99, 100));
    }
}
