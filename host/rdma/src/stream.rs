//! An RDMA connection as a byte stream (see the crate's doc for the
//! protocol, `wire` for the message format).
//!
//! Who posts receives first: each side posts all [`RECEIVE_SLOTS`] of its
//! receive buffers before it connects or accepts, and the other side
//! starts with that many credits. A buffer is reposted once its message
//! is consumed, and the credit goes back in the next message's header
//! (or in a control message once half the buffers wait to be reported),
//! so a sender never SENDs into a queue without a posted receive.
//!
//! How the receiver knows data arrived: a receive completion, whose
//! header says exactly how many payload bytes follow; page references
//! become stream bytes once every READ of theirs has completed.
//!
//! What happens on error: any completion that is not a success (a
//! refused key, a flushed queue after the peer went away) or a
//! malformed message fails the stream; every later call returns that
//! error, and dropping the stream tears the queue pair down before any
//! buffer it may touch is freed.

use std::collections::VecDeque;
use std::io;
use std::mem::MaybeUninit;
use std::ops::Range;
use std::ptr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use rdma_sys::*;
use tokio::io::unix::AsyncFd;
use tokio::task::JoinHandle;

use crate::registry::{at_or_after, Registry};
use crate::verbs::{
    check, event_name, watch, Access, Conn, DmaBuffer, Mr, WatchedFd, SEND_QUEUE_ENTRIES,
};
use crate::wire::{
    page_refs, Header, Kind, PageRef, HEADER_BYTES, MAX_DATA_BYTES, MAX_PAGE_REFS, MESSAGE_BYTES,
    PAGE_REF_BYTES,
};

/// Receive buffers each side posts (and so messages the peer may have
/// in flight towards it).
pub(crate) const RECEIVE_SLOTS: usize = 16;
/// Send buffers of a side: messages it may have posted at once.
const SEND_SLOTS: usize = 16;
/// Bytes of one half of the staging buffer that READs land in: one half
/// is copied out while the other is fetched.
const STAGE_HALF_BYTES: usize = 2 << 20;
/// Most READs posted for one half (one per 4 KiB page at worst).
const MAX_READS_PER_FILL: usize = STAGE_HALF_BYTES / 4096;
const _: () = assert!(SEND_SLOTS + 2 * MAX_READS_PER_FILL <= SEND_QUEUE_ENTRIES as usize);

const TAG_MASK: u64 = 0xf << 60;
const TAG_SEND: u64 = 1 << 60;
const TAG_RECEIVE: u64 = 2 << 60;
const TAG_READ: u64 = 3 << 60;

/// A message being filled in a send slot.
struct Outgoing {
    slot: usize,
    kind: Kind,
    /// Payload bytes written so far.
    used: usize,
    /// For page references: the bytes they stand for.
    remote_bytes: u64,
}

/// A received message not yet consumed (its receive buffer is reposted
/// once it is).
struct Incoming {
    slot: usize,
    body: Body,
}

enum Body {
    Data {
        len: usize,
        consumed: usize,
    },
    Pages {
        refs: Vec<PageRef>,
        total: u64,
        /// Where the next READ starts: reference and offset in it.
        fetch_ref: usize,
        fetch_offset: u32,
        fetched: u64,
        consumed: u64,
    },
}

/// READs into one staging half.
struct Fill {
    half: usize,
    bytes: usize,
    /// READs not yet completed.
    pending: usize,
    copied: usize,
}

/// Why the stream failed.
#[derive(Clone)]
struct Failure {
    kind: io::ErrorKind,
    message: String,
    /// A flushed work request after the connection went down: data
    /// already received may still be read.
    flushed: bool,
}

impl Failure {
    fn to_io(&self) -> io::Error {
        io::Error::new(self.kind, self.message.clone())
    }
}

/// Everything the stream changes, under one lock.
struct State {
    receive_buffer: DmaBuffer,
    receive_mr: Mr,
    send_buffer: DmaBuffer,
    send_mr: Mr,
    stage_buffer: DmaBuffer,
    stage_mr: Mr,
    registry: Registry,

    /// Messages the peer can take now.
    credits: u32,
    free_send_slots: Vec<usize>,
    send_bytes: [usize; SEND_SLOTS],
    current: Option<Outgoing>,
    /// Page-reference messages posted, from the start (wrapping).
    segments_sent: u32,
    /// Posted page-reference messages the peer has not said it read:
    /// number and bytes.
    unread: VecDeque<(u32, u64)>,
    /// The peer's count of page-reference messages it has read.
    peer_segments_read: u32,
    /// We sent close: no more writes.
    closing: bool,
    /// Stream bytes written (inline or by reference), from the start.
    bytes_written: u64,

    incoming: VecDeque<Incoming>,
    /// Receive buffers reposted and not yet reported to the peer.
    owed: u32,
    /// Page-reference messages we have read (and, reported, the count
    /// the peer last heard).
    segments_read: u32,
    segments_read_reported: u32,
    fills: VecDeque<Fill>,
    free_halves: Vec<usize>,
    /// The peer sent close.
    peer_closed: bool,
    failed: Option<Failure>,

    /// Tasks waiting to read, and to write (each may be several: one
    /// waits for readiness while another reads, say).
    read_wakers: Vec<Waker>,
    write_wakers: Vec<Waker>,
    /// The peer's address, for logs.
    peer: Option<std::net::SocketAddr>,
}

/// The connection's objects and its state. Dropping it destroys the
/// queue pair first, then the state (registrations, buffers), then the
/// rest of the connection (fields drop in order).
pub(crate) struct Shared {
    state: Mutex<State>,
    /// Tells the driving task the stream was dropped: it closes our
    /// direction and lingers until the peer has read what it was sent.
    dropped: tokio::sync::Notify,
    conn: Conn,
}

/// How long the last owner of a connection waits, when no driving task
/// lingered for it (its runtime was shut down, a detached stream never
/// attached), for the close and its page references to reach the peer.
const DROP_LINGER: std::time::Duration = std::time::Duration::from_secs(2);

impl Drop for Shared {
    fn drop(&mut self) {
        // Usually the driving task lingered and all is delivered; if its
        // runtime went away first, close here, polling for a moment, so
        // the peer still reads an end of stream rather than a cut link.
        let conn = &self.conn;
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        let deadline = std::time::Instant::now() + DROP_LINGER;
        loop {
            st.progress(conn);
            if st.linger_done(conn) || std::time::Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        self.conn.destroy_qp();
    }
}

/// An RDMA connection: a byte stream in SEND messages, whose bytes may
/// also be references to our memory that the peer reads (see
/// [`RdmaStream::try_write_ref`]).
///
/// Like a tokio `TcpStream` it is read and written through `&self`, by
/// one reading and one writing task at a time. A task on the runtime it
/// was made on takes its completions and connection events, so credits
/// and acknowledgements flow while neither side calls it.
pub struct RdmaStream {
    shared: Arc<Shared>,
    driver: Option<JoinHandle<()>>,
}

/// Cuts an [`RdmaStream`] from elsewhere ([`RdmaStream::cut_handle`]).
#[derive(Debug)]
pub struct RdmaCut(std::sync::Weak<Shared>);

impl RdmaCut {
    /// Disconnects the stream if it still exists: both sides see an
    /// error on their next call.
    pub fn cut(&self) {
        if let Some(shared) = self.0.upgrade() {
            shared.conn.disconnect();
        }
    }
}

/// An [`RdmaStream`] between runtimes ([`RdmaStream::detach`]).
pub struct DetachedRdmaStream {
    shared: Arc<Shared>,
}

impl DetachedRdmaStream {
    /// The stream, driven on the current runtime.
    pub fn attach(self) -> io::Result<RdmaStream> {
        RdmaStream::start(self.shared)
    }
}

impl RdmaStream {
    /// Sets up buffers on a connection whose queue pair exists but is
    /// not connected yet, and posts every receive.
    pub(crate) fn prepare(conn: Conn) -> io::Result<Arc<Shared>> {
        let receive_buffer = DmaBuffer::new(RECEIVE_SLOTS * MESSAGE_BYTES);
        let send_buffer = DmaBuffer::new(SEND_SLOTS * MESSAGE_BYTES);
        let stage_buffer = DmaBuffer::new(2 * STAGE_HALF_BYTES);
        // SAFETY: the buffers live in the state, which is dropped after
        // the queue pair is destroyed (`Shared`'s drop) and before the
        // protection domain; they are only read through raw pointers.
        let (receive_mr, send_mr, stage_mr) = unsafe {
            (
                Mr::register(
                    conn.pd,
                    receive_buffer.as_ptr(),
                    receive_buffer.len(),
                    Access::Local,
                )?,
                Mr::register(
                    conn.pd,
                    send_buffer.as_ptr(),
                    send_buffer.len(),
                    Access::Local,
                )?,
                Mr::register(
                    conn.pd,
                    stage_buffer.as_ptr(),
                    stage_buffer.len(),
                    Access::Local,
                )?,
            )
        };
        let state = State {
            receive_buffer,
            receive_mr,
            send_buffer,
            send_mr,
            stage_buffer,
            stage_mr,
            registry: Registry::default(),
            credits: RECEIVE_SLOTS as u32,
            free_send_slots: (0..SEND_SLOTS).rev().collect(),
            send_bytes: [0; SEND_SLOTS],
            current: None,
            segments_sent: 0,
            unread: VecDeque::new(),
            peer_segments_read: 0,
            closing: false,
            bytes_written: 0,
            incoming: VecDeque::new(),
            owed: 0,
            segments_read: 0,
            segments_read_reported: 0,
            fills: VecDeque::new(),
            free_halves: vec![1, 0],
            peer_closed: false,
            failed: None,
            read_wakers: Vec::new(),
            write_wakers: Vec::new(),
            peer: conn.peer_addr(),
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            dropped: tokio::sync::Notify::new(),
            conn,
        });
        {
            let mut st = shared.lock();
            for slot in 0..RECEIVE_SLOTS {
                st.post_receive(&shared.conn, slot)?;
            }
            // Nothing was received: the first receives are not owed.
            st.owed = 0;
            // SAFETY: a live completion queue.
            check(
                unsafe { ibv_req_notify_cq(shared.conn.cq, 0) },
                "arming the RDMA completion queue",
            )?;
        }
        Ok(shared)
    }

    /// The stream on a connected `shared`, driven by a task on the
    /// current runtime.
    pub(crate) fn start(shared: Arc<Shared>) -> io::Result<Self> {
        // SAFETY: both descriptors belong to `shared.conn`, which the
        // `Driver` holds and drops after them (fields drop in order).
        let driver = unsafe {
            Driver {
                completions: watch(shared.conn.comp_fd())?,
                events: watch(shared.conn.events.fd())?,
                shared: shared.clone(),
            }
        };
        let driver = tokio::spawn(drive(driver));
        Ok(RdmaStream {
            shared,
            driver: Some(driver),
        })
    }

    /// The stream without its driving task, to be attached to another
    /// runtime.
    pub fn detach(mut self) -> DetachedRdmaStream {
        if let Some(d) = self.driver.take() {
            d.abort();
        }
        DetachedRdmaStream {
            shared: self.shared.clone(),
        }
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> Option<std::net::SocketAddr> {
        self.shared.conn.peer_addr()
    }

    /// Lets page references point into `ranges` of our address space
    /// (see [`Self::try_write_ref`]); the peer may read any byte of a
    /// chunk a reference points into.
    ///
    /// # Safety
    /// Every range must stay mapped, readable, for as long as this
    /// stream (or its detached form) lives.
    pub unsafe fn expose_memory(&self, ranges: Vec<Range<usize>>) {
        self.shared.lock().registry.expose(ranges);
    }

    /// Reads what has arrived without waiting: `WouldBlock` if nothing
    /// has, `Ok(0)` at the end of the stream.
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        self.try_read_with(|b| {
            let n = b.len().min(buf.len());
            buf[..n].copy_from_slice(&b[..n]);
            n
        })
    }

    /// Gives `take` the stream bytes at hand (after their READs have
    /// completed, for page references); `take` returns how many it took
    /// (at least one). Same results as [`Self::try_read`].
    pub fn try_read_with(&self, take: impl FnOnce(&[u8]) -> usize) -> io::Result<usize> {
        let conn = &self.shared.conn;
        let mut st = self.shared.lock();
        st.progress(conn);
        let r = st.read_step(conn, take);
        st.send_control_if_due(conn);
        r
    }

    /// Writes what the peer has room for, without waiting: `WouldBlock`
    /// if it has none. Bytes wait in a message until it is full or
    /// [`Self::try_flush`]ed.
    pub fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let conn = &self.shared.conn;
        let mut st = self.shared.lock();
        let st = &mut *st;
        st.progress(conn);
        st.writable()?;
        if !st.room_for(conn, Kind::Data) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let out = st.current.as_mut().expect("room_for made a message");
        let n = buf.len().min(MAX_DATA_BYTES - out.used);
        let at = out.slot * MESSAGE_BYTES + HEADER_BYTES + out.used;
        // SAFETY: the slot is ours until posted; `at + n` is within it.
        unsafe { ptr::copy_nonoverlapping(buf.as_ptr(), st.send_buffer.as_ptr().add(at), n) };
        out.used += n;
        st.bytes_written += n as u64;
        if out.used == MAX_DATA_BYTES {
            st.post_current(conn)?;
        }
        Ok(n)
    }

    /// Writes bytes at `addr` as a reference the peer reads, without
    /// waiting: `Ok(Some(n))` for the first `n` of `len` bytes,
    /// `Ok(None)` if `addr` is not in exposed memory (write the bytes
    /// with [`Self::try_write`] instead), `WouldBlock` if the peer has no
    /// room. The peer reads the bytes when it gets to them, so they must
    /// stay what the stream should carry until then: guest pages whose
    /// later changes the migration sends again.
    pub fn try_write_ref(&self, addr: *const u8, len: usize) -> io::Result<Option<usize>> {
        if len == 0 {
            return Ok(Some(0));
        }
        let conn = &self.shared.conn;
        let mut st = self.shared.lock();
        let st = &mut *st;
        st.progress(conn);
        st.writable()?;
        if !st.registry.is_exposed(addr as usize) {
            return Ok(None);
        }
        if !st.room_for(conn, Kind::Pages) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        // The number the message being filled gets when posted.
        let segment = st.segments_sent.wrapping_add(1);
        // One reference at most 1 GiB (lengths are u32; READs of more
        // than 2 GiB are refused by some adapters).
        let len = len.min(1 << 30);
        // SAFETY: the exposed ranges stay mapped while the stream lives
        // (the promise of `expose_memory`).
        let Some((rkey, n)) = (unsafe {
            st.registry
                .reference(conn.pd, addr as usize, len, segment)?
        }) else {
            return Ok(None);
        };
        #[cfg(feature = "failpoints")]
        let rkey = fail::eval("src.rdma-wrong-rkey", |_| !rkey).unwrap_or(rkey);
        let r = PageRef {
            remote_addr: addr as u64,
            bytes: n as u32,
            rkey,
        };
        let out = st.current.as_mut().expect("room_for made a message");
        let at = out.slot * MESSAGE_BYTES + HEADER_BYTES + out.used;
        let mut encoded = [0u8; PAGE_REF_BYTES];
        r.encode(&mut encoded);
        // SAFETY: the slot is ours until posted; `at + 16` is within it.
        unsafe {
            ptr::copy_nonoverlapping(
                encoded.as_ptr(),
                st.send_buffer.as_ptr().add(at),
                PAGE_REF_BYTES,
            )
        };
        out.used += PAGE_REF_BYTES;
        out.remote_bytes += n as u64;
        st.bytes_written += n as u64;
        if out.used == MAX_PAGE_REFS * PAGE_REF_BYTES {
            st.post_current(conn)?;
        }
        Ok(Some(n))
    }

    /// Posts the message being filled, if any.
    pub fn try_flush(&self) -> io::Result<()> {
        let conn = &self.shared.conn;
        let mut st = self.shared.lock();
        st.progress(conn);
        if let Some(f) = &st.failed {
            return Err(f.to_io());
        }
        if st.current.is_some() {
            st.post_current(conn)?;
        }
        Ok(())
    }

    /// Ready when a read may find something (it may still find nothing).
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let conn = &self.shared.conn;
        let mut st = self.shared.lock();
        st.progress(conn);
        if st.read_ready() {
            return Poll::Ready(Ok(()));
        }
        add_waker(&mut st.read_wakers, cx.waker());
        Poll::Pending
    }

    /// Ready when a write may find room (it may still find none).
    pub fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let conn = &self.shared.conn;
        let mut st = self.shared.lock();
        st.progress(conn);
        if st.write_ready() {
            return Poll::Ready(Ok(()));
        }
        add_waker(&mut st.write_wakers, cx.waker());
        Poll::Pending
    }

    /// Ends our direction: what is being filled goes out, then a close
    /// message, and it is ready once the peer has read every page
    /// reference (our memory may go after that, not before).
    pub fn poll_shutdown(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let conn = &self.shared.conn;
        let mut st = self.shared.lock();
        st.progress(conn);
        if let Err(e) = st.close(conn) {
            return Poll::Ready(Err(e));
        }
        if st.closing {
            if st.unread.is_empty() {
                return Poll::Ready(Ok(()));
            }
            if let Some(f) = &st.failed {
                return Poll::Ready(Err(io::Error::new(
                    f.kind,
                    format!(
                        "{} before it read the last {} page-reference messages",
                        f.message,
                        st.unread.len()
                    ),
                )));
            }
        }
        add_waker(&mut st.write_wakers, cx.waker());
        Poll::Pending
    }

    /// Bytes written that the peer has not taken yet: messages not yet
    /// completed and page references it has not said it read.
    pub fn queued_bytes(&self) -> u64 {
        let st = self.shared.lock();
        let sends: usize = st.send_bytes.iter().sum();
        sends as u64 + st.unread.iter().map(|&(_, b)| b).sum::<u64>()
    }

    /// Stream bytes that arrived and are not read yet: inline bytes, and
    /// referenced pages whose READs have completed.
    pub fn readable_bytes(&self) -> u64 {
        let st = self.shared.lock();
        let inline: usize = st
            .incoming
            .iter()
            .map(|m| match &m.body {
                Body::Data { len, consumed } => len - consumed,
                Body::Pages { .. } => 0,
            })
            .sum();
        let staged: usize = st
            .fills
            .iter()
            .filter(|f| f.pending == 0)
            .map(|f| f.bytes - f.copied)
            .sum();
        (inline + staged) as u64
    }

    /// Stream bytes written so far, inline or by reference.
    pub fn bytes_written(&self) -> u64 {
        self.shared.lock().bytes_written
    }

    /// A handle that cuts this connection later ([`RdmaCut::cut`]), from
    /// anywhere, without keeping it alive.
    pub fn cut_handle(&self) -> RdmaCut {
        RdmaCut(Arc::downgrade(&self.shared))
    }
}

/// How long a dropped stream waits for its peer to read what it was
/// sent before it tears the connection down regardless.
const LINGER: std::time::Duration = std::time::Duration::from_secs(60);

impl Drop for RdmaStream {
    /// Like closing a TCP socket: what was written still reaches the
    /// peer. The driving task posts a close message and keeps the
    /// connection (and our memory the peer may still READ) until the
    /// peer has read every page reference, goes away, or `LINGER`
    /// passes; then the connection is torn down.
    fn drop(&mut self) {
        if self.driver.take().is_some() {
            self.shared.dropped.notify_one();
        }
    }
}

/// Adds `w` to `wakers` unless it is there already.
fn add_waker(wakers: &mut Vec<Waker>, w: &Waker) {
    if !wakers.iter().any(|x| x.will_wake(w)) {
        wakers.push(w.clone());
    }
}

impl Shared {
    /// The connection's verbs objects.
    pub(crate) fn conn(&self) -> &Conn {
        &self.conn
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding it leaves counters half-updated: the next
        // call may fail, never touch memory it should not (every buffer
        // stays registered until the queue pair is gone).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the driving task holds: the descriptors it waits on, then the
/// connection they belong to (dropped last).
struct Driver {
    completions: AsyncFd<WatchedFd>,
    events: AsyncFd<WatchedFd>,
    shared: Arc<Shared>,
}

/// Takes completion and connection events as they come, and wakes the
/// stream's reader and writer after each.
async fn drive(d: Driver) {
    let shared = &d.shared;
    let mut linger_until: Option<tokio::time::Instant> = None;
    loop {
        let linger = async {
            match linger_until {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        let outcome: io::Result<()> = tokio::select! {
            () = shared.dropped.notified(), if linger_until.is_none() => {
                linger_until = Some(tokio::time::Instant::now() + LINGER);
                Ok(())
            }
            () = linger => {
                tracing::warn!(
                    "an RDMA peer did not read what it was sent within {} s; disconnecting",
                    LINGER.as_secs()
                );
                return;
            }
            guard = d.completions.readable() => match guard {
                Ok(mut g) => match shared.conn.drain_completion_events() {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        g.clear_ready();
                        Ok(())
                    }
                    other => other,
                },
                Err(e) => Err(e),
            },
            guard = d.events.readable() => match guard {
                Ok(mut g) => loop {
                    match shared.conn.events.try_next() {
                        Ok(Some(ev)) => connection_event(shared, ev.kind(), ev.status()),
                        Ok(None) => {
                            g.clear_ready();
                            break Ok(());
                        }
                        Err(e) => break Err(e),
                    }
                },
                Err(e) => Err(e),
            },
        };
        let (r, w) = {
            let conn = &shared.conn;
            let mut st = shared.lock();
            if let Err(e) = outcome {
                st.fail(e.kind(), format!("waiting for RDMA events: {e}"), false);
            }
            st.progress(conn);
            st.send_control_if_due(conn);
            (
                std::mem::take(&mut st.read_wakers),
                std::mem::take(&mut st.write_wakers),
            )
        };
        for w in r.into_iter().chain(w) {
            w.wake();
        }
        let mut st = shared.lock();
        if st.failed.as_ref().is_some_and(|f| !f.flushed) {
            // Nothing more will come; the stream's calls report why.
            return;
        }
        if linger_until.is_some() && st.linger_done(&shared.conn) {
            return;
        }
    }
}

/// An rdma_cm event on an established connection.
fn connection_event(shared: &Shared, kind: rdma_cm_event_type::Type, status: i32) {
    match kind {
        rdma_cm_event_type::RDMA_CM_EVENT_DISCONNECTED => {
            // Our queue pair goes to the error state: posted work
            // completes, flushed, and the stream fails once what already
            // arrived is read.
            shared.conn.disconnect();
            shared.lock().fail(
                io::ErrorKind::ConnectionReset,
                "the RDMA peer disconnected".into(),
                true,
            );
        }
        rdma_cm_event_type::RDMA_CM_EVENT_DEVICE_REMOVAL => {
            shared.conn.disconnect();
            shared.lock().fail(
                io::ErrorKind::BrokenPipe,
                "the RDMA device was removed".into(),
                false,
            );
        }
        rdma_cm_event_type::RDMA_CM_EVENT_REJECTED
        | rdma_cm_event_type::RDMA_CM_EVENT_CONNECT_ERROR
        | rdma_cm_event_type::RDMA_CM_EVENT_UNREACHABLE => {
            shared.conn.disconnect();
            shared.lock().fail(
                io::ErrorKind::ConnectionAborted,
                format!(
                    "the RDMA connection was never completed: {} (status {status})",
                    event_name(kind)
                ),
                false,
            );
        }
        rdma_cm_event_type::RDMA_CM_EVENT_TIMEWAIT_EXIT
        | rdma_cm_event_type::RDMA_CM_EVENT_ESTABLISHED => {}
        other => {
            tracing::debug!(event = %event_name(other), status, "rdma_cm event on a connection")
        }
    }
}

impl State {
    fn fail(&mut self, kind: io::ErrorKind, message: String, flushed: bool) {
        // The first reason stays (later ones are its consequences), except
        // that a cause beats "the connection went down": the peer's
        // disconnect may be seen before the completion that says why.
        let replace = match &self.failed {
            None => true,
            Some(f) => f.flushed && !flushed,
        };
        if !replace {
            return;
        }
        if !flushed {
            // Logged where it is seen: the peer may only see a cut link.
            let peer = self
                .peer
                .map_or_else(|| "its peer".to_string(), |p| p.to_string());
            tracing::warn!("RDMA connection with {peer} failed: {message}");
        }
        self.failed = Some(Failure {
            kind,
            message,
            flushed,
        });
    }

    /// For a dropped stream: closes our direction (once a credit is
    /// free); `true` once the close and everything before it has been
    /// delivered and the peer has read every page reference, or the
    /// connection failed, so that it may be torn down.
    fn linger_done(&mut self, conn: &Conn) -> bool {
        if self.failed.is_some() || self.close(conn).is_err() {
            return true;
        }
        // Every message delivered (a queue pair torn down with a send in
        // flight may never send it), every reference read.
        self.closing && self.unread.is_empty() && self.free_send_slots.len() == SEND_SLOTS
    }

    /// Sends our close once (the message being filled goes out first,
    /// in `room_for`); while no credit is free it is sent on a later call.
    /// `Err` if the stream failed before its close went out.
    fn close(&mut self, conn: &Conn) -> io::Result<()> {
        if self.closing {
            return Ok(());
        }
        if self.failed.is_none() && self.room_for(conn, Kind::Close) {
            self.post_current(conn)?;
            self.closing = true;
        }
        match &self.failed {
            Some(f) => Err(f.to_io()),
            None => Ok(()),
        }
    }

    fn writable(&self) -> io::Result<()> {
        if let Some(f) = &self.failed {
            return Err(f.to_io());
        }
        if self.closing {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write on an RDMA stream after its shutdown",
            ));
        }
        Ok(())
    }

    /// Makes sure a message of `kind` with room is being filled: posts
    /// one of another kind or a full one, starts a new one if a send
    /// slot and a credit are free (a data or page message leaves the
    /// last credit for a control or close message, so the two sides can
    /// always tell each other about freed buffers). `false`: no room.
    fn room_for(&mut self, conn: &Conn, kind: Kind) -> bool {
        if let Some(out) = &self.current {
            let full = match out.kind {
                Kind::Data => out.used == MAX_DATA_BYTES,
                Kind::Pages => out.used == MAX_PAGE_REFS * PAGE_REF_BYTES,
                Kind::Control | Kind::Close => true,
            };
            if out.kind == kind && !full {
                return true;
            }
            if self.post_current(conn).is_err() {
                return false;
            }
        }
        let needed = match kind {
            Kind::Data | Kind::Pages => 2,
            Kind::Control | Kind::Close => 1,
        };
        if self.credits < needed {
            return false;
        }
        let Some(slot) = self.free_send_slots.pop() else {
            return false;
        };
        self.credits -= 1;
        self.current = Some(Outgoing {
            slot,
            kind,
            used: 0,
            remote_bytes: 0,
        });
        true
    }

    /// Posts the message being filled, with the credits and count owed.
    fn post_current(&mut self, conn: &Conn) -> io::Result<()> {
        let Some(out) = self.current.take() else {
            return Ok(());
        };
        if out.used == 0 && matches!(out.kind, Kind::Data | Kind::Pages) {
            // Started but nothing went in: the slot and credit return.
            self.free_send_slots.push(out.slot);
            self.credits += 1;
            return Ok(());
        }
        let credits = self.owed.min(u16::MAX as u32) as u16;
        let header = Header {
            kind: out.kind,
            credits,
            segments_read: self.segments_read,
            payload_bytes: out.used as u32,
        };
        let base = out.slot * MESSAGE_BYTES;
        let mut encoded = [0u8; HEADER_BYTES];
        header.encode(&mut encoded);
        // SAFETY: the slot is ours until posted; the header fits in it.
        unsafe {
            ptr::copy_nonoverlapping(
                encoded.as_ptr(),
                self.send_buffer.as_ptr().add(base),
                HEADER_BYTES,
            )
        };
        let len = HEADER_BYTES + out.used;
        let mut sge = ibv_sge {
            // SAFETY: within the send buffer.
            addr: unsafe { self.send_buffer.as_ptr().add(base) } as u64,
            length: len as u32,
            lkey: self.send_mr.lkey(),
        };
        // SAFETY: all-zero is a valid work request to fill in.
        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = TAG_SEND | out.slot as u64;
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        wr.opcode = ibv_wr_opcode::IBV_WR_SEND;
        wr.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
        let mut bad = ptr::null_mut();
        // SAFETY: a live queue pair; the work request and its list are
        // copied into the send queue by the call; the slot's bytes stay
        // untouched until its completion returns the slot.
        let rc = unsafe { ibv_post_send(conn.qp(), &mut wr, &mut bad) };
        if let Err(e) = check(rc, "posting an RDMA send") {
            self.free_send_slots.push(out.slot);
            self.fail(e.kind(), e.to_string(), false);
            return Err(e);
        }
        self.send_bytes[out.slot] = len;
        self.owed -= credits as u32;
        self.segments_read_reported = self.segments_read;
        if out.kind == Kind::Pages {
            self.segments_sent = self.segments_sent.wrapping_add(1);
            self.unread
                .push_back((self.segments_sent, out.remote_bytes));
        }
        Ok(())
    }

    /// Tells the peer about freed buffers (once half of them wait) and
    /// read page references (at once: the peer may be waiting to free
    /// its memory), in the message being filled or a control message.
    fn send_control_if_due(&mut self, conn: &Conn) {
        let due = self.owed as usize >= RECEIVE_SLOTS / 2
            || self.segments_read != self.segments_read_reported;
        if !due || self.failed.is_some() {
            return;
        }
        // The message being filled carries them; else a control message.
        if self.current.is_some() || self.room_for(conn, Kind::Control) {
            let _ = self.post_current(conn);
        }
    }

    fn post_receive(&mut self, conn: &Conn, slot: usize) -> io::Result<()> {
        let mut sge = ibv_sge {
            // SAFETY: within the receive buffer.
            addr: unsafe { self.receive_buffer.as_ptr().add(slot * MESSAGE_BYTES) } as u64,
            length: MESSAGE_BYTES as u32,
            lkey: self.receive_mr.lkey(),
        };
        // SAFETY: all-zero is a valid work request to fill in.
        let mut wr: ibv_recv_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = TAG_RECEIVE | slot as u64;
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        let mut bad = ptr::null_mut();
        // SAFETY: a live queue pair; the slot is not read again until
        // its completion.
        let rc = unsafe { ibv_post_recv(conn.qp(), &mut wr, &mut bad) };
        if let Err(e) = check(rc, "posting an RDMA receive") {
            self.fail(e.kind(), e.to_string(), false);
            return Err(e);
        }
        self.owed += 1;
        Ok(())
    }

    /// Takes every completion there is, re-arming the completion
    /// channel so that the next one wakes the driving task.
    fn progress(&mut self, conn: &Conn) {
        const BATCH: usize = 32;
        let mut wcs: [MaybeUninit<ibv_wc>; BATCH] = [const { MaybeUninit::uninit() }; BATCH];
        let mut armed = false;
        loop {
            // SAFETY: a live completion queue; room for BATCH entries.
            let n = unsafe { ibv_poll_cq(conn.cq, BATCH as i32, wcs.as_mut_ptr().cast()) };
            if n < 0 {
                self.fail(
                    io::ErrorKind::Other,
                    "polling the RDMA completion queue failed".into(),
                    false,
                );
                return;
            }
            for wc in &wcs[..n as usize] {
                // SAFETY: ibv_poll_cq wrote the first `n` entries.
                let wc = unsafe { wc.assume_init_ref() };
                self.complete(conn, wc);
            }
            if n as usize == BATCH {
                continue;
            }
            if n == 0 && armed {
                return;
            }
            // Arm, then look once more: a completion that came before
            // arming is found now, one after it raises an event.
            // SAFETY: a live completion queue.
            unsafe { ibv_req_notify_cq(conn.cq, 0) };
            armed = true;
        }
    }

    fn complete(&mut self, conn: &Conn, wc: &ibv_wc) {
        let tag = wc.wr_id & TAG_MASK;
        let index = (wc.wr_id & !TAG_MASK) as usize;
        if wc.status != ibv_wc_status::IBV_WC_SUCCESS {
            self.failed_completion(tag, wc.status);
        }
        match tag {
            TAG_SEND if index < SEND_SLOTS => {
                self.send_bytes[index] = 0;
                self.free_send_slots.push(index);
            }
            TAG_RECEIVE if wc.status == ibv_wc_status::IBV_WC_SUCCESS => {
                self.received(conn, index, wc.byte_len as usize)
            }
            TAG_READ => {
                if let Some(f) = self.fills.iter_mut().find(|f| f.half == index) {
                    f.pending = f.pending.saturating_sub(1);
                }
            }
            _ => {}
        }
    }

    fn failed_completion(&mut self, tag: u64, status: ibv_wc_status::Type) {
        // SAFETY: ibv_wc_status_str returns a static string for any value.
        let name = unsafe {
            let s = ibv_wc_status_str(status);
            if s.is_null() {
                format!("status {status}")
            } else {
                std::ffi::CStr::from_ptr(s).to_string_lossy().into_owned()
            }
        };
        let what = match tag {
            TAG_SEND => "an RDMA send",
            TAG_RECEIVE => "an RDMA receive",
            _ => "an RDMA READ of the peer's pages",
        };
        if status == ibv_wc_status::IBV_WC_WR_FLUSH_ERR {
            self.fail(
                io::ErrorKind::ConnectionReset,
                "the RDMA connection went down (the peer disconnected)".into(),
                true,
            );
        } else if status == ibv_wc_status::IBV_WC_REM_ACCESS_ERR {
            self.fail(
                io::ErrorKind::PermissionDenied,
                format!("{what} failed: {name} (the peer's memory key or address was refused)"),
                false,
            );
        } else {
            self.fail(
                io::ErrorKind::Other,
                format!("{what} failed: {name}"),
                false,
            );
        }
    }

    /// A message arrived in receive slot `slot`, `len` bytes long.
    fn received(&mut self, conn: &Conn, slot: usize, len: usize) {
        if slot >= RECEIVE_SLOTS || len > MESSAGE_BYTES {
            self.fail(
                io::ErrorKind::InvalidData,
                "an RDMA receive completed out of bounds".into(),
                false,
            );
            return;
        }
        // SAFETY: the adapter has written these bytes (the completion
        // says so) and writes the slot again only once we repost it.
        let bytes = unsafe {
            std::slice::from_raw_parts(self.receive_buffer.as_ptr().add(slot * MESSAGE_BYTES), len)
        };
        let (header, payload) = match Header::decode(bytes) {
            Ok(v) => v,
            Err(e) => {
                self.fail(
                    io::ErrorKind::InvalidData,
                    format!("the RDMA peer sent a malformed message: {e}"),
                    false,
                );
                return;
            }
        };
        self.credits = self.credits.saturating_add(header.credits as u32);
        if at_or_after(header.segments_read, self.peer_segments_read) {
            self.peer_segments_read = header.segments_read;
            while self
                .unread
                .front()
                .is_some_and(|&(n, _)| at_or_after(self.peer_segments_read, n))
            {
                self.unread.pop_front();
            }
            self.registry.release(self.peer_segments_read);
        }
        if self.peer_closed && header.kind != Kind::Control {
            self.fail(
                io::ErrorKind::InvalidData,
                "the RDMA peer sent a message after its close".into(),
                false,
            );
            return;
        }
        let body = match header.kind {
            Kind::Control | Kind::Close => {
                self.peer_closed |= header.kind == Kind::Close;
                let _ = self.post_receive(conn, slot);
                return;
            }
            Kind::Data => Body::Data {
                len: payload.len(),
                consumed: 0,
            },
            Kind::Pages => {
                let refs: Vec<PageRef> = page_refs(payload).collect();
                let total = refs.iter().map(|r| r.bytes as u64).sum();
                Body::Pages {
                    refs,
                    total,
                    fetch_ref: 0,
                    fetch_offset: 0,
                    fetched: 0,
                    consumed: 0,
                }
            }
        };
        self.incoming.push_back(Incoming { slot, body });
    }

    /// Posts READs of the front page-reference message into free
    /// staging halves.
    fn post_fills(&mut self, conn: &Conn) {
        while let Some(half) = self.free_halves.last().copied() {
            let Some(Incoming {
                body:
                    Body::Pages {
                        refs,
                        total,
                        fetch_ref,
                        fetch_offset,
                        fetched,
                        ..
                    },
                ..
            }) = self.incoming.front_mut()
            else {
                return;
            };
            if *fetched == *total {
                return;
            }
            let base = half * STAGE_HALF_BYTES;
            let mut sges = Vec::new();
            let mut remote = Vec::new();
            let mut bytes = 0usize;
            while bytes < STAGE_HALF_BYTES && *fetched < *total && sges.len() < MAX_READS_PER_FILL {
                let r = refs[*fetch_ref];
                let take = ((r.bytes - *fetch_offset) as usize).min(STAGE_HALF_BYTES - bytes);
                sges.push(ibv_sge {
                    // SAFETY: within the staging buffer.
                    addr: unsafe { self.stage_buffer.as_ptr().add(base + bytes) } as u64,
                    length: take as u32,
                    lkey: self.stage_mr.lkey(),
                });
                remote.push((r.remote_addr.wrapping_add(*fetch_offset as u64), r.rkey));
                bytes += take;
                *fetched += take as u64;
                *fetch_offset += take as u32;
                if *fetch_offset == r.bytes {
                    *fetch_ref += 1;
                    *fetch_offset = 0;
                }
            }
            // SAFETY: all-zero is a valid work request to fill in.
            let mut wrs: Vec<ibv_send_wr> = (0..sges.len())
                .map(|_| unsafe { std::mem::zeroed() })
                .collect();
            let count = wrs.len();
            for i in 0..count {
                let next = if i + 1 < count {
                    // SAFETY: within `wrs`, which outlives the post.
                    unsafe { wrs.as_mut_ptr().add(i + 1) }
                } else {
                    ptr::null_mut()
                };
                let wr = &mut wrs[i];
                wr.wr_id = TAG_READ | half as u64;
                wr.next = next;
                wr.sg_list = &mut sges[i];
                wr.num_sge = 1;
                wr.opcode = ibv_wr_opcode::IBV_WR_RDMA_READ;
                wr.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
                wr.wr.rdma = rdma_t {
                    remote_addr: remote[i].0,
                    rkey: remote[i].1,
                };
            }
            let mut bad = ptr::null_mut();
            // SAFETY: a live queue pair; the chain and its lists are
            // copied into the send queue by the call; the staging half is
            // not read until every READ into it has completed.
            let rc = unsafe { ibv_post_send(conn.qp(), wrs.as_mut_ptr(), &mut bad) };
            if let Err(e) = check(rc, "posting RDMA READs") {
                self.fail(e.kind(), e.to_string(), false);
                return;
            }
            self.free_halves.pop();
            self.fills.push_back(Fill {
                half,
                bytes,
                pending: count,
                copied: 0,
            });
        }
    }

    fn read_ready(&self) -> bool {
        if self.failed.is_some() || self.peer_closed {
            return true;
        }
        match self.incoming.front().map(|m| &m.body) {
            None => false,
            Some(Body::Data { .. }) => true,
            Some(Body::Pages { .. }) => self.fills.front().is_none_or(|f| f.pending == 0),
        }
    }

    fn write_ready(&self) -> bool {
        self.failed.is_some()
            || (self.closing && self.unread.is_empty())
            || self.current.is_some()
            || (!self.free_send_slots.is_empty() && self.credits >= 2)
    }

    fn read_step(&mut self, conn: &Conn, take: impl FnOnce(&[u8]) -> usize) -> io::Result<usize> {
        let Some(front) = self.incoming.front_mut() else {
            if self.peer_closed {
                return Ok(0);
            }
            return Err(match &self.failed {
                Some(f) => f.to_io(),
                None => io::ErrorKind::WouldBlock.into(),
            });
        };
        let slot = front.slot;
        match &mut front.body {
            Body::Data { len, consumed } => {
                let at = slot * MESSAGE_BYTES + HEADER_BYTES + *consumed;
                // SAFETY: the message's bytes, written by the adapter
                // before its completion; the slot is reposted only after
                // this slice is gone.
                let bytes = unsafe {
                    std::slice::from_raw_parts(
                        self.receive_buffer.as_ptr().add(at),
                        *len - *consumed,
                    )
                };
                let n = take(bytes).min(bytes.len());
                *consumed += n;
                if *consumed == *len {
                    self.incoming.pop_front();
                    self.post_receive(conn, slot)?;
                }
                Ok(n)
            }
            Body::Pages { .. } => {
                if let Some(f) = &self.failed {
                    return Err(f.to_io());
                }
                self.post_fills(conn);
                let Some(fill) = self.fills.front_mut() else {
                    return Err(io::ErrorKind::WouldBlock.into());
                };
                if fill.pending > 0 {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                let at = fill.half * STAGE_HALF_BYTES + fill.copied;
                // SAFETY: every READ into this half has completed; the
                // half is refilled only after this slice is gone.
                let bytes = unsafe {
                    std::slice::from_raw_parts(
                        self.stage_buffer.as_ptr().add(at),
                        fill.bytes - fill.copied,
                    )
                };
                let n = take(bytes).min(bytes.len());
                fill.copied += n;
                if fill.copied == fill.bytes {
                    let half = fill.half;
                    self.fills.pop_front();
                    self.free_halves.push(half);
                }
                let Some(Incoming {
                    body:
                        Body::Pages {
                            total, consumed, ..
                        },
                    ..
                }) = self.incoming.front_mut()
                else {
                    unreachable!("the front message is the page references just read")
                };
                *consumed += n as u64;
                if *consumed == *total {
                    self.incoming.pop_front();
                    self.segments_read = self.segments_read.wrapping_add(1);
                    self.post_receive(conn, slot)?;
                }
                self.post_fills(conn);
                Ok(n)
            }
        }
    }
}
