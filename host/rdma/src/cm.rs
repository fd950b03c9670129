//! Connection set-up with rdma_cm: [`connect`] on the source,
//! [`RdmaListener`] on the destination. Each connection gets an event
//! channel of its own, so its events (a disconnect) reach its stream.

use std::io;
use std::net::SocketAddr;
use std::ptr;
use std::time::Duration;

use rdma_sys::*;
use tokio::io::unix::AsyncFd;

use crate::stream::RdmaStream;
use crate::verbs::{check, watch, CmEvent, Conn, EventChannel, RawSockAddr, WatchedFd};
use crate::RdmaError;

/// Private data of a connect request: freehint's mark and the message
/// version, so that a listener refuses other RDMA peers before anything
/// is registered for them.
const HELLO: [u8; 4] = [b'F', b'H', crate::wire::VERSION, 0];
/// How long address and route resolution may take, each.
const RESOLVE_TIMEOUT_MS: i32 = 5000;
/// Connect requests the listener queues.
const BACKLOG: i32 = 128;

/// Waits for the next event on `ch`.
async fn next_event(fd: &AsyncFd<WatchedFd>, ch: &EventChannel) -> io::Result<CmEvent> {
    loop {
        let mut guard = fd.readable().await?;
        match ch.try_next()? {
            Some(ev) => return Ok(ev),
            None => guard.clear_ready(),
        }
    }
}

/// Waits for an event of `kind` on `ch`, within `timeout`; `step` names
/// what it completes in errors.
async fn expect_event(
    fd: &AsyncFd<WatchedFd>,
    ch: &EventChannel,
    kind: rdma_cm_event_type::Type,
    step: &str,
    timeout: Duration,
) -> Result<CmEvent, RdmaError> {
    let ev = tokio::time::timeout(timeout, next_event(fd, ch))
        .await
        .map_err(|_| RdmaError::Timeout {
            step: step.to_string(),
            seconds: timeout.as_secs(),
        })?
        .map_err(|source| RdmaError::Io {
            step: step.to_string(),
            source,
        })?;
    if ev.kind() != kind {
        return Err(RdmaError::Event {
            step: step.to_string(),
            event: ev.name(),
            status: ev.status(),
        });
    }
    Ok(ev)
}

fn io_step(step: &str) -> impl FnOnce(io::Error) -> RdmaError + '_ {
    move |source| RdmaError::Io {
        step: step.to_string(),
        source,
    }
}

/// A new id on `ch` (reliable connections, the TCP port space).
fn create_id(ch: &EventChannel) -> io::Result<*mut rdma_cm_id> {
    let mut id = ptr::null_mut();
    // SAFETY: a live channel and a place for the id.
    check(
        unsafe {
            rdma_create_id(
                ch.as_ptr(),
                &mut id,
                ptr::null_mut(),
                rdma_port_space::RDMA_PS_TCP,
            )
        },
        "creating an rdma_cm id",
    )?;
    Ok(id)
}

/// Connection parameters: READs in flight each way, retries, and our
/// hello as private data.
fn conn_param(rd_atomic: u8) -> rdma_conn_param {
    // SAFETY: all-zero is a valid rdma_conn_param to fill in.
    let mut p: rdma_conn_param = unsafe { std::mem::zeroed() };
    p.private_data = HELLO.as_ptr().cast();
    p.private_data_len = HELLO.len() as u8;
    p.responder_resources = rd_atomic;
    p.initiator_depth = rd_atomic;
    p.retry_count = 7;
    p.rnr_retry_count = 7;
    p
}

/// Connects to the freehint destination listening on `addr` over RDMA
/// (through the device that serves the route to it), within `timeout`.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<RdmaStream, RdmaError> {
    let step = format!("connecting to rdma://{addr}");
    let ch = EventChannel::new().map_err(io_step(&step))?;
    // SAFETY: `ch` outlives `fd`, dropped before `ch` moves on.
    let fd = unsafe { watch(ch.fd()) }.map_err(io_step(&step))?;
    // Owns the id from here (and destroys it on every error path).
    let id = IdGuard(create_id(&ch).map_err(io_step(&step))?);
    let mut dst = RawSockAddr::new(addr);
    // SAFETY: a live id and a valid address.
    check(
        unsafe { rdma_resolve_addr(id.0, ptr::null_mut(), dst.as_mut_ptr(), RESOLVE_TIMEOUT_MS) },
        "resolving the address",
    )
    .map_err(io_step(&step))?;
    drop(
        expect_event(
            &fd,
            &ch,
            rdma_cm_event_type::RDMA_CM_EVENT_ADDR_RESOLVED,
            &format!("{step}: resolving the address (is an RDMA device up on the interface that reaches it?)"),
            timeout,
        )
        .await?,
    );
    // SAFETY: a live id with a resolved address.
    check(
        unsafe { rdma_resolve_route(id.0, RESOLVE_TIMEOUT_MS) },
        "resolving the route",
    )
    .map_err(io_step(&step))?;
    drop(
        expect_event(
            &fd,
            &ch,
            rdma_cm_event_type::RDMA_CM_EVENT_ROUTE_RESOLVED,
            &format!("{step}: resolving the route"),
            timeout,
        )
        .await?,
    );
    drop(fd);
    let conn = Conn::new(id.take(), ch).map_err(io_step(&step))?;
    // SAFETY: the connection (in `shared` below) outlives `fd`, dropped
    // before the stream starts (or on an error, before `shared`).
    let fd = unsafe { watch(conn.events.fd()) }.map_err(io_step(&step))?;
    let rd_atomic = conn.rd_atomic;
    let shared = RdmaStream::prepare(conn).map_err(io_step(&step))?;
    {
        let mut param = conn_param(rd_atomic);
        // SAFETY: a live id with a route and a queue pair; the parameters
        // (and the private data they point to, a static) outlive the call.
        check(
            unsafe { rdma_connect(shared.conn().id, &mut param) },
            "connecting",
        )
        .map_err(io_step(&step))?;
    }
    drop(
        expect_event(
            &fd,
            &shared.conn().events,
            rdma_cm_event_type::RDMA_CM_EVENT_ESTABLISHED,
            &format!(
                "{step} (is a freehint destination listening there with --listen rdma://...?)"
            ),
            timeout,
        )
        .await?,
    );
    drop(fd);
    RdmaStream::start(shared).map_err(io_step(&step))
}

/// Destroys an id unless taken.
struct IdGuard(*mut rdma_cm_id);

// SAFETY: the guard alone owns the id; librdmacm's calls on an id may be
// made from any thread.
unsafe impl Send for IdGuard {}

impl IdGuard {
    fn take(self) -> *mut rdma_cm_id {
        let id = self.0;
        std::mem::forget(self);
        id
    }
}

impl Drop for IdGuard {
    fn drop(&mut self) {
        // SAFETY: an id we created and nobody else owns; its events were
        // acked (every CmEvent is acked when dropped).
        unsafe { rdma_destroy_id(self.0) };
    }
}

/// Listens for freehint sources over RDMA on one address.
pub struct RdmaListener {
    fd: AsyncFd<WatchedFd>,
    // Dropped after `fd` (deregistered first) and with the id destroyed
    // before the channel (our drop).
    id: *mut rdma_cm_id,
    ch: EventChannel,
    local: SocketAddr,
}

// SAFETY: the listening id is used only through `&mut self` (accept) and
// librdmacm's calls are thread-safe.
unsafe impl Send for RdmaListener {}
// SAFETY: as above.
unsafe impl Sync for RdmaListener {}

impl RdmaListener {
    /// Listens on `addr` (port 0 picks one: see [`Self::local_addr`]).
    pub fn bind(addr: SocketAddr) -> Result<Self, RdmaError> {
        let step = format!("listening on rdma://{addr}");
        let ch = EventChannel::new().map_err(io_step(&step))?;
        // SAFETY: `fd` is the listener's first field, dropped before its
        // `ch` (fields drop in order).
        let fd = unsafe { watch(ch.fd()) }.map_err(io_step(&step))?;
        let id = create_id(&ch).map_err(io_step(&step))?;
        let guard = IdGuard(id);
        let mut sa = RawSockAddr::new(addr);
        // SAFETY: a live id and a valid address.
        check(
            unsafe { rdma_bind_addr(id, sa.as_mut_ptr()) },
            "binding the address (is an RDMA device up on its interface?)",
        )
        .map_err(io_step(&step))?;
        // SAFETY: a bound id.
        check(unsafe { rdma_listen(id, BACKLOG) }, "listening").map_err(io_step(&step))?;
        // SAFETY: a bound id; the port comes back in network order.
        let port = u16::from_be(unsafe { rdma_get_src_port(id) });
        let mut local = addr;
        local.set_port(port);
        Ok(RdmaListener {
            fd,
            id: guard.take(),
            ch,
            local,
        })
    }

    /// The address sources connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The next freehint source's connection, accepted: its queue pair
    /// is ready to send once this returns, and the connection fails (the
    /// stream's next call says why) if the source never completes it. A
    /// request from a peer that is not a freehint source of this version,
    /// or one that fails half-way, is refused (logged) and the wait goes
    /// on; errors are the listener's own. Cancel-safe: a request is taken
    /// and answered without waiting, so a `select!` that drops this
    /// future loses no connection.
    pub async fn accept(&self) -> Result<(RdmaStream, SocketAddr), RdmaError> {
        loop {
            let ev = next_event(&self.fd, &self.ch)
                .await
                .map_err(|source| RdmaError::Io {
                    step: format!("accepting on rdma://{}", self.local),
                    source,
                })?;
            if ev.kind() != rdma_cm_event_type::RDMA_CM_EVENT_CONNECT_REQUEST {
                tracing::debug!(event = %ev.name(), "rdma_cm event on the listener");
                continue;
            }
            let id = ev.id();
            let (responder, initiator, private) = ev.conn_param();
            // Acked before the id moves to its own channel (rdma_migrate_id
            // waits for every event of the id to be acked).
            drop(ev);
            match self.accept_one(id, responder, initiator, &private) {
                Ok(v) => return Ok(v),
                Err(e) => tracing::warn!("refused an RDMA connection: {e}"),
            }
        }
    }

    fn accept_one(
        &self,
        id: *mut rdma_cm_id,
        peer_responder: u8,
        peer_initiator: u8,
        private: &[u8],
    ) -> Result<(RdmaStream, SocketAddr), RdmaError> {
        let step = format!("accepting on rdma://{}", self.local);
        if private.get(..3) != Some(&HELLO[..3]) {
            // SAFETY: a connect request's id, ours to reject and destroy.
            unsafe {
                rdma_reject(id, ptr::null(), 0);
                rdma_destroy_id(id);
            }
            return Err(RdmaError::NotFreehint);
        }
        let guard = IdGuard(id);
        let ch = EventChannel::new().map_err(io_step(&step))?;
        // SAFETY: a live id whose events are all acked, and a live channel.
        check(
            unsafe { rdma_migrate_id(id, ch.as_ptr()) },
            "moving the connection to its own event channel",
        )
        .map_err(io_step(&step))?;
        let conn = Conn::new(guard.take(), ch).map_err(io_step(&step))?;
        let peer = conn.peer_addr();
        let mut param = conn_param(conn.rd_atomic);
        // Serve as many READs as the peer issues, issue as many as it serves.
        param.responder_resources = param.responder_resources.min(peer_initiator.max(1));
        param.initiator_depth = param.initiator_depth.min(peer_responder.max(1));
        let shared = RdmaStream::prepare(conn).map_err(io_step(&step))?;
        // SAFETY: a connect request's id with a queue pair; the
        // parameters outlive the call. Its queue pair is ready to send
        // when this returns; ESTABLISHED reaches the stream's task.
        check(
            unsafe { rdma_accept(shared.conn().id, &mut param) },
            "accepting",
        )
        .map_err(io_step(&step))?;
        let stream = RdmaStream::start(shared).map_err(io_step(&step))?;
        let peer = peer.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
        Ok((stream, peer))
    }
}

impl Drop for RdmaListener {
    fn drop(&mut self) {
        // SAFETY: our listening id; connections it spawned were migrated
        // to their own channels (or destroyed), its events acked.
        unsafe { rdma_destroy_id(self.id) };
    }
}
