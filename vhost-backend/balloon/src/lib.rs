//! A vhost-user virtio-balloon device (virtio id 5) for freehint.
//!
//! The stock Linux `virtio_balloon` driver talks to this backend through
//! QEMU's generic vhost-user device. The backend implements the whole
//! balloon, not only the part migration needs:
//!
//! * **free page hinting** (`FREE_PAGE_HINT`): the host starts a round with a
//!   fresh `free_page_hint_cmd_id` ([`BalloonHandle`] implements
//!   [`HintSource`]); the guest answers with a cmd_id buffer, free blocks
//!   and STOP; every block becomes a [`GpaRange`] handed, tagged with the
//!   cmd_id of its batch, to the engine's [`HintSink`]. Block contents are
//!   never read. A batch whose cmd_id buffer was queued before the id it
//!   reads was published is tagged [`FENCED_HINT_CMD_ID`] (see `fence.rs`).
//! * **free page reporting** (`REPORTING`): reported ranges are discarded
//!   from the shared RAM file (`fallocate(PUNCH_HOLE)`) and then handed to
//!   [`HintSink::reported_free`].
//! * **page poison** (`PAGE_POISON`): the guest's `poison_val` is kept; while
//!   it is non-zero, reported and inflated pages are not discarded (they
//!   must keep the poison pattern).
//! * **stats** (`STATS_VQ`): the guest's memory statistics, in
//!   [`BalloonStatus::guest_stats`]; [`BalloonHandle::request_stats`] asks
//!   for fresh ones.
//! * **inflate/deflate** with a host-set target
//!   ([`BalloonHandle::set_target_pages`]); inflated pages are discarded.
//!
//! # Queue indices
//!
//! The driver compacts the queue indices: only the queues of acked features
//! exist, in the order inflate, deflate, stats, free_page, reporting. See
//! [`layout::queue_roles`].
//!
//! # Untrusted input
//!
//! Everything from the guest and from the frontend is validated. Rejected
//! input is logged with `tracing::warn!` and counted per
//! [`RejectReason`]; the backend never applies such a range, never panics and
//! keeps serving the other queues. Every buffer, rejected or not, is returned
//! to the guest (used, length 0) so that the driver never waits forever.
//!
//! # Migration
//!
//! [`BalloonHandle::export_state`] on the source (after QEMU stopped the
//! device) and [`BalloonHandle::import_state`] on the destination (before
//! the VM resumes) carry a [`BalloonState`]: config, held stats buffer,
//! balloon PFNs, guest stats, cmd_id fences.
//!
//! # Stopping the device
//!
//! Before the frontend's `GET_VRING_BASE` for a ring reaches the daemon, the
//! ring is stopped and every chain the worker popped from it is finished
//! (holes punched, hints and reports delivered, used entries written, guest
//! notified): nothing touches the ring after the reply, which is what the
//! final dirty-log sync of a migration needs. See `gate.rs`.
//!
//! # The frontend proxy
//!
//! `vhost-user-backend` 0.24 cannot send `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`
//! (vhost 0.18's `Backend` has no such method and hides its socket), and it
//! drops the connection on the first request its handler refuses.
//! [`BalloonBackend::serve_connection`] therefore puts a small message proxy
//! between the frontend and the `VhostUserDaemon`: it keeps a duplicate of
//! the backend request channel fd, on which `backend_req.rs` sends config
//! changes, and refuses (NACK, counted) the frontend requests that would
//! otherwise kill the connection. See [`proxy`]. Both speak vhost's
//! vocabulary: requests are vhost's `FrontendReq`/`BackendReq`, bodies its
//! `ByteValued` message types, checked with its `VhostUserMsgValidator`.
//!
//! # Errors
//!
//! [`BalloonError`] keeps the error each failure comes from as its
//! `source()` ([`BackendReqError`] for config changes, [`VhostDaemonError`]
//! for the vhost-user daemon, `std::io::Error` for sockets), and its
//! message does not repeat it: print it with its chain.

#![deny(missing_docs)]

use std::collections::BTreeSet;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use freehint_types::{
    CmdId, ErrorChain, GpaRange, HintCommand, HintSink, HintSource, HintSourceError,
};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::Backend;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{
    GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

mod backend_req;
pub mod config;
mod device;
mod error;
mod fence;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod gate;
pub mod layout;
mod message;
mod migration;
pub mod proxy;
pub mod status;
mod vhost_log;

pub use backend_req::BackendReqError;
pub use config::ConfigSpace;
pub use error::{BalloonConfigError, BalloonError, BalloonStateError, VhostDaemonError};
pub use fence::{CmdIdFence, FENCED_HINT_CMD_ID, MAX_FENCES};
pub use layout::{queue_roles, QueueRole};
pub use migration::{BalloonState, BALLOON_STATE_VERSION};
pub use status::{BalloonStatus, DeviceCounters, GuestStats, RejectReason};

use backend_req::{Channel, Notified, Wait};
use status::RejectCounters;

/// Guest memory as the backend maps it.
pub(crate) type Mem = GuestMemoryMmap<()>;
/// Guest memory, swappable on SET_MEM_TABLE.
pub(crate) type AtomicMem = GuestMemoryAtomic<Mem>;

/// The balloon's page size: PFNs on the inflate/deflate queues and
/// `num_pages`/`actual` count 4 KiB pages whatever the guest's page size.
pub const BALLOON_PAGE_BYTES: u64 = 4096;

/// Largest queue size the backend accepts.
pub const DEFAULT_MAX_QUEUE_SIZE: u16 = 1024;

/// Settings of a balloon device.
#[derive(Clone, Debug)]
pub struct BalloonConfig {
    /// Initial target balloon size (`num_pages`), in 4 KiB pages.
    pub initial_target_pages: u32,
    /// Largest queue size accepted from the frontend (a power of two).
    pub max_queue_size: u16,
}

impl Default for BalloonConfig {
    fn default() -> Self {
        Self {
            initial_target_pages: 0,
            max_queue_size: DEFAULT_MAX_QUEUE_SIZE,
        }
    }
}

/// Mutable device state, behind one lock.
#[derive(Default)]
pub(crate) struct State {
    pub(crate) acked_features: u64,
    pub(crate) features_acked: bool,
    pub(crate) event_idx: bool,
    pub(crate) config: ConfigSpace,
    pub(crate) counters: DeviceCounters,
    pub(crate) stats: GuestStats,
    /// Head of the stats buffer the device holds until it wants new stats.
    pub(crate) held_stats: Option<u16>,
    /// The free-page batch the guest opened, if any.
    pub(crate) open_batch: Option<device::Batch>,
    /// Recent cmd_id publications, for the fence (see `fence.rs`).
    pub(crate) fences: fence::Fences,
    /// Ranges of the open batch, to refuse overlaps.
    pub(crate) batch_ranges: device::RangeSet,
    /// PFNs in the balloon.
    pub(crate) balloon: BTreeSet<u64>,
    /// The last hint round the guest closed with STOP (it had no more free
    /// blocks to report, or the host asked it to stop).
    pub(crate) last_closed_round: Option<u32>,
    /// The last round published with `start_round`, and when.
    pub(crate) round_started: Option<(u32, std::time::Instant)>,
    /// How long the guest took to close round `.0` (from its start).
    pub(crate) round_report_ms: Option<(u32, u64)>,
    /// A state was imported and the device has not been started since: a
    /// new connection keeps the imported stats buffer and fences.
    pub(crate) import_pending: bool,
}

pub(crate) struct Inner {
    pub(crate) sink: Arc<dyn HintSink>,
    pub(crate) state: Mutex<State>,
    pub(crate) mem: Mutex<Option<AtomicMem>>,
    pub(crate) vrings: Mutex<Vec<VringRwLock>>,
    /// Duplicate of the backend request channel, for config changes.
    pub(crate) channel: Mutex<Channel>,
    /// The frontend's dirty log while it has `VHOST_F_LOG_ALL` acked.
    pub(crate) vhost_log: Mutex<Option<vhost_log::VhostLog>>,
    pub(crate) rejects: RejectCounters,
    pub(crate) max_queue_size: u16,
    /// Per ring: stopped by `GET_VRING_BASE`, and in-flight work (see
    /// [`gate`]).
    pub(crate) gates: [gate::RingGate; layout::MAX_QUEUES],
}

/// The guest-physical range of a queue's used ring (flags, idx, one 8-byte
/// element per entry, avail_event), if the queue has a size.
pub(crate) fn used_ring_range(vring: &VringRwLock) -> Option<GpaRange> {
    let state = vring.get_ref();
    let q = state.get_queue();
    let size = u64::from(q.size());
    (size > 0).then(|| GpaRange::new(q.used_ring(), 6 + 8 * size))
}

/// Locks a mutex, recovering the data if a thread panicked while holding it.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    /// Logs and counts one rejection.
    pub(crate) fn reject(&self, reason: RejectReason, detail: std::fmt::Arguments<'_>) {
        self.rejects.bump(reason);
        tracing::warn!(reason = reason.name(), "balloon: rejected: {detail}");
    }

    /// Sends VHOST_USER_BACKEND_CONFIG_CHANGE_MSG to the frontend, or
    /// holds it until the device starts again (see [`backend_req`]).
    pub(crate) fn notify_config(&self, wait: Wait) -> Result<(), BalloonError> {
        let result = lock(&self.channel).config_changed(wait);
        let mut st = lock(&self.state);
        match result {
            Ok(Notified::Held) => {
                tracing::debug!("balloon: device stopped; config change held until it starts");
                Ok(())
            }
            Ok(Notified::Sent) => {
                st.counters.config_changes_sent += 1;
                Ok(())
            }
            Err(e) => {
                st.counters.config_changes_failed += 1;
                let e = BalloonError::ConfigChange(e);
                tracing::warn!("balloon: {}", ErrorChain(&e));
                Err(e)
            }
        }
    }

    fn set_cmd_id(&self, cmd: CmdId) -> Result<(), BalloonError> {
        {
            let mut st = lock(&self.state);
            // The fence is recorded before the config changes, under the
            // lock that get_config takes: the guest cannot see the new id
            // before its avail index is recorded (see `fence.rs`).
            if cmd.is_round() {
                match self.free_page_avail_idx(st.acked_features) {
                    Some(avail_idx) => st.fences.published(CmdIdFence {
                        cmd_id: cmd.0,
                        avail_idx,
                    }),
                    // No free-page ring has been started on this
                    // connection: the guest has no chain queued on it.
                    None => tracing::debug!(cmd_id = %cmd, "balloon: no free-page ring to fence"),
                }
            }
            st.config.free_page_hint_cmd_id = cmd.0;
        }
        tracing::info!(cmd_id = %cmd, "balloon: free_page_hint_cmd_id set");
        self.notify_config(Wait::ForReply)
    }

    /// The driver's `avail->idx` of the free-page queue (Acquire), if the
    /// queue exists and the device knows its ring.
    fn free_page_avail_idx(&self, acked_features: u64) -> Option<u16> {
        let index = layout::index_of(acked_features, QueueRole::FreePage)?;
        let vring = lock(&self.vrings).get(index).cloned()?;
        let atomic = lock(&self.mem).clone()?;
        let mem = atomic.memory();
        let state = vring.get_ref();
        let q = state.get_queue();
        if q.size() == 0 {
            return None;
        }
        q.avail_idx(&*mem, Ordering::Acquire).ok().map(|w| w.0)
    }
}

/// The balloon device: implements `VhostUserBackend` and serves frontends.
///
/// Cloning gives another reference to the same device.
#[derive(Clone)]
pub struct BalloonBackend {
    inner: Arc<Inner>,
}

/// One region of the memory table the frontend sent (`SET_MEM_TABLE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryTableRegion {
    /// Guest-physical start address.
    pub gpa_start: u64,
    /// Length in bytes.
    pub size_bytes: u64,
    /// Where the region starts in its file (vhost-user `mmap_offset`).
    pub file_offset_bytes: u64,
    /// Device number of the file (`st_dev`), to match it with a RAM file.
    pub file_dev: u64,
    /// Inode number of the file (`st_ino`).
    pub file_ino: u64,
}

/// The host's handle on a balloon device: hint rounds ([`HintSource`]),
/// target, stats requests and status.
#[derive(Clone)]
pub struct BalloonHandle {
    inner: Arc<Inner>,
}

static CONNECTION_SEQ: AtomicU64 = AtomicU64::new(0);

impl BalloonBackend {
    /// A new device that hands hints and reports to `sink`.
    pub fn new(config: BalloonConfig, sink: Arc<dyn HintSink>) -> Result<Self, BalloonError> {
        if config.max_queue_size == 0 || !config.max_queue_size.is_power_of_two() {
            return Err(BalloonError::InvalidConfig(
                BalloonConfigError::MaxQueueSize(config.max_queue_size),
            ));
        }
        let state = State {
            config: ConfigSpace {
                num_pages: config.initial_target_pages,
                ..ConfigSpace::default()
            },
            ..State::default()
        };
        Ok(Self {
            inner: Arc::new(Inner {
                sink,
                state: Mutex::new(state),
                mem: Mutex::new(None),
                vrings: Mutex::new(Vec::new()),
                channel: Mutex::new(Channel::default()),
                vhost_log: Mutex::new(None),
                rejects: RejectCounters::default(),
                max_queue_size: config.max_queue_size,
                gates: Default::default(),
            }),
        })
    }

    /// The host-side handle of this device.
    pub fn handle(&self) -> BalloonHandle {
        BalloonHandle {
            inner: self.inner.clone(),
        }
    }

    /// Listens on `socket` (replacing a stale socket file), accepts one
    /// frontend and serves it until it disconnects.
    pub fn serve(&self, socket: &Path) -> Result<(), BalloonError> {
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket).map_err(|source| BalloonError::Listen {
            socket: socket.to_path_buf(),
            source,
        })?;
        let (stream, _) = listener.accept().map_err(|source| BalloonError::Io {
            what: "accept a frontend",
            source,
        })?;
        let r = self.serve_connection(stream);
        let _ = std::fs::remove_file(socket);
        r
    }

    /// Serves one connected frontend until it disconnects.
    ///
    /// Starts a `VhostUserDaemon` on a private socket and proxies the
    /// frontend's messages to it (see [`proxy`]).
    pub fn serve_connection(&self, frontend: UnixStream) -> Result<(), BalloonError> {
        self.reset_connection();
        let io = |what: &'static str| move |source| BalloonError::Io { what, source };
        let name = format!(
            "freehint-balloon-{}-{}",
            std::process::id(),
            CONNECTION_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let addr = SocketAddr::from_abstract_name(name.as_bytes())
            .map_err(io("name the private daemon socket"))?;
        let listener =
            UnixListener::bind_addr(&addr).map_err(io("bind the private daemon socket"))?;
        // The connection completes from the backlog; the daemon accepts it below.
        let daemon_side =
            UnixStream::connect_addr(&addr).map_err(io("connect the private daemon socket"))?;
        let mut vlistener = vhost::vhost_user::Listener::from(listener);
        let mut daemon = VhostUserDaemon::new(
            "freehint-balloon".to_string(),
            self.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )?;
        daemon.start(&mut vlistener)?;

        let proxy_inner = self.inner.clone();
        let proxy = std::thread::Builder::new()
            .name("balloon-proxy".into())
            .spawn(move || proxy::run(frontend, daemon_side, proxy_inner))
            .map_err(io("spawn the proxy thread"))?;

        let result = daemon.wait();
        for h in daemon.get_epoll_handlers() {
            h.send_exit_event();
        }
        let _ = proxy.join();
        *lock(&self.inner.channel) = Channel::default();
        lock(&self.inner.vrings).clear();
        match result {
            Ok(()) => Ok(()),
            Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn reset_connection(&self) {
        let mut st = lock(&self.inner.state);
        st.acked_features = 0;
        st.features_acked = false;
        st.event_idx = false;
        st.open_batch = None;
        st.batch_ranges.clear();
        // A new frontend is a new guest, unless a state was imported for
        // the guest this frontend is about to start (an import made before
        // the destination's QEMU connected).
        if !st.import_pending {
            st.held_stats = None;
            st.fences.clear();
        }
        drop(st);
        lock(&self.inner.mem).take();
        lock(&self.inner.vrings).clear();
        *lock(&self.inner.channel) = Channel::default();
        for g in &self.inner.gates {
            g.start();
        }
    }
}

impl BalloonHandle {
    /// A snapshot of the device.
    pub fn status(&self) -> BalloonStatus {
        let st = lock(&self.inner.state);
        BalloonStatus {
            acked_features: st.acked_features,
            queues: queue_roles(st.acked_features),
            config: st.config,
            balloon_pages: st.balloon.len() as u64,
            backend_channel: lock(&self.inner.channel).backend_req.is_some(),
            memory_table: lock(&self.inner.mem).is_some(),
            guest_stats: st.stats.clone(),
            counters: st.counters.clone(),
            rejected: self.inner.rejects.snapshot(),
        }
    }

    /// The counter of one rejection reason.
    pub fn rejected(&self, reason: RejectReason) -> u64 {
        self.inner.rejects.get(reason)
    }

    /// Sets the balloon target (`num_pages`, 4 KiB pages) and notifies the
    /// guest. The config is updated even if the notification fails.
    pub fn set_target_pages(&self, pages: u32) -> Result<(), BalloonError> {
        lock(&self.inner.state).config.num_pages = pages;
        tracing::info!(pages, "balloon: target set");
        self.inner.notify_config(Wait::ForReply)
    }

    /// Returns the held stats buffer to the guest so that it sends fresh
    /// statistics. `Ok(false)` if the device holds no stats buffer (the
    /// guest has not sent one yet, or a request is already outstanding),
    /// or if the stats ring is stopped or not started yet: the buffer then
    /// stays held (and travels in [`BalloonState`]).
    pub fn request_stats(&self) -> Result<bool, BalloonError> {
        device::request_stats(&self.inner)
    }

    /// The memory table the frontend sent, empty before the first
    /// `SET_MEM_TABLE` (QEMU sends it when the guest's driver starts the
    /// device).
    pub fn memory_table(&self) -> Vec<MemoryTableRegion> {
        use std::os::unix::fs::MetadataExt;
        let Some(atomic) = lock(&self.inner.mem).clone() else {
            return Vec::new();
        };
        let mem = atomic.memory();
        mem.iter()
            .filter_map(|r| {
                let fo = r.file_offset()?;
                let meta = fo.file().metadata().ok()?;
                Some(MemoryTableRegion {
                    gpa_start: r.start_addr().0,
                    size_bytes: r.len(),
                    file_offset_bytes: fo.start(),
                    file_dev: meta.dev(),
                    file_ino: meta.ino(),
                })
            })
            .collect()
    }

    /// The guest-physical ranges of every used ring the device has written
    /// to. These are the only guest memory the backend writes (used
    /// elements, the used index and, with `EVENT_IDX`, `avail_event`): a
    /// migration must send them again after the last write, because the
    /// VMM's dirty tracking does not see writes made through this process's
    /// mapping.
    pub fn used_ring_ranges(&self) -> Vec<GpaRange> {
        lock(&self.inner.vrings)
            .iter()
            .filter_map(used_ring_range)
            .collect()
    }

    /// Stops the device's every access to guest memory until
    /// [`BalloonHandle::resume_memory_access`], and waits for work in
    /// flight to finish. Kicks meanwhile are remembered and given when
    /// access resumes; stats requests return `false`.
    ///
    /// For the destination of a postcopy migration: pages still to come are
    /// holes in the RAM file, and a read through this process's mapping
    /// would fill one with zeros that the guest would then see in place of
    /// its data.
    pub fn pause_memory_access(&self) {
        for g in &self.inner.gates {
            g.hold();
        }
    }

    /// Ends [`BalloonHandle::pause_memory_access`]: kicks every ring a kick
    /// found paused, so that chains the guest queued meanwhile are served.
    pub fn resume_memory_access(&self) {
        let vrings = lock(&self.inner.vrings).clone();
        for (index, g) in self.inner.gates.iter().enumerate() {
            if !g.release() {
                continue;
            }
            let Some(vring) = vrings.get(index) else {
                continue;
            };
            let kick = vring.get_ref().get_kick().as_ref().map(|k| k.try_clone());
            match kick {
                Some(Ok(consumer)) => {
                    use std::io::Write;
                    use std::os::fd::{FromRawFd, IntoRawFd};
                    // SAFETY: `into_raw_fd` hands over a valid fd (a
                    // duplicate of the ring's kick eventfd) that nothing
                    // else owns; the File closes it when dropped.
                    let file = unsafe { std::fs::File::from_raw_fd(consumer.into_raw_fd()) };
                    if let Err(e) = (&file).write_all(&1u64.to_ne_bytes()) {
                        tracing::warn!("balloon: cannot kick vring {index} after the pause: {e}");
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!("balloon: cannot duplicate the kick fd of vring {index}: {e}")
                }
                None => {}
            }
        }
    }

    /// Publishes a new `free_page_hint_cmd_id` to the guest.
    pub fn set_cmd_id(&self, cmd: CmdId) -> Result<(), BalloonError> {
        self.inner.set_cmd_id(cmd)
    }

    /// The device state the destination's backend needs (see
    /// [`BalloonState`]). Call it on the source after QEMU stopped the
    /// device (every ring has answered `GET_VRING_BASE`), so that nothing
    /// changes it any more. The device keeps its state: if the migration
    /// fails, the source goes on as before.
    pub fn export_state(&self) -> BalloonState {
        let st = lock(&self.inner.state);
        BalloonState {
            version: BALLOON_STATE_VERSION,
            num_pages_4k: st.config.num_pages,
            actual_pages_4k: st.config.actual,
            poison_val: st.config.poison_val,
            free_page_hint_cmd_id: st.config.free_page_hint_cmd_id,
            held_stats_head: st.held_stats,
            inflated_pfns_4k: st.balloon.iter().copied().collect(),
            guest_stats: st.stats.clone(),
            cmd_id_fences: st.fences.pending(),
        }
    }

    /// Takes over the device state of the source's backend. Call it on the
    /// destination's backend after QEMU loaded its device state and before
    /// the VM resumes; the frontend then starts the device (with
    /// `SET_VRING_BASE` at the source's avail positions), which keeps what
    /// was imported. [`BalloonHandle::request_stats`] then returns the
    /// imported stats buffer on this device's stats ring.
    ///
    /// Refuses (and applies nothing of) a state of another version, a stats
    /// head outside the largest queue, PFNs that are not 32-bit, fences that
    /// name no round or are too many, and, once the memory table is known,
    /// PFNs or an `actual` outside guest memory.
    pub fn import_state(&self, state: &BalloonState) -> Result<(), BalloonError> {
        if state.version != BALLOON_STATE_VERSION {
            return Err(BalloonError::StateVersion {
                found: state.version,
                supported: BALLOON_STATE_VERSION,
            });
        }
        let invalid = |why| Err(BalloonError::InvalidState(why));
        if let Some(head) = state.held_stats_head {
            if head >= self.inner.max_queue_size {
                return invalid(BalloonStateError::StatsHeadOutOfRange {
                    head,
                    max_queue_size: self.inner.max_queue_size,
                });
            }
        }
        if let Some(&pfn) = state
            .inflated_pfns_4k
            .iter()
            .find(|&&p| p > u64::from(u32::MAX))
        {
            return invalid(BalloonStateError::PfnNot32Bit(pfn));
        }
        if state.cmd_id_fences.len() > MAX_FENCES {
            return invalid(BalloonStateError::TooManyFences {
                count: state.cmd_id_fences.len(),
                max: MAX_FENCES,
            });
        }
        if let Some(f) = state
            .cmd_id_fences
            .iter()
            .find(|f| !CmdId(f.cmd_id).is_round())
        {
            return invalid(BalloonStateError::FenceNotARound(f.cmd_id));
        }
        if let Some(atomic) = lock(&self.inner.mem).clone() {
            let mem = atomic.memory();
            let pages = device::memory_bytes(&mem) / BALLOON_PAGE_BYTES;
            if u64::from(state.actual_pages_4k) > pages {
                return invalid(BalloonStateError::ActualBeyondMemory {
                    actual_pages: state.actual_pages_4k,
                    memory_pages: pages,
                });
            }
            if let Some(&pfn) = state
                .inflated_pfns_4k
                .iter()
                .find(|&&p| !device::in_memory(&mem, p * BALLOON_PAGE_BYTES, BALLOON_PAGE_BYTES))
            {
                return invalid(BalloonStateError::PfnOutsideMemory(pfn));
            }
        }
        let mut st = lock(&self.inner.state);
        st.config.num_pages = state.num_pages_4k;
        st.config.actual = state.actual_pages_4k;
        st.config.poison_val = state.poison_val;
        st.config.free_page_hint_cmd_id = state.free_page_hint_cmd_id;
        st.held_stats = state.held_stats_head;
        st.balloon = state.inflated_pfns_4k.iter().copied().collect();
        st.stats = state.guest_stats.clone();
        st.fences.clear();
        for f in &state.cmd_id_fences {
            st.fences.published(*f);
        }
        // Batches do not travel: hints the guest queued on the source after
        // a cmd_id chain the source processed arrive here with no batch
        // open and are dropped (counted) — they belong to the source's
        // migration anyway.
        st.open_batch = None;
        st.batch_ranges.clear();
        st.import_pending = true;
        tracing::info!(
            held_stats = ?state.held_stats_head,
            balloon_pages = state.inflated_pfns_4k.len(),
            cmd_id = state.free_page_hint_cmd_id,
            "balloon: device state imported"
        );
        Ok(())
    }
}

impl HintSource for BalloonHandle {
    fn start_round(&self, cmd_id: CmdId) -> Result<(), HintSourceError> {
        let failed = |e| HintSourceError::new(HintCommand::StartRound(cmd_id), e);
        if !cmd_id.is_round() {
            return Err(failed(BalloonError::NotARound(cmd_id.0)));
        }
        lock(&self.inner.state).round_started = Some((cmd_id.0, std::time::Instant::now()));
        self.inner.set_cmd_id(cmd_id).map_err(failed)
    }

    fn stop_round(&self) -> Result<(), HintSourceError> {
        self.inner
            .set_cmd_id(CmdId::STOP)
            .map_err(|e| HintSourceError::new(HintCommand::StopRound, e))
    }

    fn finish(&self) -> Result<(), HintSourceError> {
        self.inner
            .set_cmd_id(CmdId::DONE)
            .map_err(|e| HintSourceError::new(HintCommand::Finish, e))
    }

    fn round_reported(&self, cmd_id: CmdId) -> Option<bool> {
        Some(lock(&self.inner.state).last_closed_round == Some(cmd_id.0))
    }

    fn name(&self) -> &'static str {
        "balloon"
    }

    fn report_ms(&self, cmd_id: CmdId) -> Option<u64> {
        match lock(&self.inner.state).round_report_ms {
            Some((id, ms)) if id == cmd_id.0 => Some(ms),
            _ => None,
        }
    }
}

impl VhostUserBackend for BalloonBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        layout::MAX_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        self.inner.max_queue_size as usize
    }

    fn features(&self) -> u64 {
        layout::features::OFFERED
    }

    fn acked_features(&self, features: u64) {
        let mut st = lock(&self.inner.state);
        st.acked_features = features;
        st.features_acked = true;
        tracing::info!(
            features = format_args!("{features:#x}"),
            queues = ?queue_roles(features),
            "balloon: features acked"
        );
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::MQ
    }

    fn reset_device(&self) {
        let mut st = lock(&self.inner.state);
        st.acked_features = 0;
        st.features_acked = false;
        st.held_stats = None;
        st.open_batch = None;
        st.batch_ranges.clear();
        // The driver starts its rings again from 0.
        st.fences.clear();
        st.import_pending = false;
    }

    fn set_event_idx(&self, enabled: bool) {
        lock(&self.inner.state).event_idx = enabled;
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        lock(&self.inner.state).config.read(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> std::io::Result<()> {
        // Refused writes are logged, counted and not applied, but answered
        // with success: vhost-user-backend drops the whole connection when a
        // handler returns an error.
        device::set_config(&self.inner, offset, buf);
        Ok(())
    }

    fn update_memory(&self, mem: AtomicMem) -> std::io::Result<()> {
        *lock(&self.inner.mem) = Some(mem);
        Ok(())
    }

    fn set_backend_req_fd(&self, _backend: Backend) {
        // The proxy keeps its own duplicate of this channel (vhost 0.18's
        // Backend cannot send CONFIG_CHANGE_MSG, see `backend_req.rs`);
        // this copy is not needed.
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        // Never return an error: the worker thread would stop serving every
        // queue.
        if evset != EventSet::IN {
            return Ok(());
        }
        {
            let mut stored = lock(&self.inner.vrings);
            if stored.is_empty() {
                *stored = vrings.to_vec();
            }
        }
        let index = device_event as usize;
        let (Some(vring), Some(gate)) = (vrings.get(index), self.inner.gates.get(index)) else {
            return Ok(());
        };
        // Everything below, up to the vhost log, happens inside the gate:
        // a GET_VRING_BASE for this ring waits for it (see `gate`).
        let Some(_busy) = gate.enter() else {
            tracing::debug!(
                "balloon: vring {index} is stopped; its chains wait for the next start"
            );
            return Ok(());
        };
        device::process_queue(&self.inner, index, vring, gate);
        if let (Some(log), Some(ring)) =
            (lock(&self.inner.vhost_log).as_ref(), used_ring_range(vring))
        {
            log.mark(ring);
        }
        Ok(())
    }
}
