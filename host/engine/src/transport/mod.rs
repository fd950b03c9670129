//! Migration connections: one TCP socket each, plain or inside TLS 1.3,
//! or one RDMA queue pair each (`rdma` feature, `freehint-rdma`).
//!
//! A [`Channel`] is what the engine reads frames from and writes frames
//! and guest pages to, whatever is underneath: the engine has one copy of
//! the migration, and a channel is the only thing that knows its
//! transport. Like tokio's `TcpStream`, it is read and written through a
//! shared reference (one task reads the destination's reports while
//! another writes pages on the same bulk channel), and it answers for
//! what only the transport knows: the bytes not yet acknowledged
//! ([`Channel::unacknowledged_bytes`]: `SIOCOUTQ` on TCP), the round trip
//! ([`Channel::figures`]: `tcp_info`), its options ([`Channel::tune`],
//! [`Channel::mark_urgent`]), and a handle to cut it
//! ([`Channel::cut_handle`]).
//!
//! Where a connection goes is an [`Endpoint`] (`tcp://` or `rdma://`);
//! what a destination accepts on is a [`Listener`].
//!
//! With TLS, the kernel's queue holds ciphertext and the TLS state holds
//! at most one record's worth more, so the postcopy queue budgets (see
//! `postcopy::queue`) measure the same queue as on plain TCP.
//!
//! Why not `tokio-rustls`: its stream needs `&mut` for both directions
//! (tokio's `split` puts a lock around the whole stream, which a
//! `try_read` cannot take without waiting), it cannot be moved to the
//! urgent channel's own runtime, and it has no non-blocking read. The
//! TLS itself is `rustls`'s; this module only moves its records between
//! the connection state and the socket.
//!
//! Guest pages go out and come in through [`Channel::write_pages`] and
//! [`read_into_pages`]: on plain TCP the kernel copies them between the
//! socket and the mapping (`writev`/`read` through raw pointers); with TLS
//! they are copied with volatile accesses through a buffer of ours, which
//! the cipher reads or writes.

pub mod tls;

use std::io::{self, BufRead, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
use tokio::net::TcpStream;
use vm_memory::VolatileSlice;

use crate::io::{writev_all, IoVecs, RawPages};
use crate::MigrateError;

pub use tls::{TlsConfig, TlsError};

/// Plaintext bytes handed to TLS at a time (rustls cuts them into
/// records of at most 16 KiB).
const TLS_CHUNK_BYTES: usize = 64 << 10;
/// Records a TLS connection encrypts ahead before writing them, in bytes:
/// they go out in one `writev` when full, or at a flush.
pub(crate) const TLS_SEND_BUFFER_BYTES: usize = 256 << 10;
/// Ciphertext read from the socket at a time. rustls reads at most a few
/// KiB per call on its own: through this buffer, one `read` takes what the
/// socket holds.
const TLS_RECEIVE_BUFFER_BYTES: usize = 256 << 10;

/// One migration connection (see the module's doc): TCP (plain or TLS),
/// or RDMA.
// TLS state lives inline: a migration has a handful of channels, each
// made once, so the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Channel {
    /// Over TCP.
    Tcp(TcpChannel),
    /// Over RDMA, and the guest memory its page references point into
    /// (kept mapped for as long as the stream lives: dropped after it).
    #[cfg(feature = "rdma")]
    Rdma {
        stream: freehint_rdma::RdmaStream,
        exposed: Option<Arc<freehint_memory::GuestRam>>,
    },
}

/// A TCP connection, plain or inside TLS.
pub(crate) struct TcpChannel {
    tcp: TcpStream,
    tls: Option<Tls>,
}

/// A TLS connection's state beside its socket.
pub(crate) struct Tls {
    state: Mutex<TlsState>,
}

/// What one lock holds: the TLS connection, and ciphertext read from the
/// socket that it has not taken yet.
struct TlsState {
    conn: rustls::Connection,
    incoming: Box<[u8]>,
    start: usize,
    end: usize,
}

impl TlsState {
    /// Hands the connection more ciphertext: from the buffer, refilled
    /// from the socket (without waiting) when empty. `Ok(None)` at the end
    /// of the stream; `WouldBlock` if the socket has nothing.
    fn read_tls(&mut self, tcp: &TcpStream) -> io::Result<Option<usize>> {
        if self.start == self.end {
            let n = tcp.try_read(&mut self.incoming)?;
            if n == 0 {
                // Tells rustls the stream ended.
                self.conn.read_tls(&mut io::empty())?;
                return Ok(None);
            }
            (self.start, self.end) = (0, n);
        }
        let mut pending = &self.incoming[self.start..self.end];
        let n = self.conn.read_tls(&mut pending)?;
        self.start += n;
        Ok(Some(n))
    }
}

impl TcpChannel {
    /// A plain TCP connection.
    pub(crate) fn plain(tcp: TcpStream) -> Self {
        Self { tcp, tls: None }
    }

    /// A TLS connection whose handshake is still to be done
    /// ([`Self::handshake`]).
    pub(crate) fn tls(tcp: TcpStream, conn: rustls::Connection) -> Self {
        Self {
            tcp,
            tls: Some(Tls {
                state: Mutex::new(TlsState {
                    conn,
                    incoming: vec![0u8; TLS_RECEIVE_BUFFER_BYTES].into_boxed_slice(),
                    start: 0,
                    end: 0,
                }),
            }),
        }
    }

    /// Runs the TLS handshake (nothing on plain TCP): certificates are
    /// checked here, so a peer without the right one is refused before a
    /// single frame is read from it.
    pub(crate) async fn handshake(&self) -> Result<(), TlsError> {
        let Some(tls) = &self.tls else {
            return Ok(());
        };
        loop {
            let interest = {
                let mut st = lock(&tls.state);
                let st = &mut *st;
                let conn = &mut st.conn;
                match flush_records(conn, &self.tcp) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(TlsError::Io(e)),
                }
                if !conn.is_handshaking() {
                    if !conn.wants_write() {
                        return Ok(());
                    }
                    tokio::io::Interest::WRITABLE
                } else if conn.wants_write() {
                    tokio::io::Interest::WRITABLE
                } else {
                    match st.read_tls(&self.tcp) {
                        Ok(None) => return Err(TlsError::ClosedInHandshake),
                        Ok(Some(_)) => {
                            if let Err(e) = st.conn.process_new_packets() {
                                // Tell the peer why (the alert rustls
                                // queued), best effort.
                                let _ = flush_records(&mut st.conn, &self.tcp);
                                return Err(TlsError::Handshake(e));
                            }
                            continue;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            tokio::io::Interest::READABLE
                        }
                        Err(e) => return Err(TlsError::Io(e)),
                    }
                }
            };
            self.tcp.ready(interest).await.map_err(TlsError::Io)?;
        }
    }

    /// Reads what has arrived without waiting: `WouldBlock` if nothing
    /// has, `Ok(0)` at the end of the stream.
    pub(crate) fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = &self.tls else {
            return self.tcp.try_read(buf);
        };
        self.try_read_tls(tls, |plain| {
            let n = plain.len().min(buf.len());
            buf[..n].copy_from_slice(&plain[..n]);
            n
        })
    }

    /// Like [`Self::try_read`], but the bytes go into `dst` from byte
    /// `offset` on, copied straight out of the TLS connection's plaintext
    /// (with TLS; plain TCP reads them straight from the socket).
    fn try_read_pages(&self, dst: &RawPages, offset: usize) -> io::Result<usize> {
        let Some(tls) = &self.tls else {
            return Err(io::Error::other("plain TCP reads pages from the socket"));
        };
        self.try_read_tls(tls, |plain| {
            let n = plain.len().min(dst.len() - offset);
            dst.write_at(offset, &plain[..n]);
            n
        })
    }

    /// Gives `take` the plaintext the connection holds (decrypting what
    /// the socket has, without waiting); `take` returns how much it took.
    /// `WouldBlock` if nothing has arrived, `Ok(0)` at the end of the
    /// stream.
    fn try_read_tls(&self, tls: &Tls, mut take: impl FnMut(&[u8]) -> usize) -> io::Result<usize> {
        let mut st = lock(&tls.state);
        let mut ended = false;
        loop {
            let mut reader = st.conn.reader();
            match reader.fill_buf() {
                Ok([]) => return Ok(0),
                Ok(plain) => {
                    let n = take(plain);
                    reader.consume(n);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && ended => return Ok(0),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The peer closed its socket without TLS's close_notify.
                // Counted as the end of the stream, as on plain TCP: every
                // migration frame says how long it is and the protocol
                // says when it ends, so a cut is seen at that level.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            let got = st.read_tls(&self.tcp)?;
            if let Err(e) = st.conn.process_new_packets() {
                let _ = flush_records(&mut st.conn, &self.tcp);
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
            match got {
                None => ended = true,
                // rustls took nothing although ciphertext waits (it
                // refuses what it cannot hold with an error, so this is
                // not expected): failing beats spinning here.
                Some(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "TLS: the connection took none of the ciphertext waiting",
                    ));
                }
                Some(_) => {}
            }
        }
    }

    /// Writes what the socket takes without waiting: `WouldBlock` if it
    /// takes nothing. With TLS, bytes taken are encrypted into records
    /// that wait in the connection's state (up to
    /// [`TLS_SEND_BUFFER_BYTES`]) until it is full or flushed: every
    /// writer of the engine flushes once its frame or batch is written.
    pub(crate) fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        let Some(tls) = &self.tls else {
            return self.tcp.try_write(buf);
        };
        let mut st = lock(&tls.state);
        let chunk = &buf[..buf.len().min(TLS_CHUNK_BYTES)];
        let n = st.conn.writer().write(chunk)?;
        if n > 0 || chunk.is_empty() {
            return Ok(n);
        }
        // Its records fill the buffer: write them out first.
        flush_records(&mut st.conn, &self.tcp)?;
        match st.conn.writer().write(chunk)? {
            0 => Err(io::ErrorKind::WouldBlock.into()),
            n => Ok(n),
        }
    }

    /// Writes every record the TLS state holds, without waiting.
    fn try_flush(&self) -> io::Result<()> {
        match &self.tls {
            None => Ok(()),
            Some(tls) => flush_records(&mut lock(&tls.state).conn, &self.tcp),
        }
    }

    /// Waits until a read may find something (it may still find nothing).
    pub(crate) async fn readable(&self) -> io::Result<()> {
        if let Some(tls) = &self.tls {
            let mut st = lock(&tls.state);
            let has_plaintext = st
                .conn
                .process_new_packets()
                .map(|s| s.plaintext_bytes_to_read() > 0)
                .unwrap_or(true);
            if has_plaintext || st.start < st.end {
                return Ok(());
            }
        }
        self.tcp.readable().await
    }

    fn poll_read_shared(
        &self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = ready!(retry(
            cx,
            |cx| self.tcp.poll_read_ready(cx),
            || self.try_read(buf.initialize_unfilled())
        ))?;
        buf.advance(n);
        Poll::Ready(Ok(()))
    }

    fn poll_write_shared(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        retry(
            cx,
            |cx| self.tcp.poll_write_ready(cx),
            || self.try_write(buf),
        )
    }

    fn poll_flush_shared(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        retry(cx, |cx| self.tcp.poll_write_ready(cx), || self.try_flush())
    }

    /// Ends our direction: TLS's close_notify (once), every record out,
    /// then the socket's write side.
    fn poll_shutdown_shared(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(tls) = &self.tls {
            let mut st = lock(&tls.state);
            if !st.conn.is_handshaking() {
                // Sent once: rustls ignores a second call.
                st.conn.send_close_notify();
            }
        }
        ready!(self.poll_flush_shared(cx))?;
        Poll::Ready(
            match socket2::SockRef::from(&self.tcp).shutdown(std::net::Shutdown::Write) {
                Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
                r => r,
            },
        )
    }

    /// Writes every byte `iovs` describes (a batch head of ours and runs of
    /// guest pages), then flushes.
    pub(crate) async fn write_pages(
        &self,
        iovs: &mut IoVecs,
        bounce: &mut Vec<u8>,
    ) -> io::Result<()> {
        if self.tls.is_none() {
            return writev_all(&self.tcp, iovs).await;
        }
        let mut w = self;
        for i in 0..iovs.0.len() {
            // Copied out: a reference to an iovec (raw pointers) must not
            // be held across an await.
            let (base, len) = (iovs.0[i].iov_base as usize, iovs.0[i].iov_len);
            let mut done = 0;
            while done < len {
                let n = (len - done).min(TLS_CHUNK_BYTES);
                // SAFETY: the iovec describes readable memory for as long
                // as this call runs (see `IoVecs`): our batch head, or
                // guest pages in the mapping the caller keeps alive.
                // The slice is read only through volatile copies (the
                // guest may write it meanwhile) and dropped before return.
                bounce.resize(n, 0);
                unsafe { VolatileSlice::new((base as *mut u8).add(done), n) }
                    .copy_to(&mut bounce[..n]);
                w.write_all(&bounce[..n]).await?;
                done += n;
            }
        }
        w.flush().await
    }
}

fn lock(m: &Mutex<TlsState>) -> MutexGuard<'_, TlsState> {
    // A panic while holding it leaves a connection whose records may be
    // half-written: the next read or write fails in rustls, not here.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Writes the records `conn` holds; `WouldBlock` if the socket is full.
fn flush_records(conn: &mut rustls::Connection, tcp: &TcpStream) -> io::Result<()> {
    while conn.wants_write() {
        if conn.write_tls(&mut SocketIo(tcp))? == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
    }
    Ok(())
}

/// The socket as `std::io::Write` for rustls: non-blocking writes that
/// keep tokio's readiness tracking right.
struct SocketIo<'a>(&'a TcpStream);

impl Write for SocketIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for TcpChannel {
    fn as_raw_fd(&self) -> RawFd {
        self.tcp.as_raw_fd()
    }
}

impl AsFd for TcpChannel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.tcp.as_fd()
    }
}

/// Calls `$body` with `$c` bound to the TCP channel or the RDMA stream.
macro_rules! each {
    ($ch:expr, $c:ident => $tcp:expr, $r:ident => $rdma:expr) => {
        match $ch {
            Channel::Tcp($c) => $tcp,
            #[cfg(feature = "rdma")]
            Channel::Rdma { stream: $r, .. } => $rdma,
        }
    };
}

impl Channel {
    /// A plain TCP connection.
    pub(crate) fn plain(tcp: TcpStream) -> Self {
        Channel::Tcp(TcpChannel::plain(tcp))
    }

    /// A TLS connection whose handshake is still to be done
    /// ([`Self::handshake`]).
    pub(crate) fn tls(tcp: TcpStream, conn: rustls::Connection) -> Self {
        Channel::Tcp(TcpChannel::tls(tcp, conn))
    }

    /// What carries the connection.
    pub(crate) fn kind(&self) -> crate::TransportKind {
        match self {
            Channel::Tcp(c) if c.tls.is_some() => crate::TransportKind::Tls,
            Channel::Tcp(_) => crate::TransportKind::Tcp,
            #[cfg(feature = "rdma")]
            Channel::Rdma { .. } => crate::TransportKind::Rdma,
        }
    }

    /// Runs the TLS handshake (nothing on plain TCP or RDMA).
    pub(crate) async fn handshake(&self) -> Result<(), TlsError> {
        match self {
            Channel::Tcp(c) => c.handshake().await,
            #[cfg(feature = "rdma")]
            Channel::Rdma { .. } => Ok(()),
        }
    }

    /// Sets the options every migration connection uses (TCP: see
    /// `tune_socket`; RDMA has no such options).
    pub(crate) fn tune(&self, peer_timeout: std::time::Duration) -> io::Result<()> {
        each!(self, c => crate::tune_socket(&c.tcp, peer_timeout), _r => Ok(()))
    }

    /// Marks the connection as postcopy's urgent channel (TCP: DSCP and
    /// priority; an RDMA queue pair of its own already queues apart).
    pub(crate) fn mark_urgent(&self) {
        each!(self, c => crate::mark_urgent(&c.tcp), _r => ())
    }

    /// Bytes written that the peer has not acknowledged (TCP:
    /// `SIOCOUTQ`; RDMA: messages not completed and page references not
    /// read); 0 if unknown.
    pub(crate) fn unacknowledged_bytes(&self) -> u64 {
        each!(self,
            c => freehint_linux_sys::unacknowledged_bytes(c).unwrap_or(0),
            r => r.queued_bytes())
    }

    /// Bytes received and not yet read (TCP: `FIONREAD`; RDMA: inline
    /// bytes and pages already READ); 0 if unknown.
    pub(crate) fn readable_bytes(&self) -> u64 {
        each!(self,
            c => freehint_linux_sys::readable_bytes(c).unwrap_or(0),
            r => r.readable_bytes())
    }

    /// The kernel's figures of the connection (RDMA: bytes acknowledged,
    /// no round trip).
    pub(crate) fn figures(&self) -> freehint_linux_sys::TcpFigures {
        each!(self,
        c => freehint_linux_sys::tcp_figures(c).unwrap_or_default(),
        r => freehint_linux_sys::TcpFigures {
            bytes_acked: r.bytes_written().saturating_sub(r.queued_bytes()),
            ..Default::default()
        })
    }

    /// A handle that cuts this connection (both ways) later, even after
    /// it moved to another task; `None` if it cannot be made.
    pub(crate) fn cut_handle(&self) -> Option<LinkCut> {
        match self {
            Channel::Tcp(c) => match c.as_fd().try_clone_to_owned() {
                Ok(fd) => Some(LinkCut::Tcp(std::net::TcpStream::from(fd))),
                Err(e) => {
                    tracing::warn!("cannot duplicate a socket to cut it later: {e}");
                    None
                }
            },
            #[cfg(feature = "rdma")]
            Channel::Rdma { stream, .. } => Some(LinkCut::Rdma(stream.cut_handle())),
        }
    }

    /// Reads what has arrived without waiting: `WouldBlock` if nothing
    /// has, `Ok(0)` at the end of the stream.
    pub(crate) fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        each!(self, c => c.try_read(buf), r => r.try_read(buf))
    }

    /// Waits until a read may find something (it may still find nothing).
    pub(crate) async fn readable(&self) -> io::Result<()> {
        match self {
            Channel::Tcp(c) => c.readable().await,
            #[cfg(feature = "rdma")]
            Channel::Rdma { stream, .. } => {
                std::future::poll_fn(|cx| stream.poll_read_ready(cx)).await
            }
        }
    }

    fn poll_read_shared(
        &self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self {
            Channel::Tcp(c) => c.poll_read_shared(cx, buf),
            #[cfg(feature = "rdma")]
            Channel::Rdma { stream, .. } => {
                let n = ready!(retry(
                    cx,
                    |cx| stream.poll_read_ready(cx),
                    || stream.try_read(buf.initialize_unfilled())
                ))?;
                buf.advance(n);
                Poll::Ready(Ok(()))
            }
        }
    }

    fn poll_write_shared(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self {
            Channel::Tcp(c) => c.poll_write_shared(cx, buf),
            #[cfg(feature = "rdma")]
            Channel::Rdma { stream, .. } => retry(
                cx,
                |cx| stream.poll_write_ready(cx),
                || stream.try_write(buf),
            ),
        }
    }

    fn poll_flush_shared(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Channel::Tcp(c) => c.poll_flush_shared(cx),
            #[cfg(feature = "rdma")]
            Channel::Rdma { stream, .. } => {
                retry(cx, |cx| stream.poll_write_ready(cx), || stream.try_flush())
            }
        }
    }

    fn poll_shutdown_shared(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, c => c.poll_shutdown_shared(cx), r => r.poll_shutdown(cx))
    }

    /// Writes every byte `iovs` describes (a batch head of ours and runs of
    /// guest pages), then flushes. Over RDMA, guest pages go as references
    /// the destination reads.
    pub(crate) async fn write_pages(
        &self,
        iovs: &mut IoVecs,
        bounce: &mut Vec<u8>,
    ) -> io::Result<()> {
        match self {
            Channel::Tcp(c) => c.write_pages(iovs, bounce).await,
            #[cfg(feature = "rdma")]
            Channel::Rdma { stream, .. } => rdma_write_pages(self, stream, iovs, bounce).await,
        }
    }

    /// Moves the connection off its runtime, to be attached to another
    /// ([`DetachedChannel::attach`]).
    pub(crate) fn detach(self) -> io::Result<DetachedChannel> {
        Ok(match self {
            Channel::Tcp(c) => DetachedChannel::Tcp {
                tcp: c.tcp.into_std()?,
                tls: c.tls,
            },
            #[cfg(feature = "rdma")]
            Channel::Rdma { stream, exposed } => DetachedChannel::Rdma {
                stream: stream.detach(),
                exposed,
            },
        })
    }

    /// Splits the connection into a reader and a writer that may live in
    /// different tasks.
    pub(crate) fn into_split(self) -> (ChannelReader, ChannelWriter) {
        let me = Arc::new(self);
        (ChannelReader(me.clone()), ChannelWriter(me))
    }
}

/// Writes `iovs` on an RDMA stream: runs in exposed guest memory as
/// references, the rest (our batch head) copied inline.
#[cfg(feature = "rdma")]
async fn rdma_write_pages(
    w: &Channel,
    stream: &freehint_rdma::RdmaStream,
    iovs: &mut IoVecs,
    bounce: &mut Vec<u8>,
) -> io::Result<()> {
    let mut w = w;
    for i in 0..iovs.0.len() {
        // Copied out: a reference to an iovec (raw pointers) must not be
        // held across an await.
        let (base, len) = (iovs.0[i].iov_base as usize, iovs.0[i].iov_len);
        let mut done = 0;
        while done < len {
            let referenced = std::future::poll_fn(|cx| {
                retry(
                    cx,
                    |cx| stream.poll_write_ready(cx),
                    || stream.try_write_ref((base + done) as *const u8, len - done),
                )
            })
            .await?;
            if let Some(n) = referenced {
                done += n;
                continue;
            }
            let n = (len - done).min(TLS_CHUNK_BYTES);
            // SAFETY: the iovec describes readable memory for as long as
            // this call runs (see `IoVecs`); read only through a volatile
            // copy, the slice dropped before the next await.
            bounce.resize(n, 0);
            unsafe { VolatileSlice::new((base as *mut u8).add(done), n) }.copy_to(&mut bounce[..n]);
            w.write_all(&bounce[..n]).await?;
            done += n;
        }
    }
    w.flush().await
}

/// Cuts one connection of a postcopy session (see `postcopy::Links`).
#[derive(Debug)]
pub(crate) enum LinkCut {
    /// A duplicate of the TCP socket.
    Tcp(std::net::TcpStream),
    /// The RDMA stream's cut handle.
    #[cfg(feature = "rdma")]
    Rdma(freehint_rdma::RdmaCut),
}

impl LinkCut {
    /// Shuts the connection down, both ways.
    pub(crate) fn cut(self) {
        match self {
            LinkCut::Tcp(s) => {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
            #[cfg(feature = "rdma")]
            LinkCut::Rdma(r) => r.cut(),
        }
    }
}

/// `AsyncRead` for `$ty`, reading through the `Channel` `$ch` gives.
macro_rules! channel_read {
    ($ty:ty, |$me:ident| $ch:expr) => {
        impl AsyncRead for $ty {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                let $me = self.get_mut();
                $ch.poll_read_shared(cx, buf)
            }
        }
    };
}

/// `AsyncWrite` for `$ty`, writing through the `Channel` `$ch` gives.
macro_rules! channel_write {
    ($ty:ty, |$me:ident| $ch:expr) => {
        impl AsyncWrite for $ty {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                let $me = self.get_mut();
                $ch.poll_write_shared(cx, buf)
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                let $me = self.get_mut();
                $ch.poll_flush_shared(cx)
            }

            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                let $me = self.get_mut();
                $ch.poll_shutdown_shared(cx)
            }
        }
    };
}

channel_write!(&TcpChannel, |me| me);
channel_read!(&Channel, |me| me);
channel_write!(&Channel, |me| me);
channel_read!(Channel, |me| me);
channel_write!(Channel, |me| me);
channel_read!(ChannelReader, |me| me.0);
channel_write!(ChannelWriter, |me| me.0);

/// The reading half of a [`Channel::into_split`].
pub(crate) struct ChannelReader(Arc<Channel>);

/// The writing half of a [`Channel::into_split`].
pub(crate) struct ChannelWriter(Arc<Channel>);

impl ChannelWriter {
    /// The connection both halves share.
    pub(crate) fn channel(&self) -> &Channel {
        &self.0
    }
}

/// A [`Channel`] between two runtimes.
#[allow(clippy::large_enum_variant)]
pub(crate) enum DetachedChannel {
    Tcp {
        tcp: std::net::TcpStream,
        tls: Option<Tls>,
    },
    #[cfg(feature = "rdma")]
    Rdma {
        stream: freehint_rdma::DetachedRdmaStream,
        exposed: Option<Arc<freehint_memory::GuestRam>>,
    },
}

impl DetachedChannel {
    /// The channel on the current runtime.
    pub(crate) fn attach(self) -> io::Result<Channel> {
        Ok(match self {
            DetachedChannel::Tcp { tcp, tls } => Channel::Tcp(TcpChannel {
                tcp: TcpStream::from_std(tcp)?,
                tls,
            }),
            #[cfg(feature = "rdma")]
            DetachedChannel::Rdma { stream, exposed } => Channel::Rdma {
                stream: stream.attach()?,
                exposed,
            },
        })
    }
}

/// Reads exactly `dst`'s length of page data into guest memory: first what
/// `r` has buffered, then the rest. On plain TCP the socket reads
/// straight into the mapping; with TLS the plaintext is copied out of the
/// connection's own buffer with volatile writes. Guest memory is only
/// reached through raw pointers, never a Rust reference.
pub(crate) async fn read_into_pages(
    r: &mut BufReader<Channel>,
    dst: RawPages,
    context: &str,
) -> Result<(), MigrateError> {
    let len = dst.len();
    let mut done = 0;
    let buffered = r.buffer();
    if !buffered.is_empty() {
        let n = buffered.len().min(len);
        dst.write_at(0, &buffered[..n]);
        Pin::new(&mut *r).consume(n);
        done = n;
    }
    if done == len {
        return Ok(());
    }
    match r.get_ref() {
        Channel::Tcp(c) if c.tls.is_none() => {
            crate::io::read_socket_into_pages(&c.tcp, dst, done, context).await
        }
        Channel::Tcp(c) => {
            read_pages_from(&dst, done, context, |cx, done| {
                retry(
                    cx,
                    |cx| c.tcp.poll_read_ready(cx),
                    || c.try_read_pages(&dst, done),
                )
            })
            .await
        }
        #[cfg(feature = "rdma")]
        Channel::Rdma { stream, .. } => {
            read_pages_from(&dst, done, context, |cx, done| {
                retry(
                    cx,
                    |cx| stream.poll_read_ready(cx),
                    || {
                        stream.try_read_with(|b| {
                            let n = b.len().min(dst.len() - done);
                            dst.write_at(done, &b[..n]);
                            n
                        })
                    },
                )
            })
            .await
        }
    }
}

/// Fills `dst` from byte `done` on, each step `read(cx, done)` (bytes
/// read, 0 at the end of the stream).
async fn read_pages_from(
    dst: &RawPages,
    mut done: usize,
    context: &str,
    mut read: impl FnMut(&mut Context<'_>, usize) -> Poll<io::Result<usize>>,
) -> Result<(), MigrateError> {
    while done < dst.len() {
        let n = std::future::poll_fn(|cx| read(cx, done))
            .await
            .map_err(MigrateError::io(context.to_string()))?;
        if n == 0 {
            return Err(MigrateError::Disconnected(format!(
                "{context}: peer disconnected in the middle of a frame (truncated frame)"
            )));
        }
        done += n;
    }
    Ok(())
}

/// Runs `op` until it says something other than `WouldBlock`, waiting
/// with `ready` between tries.
fn retry<T>(
    cx: &mut Context<'_>,
    mut ready: impl FnMut(&mut Context<'_>) -> Poll<io::Result<()>>,
    mut op: impl FnMut() -> io::Result<T>,
) -> Poll<io::Result<T>> {
    loop {
        match op() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready!(ready(cx))?,
            other => return Poll::Ready(other),
        }
    }
}

/// Opens a connection to `dest` over `scheme`: TCP, then TLS's handshake
/// when `tls` is given; or RDMA, whose page references may point into
/// `exposed` (the source's guest RAM); each step within `timeout`.
/// `what` names the connection in errors.
pub(crate) async fn connect(
    dest: std::net::SocketAddr,
    scheme: Scheme,
    tls: Option<&TlsConfig>,
    exposed: Option<&Arc<freehint_memory::GuestRam>>,
    timeout: std::time::Duration,
    what: &str,
) -> Result<Channel, MigrateError> {
    if scheme == Scheme::Rdma {
        return connect_rdma(dest, tls, exposed, timeout, what).await;
    }
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(dest))
        .await
        .map_err(|_| MigrateError::Timeout {
            what: what.to_string(),
            seconds: timeout.as_secs(),
        })?
        .map_err(MigrateError::io(what.to_string()))?;
    let Some(tls) = tls else {
        return Ok(Channel::plain(tcp));
    };
    let tls_error = |source| MigrateError::Tls {
        context: format!("{what}: TLS with {dest}"),
        source,
    };
    let channel = Channel::tls(tcp, tls.connection_to(dest).map_err(tls_error)?);
    handshake_within(&channel, timeout)
        .await
        .map_err(tls_error)?;
    Ok(channel)
}

#[cfg(feature = "rdma")]
async fn connect_rdma(
    dest: std::net::SocketAddr,
    tls: Option<&TlsConfig>,
    exposed: Option<&Arc<freehint_memory::GuestRam>>,
    timeout: std::time::Duration,
    what: &str,
) -> Result<Channel, MigrateError> {
    if tls.is_some() {
        return Err(MigrateError::io(what.to_string())(io::Error::new(
            io::ErrorKind::Unsupported,
            RDMA_WITHOUT_TLS,
        )));
    }
    let stream = freehint_rdma::connect(dest, timeout)
        .await
        .map_err(|e| MigrateError::io(what.to_string())(io::Error::other(e)))?;
    if let Some(ram) = exposed {
        let ranges = ram
            .regions()
            .iter()
            .map(|r| {
                let start = r.host_ptr() as usize;
                start..start + r.size_bytes() as usize
            })
            .collect();
        // SAFETY: the channel holds `ram` (dropped after the stream), so
        // its mappings stay for as long as the stream lives.
        unsafe { stream.expose_memory(ranges) };
    }
    Ok(Channel::Rdma {
        stream,
        exposed: exposed.cloned(),
    })
}

#[cfg(not(feature = "rdma"))]
async fn connect_rdma(
    _dest: std::net::SocketAddr,
    _tls: Option<&TlsConfig>,
    _exposed: Option<&Arc<freehint_memory::GuestRam>>,
    _timeout: std::time::Duration,
    what: &str,
) -> Result<Channel, MigrateError> {
    Err(MigrateError::io(what.to_string())(io::Error::new(
        io::ErrorKind::Unsupported,
        NO_RDMA,
    )))
}

/// Why a build refuses `rdma://`.
#[cfg(not(feature = "rdma"))]
pub(crate) const NO_RDMA: &str =
    "this freehint was built without RDMA (build it with the cargo feature `rdma`)";
/// Why RDMA refuses TLS.
#[cfg(feature = "rdma")]
pub(crate) const RDMA_WITHOUT_TLS: &str = "RDMA connections carry no TLS: run them on a trusted fabric with --insecure (docs/SECURITY.md)";

/// How a connection reaches its peer: the scheme of an [`Endpoint`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Scheme {
    /// TCP (plain or TLS).
    #[default]
    Tcp,
    /// RDMA through rdma_cm (InfiniBand, RoCE, soft-RoCE).
    Rdma,
}

/// Where a destination listens: `tcp://HOST:PORT` (or just
/// `HOST:PORT`), or `rdma://HOST:PORT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// How to reach it.
    pub scheme: Scheme,
    /// Its address (for RDMA, the address of an interface with an RDMA
    /// device: IPoIB, RoCE, rxe).
    pub addr: std::net::SocketAddr,
}

impl std::str::FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (scheme, rest) = match s.split_once("://") {
            None => (Scheme::Tcp, s),
            Some(("tcp", rest)) => (Scheme::Tcp, rest),
            Some(("rdma", rest)) => (Scheme::Rdma, rest),
            Some((other, _)) => {
                return Err(format!(
                    "unknown scheme {other}:// in {s:?}: use tcp://HOST:PORT (or HOST:PORT) or rdma://HOST:PORT"
                ))
            }
        };
        let addr = rest.parse().map_err(|e| {
            format!("{rest:?} is not an address and port (like 192.0.2.1:7070 or [::1]:7070): {e}")
        })?;
        Ok(Endpoint { scheme, addr })
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.scheme {
            Scheme::Tcp => write!(f, "{}", self.addr),
            Scheme::Rdma => write!(f, "rdma://{}", self.addr),
        }
    }
}

/// What a destination accepts connections on.
#[derive(Clone, Copy)]
pub enum Listener<'a> {
    /// A TCP listener.
    Tcp(&'a tokio::net::TcpListener),
    /// An RDMA listener.
    #[cfg(feature = "rdma")]
    Rdma(&'a freehint_rdma::RdmaListener),
}

/// A connection just accepted, before its TLS handshake.
pub(crate) enum NewConnection {
    Tcp(TcpStream),
    #[cfg(feature = "rdma")]
    Rdma(freehint_rdma::RdmaStream),
}

impl Listener<'_> {
    /// The next connection and its peer's address. Cancel-safe.
    pub(crate) async fn accept(&self) -> io::Result<(NewConnection, std::net::SocketAddr)> {
        match self {
            Listener::Tcp(l) => l.accept().await.map(|(s, a)| (NewConnection::Tcp(s), a)),
            #[cfg(feature = "rdma")]
            Listener::Rdma(l) => l
                .accept()
                .await
                .map(|(s, a)| (NewConnection::Rdma(s), a))
                .map_err(io::Error::other),
        }
    }
}

/// An accepted connection, after TLS's handshake when `tls` is given
/// (within `timeout`): a peer without a certificate from our CA fails
/// here, before any frame of it is read. RDMA connections carry no TLS: a
/// destination that requires it refuses them.
pub(crate) async fn accepted(
    incoming: NewConnection,
    tls: Option<&TlsConfig>,
    timeout: std::time::Duration,
) -> Result<Channel, TlsError> {
    #[allow(clippy::infallible_destructuring_match)]
    let tcp = match incoming {
        NewConnection::Tcp(tcp) => tcp,
        #[cfg(feature = "rdma")]
        NewConnection::Rdma(stream) => {
            if tls.is_some() {
                return Err(TlsError::Io(io::Error::new(
                    io::ErrorKind::Unsupported,
                    RDMA_WITHOUT_TLS,
                )));
            }
            return Ok(Channel::Rdma {
                stream,
                exposed: None,
            });
        }
    };
    let Some(tls) = tls else {
        return Ok(Channel::plain(tcp));
    };
    let channel = Channel::tls(tcp, tls.accepted_connection()?);
    handshake_within(&channel, timeout).await?;
    Ok(channel)
}

async fn handshake_within(channel: &Channel, timeout: std::time::Duration) -> Result<(), TlsError> {
    tokio::time::timeout(timeout, channel.handshake())
        .await
        .unwrap_or(Err(TlsError::Timeout(timeout.as_secs())))
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    const T: Duration = Duration::from_secs(10);

    fn test_set() -> (tempfile::TempDir, Arc<TlsConfig>) {
        let dir = tempfile::tempdir().unwrap();
        tls::make_test_set(dir.path(), &[]).unwrap();
        let config = Arc::new(TlsConfig::from_dir(dir.path()).unwrap());
        (dir, config)
    }

    /// A connected pair over loopback: (source's, destination's).
    async fn pair(
        client: Option<&TlsConfig>,
        server: Option<&TlsConfig>,
    ) -> (Result<Channel, MigrateError>, Result<Channel, TlsError>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let accept = async {
            let (tcp, _) = listener.accept().await.unwrap();
            accepted(NewConnection::Tcp(tcp), server, T).await
        };
        tokio::join!(connect(addr, Scheme::Tcp, client, None, T, "test"), accept)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[0] ^ seed)
            .collect()
    }

    #[tokio::test]
    async fn tls_carries_bytes_both_ways_at_once_and_ends_cleanly() {
        let (_dir, tls) = test_set();
        let (c, s) = pair(Some(&tls), Some(&tls)).await;
        let (c, s) = (c.unwrap(), s.unwrap());
        let (a, b) = (pattern(8 << 20, 1), pattern(8 << 20, 2));
        // Each side writes through one shared reference while it reads
        // through another, as the bulk channels do.
        async fn side(ch: &Channel, out: Vec<u8>) -> Vec<u8> {
            let write = async {
                let mut w = ch;
                w.write_all(&out).await.unwrap();
                w.shutdown().await.unwrap();
            };
            let read = async {
                let mut r = ch;
                let mut got = Vec::new();
                r.read_to_end(&mut got).await.unwrap();
                got
            };
            tokio::join!(write, read).1
        }
        let (got_by_server, got_by_client) = tokio::join!(side(&s, b.clone()), side(&c, a.clone()));
        assert!(
            got_by_server == a,
            "the destination read other bytes than were sent"
        );
        assert!(
            got_by_client == b,
            "the source read other bytes than were sent"
        );
    }

    #[tokio::test]
    async fn guest_pages_cross_tls_intact() {
        let (_dir, tls) = test_set();
        let (c, s) = pair(Some(&tls), Some(&tls)).await;
        let (c, s) = (c.unwrap(), s.unwrap());
        let src = pattern(3 << 20, 7);
        let mut dst = vec![0u8; src.len()];
        let head = b"head".to_vec();
        let mut iovs = IoVecs::default();
        iovs.0.push(libc::iovec {
            iov_base: head.as_ptr() as *mut libc::c_void,
            iov_len: head.len(),
        });
        iovs.0.push(libc::iovec {
            iov_base: src.as_ptr() as *mut libc::c_void,
            iov_len: src.len(),
        });
        // SAFETY: `dst` outlives the slice and nothing else touches it
        // until the read is done.
        let dst_slice = unsafe { VolatileSlice::new(dst.as_mut_ptr(), dst.len()) };
        let pages = RawPages::of(&dst_slice);
        let mut r = BufReader::new(s);
        let write = async {
            c.write_pages(&mut iovs, &mut Vec::new()).await.unwrap();
        };
        let read = async {
            let mut h = [0u8; 4];
            r.read_exact(&mut h).await.unwrap();
            assert_eq!(&h, b"head");
            read_into_pages(&mut r, pages, "test").await.unwrap();
        };
        tokio::join!(write, read);
        assert!(dst == src, "pages differ after crossing TLS");
    }

    #[tokio::test]
    async fn plain_tcp_to_a_tls_destination_is_refused() {
        let (_dir, tls) = test_set();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let plain_source = async {
            let c = connect(addr, Scheme::Tcp, None, None, T, "test")
                .await
                .unwrap();
            // What a plain source says first: a frame, not a TLS hello.
            let mut hello = Vec::new();
            freehint_wire::Message::Error("not TLS".into()).encode(&mut hello);
            let _ = (&c).write_all(&hello).await;
            let mut b = [0u8; 16];
            let _ = (&c).read(&mut b).await;
        };
        let destination = async {
            let (tcp, _) = listener.accept().await.unwrap();
            accepted(NewConnection::Tcp(tcp), Some(&tls), T).await
        };
        let (_, s) = tokio::join!(plain_source, destination);
        let e = s.err().expect("refused");
        assert!(matches!(e, TlsError::Handshake(_)), "{e:?}");
    }

    #[tokio::test]
    async fn a_source_without_a_certificate_is_refused() {
        let (dir, tls) = test_set();
        let mut roots = rustls::RootCertStore::empty();
        let ca = std::fs::read(dir.path().join(tls::CA_CERT_FILE)).unwrap();
        use rustls::pki_types::pem::PemObject;
        for c in rustls::pki_types::CertificateDer::pem_slice_iter(&ca) {
            roots.add(c.unwrap()).unwrap();
        }
        let no_cert = Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let conn =
                rustls::ClientConnection::new(no_cert, "localhost".try_into().unwrap()).unwrap();
            let ch = Channel::tls(tcp, conn.into());
            let _ = ch.handshake().await;
            // TLS 1.3: the client's side may finish before the server's
            // verdict; a read then sees it.
            let mut b = [0u8; 1];
            let _ = (&ch).read(&mut b).await;
        };
        let server = async {
            let (tcp, _) = listener.accept().await.unwrap();
            accepted(NewConnection::Tcp(tcp), Some(&tls), T).await
        };
        let (_, s) = tokio::join!(client, server);
        let e = s.err().expect("refused");
        assert!(
            e.to_string().contains("certificate"),
            "the error should say why: {e}"
        );
    }

    #[tokio::test]
    async fn certificates_of_another_ca_are_refused_both_ways() {
        let (_d1, ours) = test_set();
        let (_d2, theirs) = test_set();
        // Their source, our destination.
        let (c, s) = pair(Some(&theirs), Some(&ours)).await;
        assert!(s.is_err(), "our destination took a source of another CA");
        drop(c);
        // Our source, their destination: the source refuses it.
        let (c, _s) = pair(Some(&ours), Some(&theirs)).await;
        let e = c
            .err()
            .expect("our source took a destination of another CA");
        let text = freehint_types::ErrorChain(&e).to_string();
        assert!(text.contains("invalid peer certificate"), "{text}");
    }

    #[tokio::test]
    async fn a_destination_certificate_for_another_name_is_refused() {
        let (dir, _) = test_set();
        let tls = TlsConfig::from_dir(dir.path())
            .unwrap()
            .with_peer_name("dst.example.org")
            .unwrap();
        let (c, _s) = pair(Some(&tls), Some(&tls)).await;
        let e = c
            .err()
            .expect("a certificate without the expected name was taken");
        let text = freehint_types::ErrorChain(&e).to_string();
        assert!(text.contains("not valid for name"), "{text}");
    }

    #[tokio::test]
    async fn a_destination_expecting_a_source_name_refuses_other_sources() {
        let (dir, tls) = test_set();
        let picky =
            TlsConfig::from_dir_accepting_only(dir.path(), &["src.example.org".into()]).unwrap();
        let (_c, s) = pair(Some(&tls), Some(&picky)).await;
        let e = s
            .err()
            .expect("a source without the expected name was taken");
        assert!(e.to_string().contains("not valid for name"), "{e}");
        // One name of a list is enough.
        let named = TlsConfig::from_dir_accepting_only(
            dir.path(),
            &["src.example.org".into(), tls::TEST_SOURCE_NAME.into()],
        )
        .unwrap();
        let (c, s) = pair(Some(&tls), Some(&named)).await;
        c.unwrap();
        s.unwrap();
    }

    fn pinned_host() -> (tempfile::TempDir, tls::CertificateFingerprint) {
        let dir = tempfile::tempdir().unwrap();
        let fingerprint = tls::make_host_certificate(dir.path()).unwrap();
        (dir, fingerprint)
    }

    #[tokio::test]
    async fn pinned_hosts_take_each_other_and_refuse_strangers() {
        let (a_dir, a) = pinned_host();
        let (b_dir, b) = pinned_host();
        let (c_dir, c) = pinned_host();
        let a_tls = TlsConfig::pinned(a_dir.path(), &[b]).unwrap();
        let b_tls = TlsConfig::pinned(b_dir.path(), &[a]).unwrap();
        let c_tls = TlsConfig::pinned(c_dir.path(), &[b]).unwrap();

        // A to B: each has pinned the other; bytes cross.
        let (src, dst) = pair(Some(&a_tls), Some(&b_tls)).await;
        let (src, dst) = (src.unwrap(), dst.unwrap());
        (&src).write_all(b"pinned").await.unwrap();
        (&src).shutdown().await.unwrap();
        let mut got = Vec::new();
        (&dst).read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"pinned");

        // C knows B's fingerprint, but B has not pinned C: B refuses it
        // and names the fingerprint it saw.
        let (_src, dst) = pair(Some(&c_tls), Some(&b_tls)).await;
        let e = dst
            .err()
            .expect("a destination took a source it has not pinned");
        let text = e.to_string();
        assert!(
            text.contains(&c.to_string()) && text.contains("--tls-pin"),
            "{text}"
        );

        // A source pinned to C reaches B: the source refuses B.
        let a_to_c = TlsConfig::pinned(a_dir.path(), &[c]).unwrap();
        let (src, _dst) = pair(Some(&a_to_c), Some(&b_tls)).await;
        let e = src
            .err()
            .expect("a source took a destination it has not pinned");
        let text = freehint_types::ErrorChain(&e).to_string();
        assert!(text.contains(&b.to_string()), "{text}");

        // A CA set's source is a stranger to a pinned destination.
        let (_ca_dir, ca_tls) = test_set();
        let (_src, dst) = pair(Some(&ca_tls), Some(&b_tls)).await;
        assert!(dst.is_err(), "a pinned destination took a CA-signed source");
    }

    #[test]
    fn fingerprints_read_as_openssl_and_freehint_print_them() {
        let (dir, fp) = pinned_host();
        let shown = fp.to_string();
        assert_eq!(shown.len(), 32 * 3 - 1);
        assert_eq!(shown.parse::<tls::CertificateFingerprint>().unwrap(), fp);
        let bare = shown.replace(':', "").to_lowercase();
        assert_eq!(bare.parse::<tls::CertificateFingerprint>().unwrap(), fp);
        let openssl = format!("sha256 Fingerprint={shown}");
        assert_eq!(openssl.parse::<tls::CertificateFingerprint>().unwrap(), fp);
        let prefixed = format!("SHA256:{bare}");
        assert_eq!(prefixed.parse::<tls::CertificateFingerprint>().unwrap(), fp);
        assert_eq!(
            tls::CertificateFingerprint::of_file(&dir.path().join(tls::HOST_CERT_FILE)).unwrap(),
            fp
        );
        let not_hex = "zz".repeat(32);
        for bad in ["", "AB:CD", &bare[1..], &format!("{bare}00"), &not_hex] {
            let e = bad.parse::<tls::CertificateFingerprint>();
            let e = e.expect_err(bad).to_string();
            assert!(e.contains("64 hex digits"), "{e}");
        }
    }

    #[test]
    fn the_pinned_mode_says_what_is_missing() {
        let (dir, fp) = pinned_host();
        let e = TlsConfig::pinned(dir.path(), &[]).unwrap_err().to_string();
        assert!(e.contains("--tls-pin"), "{e}");
        let e = TlsConfig::from_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("--tls-pin"), "{e}");
        let empty = tempfile::tempdir().unwrap();
        let e = TlsConfig::pinned(empty.path(), &[fp])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--pinned"), "{e}");
        let both = TlsConfig::pinned(dir.path(), &[fp]).unwrap();
        assert!(both.can_send() && both.can_receive());
        assert_eq!(both.pins(), &[fp]);
    }

    #[test]
    fn a_directory_without_certificates_says_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let e = TlsConfig::from_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("ca-cert.pem"), "{e}");
        tls::make_test_set(dir.path(), &[]).unwrap();
        std::fs::remove_file(dir.path().join(tls::CLIENT_KEY_FILE)).unwrap();
        let e = TlsConfig::from_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("go together"), "{e}");
        std::fs::remove_file(dir.path().join(tls::CLIENT_CERT_FILE)).unwrap();
        let receive_only = TlsConfig::from_dir(dir.path()).unwrap();
        assert!(receive_only.can_receive() && !receive_only.can_send());
        let e = receive_only.check_role(true).unwrap_err().to_string();
        assert!(e.contains("client-cert.pem"), "{e}");
    }
}
