//! Migration connections: one TCP socket each, plain or inside TLS 1.3.
//!
//! A [`Channel`] is what the engine reads frames from and writes frames
//! and guest pages to, whatever is underneath. Like tokio's `TcpStream`,
//! it is read and written through a shared reference (one task reads the
//! destination's reports while another writes pages on the same bulk
//! channel), and its socket stays reachable ([`Channel::socket`]) for what
//! only the kernel knows: the bytes not yet acknowledged (`SIOCOUTQ`), the
//! round trip (`tcp_info`), socket options, and duplicates to cut a link.
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

/// One migration connection (see the module's doc).
pub(crate) struct Channel {
    tcp: TcpStream,
    tls: Option<Tls>,
}

/// A TLS connection's state beside its socket.
struct Tls {
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

impl Channel {
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

    /// The socket underneath, for socket options and the kernel's figures.
    pub(crate) fn socket(&self) -> &TcpStream {
        &self.tcp
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
        loop {
            match self.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(self.tcp.poll_read_ready(cx))?;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_write_shared(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            match self.try_write(buf) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(self.tcp.poll_write_ready(cx))?;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_flush_shared(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match self.try_flush() {
                Ok(()) => return Poll::Ready(Ok(())),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(self.tcp.poll_write_ready(cx))?;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
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

    /// Moves the connection off its runtime, to be attached to another
    /// ([`DetachedChannel::attach`]).
    pub(crate) fn detach(self) -> io::Result<DetachedChannel> {
        Ok(DetachedChannel {
            tcp: self.tcp.into_std()?,
            tls: self.tls,
        })
    }

    /// Splits the connection into a reader and a writer that may live in
    /// different tasks.
    pub(crate) fn into_split(self) -> (ChannelReader, ChannelWriter) {
        let me = Arc::new(self);
        (ChannelReader(me.clone()), ChannelWriter(me))
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

impl AsRawFd for Channel {
    fn as_raw_fd(&self) -> RawFd {
        self.tcp.as_raw_fd()
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.tcp.as_fd()
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
pub(crate) struct DetachedChannel {
    tcp: std::net::TcpStream,
    tls: Option<Tls>,
}

impl DetachedChannel {
    /// The channel on the current runtime.
    pub(crate) fn attach(self) -> io::Result<Channel> {
        Ok(Channel {
            tcp: TcpStream::from_std(self.tcp)?,
            tls: self.tls,
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
    let channel: &Channel = r.get_ref();
    if channel.tls.is_none() {
        return crate::io::read_socket_into_pages(&channel.tcp, dst, done, context).await;
    }
    while done < len {
        let n = std::future::poll_fn(|cx| loop {
            match channel.try_read_pages(&dst, done) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(channel.tcp.poll_read_ready(cx))?;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        })
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

/// Opens a connection to `dest`: TCP, then TLS's handshake when `tls` is
/// given; each step within `timeout`. `what` names the connection in
/// errors.
pub(crate) async fn connect(
    dest: std::net::SocketAddr,
    tls: Option<&TlsConfig>,
    timeout: std::time::Duration,
    what: &str,
) -> Result<Channel, MigrateError> {
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

/// An accepted connection, after TLS's handshake when `tls` is given
/// (within `timeout`): a peer without a certificate from our CA fails
/// here, before any frame of it is read.
pub(crate) async fn accepted(
    tcp: TcpStream,
    tls: Option<&TlsConfig>,
    timeout: std::time::Duration,
) -> Result<Channel, TlsError> {
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
            accepted(tcp, server, T).await
        };
        tokio::join!(connect(addr, client, T, "test"), accept)
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
            let c = connect(addr, None, T, "test").await.unwrap();
            // What a plain source says first: a frame, not a TLS hello.
            let mut hello = Vec::new();
            freehint_wire::Message::Error("not TLS".into()).encode(&mut hello);
            let _ = (&c).write_all(&hello).await;
            let mut b = [0u8; 16];
            let _ = (&c).read(&mut b).await;
        };
        let destination = async {
            let (tcp, _) = listener.accept().await.unwrap();
            accepted(tcp, Some(&tls), T).await
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
            accepted(tcp, Some(&tls), T).await
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
