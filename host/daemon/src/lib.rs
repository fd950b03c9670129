//! The freehint daemon attached to one QEMU.
//!
//! One process per VM runs everything freehint does for it:
//!
//! * the vhost-user **balloon backend** QEMU connects to
//!   (`-chardev socket,path=VHOST_SOCKET -device vhost-user-device-pci,…`),
//!   for the VM's whole life;
//! * on the source, on request (control socket, [`ControlRequest::Migrate`]):
//!   finds QEMU's pid (`SO_PEERCRED` on QMP), its RAM file (QMP
//!   `query-memdev` + `qom-get mem-path`), takes the userfaultfd our preload
//!   library made in QEMU, and runs the engine's [`PrecopySender`] with the
//!   balloon as hint source and QEMU (QMP) for switchover;
//! * on the destination (`incoming`): receives into the destination QEMU's
//!   RAM file, loads device state, resumes the guest, and tells its
//!   balloon driver that migration is over (cmd_id DONE).
//!
//! The engine addresses RAM by offset in the memory-backend file (see
//! [`gpa_map`]); hints are translated with the memory table QEMU sent the
//! backend.

#![deny(missing_docs)]

pub mod control;
pub mod gpa_map;
pub mod sink;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use freehint_balloon::{BalloonBackend, BalloonConfig, BalloonHandle};
use freehint_dirty_log::{CombinedDirtyLog, DirtyLog, UffdWpDirtyLog};
use freehint_engine::{
    empty_bitmap, vmm_ram_ranges, DestinationVmm, MigrateError, MigrationParams, MigrationStats,
    PrecopySender, ReceiveStats, Receiver, VmmError,
};
use freehint_hint_filter::HintFilter;
use freehint_memory::GuestRam;
use freehint_qemu::{QemuDestination, QemuVmm, Qmp, QmpError};
use freehint_types::HintSource;

pub use control::{request, ControlReply, ControlRequest, DaemonStatus};
use gpa_map::GpaMap;
use sink::{HintSlot, SharedDirtyLog, UsedRingLog};

/// Errors of the daemon; each displays as one line that says what to do.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Talking to QEMU failed.
    #[error("QEMU: {0}")]
    Qmp(#[from] QmpError),
    /// The migration failed (the source guest runs again).
    #[error("{0}")]
    Migrate(#[from] MigrateError),
    /// Guest RAM could not be opened or mapped.
    #[error("guest RAM: {0}")]
    Memory(#[from] freehint_memory::MemoryError),
    /// Dirty tracking of QEMU could not be set up.
    #[error("dirty tracking of QEMU (pid {pid}): {source}; was QEMU started with LD_PRELOAD=libfreehint_preload.so?")]
    DirtyLog {
        /// QEMU's pid.
        pid: i32,
        /// What failed.
        source: freehint_dirty_log::DirtyLogError,
    },
    /// Hints were asked for but the guest's balloon driver is not running.
    #[error("free-page hints need the guest's virtio_balloon driver, but it has not started the device (QEMU sent the backend no memory table); load virtio_balloon in the guest or migrate with hints off")]
    NoBalloonDriver,
    /// The source QEMU died during the migration.
    #[error("the source QEMU (pid {pid}) exited during the migration: the guest is gone on the source ({cause})")]
    SourceGone {
        /// Its pid.
        pid: i32,
        /// The error the migration saw.
        cause: String,
    },
    /// Another migration is running.
    #[error("a migration is already running in this daemon")]
    Busy,
    /// A bad request.
    #[error("{0}")]
    BadRequest(String),
    /// The control socket failed.
    #[error("freehint daemon at {path}: {what}: {source} (is `freehint vm` running with this --control socket?)")]
    Control {
        /// The socket.
        path: PathBuf,
        /// What failed.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The control protocol was violated.
    #[error("control protocol: {0}")]
    Protocol(String),
    /// Another OS error.
    #[error("{what}: {source}")]
    Io {
        /// What failed.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The balloon backend failed.
    #[error("balloon backend: {0}")]
    Balloon(#[from] freehint_balloon::BalloonError),
}

/// Maps an OS error to [`DaemonError::Io`] saying what was being done.
fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DaemonError {
    let what = what.into();
    move |source| DaemonError::Io { what, source }
}

/// Spawns a named thread.
fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), DaemonError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map(drop)
        .map_err(io(format!("spawning the {name} thread")))
}

/// How a daemon is set up.
#[derive(Debug)]
pub struct DaemonConfig {
    /// The vhost-user socket QEMU's balloon device connects to.
    pub vhost_socket: PathBuf,
    /// QEMU's QMP socket (`-qmp unix:PATH,server=on,wait=off`).
    pub qmp_socket: PathBuf,
    /// Where the daemon takes requests (`freehint migrate|status|resume`).
    pub control_socket: PathBuf,
    /// Destination role: take one incoming migration on this listener.
    pub incoming: Option<std::net::TcpListener>,
    /// Destination: resume the guest as soon as it has arrived (otherwise
    /// leave it paused until [`ControlRequest::Resume`]).
    pub resume: bool,
    /// Destination: allocate all guest RAM before the source connects.
    pub preallocate: bool,
    /// Directory for staging QEMU's device state.
    pub state_dir: PathBuf,
    /// Seconds to wait for a peer at each step.
    pub peer_timeout_s: u64,
}

struct Shared {
    phase: String,
    last_error: Option<String>,
    received: Option<ReceiveStats>,
    /// QEMU's pid and the dirty log attached to it.
    tracked: Option<(i32, SharedDirtyLog)>,
    /// A received guest left paused.
    paused_destination: Option<Arc<QemuDestination>>,
}

/// One daemon: see the crate documentation.
pub struct VmDaemon {
    cfg: DaemonConfig,
    backend: BalloonBackend,
    handle: BalloonHandle,
    slot: Arc<HintSlot>,
    runtime: tokio::runtime::Runtime,
    shared: Mutex<Shared>,
    /// Held while a migration runs, in or out.
    busy: Mutex<()>,
    connected: std::sync::atomic::AtomicBool,
    /// QEMU's pid from `SO_PEERCRED` on the vhost-user connection (0: none).
    vhost_peer_pid: std::sync::atomic::AtomicI32,
    /// Control requests being answered: the daemon exits only after
    /// they have their answer.
    answering: std::sync::atomic::AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl VmDaemon {
    /// A daemon with its balloon device; [`Self::run`] starts serving.
    pub fn new(cfg: DaemonConfig) -> Result<Arc<Self>, DaemonError> {
        let slot = Arc::new(HintSlot::default());
        let backend = BalloonBackend::new(BalloonConfig::default(), slot.clone())?;
        let handle = backend.handle();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(io("starting the async runtime"))?;
        Ok(Arc::new(Self {
            cfg,
            backend,
            handle,
            slot,
            runtime,
            shared: Mutex::new(Shared {
                phase: "waiting-for-qemu".into(),
                last_error: None,
                received: None,
                tracked: None,
                paused_destination: None,
            }),
            busy: Mutex::new(()),
            connected: Default::default(),
            vhost_peer_pid: Default::default(),
            answering: Default::default(),
        }))
    }

    fn role(&self) -> &'static str {
        if self.cfg.incoming.is_some() {
            "destination"
        } else {
            "source"
        }
    }

    fn set_phase(&self, phase: &str) {
        tracing::info!(phase, "daemon");
        lock(&self.shared).phase = phase.to_string();
    }

    /// Serves the balloon to QEMU until QEMU disconnects (the VM ended or
    /// moved away), taking control requests and, on a destination, the
    /// incoming migration meanwhile.
    pub fn run(self: &Arc<Self>) -> Result<(), DaemonError> {
        let _ = std::fs::remove_file(&self.cfg.control_socket);
        let control = UnixListener::bind(&self.cfg.control_socket).map_err(io(format!(
            "binding the control socket {}",
            self.cfg.control_socket.display()
        )))?;
        let me = self.clone();
        spawn("control", move || me.serve_control(control))?;
        if let Some(l) = &self.cfg.incoming {
            let l = l.try_clone().map_err(io("cloning the incoming listener"))?;
            let me = self.clone();
            spawn("incoming", move || me.incoming_loop(l))?;
        }

        let _ = std::fs::remove_file(&self.cfg.vhost_socket);
        let listener = UnixListener::bind(&self.cfg.vhost_socket).map_err(io(format!(
            "binding the vhost-user socket {}",
            self.cfg.vhost_socket.display()
        )))?;
        let (frontend, _) = listener
            .accept()
            .map_err(io("accepting QEMU on the vhost-user socket"))?;
        match freehint_qemu::socket_peer_pid(&frontend) {
            Ok(pid) => self
                .vhost_peer_pid
                .store(pid, std::sync::atomic::Ordering::SeqCst),
            Err(e) => tracing::warn!("no pid for the vhost-user peer: {e}"),
        }
        self.connected
            .store(true, std::sync::atomic::Ordering::SeqCst);
        {
            let mut sh = lock(&self.shared);
            if sh.phase == "waiting-for-qemu" {
                sh.phase = "idle".into();
            }
        }
        tracing::info!("QEMU connected to the vhost-user socket");
        let served = self.backend.serve_connection(frontend);
        self.connected
            .store(false, std::sync::atomic::Ordering::SeqCst);
        tracing::info!("QEMU disconnected from the vhost-user socket");
        // Let a migration in flight finish and answer its requester.
        drop(lock(&self.busy));
        for _ in 0..500 {
            if self.answering.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = std::fs::remove_file(&self.cfg.vhost_socket);
        let _ = std::fs::remove_file(&self.cfg.control_socket);
        served.map_err(DaemonError::from)
    }

    fn serve_control(self: Arc<Self>, listener: UnixListener) {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let me = self.clone();
            let _ = spawn("control-request", move || me.answer(conn));
        }
    }

    fn answer(&self, conn: UnixStream) {
        use std::sync::atomic::Ordering::SeqCst;
        self.answering.fetch_add(1, SeqCst);
        self.answer_inner(conn);
        self.answering.fetch_sub(1, SeqCst);
    }

    fn answer_inner(&self, conn: UnixStream) {
        let mut line = String::new();
        let Ok(writer) = conn.try_clone() else { return };
        if BufReader::new(conn).read_line(&mut line).is_err() {
            return;
        }
        let reply = match serde_json::from_str::<ControlRequest>(&line) {
            Err(e) => ControlReply::Error {
                message: format!("bad request: {e}"),
            },
            Ok(req) => self
                .handle_request(req)
                .unwrap_or_else(|e| ControlReply::Error {
                    message: e.to_string(),
                }),
        };
        let mut out = serde_json::to_string(&reply).unwrap_or_else(|e| {
            format!(r#"{{"result":"error","message":"cannot encode the reply: {e}"}}"#)
        });
        out.push('\n');
        let mut writer = writer;
        let _ = writer.write_all(out.as_bytes());
    }

    /// Carries out one control request.
    pub fn handle_request(&self, req: ControlRequest) -> Result<ControlReply, DaemonError> {
        match req {
            ControlRequest::Status => Ok(ControlReply::Status(self.status())),
            ControlRequest::Migrate { to, params } => {
                if self.cfg.incoming.is_some() {
                    return Err(DaemonError::BadRequest(
                        "this daemon is a migration destination (--incoming); ask the source's daemon to migrate".into(),
                    ));
                }
                params
                    .validate()
                    .map_err(|e| DaemonError::BadRequest(format!("invalid parameters: {e}")))?;
                let dest = resolve(&to)?;
                let stats = self.migrate(dest, params)?;
                Ok(ControlReply::Migrated { stats })
            }
            ControlRequest::Resume => {
                let dest = lock(&self.shared).paused_destination.take().ok_or_else(|| {
                    DaemonError::BadRequest(
                        "no received guest is waiting to be resumed (only after an incoming migration with --no-resume)".into(),
                    )
                })?;
                dest.resume()
                    .map_err(|e| DaemonError::BadRequest(e.to_string()))?;
                self.finish_hints();
                self.set_phase("received");
                Ok(ControlReply::Resumed)
            }
        }
    }

    /// The daemon's state.
    pub fn status(&self) -> DaemonStatus {
        let sh = lock(&self.shared);
        DaemonStatus {
            role: self.role().into(),
            phase: sh.phase.clone(),
            qemu_connected: self.connected.load(std::sync::atomic::Ordering::SeqCst),
            balloon_driver_active: !self.handle.memory_table().is_empty(),
            last_error: sh.last_error.clone(),
            received: sh.received.clone(),
            balloon: serde_json::to_value(self.handle.status()).unwrap_or_default(),
        }
    }

    fn finish_hints(&self) {
        // The guest holds the blocks it hinted until it reads DONE.
        if let Err(e) = self.handle.finish() {
            tracing::warn!("could not tell the guest that migration is over (DONE): {e}");
        }
    }

    /// Migrates the VM to the destination daemon at `dest`. On error the
    /// source guest runs again (or the error says that its QEMU died).
    pub fn migrate(
        &self,
        dest: SocketAddr,
        params: MigrationParams,
    ) -> Result<MigrationStats, DaemonError> {
        let _busy = self.busy.try_lock().map_err(|_| DaemonError::Busy)?;
        if !self.connected.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(DaemonError::BadRequest(format!(
                "QEMU is not connected to the vhost-user socket {}",
                self.cfg.vhost_socket.display()
            )));
        }
        self.set_phase("migrating");
        // QEMU's pid as the vhost-user socket saw it; QMP's confirms it.
        let mut pid = Some(
            self.vhost_peer_pid
                .load(std::sync::atomic::Ordering::SeqCst),
        )
        .filter(|&p| p > 0);
        let result = self
            .migrate_inner(dest, params, &mut pid)
            .map_err(|e| match (e, pid) {
                // Whatever step noticed it, a dead source QEMU is the news.
                (e @ DaemonError::SourceGone { .. }, _) => e,
                (e, Some(pid)) if !process_alive(pid) => DaemonError::SourceGone {
                    pid,
                    cause: e.to_string(),
                },
                (e, _) => e,
            });
        self.slot.detach();
        let mut sh = lock(&self.shared);
        match &result {
            Ok(_) => {
                sh.phase = "migrated".into();
                sh.last_error = None;
            }
            Err(e) => {
                sh.phase = "failed".into();
                sh.last_error = Some(e.to_string());
            }
        }
        result
    }

    fn migrate_inner(
        &self,
        dest: SocketAddr,
        params: MigrationParams,
        pid_out: &mut Option<i32>,
    ) -> Result<MigrationStats, DaemonError> {
        let mut qmp = Qmp::connect(&self.cfg.qmp_socket)?;
        let pid = qmp.peer_pid()?;
        *pid_out = Some(pid);
        let backend = qmp.shared_ram_backend()?;
        let ram = Arc::new(GuestRam::open_file(&backend.path, backend.size_bytes)?);
        let region = &ram.regions()[0];
        let meta = region
            .file()
            .metadata()
            .map_err(io(format!("stat {}", backend.path.display())))?;
        let map = GpaMap::new(
            &self.handle.memory_table(),
            meta.dev(),
            meta.ino(),
            backend.size_bytes,
        );
        if params.hints && map.is_empty() {
            return Err(DaemonError::NoBalloonDriver);
        }
        let page_bytes = region.page_bytes();
        let uffd_log = self.dirty_log(pid, &ram)?;
        let filter = Arc::new(HintFilter::new(empty_bitmap(&ram)));
        self.slot.attach(filter.clone(), map.clone());
        let log = CombinedDirtyLog(vec![
            Box::new(uffd_log),
            Box::new(UsedRingLog::new(self.handle.clone(), map, page_bytes)),
        ]);
        let vmm = Arc::new(QemuVmm::new(qmp, self.cfg.state_dir.join("source.state"))?);
        let hint_source: Option<Arc<dyn HintSource>> = if params.hints {
            Some(Arc::new(self.handle.clone()))
        } else {
            None
        };
        tracing::info!(
            pid,
            ram = %backend.path.display(),
            ram_bytes = backend.size_bytes,
            %dest,
            hints = params.hints,
            "migrating"
        );
        let sender = PrecopySender::new(ram, filter, Box::new(log), hint_source, vmm, params)?;
        Ok(self.runtime.block_on(sender.migrate(dest))?)
    }

    /// The dirty log of QEMU `pid`, attached on first use and kept.
    fn dirty_log(&self, pid: i32, ram: &GuestRam) -> Result<SharedDirtyLog, DaemonError> {
        let mut sh = lock(&self.shared);
        if let Some((p, log)) = &sh.tracked {
            if *p == pid {
                return Ok(log.clone());
            }
        }
        let ranges = vmm_ram_ranges(pid, ram)?;
        let log = UffdWpDirtyLog::attach_process(pid, ranges)
            .map_err(|source| DaemonError::DirtyLog { pid, source })?;
        let shared = SharedDirtyLog(Arc::new(Mutex::new(Box::new(log) as Box<dyn DirtyLog>)));
        sh.tracked = Some((pid, shared.clone()));
        Ok(shared)
    }

    fn incoming_loop(self: Arc<Self>, listener: std::net::TcpListener) {
        loop {
            let result = {
                let _busy = lock(&self.busy);
                self.receive_once(&listener)
            };
            match result {
                Ok(stats) => {
                    tracing::info!(
                        bytes_received = stats.bytes_received,
                        total_time_ms = stats.total_time_ms,
                        "incoming migration complete"
                    );
                    return;
                }
                Err(e) => {
                    tracing::error!("incoming migration failed: {e}");
                    {
                        let mut sh = lock(&self.shared);
                        sh.phase = "failed".into();
                        sh.last_error = Some(e.to_string());
                    }
                    if matches!(e, DaemonError::Qmp(QmpError::Closed(_))) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }

    fn receive_once(&self, listener: &std::net::TcpListener) -> Result<ReceiveStats, DaemonError> {
        let mut qmp = wait_for_qmp(&self.cfg.qmp_socket)?;
        let status = qmp.status()?;
        if status != "inmigrate" {
            return Err(DaemonError::BadRequest(format!(
                "the destination QEMU is {status}, not waiting for a migration: start it with -incoming defer"
            )));
        }
        let backend = qmp.shared_ram_backend()?;
        let ram = Arc::new(GuestRam::open_file(&backend.path, backend.size_bytes)?);
        let qemu = Arc::new(QemuDestination::new(
            qmp,
            self.cfg.state_dir.join("destination.state"),
        )?);
        let vmm: Arc<dyn DestinationVmm> = if self.cfg.resume {
            qemu.clone()
        } else {
            Arc::new(LeavePaused(qemu.clone()))
        };
        let mut receiver = Receiver::new(ram, vmm, Duration::from_secs(self.cfg.peer_timeout_s))
            .preallocate(self.cfg.preallocate);
        receiver.prepare()?;
        self.set_phase("receiving");
        let std_listener = listener
            .try_clone()
            .map_err(io("cloning the incoming listener"))?;
        let stats = self.runtime.block_on(async move {
            std_listener
                .set_nonblocking(true)
                .map_err(io("the incoming listener"))?;
            let l = tokio::net::TcpListener::from_std(std_listener)
                .map_err(io("the incoming listener"))?;
            receiver.receive(&l).await.map_err(DaemonError::from)
        })?;
        let mut sh = lock(&self.shared);
        sh.received = Some(stats.clone());
        sh.last_error = None;
        if self.cfg.resume {
            sh.phase = "received".into();
            drop(sh);
            self.finish_hints();
        } else {
            sh.phase = "received-paused".into();
            sh.paused_destination = Some(qemu);
        }
        Ok(stats)
    }
}

/// A destination that loads device state but leaves the guest paused.
struct LeavePaused(Arc<QemuDestination>);

impl DestinationVmm for LeavePaused {
    fn load_device_state(&self, state: &[u8]) -> Result<(), VmmError> {
        self.0.load_device_state(state)
    }

    fn resume(&self) -> Result<(), VmmError> {
        tracing::info!("guest received; left paused (--no-resume)");
        Ok(())
    }
}

/// `HOST:PORT` to one address.
fn resolve(to: &str) -> Result<SocketAddr, DaemonError> {
    to.to_socket_addrs()
        .map_err(|e| DaemonError::BadRequest(format!("destination {to:?}: {e}")))?
        .next()
        .ok_or_else(|| DaemonError::BadRequest(format!("destination {to:?} resolves to nothing")))
}

/// Connects to QMP, waiting for QEMU to create the socket.
fn wait_for_qmp(path: &Path) -> Result<Qmp, DaemonError> {
    loop {
        match Qmp::connect(path) {
            Ok(q) => return Ok(q),
            Err(QmpError::Io { source, .. })
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Whether process `pid` still exists (and is not a zombie).
fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
    }
}
