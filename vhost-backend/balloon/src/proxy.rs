//! A vhost-user message proxy between the frontend and the daemon.
//!
//! The proxy forwards every message unchanged, with its file descriptors,
//! in both directions. On the way to the daemon it reads the requests it
//! cares about with vhost's types (a [`FrontendReq`] code, bodies as
//! `VhostUserU64`, `VhostUserVringState`, `VhostUserVringAddr`,
//! `VhostUserMemory`, `VhostUserLog`, ...), and:
//!
//! * keeps a duplicate of the `SET_BACKEND_REQ_FD` socket, on which the
//!   device sends `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` (vhost 0.18's
//!   `Backend` has no way to send it);
//! * refuses requests that `vhost-user-backend` would answer by dropping the
//!   whole connection: a vring index the device does not have, a queue size
//!   of 0 / above the maximum / not a power of two, `SET_VRING_ADDR` before a
//!   memory table, unsupported feature bits, `SET_VRING_ENABLE` without
//!   protocol features, a body of the wrong size or one vhost's
//!   `VhostUserMsgValidator` refuses, the wrong number of file descriptors.
//!   A refused request is logged, counted, not forwarded, and answered with
//!   a failure (non-zero u64) if the frontend asked for a reply
//!   (`REPLY_ACK`);
//! * before it forwards `GET_VRING_BASE` for a ring, stops the ring and
//!   waits until the worker has finished every chain it popped (see
//!   `gate.rs`), so the reply describes a quiescent ring;
//! * when `SET_VRING_KICK` starts a stopped ring again, lets it run and
//!   kicks it once (see `restart_ring`).
//!
//! Everything from the frontend is untrusted: a short, long or malformed
//! message is refused (or ends the connection, if it cannot even be read
//! whole), never a panic.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{
    FrontendReq, VhostUserEmpty, VhostUserLog, VhostUserMemory, VhostUserMemoryRegion,
    VhostUserMsgValidator, VhostUserProtocolFeatures, VhostUserSingleMemoryRegion, VhostUserU64,
    VhostUserVirtioFeatures, VhostUserVringAddr, VhostUserVringState, MAX_ATTACHED_FD_ENTRIES,
};
use vm_memory::ByteValued;

use crate::backend_req::{BackendReqChannel, Wait};
use crate::layout::{self, features};
use crate::message::{read_body, Header, HEADER_LEN};
use crate::status::RejectReason;
use crate::{lock, Inner};

/// Largest body we forward (vhost's `MAX_MSG_SIZE` is 4 KiB, memory tables
/// fit; be generous).
const MAX_BODY: usize = 64 * 1024;
/// Most file descriptors one message carries (vhost's limit).
const MAX_FDS: usize = MAX_ATTACHED_FD_ENTRIES;

/// Bits 0-7 of the u64 of a vring fd request (`SET_VRING_KICK`, `_CALL`,
/// `_ERR`): the vring index (`VHOST_USER_VRING_IDX_MASK`; vhost 0.18 has no
/// name for it).
const VRING_IDX_MASK: u64 = 0xff;
/// Bit 8 of that u64: no file descriptor, the ring is polled
/// (`VHOST_USER_VRING_NOFD_MASK`).
const VRING_NOFD_MASK: u64 = 0x100;

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

/// A whole message as read from a socket.
struct Message {
    header: Header<FrontendReq>,
    /// Header and body as read: what is forwarded.
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    fn body(&self) -> &[u8] {
        &self.bytes[HEADER_LEN..]
    }
}

/// One whole message: header, body, descriptors. `None` on a clean EOF.
fn read_message(stream: &mut UnixStream) -> Result<Option<Message>, ReadError> {
    let mut head = [0u8; HEADER_LEN];
    let (n, mut fds) = recv_with_fds(stream.as_raw_fd(), &mut head)?;
    if n == 0 {
        return Ok(None);
    }
    let mut got = n;
    while got < HEADER_LEN {
        let (m, more) = recv_with_fds(stream.as_raw_fd(), &mut head[got..])?;
        if m == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
        fds.extend(more);
        got += m;
    }
    if fds.len() > MAX_FDS {
        return Err(ReadError::TooManyFds(fds.len()));
    }
    let header = Header::<FrontendReq>::from_bytes(&head);
    let size = header.size() as usize;
    if size > MAX_BODY {
        return Err(ReadError::Oversized(size));
    }
    let mut bytes = Vec::with_capacity(HEADER_LEN + size);
    bytes.extend_from_slice(&head);
    bytes.resize(HEADER_LEN + size, 0);
    stream.read_exact(&mut bytes[HEADER_LEN..])?;
    Ok(Some(Message { header, bytes, fds }))
}

/// What the proxy knows of the session.
#[derive(Default)]
struct Session {
    acked_features: u64,
    acked_protocol: Option<VhostUserProtocolFeatures>,
    mem_table: bool,
}

impl Session {
    /// Whether `REPLY_ACK` is negotiated.
    fn reply_ack(&self) -> bool {
        self.acked_protocol
            .is_some_and(|p| p.contains(VhostUserProtocolFeatures::REPLY_ACK))
    }

    /// Whether the frontend wants an answer to `header`: it asked for one
    /// and `REPLY_ACK` is negotiated.
    fn wants_ack(&self, header: &Header<FrontendReq>) -> bool {
        header.needs_reply() && self.reply_ack()
    }
}

/// The reply to `request`: its header, then `body`.
fn reply<T: ByteValued>(request: &Header<FrontendReq>, body: &T) -> Vec<u8> {
    let body = body.as_slice();
    let mut r = Vec::with_capacity(HEADER_LEN + body.len());
    r.extend_from_slice(request.reply(body.len() as u32).as_slice());
    r.extend_from_slice(body);
    r
}

/// The u64 of a vring fd request (`SET_VRING_KICK`, `_CALL`, `_ERR`).
#[derive(Clone, Copy, Debug)]
struct VringFd {
    index: u32,
    /// No descriptor: the ring is polled.
    no_fd: bool,
}

impl From<VhostUserU64> for VringFd {
    fn from(v: VhostUserU64) -> Self {
        VringFd {
            index: (v.value & VRING_IDX_MASK) as u32,
            no_fd: v.value & VRING_NOFD_MASK != 0,
        }
    }
}

/// A frontend request the proxy looks into, its body read with vhost's
/// message types. Other requests are forwarded unread.
#[derive(Clone, Copy, Debug)]
enum Request {
    SetFeatures(u64),
    SetProtocolFeatures(VhostUserProtocolFeatures),
    /// `SET_MEM_TABLE` or `ADD_MEM_REG`, regions and descriptors matching.
    MemoryTable,
    SetVringNum {
        index: u32,
        num: u32,
    },
    SetVringAddr {
        index: u32,
    },
    SetVringBase {
        index: u32,
    },
    GetVringBase {
        index: u32,
    },
    /// `SET_VRING_KICK`, `SET_VRING_CALL` or `SET_VRING_ERR`.
    VringFd(FrontendReq, VringFd),
    SetVringEnable {
        index: u32,
        num: u32,
    },
    SetLogBase {
        size: u64,
        offset: u64,
    },
    SetBackendReqFd,
    Other,
}

/// Why a frontend request is refused.
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error("{request:?} with a {size}-byte body (want {want})")]
    BodySize {
        request: FrontendReq,
        size: usize,
        want: usize,
    },
    #[error("{request:?} with a body vhost does not accept")]
    InvalidBody { request: FrontendReq },
    #[error("{request:?} with {got} file descriptors (want {want})")]
    Fds {
        request: FrontendReq,
        got: usize,
        want: usize,
    },
    #[error("{request:?} for vring {index}; the device has {}", layout::MAX_QUEUES)]
    VringIndex { request: FrontendReq, index: u32 },
    #[error("SET_FEATURES {features:#x} has bits not offered ({:#x})", features & !features::OFFERED)]
    Features { features: u64 },
    #[error("SET_VRING_NUM {num} (max {max}, power of two)")]
    QueueSize { num: u32, max: u16 },
    #[error("SET_VRING_ADDR before SET_MEM_TABLE")]
    AddrBeforeMemTable,
    #[error("SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES acked")]
    EnableWithoutProtocolFeatures,
    #[error("SET_VRING_ENABLE with state {num}, not 0/1")]
    EnableState { num: u32 },
}

impl Refused {
    fn reason(&self) -> RejectReason {
        match self {
            Refused::BodySize { .. }
            | Refused::InvalidBody { .. }
            | Refused::Fds { .. }
            | Refused::EnableState { .. } => RejectReason::MalformedMessage,
            Refused::VringIndex { .. } => RejectReason::VringIndexOutOfRange,
            Refused::Features { .. } => RejectReason::UnsupportedFeatures,
            Refused::QueueSize { .. } => RejectReason::BadQueueSize,
            Refused::AddrBeforeMemTable => RejectReason::VringAddrBeforeMemTable,
            Refused::EnableWithoutProtocolFeatures => {
                RejectReason::VringEnableWithoutProtocolFeatures
            }
        }
    }
}

/// The body of `request` as vhost's `T`: exactly its size, and valid as
/// vhost's backend would check it (`VhostUserMsgValidator`).
fn body_as<T: ByteValued + VhostUserMsgValidator>(
    request: FrontendReq,
    body: &[u8],
) -> Result<T, Refused> {
    let v: T = read_body(body).ok_or(Refused::BodySize {
        request,
        size: body.len(),
        want: std::mem::size_of::<T>(),
    })?;
    if !VhostUserMsgValidator::is_valid(&v) {
        return Err(Refused::InvalidBody { request });
    }
    Ok(v)
}

/// Exactly `want` descriptors came with `request`.
fn expect_fds(request: FrontendReq, got: usize, want: usize) -> Result<(), Refused> {
    if got == want {
        Ok(())
    } else {
        Err(Refused::Fds { request, got, want })
    }
}

/// A `SET_MEM_TABLE` body (`VhostUserMemory`, then its regions) checked
/// the way vhost's backend checks it, with one descriptor per region.
fn memory_table(body: &[u8], nfds: usize) -> Result<(), Refused> {
    let request = FrontendReq::SET_MEM_TABLE;
    let head_len = std::mem::size_of::<VhostUserMemory>();
    let region_len = std::mem::size_of::<VhostUserMemoryRegion>();
    let head: VhostUserMemory = body_as(request, body.get(..head_len).unwrap_or(body))?;
    let regions = head.num_regions as usize;
    let want = head_len + regions * region_len;
    let Some(table) = body.get(head_len..).filter(|_| body.len() == want) else {
        return Err(Refused::BodySize {
            request,
            size: body.len(),
            want,
        });
    };
    for region in table.chunks_exact(region_len) {
        body_as::<VhostUserMemoryRegion>(request, region)?;
    }
    expect_fds(request, nfds, regions)
}

/// Reads the body of a frontend request, as far as the proxy looks.
fn parse(code: Option<FrontendReq>, body: &[u8], nfds: usize) -> Result<Request, Refused> {
    use FrontendReq as F;
    let Some(request) = code else {
        return Ok(Request::Other);
    };
    let state = || body_as::<VhostUserVringState>(request, body);
    Ok(match request {
        F::SET_FEATURES => Request::SetFeatures(body_as::<VhostUserU64>(request, body)?.value),
        F::SET_PROTOCOL_FEATURES => {
            Request::SetProtocolFeatures(VhostUserProtocolFeatures::from_bits_retain(
                body_as::<VhostUserU64>(request, body)?.value,
            ))
        }
        F::SET_MEM_TABLE => {
            memory_table(body, nfds)?;
            Request::MemoryTable
        }
        F::ADD_MEM_REG => {
            let single: VhostUserSingleMemoryRegion = body_as(request, body)?;
            // The region inside (vhost checks it the same way).
            if !VhostUserMsgValidator::is_valid(&*single) {
                return Err(Refused::InvalidBody { request });
            }
            expect_fds(request, nfds, 1)?;
            Request::MemoryTable
        }
        F::SET_VRING_NUM => {
            let s = state()?;
            Request::SetVringNum {
                index: s.index,
                num: s.num,
            }
        }
        F::SET_VRING_ADDR => Request::SetVringAddr {
            index: body_as::<VhostUserVringAddr>(request, body)?.index,
        },
        F::SET_VRING_BASE => Request::SetVringBase {
            index: state()?.index,
        },
        F::GET_VRING_BASE => Request::GetVringBase {
            index: state()?.index,
        },
        F::SET_VRING_KICK | F::SET_VRING_CALL | F::SET_VRING_ERR => {
            let v = VringFd::from(body_as::<VhostUserU64>(request, body)?);
            expect_fds(request, nfds, if v.no_fd { 0 } else { 1 })?;
            Request::VringFd(request, v)
        }
        F::SET_VRING_ENABLE => {
            let s = state()?;
            Request::SetVringEnable {
                index: s.index,
                num: s.num,
            }
        }
        F::SET_LOG_BASE => {
            let log = body_as::<VhostUserLog>(request, body)?;
            expect_fds(request, nfds, 1)?;
            Request::SetLogBase {
                size: log.mmap_size,
                offset: log.mmap_offset,
            }
        }
        F::SET_BACKEND_REQ_FD => {
            expect_fds(request, nfds, 1)?;
            Request::SetBackendReqFd
        }
        _ => Request::Other,
    })
}

/// Checks one frontend request against the session and the device, and
/// records what it negotiates.
fn check(session: &mut Session, inner: &Inner, request: &Request) -> Result<(), Refused> {
    use FrontendReq as F;
    let index_ok = |request: FrontendReq, index: u32| {
        if (index as usize) < layout::MAX_QUEUES {
            Ok(())
        } else {
            Err(Refused::VringIndex { request, index })
        }
    };
    match *request {
        Request::SetFeatures(f) => {
            if f & !features::OFFERED != 0 {
                return Err(Refused::Features { features: f });
            }
            session.acked_features = f;
        }
        Request::SetProtocolFeatures(p) => session.acked_protocol = Some(p),
        Request::MemoryTable => session.mem_table = true,
        Request::SetVringNum { index, num } => {
            index_ok(F::SET_VRING_NUM, index)?;
            let max = inner.max_queue_size;
            if num == 0 || num > u32::from(max) || !num.is_power_of_two() {
                return Err(Refused::QueueSize { num, max });
            }
        }
        Request::SetVringBase { index } => index_ok(F::SET_VRING_BASE, index)?,
        Request::GetVringBase { index } => index_ok(F::GET_VRING_BASE, index)?,
        Request::SetVringAddr { index } => {
            index_ok(F::SET_VRING_ADDR, index)?;
            if !session.mem_table {
                return Err(Refused::AddrBeforeMemTable);
            }
        }
        Request::VringFd(request, v) => index_ok(request, v.index)?,
        Request::SetVringEnable { index, num } => {
            index_ok(F::SET_VRING_ENABLE, index)?;
            if session.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
                return Err(Refused::EnableWithoutProtocolFeatures);
            }
            if num > 1 {
                return Err(Refused::EnableState { num });
            }
        }
        Request::SetLogBase { .. } | Request::SetBackendReqFd | Request::Other => {}
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
fn restart_ring(inner: &Inner, kick: VringFd, fds: &[OwnedFd]) -> Option<std::fs::File> {
    let index = kick.index as usize;
    if !inner.gates.get(index)?.start() {
        return None;
    }
    tracing::debug!("balloon: vring {index} started again");
    // No fd (polling mode): nothing to kick.
    let fd = fds.first().filter(|_| !kick.no_fd)?;
    match fd.try_clone() {
        Ok(dup) => Some(std::fs::File::from(dup)),
        Err(e) => {
            tracing::warn!("balloon proxy: cannot duplicate the kick fd of vring {index}: {e}");
            None
        }
    }
}

/// The fuzz target's path through the proxy (see [`crate::fuzzing`]):
/// `bytes` as the frontend's stream, read, parsed and checked message by
/// message as [`run`] does, until the stream ends or a message cannot be
/// read; returns the messages accepted. Nothing is forwarded.
#[cfg(feature = "fuzzing")]
pub(crate) fn fuzz_frontend_stream(bytes: &[u8], inner: &Inner) -> usize {
    use std::io::Write;
    let (mut tx, mut rx) = UnixStream::pair().expect("socketpair");
    // The input is at most 64 KiB (the fuzzer's limit), within a Unix
    // socket's buffer: the whole stream is written before it is read.
    let _ = tx.set_nonblocking(true);
    let _ = tx.write_all(bytes);
    drop(tx);
    let mut session = Session::default();
    let mut accepted = 0;
    while let Ok(Some(msg)) = read_message(&mut rx) {
        if admit(&mut session, inner, &msg).is_some() {
            accepted += 1;
        }
    }
    accepted
}

/// Reads and checks one frontend message ([`parse`], then [`check`]);
/// a refusal is logged and counted, and gives `None`.
fn admit(session: &mut Session, inner: &Inner, msg: &Message) -> Option<Request> {
    let request = parse(msg.header.code(), msg.body(), msg.fds.len())
        .and_then(|r| check(session, inner, &r).map(|()| r));
    match request {
        Ok(r) => Some(r),
        Err(refused) => {
            inner.reject(refused.reason(), format_args!("frontend: {refused}"));
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
                        Ok(Some(msg)) => {
                            if let Err(e) = send_with_fds(&mut lock(&f_write), &msg.bytes, &msg.fds)
                            {
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
        let msg = match read_message(&mut f_read) {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(e) => {
                tracing::info!("balloon proxy: frontend read: {e}");
                break;
            }
        };
        let header = msg.header;
        let code = header.code();
        let request = match admit(&mut session, &inner, &msg) {
            Some(r) => r,
            None => {
                let answer = if code == Some(FrontendReq::SET_LOG_BASE) {
                    // QEMU waits for this reply whatever happens (see below).
                    Some(reply(&header, &VhostUserEmpty))
                } else if session.wants_ack(&header) {
                    // A failure: a non-zero u64.
                    Some(reply(&header, &VhostUserU64::new(1)))
                } else {
                    None
                };
                if let Some(answer) = answer {
                    if lock(&f_write).write_all(&answer).is_err() {
                        break;
                    }
                }
                continue;
            }
        };
        match request {
            Request::SetProtocolFeatures(_) => {
                // If the channel was set up first (QEMU sends
                // SET_BACKEND_REQ_FD after this message, but the protocol
                // does not require that order), it learns REPLY_ACK now.
                if let Some(c) = lock(&inner.channel).backend_req.as_mut() {
                    c.set_reply_ack(session.reply_ack());
                }
            }
            Request::SetFeatures(f) if f & VhostUserVirtioFeatures::LOG_ALL.bits() == 0 => {
                // Logging ended (or never began): drop the log.
                lock(&inner.vhost_log).take();
            }
            Request::SetLogBase { size, offset } => {
                // Answered here: the vhost-user-backend daemon keeps no log
                // (see vhost_log.rs). `parse` checked there is one fd.
                if let Some(fd) = msg.fds.first() {
                    match crate::vhost_log::VhostLog::map(fd, size, offset) {
                        Ok(log) => {
                            tracing::info!("balloon: dirty log set up by the frontend");
                            *lock(&inner.vhost_log) = Some(log);
                        }
                        Err(e) => inner.reject(
                            RejectReason::MalformedMessage,
                            format_args!("frontend: SET_LOG_BASE: {e}"),
                        ),
                    }
                }
                // QEMU waits for a reply without payload.
                if lock(&f_write)
                    .write_all(&reply(&header, &VhostUserEmpty))
                    .is_err()
                {
                    break;
                }
                continue;
            }
            Request::SetBackendReqFd => {
                // `parse` checked there is one fd.
                if let Some(fd) = msg.fds.first() {
                    match fd.try_clone() {
                        Ok(dup) => {
                            lock(&inner.channel).backend_req = Some(BackendReqChannel::new(
                                UnixStream::from(dup),
                                session.reply_ack(),
                            ));
                            tracing::info!("balloon: backend request channel set up");
                        }
                        Err(e) => tracing::warn!(
                            "balloon proxy: cannot duplicate the backend channel: {e}"
                        ),
                    }
                }
            }
            Request::GetVringBase { index } => {
                // The frontend stops the device: hold config changes from now.
                lock(&inner.channel).device_started = false;
                // `check` validated the index.
                if let Some(gate) = inner.gates.get(index as usize) {
                    // Waits for the worker only (guest memory, RAM file,
                    // sink), never for the frontend.
                    gate.stop();
                    tracing::debug!("balloon: vring {index} stopped, nothing in flight");
                }
            }
            _ => {}
        }
        // A restarted ring: a duplicate of its new kick fd, kicked after
        // the daemon has the message.
        let kick = match request {
            Request::VringFd(FrontendReq::SET_VRING_KICK, v) => Some(v),
            _ => None,
        };
        let restart_kick = kick.and_then(|v| restart_ring(&inner, v, &msg.fds));
        if let Err(e) = send_with_fds(&mut d_write, &msg.bytes, &msg.fds) {
            tracing::info!("balloon proxy: daemon write: {e}");
            break;
        }
        if let Some(kick) = restart_kick {
            let _ = (&kick).write_all(&1u64.to_ne_bytes()).map_err(|e| {
                tracing::warn!("balloon proxy: cannot kick a restarted vring: {e}");
            });
        }
        if kick.is_some() {
            // The device runs with what was imported: a later connection
            // is a new guest.
            lock(&inner.state).import_pending = false;
            let mut ch = lock(&inner.channel);
            ch.device_started = true;
            if ch.change_pending {
                drop(ch);
                tracing::info!("balloon: device started; sending the held config change");
                // Never wait for the frontend here: it may be waiting for us.
                let _ = inner.notify_config(Wait::No);
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
        send_with_fds(&mut a, &[7u8; HEADER_LEN], &null_fds(3)).unwrap();
        let mut buf = [0u8; HEADER_LEN];
        let (n, fds) = recv_with_fds(b.as_raw_fd(), &mut buf).unwrap();
        assert_eq!((n, fds.len()), (HEADER_LEN, 3));
        assert!(send_with_fds(&mut a, &[0u8; HEADER_LEN], &null_fds(MAX_FDS + 1)).is_err());
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

    fn u64_body(v: u64) -> Vec<u8> {
        VhostUserU64::new(v).as_slice().to_vec()
    }

    fn state_body(index: u32, num: u32) -> Vec<u8> {
        VhostUserVringState::new(index, num).as_slice().to_vec()
    }

    #[test]
    fn bodies_are_read_with_vhost_types_and_bad_ones_refused() {
        use FrontendReq as F;
        let p = |code, body: &[u8], nfds| parse(Some(code), body, nfds);
        assert!(matches!(
            p(F::SET_VRING_NUM, &state_body(2, 256), 0),
            Ok(Request::SetVringNum { index: 2, num: 256 })
        ));
        // Short, long: refused, never read past the end.
        for len in [0, 4, 7, 9, 16] {
            let r = p(F::SET_VRING_NUM, &vec![1u8; len], 0);
            assert!(
                matches!(r, Err(Refused::BodySize { size, want: 8, .. }) if size == len),
                "{len}: {r:?}"
            );
        }
        // A kick with the NOFD bit and a descriptor anyway, or neither.
        let r = p(F::SET_VRING_KICK, &u64_body(0x100 | 3), 1);
        assert!(matches!(r, Err(Refused::Fds { want: 0, .. })), "{r:?}");
        let r = p(F::SET_VRING_KICK, &u64_body(3), 0);
        assert!(matches!(r, Err(Refused::Fds { want: 1, .. })), "{r:?}");
        assert!(matches!(
            p(F::SET_VRING_CALL, &u64_body(0x100 | 4), 0),
            Ok(Request::VringFd(
                F::SET_VRING_CALL,
                VringFd {
                    index: 4,
                    no_fd: true
                }
            ))
        ));
        // vhost's validators: a misaligned descriptor table, a zero-sized log.
        let addr = VhostUserVringAddr {
            index: 0,
            flags: 0,
            descriptor: 0x1008,
            used: 0x2000,
            available: 0x3000,
            log: 0,
        };
        let r = p(F::SET_VRING_ADDR, addr.as_slice(), 0);
        assert!(matches!(r, Err(Refused::InvalidBody { .. })), "{r:?}");
        let log = VhostUserLog::new(0, 0);
        let r = p(F::SET_LOG_BASE, log.as_slice(), 1);
        assert!(matches!(r, Err(Refused::InvalidBody { .. })), "{r:?}");
        // Unknown codes and requests the proxy does not read pass.
        assert!(matches!(parse(None, &[1, 2, 3], 5), Ok(Request::Other)));
        assert!(matches!(p(F::GET_FEATURES, &[9; 3], 0), Ok(Request::Other)));
    }

    #[test]
    fn memory_tables_need_one_descriptor_per_valid_region() {
        let region = VhostUserMemoryRegion::new(0, 1 << 20, 0x7f00_0000_0000, 0);
        let table = |n: u32, regions: &[VhostUserMemoryRegion]| {
            let mut b = VhostUserMemory::new(n).as_slice().to_vec();
            for r in regions {
                b.extend_from_slice(r.as_slice());
            }
            b
        };
        let m = |body: &[u8], nfds| parse(Some(FrontendReq::SET_MEM_TABLE), body, nfds);
        assert!(matches!(
            m(&table(2, &[region, region]), 2),
            Ok(Request::MemoryTable)
        ));
        let r = m(&table(2, &[region, region]), 1);
        assert!(matches!(r, Err(Refused::Fds { want: 2, .. })), "{r:?}");
        let r = m(&table(2, &[region]), 1);
        assert!(
            matches!(r, Err(Refused::BodySize { want: 72, .. })),
            "{r:?}"
        );
        let r = m(&table(0, &[]), 0);
        assert!(matches!(r, Err(Refused::InvalidBody { .. })), "{r:?}");
        let empty = VhostUserMemoryRegion::new(0, 0, 0, 0);
        let r = m(&table(1, &[empty]), 1);
        assert!(matches!(r, Err(Refused::InvalidBody { .. })), "{r:?}");
        let r = m(&[1, 0, 0], 1);
        assert!(matches!(r, Err(Refused::BodySize { .. })), "{r:?}");
    }

    struct NoSink;

    impl freehint_types::HintSink for NoSink {
        fn free_page_hints(
            &self,
            _: freehint_types::CmdId,
            _: &[freehint_types::GpaRange],
        ) -> freehint_types::HintOutcome {
            freehint_types::HintOutcome::default()
        }

        fn reported_free(&self, _: &[freehint_types::GpaRange]) -> freehint_types::HintOutcome {
            freehint_types::HintOutcome::default()
        }
    }

    #[test]
    fn any_body_for_any_request_is_read_or_refused_without_panicking() {
        let backend =
            crate::BalloonBackend::new(crate::BalloonConfig::default(), Arc::new(NoSink)).unwrap();
        let mut session = Session::default();
        let mut seed = 0x1234_5678_9abc_def0u64;
        for code in 0..64u32 {
            for len in 0..90usize {
                let body: Vec<u8> = (0..len)
                    .map(|_| {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        seed as u8
                    })
                    .collect();
                for nfds in 0..3 {
                    let code = FrontendReq::try_from(code).ok();
                    if let Ok(r) = parse(code, &body, nfds) {
                        let _ = check(&mut session, &backend.inner, &r);
                    }
                }
            }
        }
    }
}
