//! Owned handles over rdma-sys's raw pointers: each frees what it holds
//! when dropped, and each call that can fail says so as an `io::Error`.
//! Nothing outside this module touches an rdma-sys pointer except
//! through these.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::{self, NonNull};

use rdma_sys::*;

/// `Err(last OS error)` when `rc` is not 0: librdmacm and libibverbs
/// return -1 and set errno, or return the errno itself.
pub(crate) fn check(rc: libc::c_int, what: &str) -> io::Result<()> {
    if rc == 0 {
        return Ok(());
    }
    let e = if rc > 0 {
        io::Error::from_raw_os_error(rc)
    } else {
        io::Error::last_os_error()
    };
    Err(io::Error::new(e.kind(), format!("{what}: {e}")))
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we were handed by the library; it
    // changes only the descriptor's status flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A descriptor that a tokio `AsyncFd` watches but does not own.
#[derive(Clone, Copy)]
pub(crate) struct WatchedFd(RawFd);

impl AsRawFd for WatchedFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Watches `fd` for readability on the current runtime.
///
/// # Safety
/// `fd` must stay open, on the same file description, until the result
/// is dropped.
pub(crate) unsafe fn watch(fd: RawFd) -> io::Result<tokio::io::unix::AsyncFd<WatchedFd>> {
    // SAFETY: the caller keeps `fd` open until the AsyncFd is dropped.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(
            WatchedFd(fd),
            tokio::io::Interest::READABLE,
        )
    };
    Ok(registered?)
}

/// An rdma_cm event channel with a non-blocking descriptor.
pub(crate) struct EventChannel(NonNull<rdma_event_channel>);

// SAFETY: an event channel is a descriptor and the library's bookkeeping
// of it; librdmacm's calls on it are thread-safe.
unsafe impl Send for EventChannel {}
// SAFETY: as above.
unsafe impl Sync for EventChannel {}

impl EventChannel {
    pub(crate) fn new() -> io::Result<Self> {
        // SAFETY: no arguments; a null return sets errno.
        let ch = NonNull::new(unsafe { rdma_create_event_channel() }).ok_or_else(|| {
            let e = io::Error::last_os_error();
            io::Error::new(
                e.kind(),
                format!("opening an rdma_cm event channel (is rdma_ucm loaded, /dev/infiniband/rdma_cm there?): {e}"),
            )
        })?;
        let ch = EventChannel(ch);
        set_nonblocking(ch.fd())?;
        Ok(ch)
    }

    pub(crate) fn as_ptr(&self) -> *mut rdma_event_channel {
        self.0.as_ptr()
    }

    pub(crate) fn fd(&self) -> RawFd {
        // SAFETY: the channel is alive while `self` is.
        unsafe { (*self.0.as_ptr()).fd }
    }

    /// The next event, without waiting: `None` if there is none.
    pub(crate) fn try_next(&self) -> io::Result<Option<CmEvent>> {
        let mut ev = ptr::null_mut();
        // SAFETY: a live channel (non-blocking) and a place for the event.
        if unsafe { rdma_get_cm_event(self.as_ptr(), &mut ev) } != 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock => Ok(None),
                _ => Err(io::Error::new(
                    e.kind(),
                    format!("reading an rdma_cm event: {e}"),
                )),
            };
        }
        Ok(NonNull::new(ev).map(CmEvent))
    }
}

impl Drop for EventChannel {
    fn drop(&mut self) {
        // SAFETY: every id using the channel was destroyed or migrated
        // before (the owners of ids drop them first), every event acked.
        unsafe { rdma_destroy_event_channel(self.0.as_ptr()) }
    }
}

/// An rdma_cm event, acknowledged when dropped.
pub(crate) struct CmEvent(NonNull<rdma_cm_event>);

// SAFETY: an event is the library's until acked, and may be read and
// acked from any thread.
unsafe impl Send for CmEvent {}

impl CmEvent {
    pub(crate) fn kind(&self) -> rdma_cm_event_type::Type {
        // SAFETY: the event is valid until acked, in our drop.
        unsafe { (*self.0.as_ptr()).event }
    }

    pub(crate) fn status(&self) -> i32 {
        // SAFETY: as above.
        unsafe { (*self.0.as_ptr()).status }
    }

    pub(crate) fn id(&self) -> *mut rdma_cm_id {
        // SAFETY: as above.
        unsafe { (*self.0.as_ptr()).id }
    }

    /// The connection parameters of a connect request or an
    /// established connection, private data copied out.
    pub(crate) fn conn_param(&self) -> (u8, u8, Vec<u8>) {
        // SAFETY: as above; the private data pointer, when set, holds
        // `private_data_len` bytes until the event is acked.
        unsafe {
            let p = &(*self.0.as_ptr()).param.conn;
            let private = if p.private_data.is_null() {
                Vec::new()
            } else {
                std::slice::from_raw_parts(p.private_data as *const u8, p.private_data_len as usize)
                    .to_vec()
            };
            (p.responder_resources, p.initiator_depth, private)
        }
    }

    /// The event's name, as librdmacm spells it.
    pub(crate) fn name(&self) -> String {
        event_name(self.kind())
    }
}

/// An event type's name, as librdmacm spells it.
pub(crate) fn event_name(kind: rdma_cm_event_type::Type) -> String {
    // SAFETY: rdma_event_str returns a static string for any value.
    unsafe {
        let s = rdma_event_str(kind);
        if s.is_null() {
            return format!("event {kind}");
        }
        std::ffi::CStr::from_ptr(s).to_string_lossy().into_owned()
    }
}

impl Drop for CmEvent {
    fn drop(&mut self) {
        // SAFETY: an event we got from rdma_get_cm_event, acked once.
        unsafe { rdma_ack_cm_event(self.0.as_ptr()) };
    }
}

/// A socket address as librdmacm takes it.
pub(crate) struct RawSockAddr(libc::sockaddr_storage);

impl RawSockAddr {
    pub(crate) fn new(addr: SocketAddr) -> Self {
        // SAFETY: all-zero bytes are a valid sockaddr_storage.
        let mut st: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        match addr {
            SocketAddr::V4(a) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(a.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_storage is larger than sockaddr_in and
                // suitably aligned for it.
                unsafe { ptr::write(&mut st as *mut _ as *mut libc::sockaddr_in, sin) };
            }
            SocketAddr::V6(a) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: a.flowinfo(),
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: a.scope_id(),
                };
                // SAFETY: as above, for sockaddr_in6.
                unsafe { ptr::write(&mut st as *mut _ as *mut libc::sockaddr_in6, sin6) };
            }
        }
        RawSockAddr(st)
    }

    pub(crate) fn as_mut_ptr(&mut self) -> *mut libc::sockaddr {
        &mut self.0 as *mut _ as *mut libc::sockaddr
    }

    /// The address in `st`, if it is IPv4 or IPv6.
    pub(crate) fn to_socket_addr(st: &libc::sockaddr_storage) -> Option<SocketAddr> {
        match st.ss_family as libc::c_int {
            libc::AF_INET => {
                // SAFETY: the family says the storage holds a sockaddr_in.
                let sin = unsafe { &*(st as *const _ as *const libc::sockaddr_in) };
                Some(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()),
                    u16::from_be(sin.sin_port),
                )))
            }
            libc::AF_INET6 => {
                // SAFETY: the family says the storage holds a sockaddr_in6.
                let sin6 = unsafe { &*(st as *const _ as *const libc::sockaddr_in6) };
                Some(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                    u16::from_be(sin6.sin6_port),
                    sin6.sin6_flowinfo,
                    sin6.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }
}

/// A memory registration, deregistered when dropped.
pub(crate) struct Mr(NonNull<ibv_mr>);

// SAFETY: a registration is the kernel's; libibverbs' calls on it are
// thread-safe, and it is only read through `lkey`/`rkey`.
unsafe impl Send for Mr {}
// SAFETY: as above.
unsafe impl Sync for Mr {}

/// What a registration allows.
#[derive(Clone, Copy)]
pub(crate) enum Access {
    /// Our own sends and receives, and RDMA READ into it.
    Local,
    /// The peer's RDMA READ from it.
    RemoteRead,
}

impl Mr {
    /// Registers `len` bytes at `addr` with `pd`.
    ///
    /// # Safety
    /// The memory must stay mapped until the registration is dropped,
    /// and nothing may rely on its contents while a posted work request
    /// or a peer with the key may write it.
    pub(crate) unsafe fn register(
        pd: *mut ibv_pd,
        addr: *mut u8,
        len: usize,
        access: Access,
    ) -> io::Result<Self> {
        let flags = match access {
            Access::Local => ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0,
            Access::RemoteRead => ibv_access_flags::IBV_ACCESS_REMOTE_READ.0,
        };
        // SAFETY: the caller keeps the memory mapped; `pd` is alive.
        let mr = unsafe { ibv_reg_mr(pd, addr.cast(), len, flags as libc::c_int) };
        NonNull::new(mr).map(Mr).ok_or_else(|| {
            let e = io::Error::last_os_error();
            io::Error::new(
                e.kind(),
                format!("registering {len} bytes of memory for RDMA (RLIMIT_MEMLOCK?): {e}"),
            )
        })
    }

    pub(crate) fn lkey(&self) -> u32 {
        // SAFETY: the registration is alive while `self` is.
        unsafe { (*self.0.as_ptr()).lkey }
    }

    pub(crate) fn rkey(&self) -> u32 {
        // SAFETY: as above.
        unsafe { (*self.0.as_ptr()).rkey }
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: registered by us, deregistered once; the owner of the
        // queue pair destroyed it first, so no work request uses it.
        unsafe { ibv_dereg_mr(self.0.as_ptr()) };
    }
}

/// Page-aligned memory for the adapter to read and write, freed on drop.
/// It is only reached through raw pointers: the adapter writes it behind
/// the compiler's back.
pub(crate) struct DmaBuffer {
    ptr: NonNull<u8>,
    layout: std::alloc::Layout,
}

// SAFETY: plain memory, reached only through raw pointers under the
// stream's lock.
unsafe impl Send for DmaBuffer {}
// SAFETY: as above.
unsafe impl Sync for DmaBuffer {}

impl DmaBuffer {
    pub(crate) fn new(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len.max(4096), 4096)
            .expect("a page-aligned layout of a fixed size");
        // SAFETY: a layout of non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(p).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        DmaBuffer { ptr, layout }
    }

    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub(crate) fn len(&self) -> usize {
        self.layout.size()
    }
}

impl Drop for DmaBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// The verbs objects of one connection: its rdma_cm id (and the event
/// channel it reports on), protection domain, completion channel,
/// completion queue and queue pair. Dropped in the order the library
/// needs: queue pair, completion queue, completion channel, protection
/// domain, id, event channel (registrations, which belong to the
/// protection domain, are dropped before by their owner: see
/// `stream::Shared`).
pub(crate) struct Conn {
    pub(crate) id: *mut rdma_cm_id,
    pub(crate) pd: *mut ibv_pd,
    pub(crate) comp: *mut ibv_comp_channel,
    pub(crate) cq: *mut ibv_cq,
    qp_alive: bool,
    pub(crate) events: EventChannel,
    /// READs this side may have outstanding, and serve, at once.
    pub(crate) rd_atomic: u8,
}

// SAFETY: verbs objects may be used from any thread; the stream
// serialises its calls on them under its lock.
unsafe impl Send for Conn {}
// SAFETY: as above.
unsafe impl Sync for Conn {}

/// Entries of a connection's send queue: its message slots and the
/// READs of two staging halves of 4 KiB pages.
pub(crate) const SEND_QUEUE_ENTRIES: u32 = 1280;
/// Entries of its receive queue: one per receive buffer.
pub(crate) const RECEIVE_QUEUE_ENTRIES: u32 = crate::stream::RECEIVE_SLOTS as u32;

impl Conn {
    /// Builds the verbs objects of `id` (whose address and route are
    /// resolved, or which came with a connect request), reporting on
    /// `events`. `id` belongs to the result from here on, failing or not.
    pub(crate) fn new(id: *mut rdma_cm_id, events: EventChannel) -> io::Result<Self> {
        let mut conn = Conn {
            id,
            pd: ptr::null_mut(),
            comp: ptr::null_mut(),
            cq: ptr::null_mut(),
            qp_alive: false,
            events,
            rd_atomic: 1,
        };
        // SAFETY: `id` is a live id; after address resolution (or a
        // connect request) its `verbs` names the device it goes through.
        let verbs = unsafe { (*id).verbs };
        if verbs.is_null() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "no RDMA device serves this address (is an rxe or RoCE/InfiniBand device up on its interface?)",
            ));
        }
        // SAFETY: a device context librdmacm opened; all-zero is a valid
        // place for its attributes.
        let mut attr: ibv_device_attr = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        check(
            unsafe { ibv_query_device(verbs, &mut attr) },
            "querying the RDMA device",
        )?;
        conn.rd_atomic = attr
            .max_qp_rd_atom
            .min(attr.max_qp_init_rd_atom)
            .clamp(1, 16) as u8;
        // SAFETY: a live device context.
        conn.pd = unsafe { ibv_alloc_pd(verbs) };
        if conn.pd.is_null() {
            return Err(last("allocating an RDMA protection domain"));
        }
        // SAFETY: as above.
        conn.comp = unsafe { ibv_create_comp_channel(verbs) };
        if conn.comp.is_null() {
            return Err(last("creating an RDMA completion channel"));
        }
        // SAFETY: the completion channel is alive.
        set_nonblocking(unsafe { (*conn.comp).fd })?;
        let cqe = (SEND_QUEUE_ENTRIES + RECEIVE_QUEUE_ENTRIES + 16) as libc::c_int;
        // SAFETY: a live context and completion channel.
        conn.cq = unsafe { ibv_create_cq(verbs, cqe, ptr::null_mut(), conn.comp, 0) };
        if conn.cq.is_null() {
            return Err(last("creating an RDMA completion queue"));
        }
        // SAFETY: all-zero is a valid ibv_qp_init_attr to fill in.
        let mut qp: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        qp.send_cq = conn.cq;
        qp.recv_cq = conn.cq;
        qp.cap.max_send_wr = SEND_QUEUE_ENTRIES;
        qp.cap.max_recv_wr = RECEIVE_QUEUE_ENTRIES;
        qp.cap.max_send_sge = 1;
        qp.cap.max_recv_sge = 1;
        qp.qp_type = ibv_qp_type::IBV_QPT_RC;
        qp.sq_sig_all = 1;
        // SAFETY: a live id, protection domain and completion queue.
        check(
            unsafe { rdma_create_qp(id, conn.pd, &mut qp) },
            "creating an RDMA queue pair",
        )?;
        conn.qp_alive = true;
        Ok(conn)
    }

    pub(crate) fn qp(&self) -> *mut ibv_qp {
        // SAFETY: the id is alive; its qp is set once created.
        unsafe { (*self.id).qp }
    }

    pub(crate) fn comp_fd(&self) -> RawFd {
        // SAFETY: the completion channel is alive while `self` is.
        unsafe { (*self.comp).fd }
    }

    /// The peer's address.
    pub(crate) fn peer_addr(&self) -> Option<SocketAddr> {
        // SAFETY: the id is alive; its route's destination is set once
        // the address is resolved or the request arrived.
        unsafe { RawSockAddr::to_socket_addr(&(*self.id).route.addr.dst_addr_union.dst_storage) }
    }

    /// Starts tearing the connection down: the queue pair goes to the
    /// error state and every work request on it completes, flushed.
    pub(crate) fn disconnect(&self) {
        // SAFETY: a live id; a second call only returns an error.
        unsafe { rdma_disconnect(self.id) };
    }

    /// Destroys the queue pair (once): after this no work request can
    /// touch our memory.
    pub(crate) fn destroy_qp(&mut self) {
        if self.qp_alive {
            self.disconnect();
            // SAFETY: a live id whose queue pair we created.
            unsafe { rdma_destroy_qp(self.id) };
            self.qp_alive = false;
        }
    }

    /// Takes the completion events that arrived, without waiting, and
    /// acknowledges them; `WouldBlock` once there are none.
    pub(crate) fn drain_completion_events(&self) -> io::Result<()> {
        let mut n = 0u32;
        let result = loop {
            let mut cq = ptr::null_mut();
            let mut ctx = ptr::null_mut();
            // SAFETY: a live, non-blocking completion channel.
            if unsafe { ibv_get_cq_event(self.comp, &mut cq, &mut ctx) } != 0 {
                break Err(io::Error::last_os_error());
            }
            n += 1;
        };
        if n > 0 {
            // SAFETY: `n` events of our one completion queue were taken.
            unsafe { ibv_ack_cq_events(self.cq, n) };
        }
        result
    }
}

fn last(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.destroy_qp();
        // SAFETY: each object was created by `new` (or is null), is
        // destroyed once, in dependency order; their events were acked.
        unsafe {
            if !self.cq.is_null() {
                ibv_destroy_cq(self.cq);
            }
            if !self.comp.is_null() {
                ibv_destroy_comp_channel(self.comp);
            }
            if !self.pd.is_null() {
                ibv_dealloc_pd(self.pd);
            }
            rdma_destroy_id(self.id);
        }
    }
}
