//! A vhost-user message proxy between the frontend and the daemon.
//!
//! The proxy forwards every message unchanged, with its file descriptors,
//! in both directions. On the way to the daemon it:
//!
//! * keeps a duplicate of the `SET_BACKEND_REQ_FD` socket, on which the
//!   device sends `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` (vhost 0.18's
//!   `Backend` has no way to send it);
//! * refuses requests that `vhost-user-backend` would answer by dropping the
//!   whole connection: a vring index the device does not have, a queue size
//!   of 0 / above the maximum / not a power of two, `SET_VRING_ADDR` before a
//!   memory table, unsupported feature bits, `SET_VRING_ENABLE` without
//!   protocol features, a truncated body. A refused request is logged,
//!   counted, not forwarded, and answered with a failure (non-zero u64) if
//!   the frontend asked for a reply (`REPLY_ACK`);
//! * before it forwards `GET_VRING_BASE` for a ring, stops the ring and
//!   waits until the worker has finished every chain it popped (see
//!   `gate.rs`), so the reply describes a quiescent ring;
//! * when `SET_VRING_KICK` starts a stopped ring again, lets it run and
//!   kicks it once (see `restart_ring`).

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use crate::layout::{self, features};
use crate::status::RejectReason;
use crate::{lock, Inner};

/// vhost-user header size: request, flags, size (u32 each).
const HDR_LEN: usize = 12;
/// Largest body we forward (the vhost crate's MAX_MSG_SIZE is 4 KiB, memory
/// tables fit; be generous).
const MAX_BODY: usize = 64 * 1024;
/// Most file descriptors one message carries.
const MAX_FDS: usize = 32;

/// Bytes of control message for [`MAX_FDS`] descriptors in one
/// `SCM_RIGHTS` message.
// SAFETY: CMSG_SPACE only computes a size from its argument.
const CMSG_BYTES: usize =
    unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) } as usize;

/// A control message buffer, aligned for `cmsghdr`.
#[repr(C, align(8))]
struct CmsgBuf([u8; CMSG_BYTES]);

const _: () = assert!(std::mem::align_of::<libc::cmsghdr>() <= 8);

/// Why a message could not be read whole.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    /// The socket failed, or closed inside a message.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The kernel truncated the control message (`MSG_CTRUNC`): more
    /// descriptors than [`MAX_FDS`], or a control message of another kind.
    #[error("control message truncated (MSG_CTRUNC); the descriptors received are closed")]
    ControlTruncated,
    /// More than [`MAX_FDS`] descriptors came with one message.
    #[error("{0} file descriptors with one message (at most {MAX_FDS})")]
    TooManyFds(usize),
    /// The header announces a body larger than [`MAX_BODY`].
    #[error("message body of {0} bytes (at most {MAX_BODY})")]
    Oversized(usize),
}

const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

const SET_FEATURES: u32 = 2;
const SET_MEM_TABLE: u32 = 5;
const SET_LOG_BASE: u32 = 6;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_ADDR: u32 = 9;
const SET_VRING_BASE: u32 = 10;
const GET_VRING_BASE: u32 = 11;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const SET_VRING_ERR: u32 = 14;
const SET_PROTOCOL_FEATURES: u32 = 16;
const SET_VRING_ENABLE: u32 = 18;
const SET_BACKEND_REQ_FD: u32 = 21;
const ADD_MEM_REG: u32 = 37;

const PROTOCOL_F_REPLY_ACK: u64 = 1 << 3;

/// Receives up to `buf.len()` bytes and the file descriptors sent with
/// them.
///
/// A control message the kernel truncated (`MSG_CTRUNC`) is an error: the
/// message cannot be forwarded whole, and the descriptors that did arrive
/// are closed.
fn recv_with_fds(fd: RawFd, buf: &mut [u8]) -> Result<(usize, Vec<OwnedFd>), ReadError> {
    let mut cmsg = CmsgBuf([0; CMSG_BYTES]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.0.as_mut_ptr().cast();
    msg.msg_controllen = CMSG_BYTES as _;
    let n = loop {
        // SAFETY: `msg` points at `iov` (over `buf`) and `cmsg`, which live
        // across the call and have the lengths given; recvmsg writes only
        // inside them.
        let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e.into());
        }
    };
    let mut fds = Vec::new();
    let control_end = cmsg.0.as_ptr() as usize + (msg.msg_controllen as usize).min(CMSG_BYTES);
    // SAFETY: recvmsg set `msg_controllen` to the bytes of control messages
    // it wrote into `cmsg` (aligned for cmsghdr). CMSG_FIRSTHDR and
    // CMSG_NXTHDR return only headers that lie whole inside that length;
    // the descriptors read after a header lie inside both its `cmsg_len`
    // and that length (`data_end`), and are read unaligned.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c) as *const RawFd;
                let data_end = (c as usize)
                    .saturating_add((*c).cmsg_len as usize)
                    .min(control_end);
                let count = data_end.saturating_sub(data as usize) / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    let raw = std::ptr::read_unaligned(data.add(i));
                    // The kernel installed this descriptor for us; we own it.
                    fds.push(OwnedFd::from_raw_fd(raw));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        // Dropping `fds` closes what did arrive.
        return Err(ReadError::ControlTruncated);
    }
    Ok((n, fds))
}

/// Sends `buf` with `fds` attached to its first byte, then the rest.
fn send_with_fds(stream: &mut UnixStream, buf: &[u8], fds: &[OwnedFd]) -> std::io::Result<()> {
    if fds.is_empty() {
        return stream.write_all(buf);
    }
    if fds.len() > MAX_FDS || buf.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "descriptors without bytes, or more than one control message holds",
        ));
    }
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut cmsg = CmsgBuf([0; CMSG_BYTES]);
    let data_len = std::mem::size_of_val(raw.as_slice()) as u32;
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.0.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size from its argument.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(data_len) } as _;
    // SAFETY: `msg_control` points at `cmsg`, CMSG_SPACE(MAX_FDS
    // descriptors) bytes aligned for cmsghdr, and `msg_controllen` is at
    // most that (at most MAX_FDS descriptors, checked above): the header
    // CMSG_FIRSTHDR returns (not null, the length holds one) and the
    // `raw.len()` descriptors CMSG_DATA points at lie inside `cmsg`.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(data_len) as _;
        std::ptr::copy_nonoverlapping(raw.as_ptr(), libc::CMSG_DATA(c) as *mut RawFd, raw.len());
    }
    let n = loop {
        // SAFETY: `msg` points at `iov` (over `buf`, which sendmsg only
        // reads) and at the control message filled above, all alive across
        // the call.
        let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            break n as usize;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    stream.write_all(&buf[n..])
}

/// A whole message (header and body) and its descriptors.
type Message = (Vec<u8>, Vec<OwnedFd>);

/// One whole message: header, body, descriptors. `None` on a clean EOF.
fn read_message(stream: &mut UnixStream) -> Result<Option<Message>, ReadError> {
    let mut msg = vec![0u8; HDR_LEN];
    let (n, mut fds) = recv_with_fds(stream.as_raw_fd(), &mut msg)?;
    if n == 0 {
        return Ok(None);
    }
    let mut got = n;
    while got < HDR_LEN {
        let (m, more) = recv_with_fds(stream.as_raw_fd(), &mut msg[got..])?;
        if m == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
        fds.extend(more);
        got += m;
    }
    if fds.len() > MAX_FDS {
        return Err(ReadError::TooManyFds(fds.len()));
    }
    let size = u32::from_le_bytes([msg[8], msg[9], msg[10], msg[11]]) as usize;
    if size > MAX_BODY {
        return Err(ReadError::Oversized(size));
    }
    msg.resize(HDR_LEN + size, 0);
    stream.read_exact(&mut msg[HDR_LEN..])?;
    Ok(Some((msg, fds)))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    let s = b.get(off..off + 8)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Some(u64::from_le_bytes(a))
}

/// What the proxy knows of the session.
#[derive(Default)]
struct Session {
    acked_features: u64,
    acked_protocol: u64,
    mem_table: bool,
}

/// A reply to frontend request `code` with `payload`.
fn reply(code: u32, payload: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(HDR_LEN + payload.len());
    r.extend_from_slice(&code.to_le_bytes());
    r.extend_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_le_bytes());
    r.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    r.extend_from_slice(payload);
    r
}

/// Checks one frontend request; `Err` names why it must be refused.
fn check(
    session: &mut Session,
    inner: &Inner,
    code: u32,
    body: &[u8],
    nfds: usize,
) -> Result<(), (RejectReason, String)> {
    let short = |want: usize| {
        if body.len() < want {
            Err((
                RejectReason::MalformedMessage,
                format!(
                    "request {code} with a {}-byte body (want {want})",
                    body.len()
                ),
            ))
        } else {
            Ok(())
        }
    };
    let nq = layout::MAX_QUEUES as u32;
    let index_ok = |index: u32| {
        if index < nq {
            Ok(())
        } else {
            Err((
                RejectReason::VringIndexOutOfRange,
                format!("request {code} for vring {index}; the device has {nq}"),
            ))
        }
    };
    match code {
        SET_FEATURES => {
            short(8)?;
            let f = u64_at(body, 0).unwrap_or(0);
            if f & !features::OFFERED != 0 {
                return Err((
                    RejectReason::UnsupportedFeatures,
                    format!(
                        "SET_FEATURES {f:#x} has bits not offered ({:#x})",
                        f & !features::OFFERED
                    ),
                ));
            }
            session.acked_features = f;
        }
        SET_PROTOCOL_FEATURES => {
            short(8)?;
            session.acked_protocol = u64_at(body, 0).unwrap_or(0);
        }
        SET_MEM_TABLE | ADD_MEM_REG => {
            if nfds == 0 {
                return Err((
                    RejectReason::MalformedMessage,
                    format!("memory table request {code} without file descriptors"),
                ));
            }
            session.mem_table = true;
        }
        SET_VRING_NUM => {
            short(8)?;
            index_ok(u32_at(body, 0).unwrap_or(u32::MAX))?;
            let num = u32_at(body, 4).unwrap_or(0);
            if num == 0 || num > u32::from(inner.max_queue_size) || !num.is_power_of_two() {
                return Err((
                    RejectReason::BadQueueSize,
                    format!(
                        "SET_VRING_NUM {num} (max {}, power of two)",
                        inner.max_queue_size
                    ),
                ));
            }
        }
        SET_VRING_BASE | GET_VRING_BASE => {
            short(8)?;
            index_ok(u32_at(body, 0).unwrap_or(u32::MAX))?;
        }
        SET_VRING_ADDR => {
            short(40)?;
            index_ok(u32_at(body, 0).unwrap_or(u32::MAX))?;
            if !session.mem_table {
                return Err((
                    RejectReason::VringAddrBeforeMemTable,
                    "SET_VRING_ADDR before SET_MEM_TABLE".into(),
                ));
            }
        }
        SET_VRING_KICK | SET_VRING_CALL | SET_VRING_ERR => {
            short(8)?;
            let v = u64_at(body, 0).unwrap_or(0);
            index_ok((v & 0xff) as u32)?;
            let no_fd = v & 0x100 != 0;
            if !no_fd && nfds != 1 {
                return Err((
                    RejectReason::MalformedMessage,
                    format!("request {code} with {nfds} file descriptors (want 1)"),
                ));
            }
        }
        SET_VRING_ENABLE => {
            short(8)?;
            index_ok(u32_at(body, 0).unwrap_or(u32::MAX))?;
            if session.acked_features & features::bit(features::PROTOCOL_FEATURES) == 0 {
                return Err((
                    RejectReason::VringEnableWithoutProtocolFeatures,
                    "SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES acked".into(),
                ));
            }
            if u32_at(body, 4).unwrap_or(2) > 1 {
                return Err((
                    RejectReason::MalformedMessage,
                    "SET_VRING_ENABLE with a state other than 0/1".into(),
                ));
            }
        }
        SET_BACKEND_REQ_FD if nfds != 1 => {
            return Err((
                RejectReason::MalformedMessage,
                format!("SET_BACKEND_REQ_FD with {nfds} file descriptors (want 1)"),
            ));
        }
        _ => {}
    }
    Ok(())
}

/// `SET_VRING_KICK` starts a ring: if `GET_VRING_BASE` had stopped it, lets
/// the worker at it again and returns a duplicate of the new kick fd, to
/// be kicked once the message is forwarded.
///
/// Why a kick of our own: chains the guest queued while the ring was
/// stopped were kicked (if at all) on an fd nobody listens to any more, and
/// the driver will not kick again for them — with `EVENT_IDX` it kicks only
/// when its avail index passes the `avail_event` we stopped advancing. The
/// daemon watches the new fd once the ring is ready and enabled; an
/// eventfd stays readable until read, so this kick is not lost if the
/// enable comes later. (vhost-user-backend 0.24 also runs a ring once when
/// it registers it, but that is its implementation, not its contract; a
/// spare kick costs one empty pass.) The flag is cleared before the
/// message is forwarded so that no pass the daemon starts finds it set.
fn restart_ring(inner: &Inner, body: &[u8], fds: &[OwnedFd]) -> Option<std::fs::File> {
    let v = u64_at(body, 0)?;
    let index = (v & 0xff) as usize;
    if !inner.gates.get(index)?.start() {
        return None;
    }
    tracing::debug!("balloon: vring {index} started again");
    // No fd (polling mode, bit 8): nothing to kick.
    let fd = fds.first().filter(|_| v & 0x100 == 0)?;
    match fd.try_clone() {
        Ok(dup) => Some(std::fs::File::from(dup)),
        Err(e) => {
            tracing::warn!("balloon proxy: cannot duplicate the kick fd of vring {index}: {e}");
            None
        }
    }
}

/// Runs the proxy until either side closes.
pub(crate) fn run(frontend: UnixStream, daemon: UnixStream, inner: Arc<Inner>) {
    let (Ok(mut f_read), Ok(f_write), Ok(mut d_read), Ok(mut d_write)) = (
        frontend.try_clone(),
        frontend.try_clone(),
        daemon.try_clone(),
        daemon.try_clone(),
    ) else {
        tracing::warn!("balloon proxy: cannot clone sockets");
        return;
    };
    let f_write = Arc::new(Mutex::new(f_write));

    // Daemon -> frontend: replies, forwarded as they are.
    let back = {
        let f_write = f_write.clone();
        let frontend = frontend.try_clone();
        std::thread::Builder::new()
            .name("balloon-proxy-reply".into())
            .spawn(move || {
                loop {
                    match read_message(&mut d_read) {
                        Ok(Some((msg, fds))) => {
                            if let Err(e) = send_with_fds(&mut lock(&f_write), &msg, &fds) {
                                tracing::debug!("balloon proxy: frontend write: {e}");
                                break;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::debug!("balloon proxy: daemon read: {e}");
                            break;
                        }
                    }
                }
                if let Ok(f) = frontend {
                    let _ = f.shutdown(std::net::Shutdown::Both);
                }
            })
    };

    let mut session = Session::default();
    loop {
        let (msg, fds) = match read_message(&mut f_read) {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(e) => {
                tracing::info!("balloon proxy: frontend read: {e}");
                break;
            }
        };
        let code = u32_at(&msg, 0).unwrap_or(0);
        let flags = u32_at(&msg, 4).unwrap_or(0);
        let body = &msg[HDR_LEN..];
        if let Err((reason, detail)) = check(&mut session, &inner, code, body, fds.len()) {
            inner.reject(reason, format_args!("frontend: {detail}"));
            let wants_reply =
                flags & FLAG_NEED_REPLY != 0 && session.acked_protocol & PROTOCOL_F_REPLY_ACK != 0;
            if wants_reply
                && lock(&f_write)
                    .write_all(&reply(code, &1u64.to_le_bytes()))
                    .is_err()
            {
                break;
            }
            continue;
        }
        if code == SET_FEATURES && session.acked_features & features::bit(features::LOG_ALL) == 0 {
            // Logging ended (or never began): drop the log.
            lock(&inner.vhost_log).take();
        }
        if code == SET_LOG_BASE {
            // Answered here: the vhost-user-backend daemon keeps no log
            // (see vhost_log.rs).
            let result = match (body.len() >= 16, fds.first()) {
                (true, Some(fd)) => {
                    let (size, offset) =
                        (u64_at(body, 0).unwrap_or(0), u64_at(body, 8).unwrap_or(0));
                    crate::vhost_log::VhostLog::map(fd, size, offset)
                }
                _ => Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "SET_LOG_BASE without a 16-byte body and a file descriptor",
                )),
            };
            match result {
                Ok(log) => {
                    tracing::info!("balloon: dirty log set up by the frontend");
                    *lock(&inner.vhost_log) = Some(log);
                }
                Err(e) => inner.reject(
                    RejectReason::MalformedMessage,
                    format_args!("frontend: SET_LOG_BASE: {e}"),
                ),
            }
            // QEMU waits for a reply without payload.
            if lock(&f_write).write_all(&reply(code, &[])).is_err() {
                break;
            }
            continue;
        }
        if code == SET_BACKEND_REQ_FD {
            if let Some(fd) = fds.first() {
                match fd.try_clone() {
                    Ok(dup) => {
                        lock(&inner.channel).stream = Some(UnixStream::from(dup));
                        tracing::info!("balloon: backend request channel set up");
                    }
                    Err(e) => {
                        tracing::warn!("balloon proxy: cannot duplicate the backend channel: {e}")
                    }
                }
            }
        }
        if code == GET_VRING_BASE {
            // The frontend stops the device: hold config changes from now.
            lock(&inner.channel).device_started = false;
            // `check` validated the index.
            let index = u32_at(body, 0).unwrap_or(0) as usize;
            if let Some(gate) = inner.gates.get(index) {
                // Waits for the worker only (guest memory, RAM file, sink),
                // never for the frontend.
                gate.stop();
                tracing::debug!("balloon: vring {index} stopped, nothing in flight");
            }
        }
        // A restarted ring: a duplicate of its new kick fd, kicked after
        // the daemon has the message.
        let restart_kick = if code == SET_VRING_KICK {
            restart_ring(&inner, body, &fds)
        } else {
            None
        };
        if let Err(e) = send_with_fds(&mut d_write, &msg, &fds) {
            tracing::info!("balloon proxy: daemon write: {e}");
            break;
        }
        if let Some(kick) = restart_kick {
            let _ = (&kick).write_all(&1u64.to_ne_bytes()).map_err(|e| {
                tracing::warn!("balloon proxy: cannot kick a restarted vring: {e}");
            });
        }
        if code == SET_VRING_KICK {
            // The device runs with what was imported: a later connection
            // is a new guest.
            lock(&inner.state).import_pending = false;
            let mut ch = lock(&inner.channel);
            ch.device_started = true;
            if ch.change_pending {
                drop(ch);
                tracing::info!("balloon: device started; sending the held config change");
                let _ = inner.notify_config(false);
            }
        }
    }
    // The frontend is gone: hold config changes until the backend resets
    // the channel after this thread ends.
    lock(&inner.channel).device_started = false;
    let _ = daemon.shutdown(std::net::Shutdown::Both);
    let _ = frontend.shutdown(std::net::Shutdown::Both);
    if let Ok(h) = back {
        let _ = h.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn null_fds(n: usize) -> Vec<OwnedFd> {
        (0..n)
            .map(|_| OwnedFd::from(std::fs::File::open("/dev/null").unwrap()))
            .collect()
    }

    #[test]
    fn descriptors_travel_with_the_first_byte() {
        let (mut a, b) = UnixStream::pair().unwrap();
        send_with_fds(&mut a, &[7u8; HDR_LEN], &null_fds(3)).unwrap();
        let mut buf = [0u8; HDR_LEN];
        let (n, fds) = recv_with_fds(b.as_raw_fd(), &mut buf).unwrap();
        assert_eq!((n, fds.len()), (HDR_LEN, 3));
        assert!(send_with_fds(&mut a, &[0u8; HDR_LEN], &null_fds(MAX_FDS + 1)).is_err());
    }

    /// Sends one byte with `fds` attached, with no limit on their number.
    fn send_many_fds(stream: &UnixStream, fds: &[OwnedFd]) {
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let data_len = std::mem::size_of_val(raw.as_slice()) as u32;
        let mut cmsg = vec![0u64; 1024];
        let byte = [0u8; 1];
        let mut iov = libc::iovec {
            iov_base: byte.as_ptr() as *mut libc::c_void,
            iov_len: 1,
        };
        // SAFETY: msghdr is plain data; all-zero is a valid value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE only computes a size from its argument.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(data_len) } as _;
        assert!(msg.msg_controllen as usize <= cmsg.len() * 8);
        // SAFETY: the control message (one header and `raw.len()`
        // descriptors, CMSG_SPACE(data_len) bytes, checked above) lies
        // inside `cmsg`; `iov` covers `byte`, which sendmsg only reads.
        let n = unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(data_len) as _;
            std::ptr::copy_nonoverlapping(
                raw.as_ptr(),
                libc::CMSG_DATA(c) as *mut RawFd,
                raw.len(),
            );
            libc::sendmsg(stream.as_raw_fd(), &msg, 0)
        };
        assert_eq!(n, 1, "{}", std::io::Error::last_os_error());
    }

    #[test]
    fn a_truncated_control_message_is_an_error() {
        let (a, b) = UnixStream::pair().unwrap();
        send_many_fds(&a, &null_fds(MAX_FDS + 8));
        let mut buf = [0u8; 1];
        let r = recv_with_fds(b.as_raw_fd(), &mut buf);
        assert!(matches!(r, Err(ReadError::ControlTruncated)), "{r:?}");
    }
}
