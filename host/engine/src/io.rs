//! Framed reads and writes on tokio streams, with timeouts, and page data
//! moved between sockets and guest memory through raw pointers only.

use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use freehint_wire::{
    Frame, FrameHeader, Kind, Message, PageBatchHead, BATCH_PREFIX_BYTES, HEADER_BYTES,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use vm_memory::VolatileSlice;

use crate::MigrateError;

/// Reads a frame header; `Ok(None)` on a clean end of stream before it.
pub(crate) async fn read_header<R: AsyncRead + Unpin>(
    r: &mut R,
    context: &str,
) -> Result<Option<FrameHeader>, MigrateError> {
    let mut b = [0u8; HEADER_BYTES];
    let mut got = 0;
    while got < HEADER_BYTES {
        let n = r
            .read(&mut b[got..])
            .await
            .map_err(MigrateError::io(context.to_string()))?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(MigrateError::Disconnected(format!(
                "{context}: peer disconnected in the middle of a frame header"
            )));
        }
        got += n;
    }
    FrameHeader::decode(&b)
        .map(Some)
        .map_err(MigrateError::protocol(context.to_string()))
}

/// Reads exactly `buf.len()` bytes; a short stream is a clear error.
pub(crate) async fn read_exact<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    context: &str,
) -> Result<(), MigrateError> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(MigrateError::Disconnected(
            format!("{context}: peer disconnected in the middle of a frame (truncated frame)"),
        )),
        Err(e) => Err(MigrateError::io(context.to_string())(e)),
    }
}

/// Reads one frame (for a page batch: its head; the page data follows on
/// the stream), with the bytes of the whole frame on the wire (header,
/// payload and any page data); `Ok(None)` on a clean end of stream. `region_pages` gives
/// a region's `(page_bytes, pages)` to check a batch against; with `None`,
/// page batches are refused (a channel that does not carry page data).
pub(crate) async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    context: &str,
    region_pages: Option<&(dyn Fn(usize) -> Option<(u64, u64)> + Sync)>,
    buf: &mut Vec<u8>,
) -> Result<Option<(Frame, u64)>, MigrateError> {
    read_frame_within(r, context, region_pages, buf, u32::MAX).await
}

/// [`read_frame`], refusing a frame whose payload (a batch's head) is over
/// `max_payload_bytes`, before reading it.
async fn read_frame_within<R: AsyncRead + Unpin>(
    r: &mut R,
    context: &str,
    region_pages: Option<&(dyn Fn(usize) -> Option<(u64, u64)> + Sync)>,
    buf: &mut Vec<u8>,
    max_payload_bytes: u32,
) -> Result<Option<(Frame, u64)>, MigrateError> {
    let Some(h) = read_header(r, context).await? else {
        return Ok(None);
    };
    let region_pages = match (h.kind, region_pages) {
        (Kind::PageBatch, None) => {
            return Err(MigrateError::Unexpected(format!(
                "{context}: page data on a channel that does not carry it"
            )))
        }
        (_, pages) => pages.unwrap_or(&|_| None),
    };
    let protocol = |e| MigrateError::protocol(context.to_string())(e);
    let payload_bytes = if h.kind == Kind::PageBatch {
        let mut prefix = [0u8; BATCH_PREFIX_BYTES];
        read_exact(r, &mut prefix, context).await?;
        let head_bytes =
            PageBatchHead::head_bytes_from_prefix(&prefix, h.payload_bytes).map_err(protocol)?;
        buf.clear();
        buf.extend_from_slice(&prefix);
        head_bytes
    } else {
        buf.clear();
        h.payload_bytes as usize
    };
    let start = buf.len();
    if payload_bytes > max_payload_bytes as usize {
        return Err(MigrateError::Unexpected(format!(
            "{context}: a frame of {payload_bytes} bytes where at most {max_payload_bytes} fit"
        )));
    }
    read_growing(r, buf, payload_bytes - start, context).await?;
    let frame = Frame::decode(&h, buf, region_pages).map_err(protocol)?;
    Ok(Some((frame, HEADER_BYTES as u64 + h.payload_bytes)))
}

/// The first step of [`read_growing`].
const GROW_FROM_BYTES: usize = 64 << 10;

/// Appends `len` bytes from `r` to `buf`, growing `buf` as they arrive
/// (doubling, from 64 KiB), not by what a frame header claims: a peer
/// that announces a 16 MiB frame and sends nothing more makes no one hold
/// 16 MiB. What is held is at most twice what was received, plus 64 KiB.
async fn read_growing<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    len: usize,
    context: &str,
) -> Result<(), MigrateError> {
    let end = buf.len() + len;
    let mut at = buf.len();
    while at < end {
        let step = (end - at).min(at.max(GROW_FROM_BYTES));
        buf.resize(at + step, 0);
        read_exact(r, &mut buf[at..], context).await?;
        at += step;
    }
    Ok(())
}

/// Reads one whole message (no page batch); `Ok(None)` on a clean end of
/// stream.
pub(crate) async fn read_message<R: AsyncRead + Unpin>(
    r: &mut R,
    context: &str,
) -> Result<Option<Message>, MigrateError> {
    read_message_within(r, context, u32::MAX).await
}

/// [`read_message`] of at most `max_payload_bytes` of payload.
async fn read_message_within<R: AsyncRead + Unpin>(
    r: &mut R,
    context: &str,
    max_payload_bytes: u32,
) -> Result<Option<Message>, MigrateError> {
    match read_frame_within(r, context, None, &mut Vec::new(), max_payload_bytes).await? {
        None => Ok(None),
        Some((Frame::Message(m), _)) => Ok(Some(m)),
        Some((Frame::PageBatch(_), _)) => Err(MigrateError::Unexpected(format!(
            "{context}: page data on a channel that does not carry it"
        ))),
    }
}

/// Like [`read_message`], but a timeout or end of stream is an error.
pub(crate) async fn expect_message<R: AsyncRead + Unpin>(
    r: &mut R,
    context: &str,
    timeout: Duration,
) -> Result<Message, MigrateError> {
    expect_message_within(r, context, timeout, u32::MAX).await
}

/// [`expect_message`] of at most `max_payload_bytes` of payload: a
/// connection's first frame, a hello, is small.
pub(crate) async fn expect_message_within<R: AsyncRead + Unpin>(
    r: &mut R,
    context: &str,
    timeout: Duration,
    max_payload_bytes: u32,
) -> Result<Message, MigrateError> {
    match tokio::time::timeout(timeout, read_message_within(r, context, max_payload_bytes)).await {
        Err(_) => Err(MigrateError::Timeout {
            what: context.to_string(),
            seconds: timeout.as_secs(),
        }),
        Ok(Ok(Some(m))) => Ok(m),
        Ok(Ok(None)) => Err(MigrateError::Disconnected(format!(
            "{context}: peer closed the connection"
        ))),
        Ok(Err(e)) => Err(e),
    }
}

/// Writes one message within `timeout`; returns the bytes written.
pub(crate) async fn write_message<W: AsyncWrite + Unpin>(
    w: &mut W,
    m: &Message,
    context: &str,
    timeout: Duration,
) -> Result<u64, MigrateError> {
    let mut b = Vec::new();
    m.encode(&mut b);
    let write = async {
        w.write_all(&b).await?;
        // Out of a TLS connection's state too, not only into it.
        w.flush().await
    };
    match tokio::time::timeout(timeout, write).await {
        Err(_) => {
            return Err(MigrateError::Timeout {
                what: format!("{context}: the peer to take our data"),
                seconds: timeout.as_secs(),
            })
        }
        Ok(r) => r.map_err(MigrateError::io(context.to_string()))?,
    }
    Ok(b.len() as u64)
}

/// `iovec`s for one `writev`: the batch head (in a buffer of ours) and runs
/// of guest pages (raw pointers into the mapping, never Rust references:
/// the guest may write them while the kernel copies them).
#[derive(Default)]
pub(crate) struct IoVecs(pub(crate) Vec<libc::iovec>);

// SAFETY: the pointers are filled and read within one
// `BatchWriter::write` call, which borrows the batch-head buffer and the
// `GuestRam` whose mapping they point into for its whole duration (between
// calls they are stale and never read). No thread gets a reference through
// them; only the kernel reads them in `writev`.
unsafe impl Send for IoVecs {}

/// Most iovecs one `writev` takes.
const IOV_MAX: usize = 1024;

/// Writes every byte the iovecs describe, however the kernel splits it.
pub(crate) async fn writev_all(stream: &TcpStream, iovs: &mut IoVecs) -> io::Result<()> {
    let mut first = 0;
    while first < iovs.0.len() {
        stream.writable().await?;
        let rest = &iovs.0[first..];
        let count = rest.len().min(IOV_MAX) as libc::c_int;
        let written = stream.try_io(tokio::io::Interest::WRITABLE, || {
            // SAFETY: `rest` holds `count` valid iovecs, each describing
            // readable memory (see `IoVecs`); writev only reads it.
            let n = unsafe { libc::writev(stream.as_raw_fd(), rest.as_ptr(), count) };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        let mut n = match written {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        // Skip what was written: whole iovecs, then part of one.
        while n > 0 {
            let v = &mut iovs.0[first];
            if n >= v.iov_len {
                n -= v.iov_len;
                first += 1;
            } else {
                // SAFETY: n < iov_len, so the new base stays inside the
                // same buffer.
                v.iov_base = unsafe { (v.iov_base as *mut u8).add(n) }.cast();
                v.iov_len -= n;
                n = 0;
            }
        }
    }
    Ok(())
}

/// Guest pages to fill from a socket: a raw pointer and a length taken from
/// a [`VolatileSlice`], so no Rust reference to guest memory ever exists.
pub(crate) struct RawPages {
    ptr: *mut u8,
    len: usize,
}

impl RawPages {
    /// The pages `slice` covers.
    pub(crate) fn of(slice: &VolatileSlice<'_, ()>) -> Self {
        Self {
            ptr: slice.ptr_guard_mut().as_ptr(),
            len: slice.len(),
        }
    }

    /// How many bytes the pages span.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Copies `bytes` into the pages from byte `offset` on, with volatile
    /// writes (the guest's memory, never a Rust reference to it).
    ///
    /// # Panics
    ///
    /// If `offset + bytes.len()` is beyond the pages: a caller's bug.
    pub(crate) fn write_at(&self, offset: usize, bytes: &[u8]) {
        assert!(offset + bytes.len() <= self.len, "write beyond the pages");
        // SAFETY: `ptr + offset .. + bytes.len()` lies inside the mapping
        // (see the type's doc, and the check above); the slice is only
        // written through, and dropped before return.
        let dst = unsafe { VolatileSlice::new(self.ptr.add(offset), bytes.len()) };
        dst.copy_from(bytes);
    }
}

// SAFETY: the pointer refers to the guest RAM mapping, which the receiver
// keeps alive (its `Arc<GuestRam>`) for as long as any future holding a
// `RawPages` runs; the memory is only written through `read(2)` and
// `ptr::copy_nonoverlapping`, from whichever thread runs the future.
unsafe impl Send for RawPages {}

// SAFETY: through a shared reference a `RawPages` gives only its length
// and `write_at`, whose writes are volatile copies into guest memory: a
// shared mapping that the guest (another thread, another process) may
// write at any moment anyway, and that no Rust reference ever covers.
unsafe impl Sync for RawPages {}

/// Reads the rest of `dst` (from byte `done` on) straight from `stream`
/// into the mapping, through raw pointers only.
pub(crate) async fn read_socket_into_pages(
    stream: &TcpStream,
    dst: RawPages,
    mut done: usize,
    context: &str,
) -> Result<(), MigrateError> {
    let len = dst.len;
    while done < len {
        stream
            .readable()
            .await
            .map_err(MigrateError::io(context.to_string()))?;
        let got = stream.try_io(tokio::io::Interest::READABLE, || {
            // SAFETY: `ptr + done .. ptr + len` lies inside the mapping;
            // read() writes at most `len - done` bytes there.
            let n = unsafe { libc::read(stream.as_raw_fd(), dst.ptr.add(done).cast(), len - done) };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        match got {
            Ok(0) => {
                return Err(MigrateError::Disconnected(format!(
                    "{context}: peer disconnected in the middle of a frame (truncated frame)"
                )))
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(MigrateError::io(context.to_string())(e)),
        }
    }
    Ok(())
}

/// The control channel of a migration, on either side: a task reads every
/// message as it arrives into a queue, so waiting for the next one can be
/// abandoned at any moment (a `select!`, a timeout) without losing half a
/// frame; writes go straight to the socket, each within a timeout.
pub(crate) struct ControlChannel {
    tx: crate::transport::ChannelWriter,
    rx: tokio::sync::mpsc::UnboundedReceiver<Result<Message, MigrateError>>,
    reader: tokio::task::JoinHandle<()>,
}

impl ControlChannel {
    /// The connection (to cut it: see `postcopy::Links`).
    pub(crate) fn channel(&self) -> &crate::transport::Channel {
        self.tx.channel()
    }

    /// Starts reading `stream`.
    pub(crate) fn new(stream: crate::transport::Channel) -> Self {
        let (mut rx_half, tx) = stream.into_split();
        let (forward, rx) = tokio::sync::mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            loop {
                match read_message(&mut rx_half, "control channel").await {
                    Ok(Some(m)) => {
                        if forward.send(Ok(m)).is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(e) => {
                        let _ = forward.send(Err(e));
                        return;
                    }
                }
            }
        });
        Self { tx, rx, reader }
    }

    /// Sends one message within `timeout`; returns the bytes written.
    pub(crate) async fn send(
        &mut self,
        m: &Message,
        context: &str,
        timeout: Duration,
    ) -> Result<u64, MigrateError> {
        write_message(&mut self.tx, m, context, timeout).await
    }

    /// The next message, or `None` once the peer closed the channel (an
    /// error reading it is the error). Cancel-safe.
    pub(crate) async fn next(&mut self) -> Option<Result<Message, MigrateError>> {
        self.rx.recv().await
    }

    /// The next message within `timeout`; a closed channel or a timeout is
    /// an error naming `what` was awaited.
    pub(crate) async fn expect(
        &mut self,
        timeout: Duration,
        what: &str,
    ) -> Result<Message, MigrateError> {
        match tokio::time::timeout(timeout, self.rx.recv()).await {
            Err(_) => Err(MigrateError::Timeout {
                what: what.to_string(),
                seconds: timeout.as_secs(),
            }),
            Ok(Some(m)) => m,
            Ok(None) => Err(MigrateError::Disconnected(format!(
                "the peer closed the control channel while we waited for {what}"
            ))),
        }
    }

    /// A message that already arrived, if any; an error if the peer closed
    /// the channel or it failed.
    pub(crate) fn try_next(&mut self) -> Result<Option<Message>, MigrateError> {
        match self.rx.try_recv() {
            Ok(Ok(m)) => Ok(Some(m)),
            Ok(Err(e)) => Err(e),
            Err(tokio::sync::mpsc::error::TryRecvError::Empty) => Ok(None),
            Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => Err(
                MigrateError::Disconnected("the peer closed the control channel".into()),
            ),
        }
    }
}

impl Drop for ControlChannel {
    fn drop(&mut self) {
        self.reader.abort();
    }
}
