//! The freehint daemon attached to one QEMU.
//!
//! One process per VM runs everything freehint does for it:
//!
//! * the vhost-user **balloon backend** QEMU connects to
//!   (`-chardev socket,path=VHOST_SOCKET -device vhost-user-device-pci,…`),
//!   for the VM's whole life;
//! * on the source, on request (control socket, [`ControlRequest::Migrate`]):
//!   refuses up front a VM whose RAM is written where dirty tracking cannot
//!   see it (O_DIRECT drives, other vhost-user backends, VFIO, other
//!   processes mapping its RAM), then finds QEMU's pid (`SO_PEERCRED`), its
//!   RAM file (QMP `query-memdev` + `qom-get mem-path`), takes the
//!   userfaultfd our preload library made in QEMU, and runs the engine's
//!   [`PrecopySender`] with the balloon as hint source and QEMU (QMP) for
//!   the handover;
//! * on the destination (`incoming`): receives into the destination QEMU's
//!   RAM file, loads device state, resumes the guest once the source
//!   commits, and tells its balloon driver that migration is over (cmd_id
//!   DONE).
//!
//! The free-page-hint cmd_id counter belongs to the VM: it goes on across
//! attempts and travels to the destination. A handover whose outcome is
//! unknown leaves the guest paused and the daemon in
//! [`DaemonState::Uncertain`], with the operator's action in its status.
//!
//! The engine addresses RAM by offset in the memory-backend file (see
//! [`gpa_map`]); hints are translated with the memory table QEMU sent the
//! backend.

#![deny(missing_docs)]

pub mod control;
pub mod gpa_map;
pub mod sink;
pub mod vm;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use freehint_balloon::{BalloonBackend, BalloonConfig, BalloonHandle};
use freehint_dirty_log::{CombinedDirtyLog, DirtyLog, UffdWpDirtyLog};
use freehint_engine::{
    empty_bitmap, vmm_ram_ranges, CancellationToken, DestinationVmm, MigrateError, MigrationParams,
    MigrationStats, Phase, PhaseWatch, PrecopySender, ReceiveStats, Receiver, Vmm,
};
use freehint_hint_filter::HintFilter;
use freehint_memory::GuestRam;
use freehint_qemu::{QemuDestination, QemuVmm, Qmp, QmpError};
use freehint_types::{CmdId, HintSource};

pub use control::{request, ControlReply, ControlRequest, DaemonState, DaemonStatus};
use gpa_map::GpaMap;
use sink::{HintSlot, SharedDirtyLog, UsedRingLog};

/// Errors of the daemon; each displays as one line that says what to do.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Talking to QEMU failed.
    #[error("QEMU: {0}")]
    Qmp(#[from] QmpError),
    /// A migration step failed before the migration started.
    #[error("{0}")]
    Migrate(#[from] MigrateError),
    /// The migration did not complete; `stats` says where the guest is.
    #[error("{message}")]
    Migration {
        /// One line: what failed, where the guest is, what to do.
        message: String,
        /// The sender's stats and the outcome.
        stats: Box<MigrationStats>,
    },
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
    /// Something writes guest RAM where dirty tracking cannot see it.
    #[error("refusing to migrate: writes to guest RAM that freehint cannot track would be lost: {0} (see docs/QEMU.md, \"What freehint can migrate\")")]
    UntrackedWriters(String),
    /// Hints were asked for but the guest's balloon driver is not running.
    #[error("free-page hints need the guest's virtio_balloon driver, but it has not started the device (QEMU sent the backend no memory table); load virtio_balloon in the guest or migrate with hints off")]
    NoBalloonDriver,
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
    /// Destination: resume the guest as soon as the source commits
    /// (otherwise leave it paused until [`ControlRequest::Resume`]).
    pub resume: bool,
    /// Destination: allocate all guest RAM before the source connects.
    pub preallocate: bool,
    /// Directory for staging QEMU's device state.
    pub state_dir: PathBuf,
}

/// What the daemon keeps between requests.
struct Shared {
    state: DaemonState,
    /// The running or last migration.
    migration: Option<PhaseWatch>,
    /// Cancels the running migration.
    cancel: Option<CancellationToken>,
    last_error: Option<String>,
    operator_action: Option<String>,
    received: Option<ReceiveStats>,
    /// QEMU's pid and the dirty log attached to it.
    tracked: Option<(i32, SharedDirtyLog)>,
    /// A received guest left paused (`--no-resume`, or an uncertain
    /// handover).
    paused_destination: Option<Arc<QemuDestination>>,
    /// The source guest left paused by an uncertain handover.
    paused_source: Option<Arc<QemuVmm>>,
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
    connected: AtomicBool,
    /// QEMU's pid from `SO_PEERCRED` on the vhost-user connection (0: none).
    vhost_peer_pid: AtomicI32,
    /// Control requests being answered: the daemon exits only after
    /// they have their answer.
    answering: AtomicUsize,
    /// The VM's last free-page-hint cmd_id.
    last_cmd_id: AtomicU32,
    /// SIGINT/SIGTERM arrived: finish what runs, start nothing new.
    stopping: AtomicBool,
    /// This daemon's QEMU runs (or holds) the guest: from the start on a
    /// source, once it arrived on a destination; no longer once it moved
    /// away.
    hosts_guest: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl VmDaemon {
    /// A daemon with its balloon device; [`Self::run`] starts serving.
    pub fn new(cfg: DaemonConfig) -> Result<Arc<Self>, DaemonError> {
        let cfg_is_source = cfg.incoming.is_none();
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
                state: DaemonState::WaitingForQemu,
                migration: None,
                cancel: None,
                last_error: None,
                operator_action: None,
                received: None,
                tracked: None,
                paused_destination: None,
                paused_source: None,
            }),
            busy: Mutex::new(()),
            connected: Default::default(),
            vhost_peer_pid: Default::default(),
            answering: Default::default(),
            last_cmd_id: AtomicU32::new(CmdId::MIN_ROUND - 1),
            stopping: Default::default(),
            hosts_guest: AtomicBool::new(cfg_is_source),
        }))
    }

    fn role(&self) -> &'static str {
        if self.cfg.incoming.is_some() {
            "destination"
        } else {
            "source"
        }
    }

    fn set_state(&self, state: DaemonState) {
        tracing::info!(state = ?state, "daemon");
        lock(&self.shared).state = state;
    }

    /// Serves the balloon to QEMU until QEMU disconnects (the VM ended or
    /// moved away), taking control requests and, on a destination, the
    /// incoming migration meanwhile. SIGINT and SIGTERM cancel a running
    /// migration (the source guest runs on if it had not committed), then
    /// end the process.
    pub fn run(self: &Arc<Self>) -> Result<(), DaemonError> {
        let _ = std::fs::remove_file(&self.cfg.control_socket);
        let control = UnixListener::bind(&self.cfg.control_socket).map_err(io(format!(
            "binding the control socket {}",
            self.cfg.control_socket.display()
        )))?;
        let me = self.clone();
        spawn("control", move || me.serve_control(control))?;
        let mut signals = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
        ])
        .map_err(io("installing the signal handler"))?;
        let me = self.clone();
        spawn("signals", move || {
            if let Some(sig) = signals.forever().next() {
                me.shut_down(sig);
            }
        })?;
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
            Ok(pid) => self.vhost_peer_pid.store(pid, SeqCst),
            Err(e) => tracing::warn!("no pid for the vhost-user peer: {e}"),
        }
        self.connected.store(true, SeqCst);
        {
            let mut sh = lock(&self.shared);
            if sh.state == DaemonState::WaitingForQemu {
                sh.state = if self.cfg.incoming.is_some() {
                    DaemonState::Receiving
                } else {
                    DaemonState::Idle
                };
            }
        }
        tracing::info!("QEMU connected to the vhost-user socket");
        let served = self.backend.serve_connection(frontend);
        self.connected.store(false, SeqCst);
        tracing::info!("QEMU disconnected from the vhost-user socket");
        // Let a migration in flight finish and answer its requester.
        drop(lock(&self.busy));
        self.wait_for_answers();
        let _ = std::fs::remove_file(&self.cfg.vhost_socket);
        let _ = std::fs::remove_file(&self.cfg.control_socket);
        served.map_err(DaemonError::from)
    }

    fn wait_for_answers(&self) {
        for _ in 0..500 {
            if self.answering.load(SeqCst) == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGINT/SIGTERM: cancel the migration (it fails back before its
    /// commit), let it answer, and exit.
    fn shut_down(&self, signal: i32) {
        tracing::warn!(
            signal,
            "signal received: cancelling any migration and exiting"
        );
        self.stopping.store(true, SeqCst);
        if let Some(token) = lock(&self.shared).cancel.clone() {
            token.cancel();
        }
        drop(lock(&self.busy));
        self.wait_for_answers();
        let _ = std::fs::remove_file(&self.cfg.vhost_socket);
        let _ = std::fs::remove_file(&self.cfg.control_socket);
        let sh = lock(&self.shared);
        eprintln!(
            "freehint: signal {signal}: exiting ({:?}{})",
            sh.state,
            sh.operator_action
                .as_deref()
                .map(|a| format!("; {a}"))
                .unwrap_or_default()
        );
        std::process::exit(0);
    }

    fn serve_control(self: Arc<Self>, listener: UnixListener) {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let me = self.clone();
            let _ = spawn("control-request", move || me.answer(conn));
        }
    }

    fn answer(&self, conn: UnixStream) {
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
            Ok(req) => {
                let handled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    self.handle_request(req)
                }));
                match handled {
                    Ok(Ok(reply)) => reply,
                    Ok(Err(DaemonError::Migration { message, stats })) => {
                        ControlReply::MigrationFailed {
                            message,
                            stats: *stats,
                        }
                    }
                    Ok(Err(e)) => ControlReply::Error {
                        message: e.to_string(),
                    },
                    Err(_) => ControlReply::Error {
                        message: "internal error: the request handler panicked".into(),
                    },
                }
            }
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
                // A destination becomes a source once the guest runs here.
                if !self.hosts_guest.load(SeqCst) {
                    return Err(DaemonError::BadRequest(
                        "this daemon's QEMU does not run the guest (it waits for an incoming migration, or the guest moved away); ask the daemon of the QEMU that runs it".into(),
                    ));
                }
                params
                    .validate()
                    .map_err(|e| DaemonError::BadRequest(format!("invalid parameters: {e}")))?;
                let dest = resolve(&to)?;
                let stats = self.migrate(dest, params)?;
                Ok(ControlReply::Migrated { stats })
            }
            ControlRequest::Resume => self.resume(),
            ControlRequest::Cancel => {
                let sh = lock(&self.shared);
                let Some(token) = &sh.cancel else {
                    return Err(DaemonError::BadRequest("no migration is running".into()));
                };
                // Before the sender exists the migration is in its set-up.
                let phase = sh
                    .migration
                    .as_ref()
                    .map_or(Phase::Setup, |w| w.get().phase);
                if matches!(phase, Phase::Committed | Phase::Completed) {
                    return Err(DaemonError::BadRequest(format!(
                        "too late to cancel: the migration is {phase} (the destination takes the guest over)"
                    )));
                }
                if phase.is_final() {
                    return Err(DaemonError::BadRequest(format!(
                        "no migration is running (the last one is {phase})"
                    )));
                }
                token.cancel();
                Ok(ControlReply::Cancelling { phase })
            }
            ControlRequest::Fault { spec } => {
                freehint_engine::fault::configure(&spec).map_err(DaemonError::BadRequest)?;
                Ok(ControlReply::Ok)
            }
        }
    }

    /// Resumes a guest held paused here (see [`ControlRequest::Resume`]).
    fn resume(&self) -> Result<ControlReply, DaemonError> {
        let (dest, src) = {
            let mut sh = lock(&self.shared);
            (sh.paused_destination.take(), sh.paused_source.take())
        };
        if let Some(dest) = dest {
            if let Err(e) = dest.resume() {
                lock(&self.shared).paused_destination = Some(dest);
                return Err(DaemonError::BadRequest(e.to_string()));
            }
            self.finish_hints();
            self.hosts_guest.store(true, SeqCst);
            let mut sh = lock(&self.shared);
            sh.state = if sh.state == DaemonState::Uncertain {
                DaemonState::ResumedByOperator
            } else {
                DaemonState::Received
            };
            sh.operator_action = None;
            return Ok(ControlReply::Resumed);
        }
        if let Some(src) = src {
            if let Err(e) = src.resume() {
                lock(&self.shared).paused_source = Some(src);
                return Err(DaemonError::BadRequest(e.to_string()));
            }
            self.finish_hints();
            let mut sh = lock(&self.shared);
            sh.state = DaemonState::ResumedByOperator;
            sh.operator_action = None;
            return Ok(ControlReply::Resumed);
        }
        Err(DaemonError::BadRequest(
            "no guest is held paused here (only after an incoming migration with --no-resume, or after a handover whose outcome was uncertain)".into(),
        ))
    }

    /// The daemon's state. Asks the guest for fresh balloon statistics on
    /// the way (they arrive for the next call).
    pub fn status(&self) -> DaemonStatus {
        if let Err(e) = self.handle.request_stats() {
            tracing::debug!("requesting guest stats: {e}");
        }
        let sh = lock(&self.shared);
        DaemonStatus {
            role: self.role().into(),
            state: sh.state,
            migration: sh.migration.as_ref().map(PhaseWatch::get),
            operator_action: sh.operator_action.clone(),
            last_cmd_id: self.last_cmd_id.load(SeqCst),
            qemu_connected: self.connected.load(SeqCst),
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
    /// source guest runs again, unless the error says otherwise (its QEMU
    /// died, or the handover's outcome is uncertain).
    pub fn migrate(
        &self,
        dest: SocketAddr,
        params: MigrationParams,
    ) -> Result<MigrationStats, DaemonError> {
        let _busy = self.busy.try_lock().map_err(|_| DaemonError::Busy)?;
        if self.stopping.load(SeqCst) {
            return Err(DaemonError::BadRequest(
                "the daemon is shutting down".into(),
            ));
        }
        if !self.connected.load(SeqCst) {
            return Err(DaemonError::BadRequest(format!(
                "QEMU is not connected to the vhost-user socket {}",
                self.cfg.vhost_socket.display()
            )));
        }
        {
            let sh = lock(&self.shared);
            if sh.paused_source.is_some() {
                return Err(DaemonError::BadRequest(format!(
                    "the guest is paused after an uncertain handover; decide first: {}",
                    sh.operator_action
                        .as_deref()
                        .unwrap_or("see `freehint status`")
                )));
            }
        }
        // The token exists before anything else, so a cancel or a signal
        // from now on reaches this migration whatever step it is in.
        let cancel = CancellationToken::new();
        {
            let mut sh = lock(&self.shared);
            sh.cancel = Some(cancel.clone());
            sh.migration = None;
        }
        if self.stopping.load(SeqCst) {
            cancel.cancel();
        }
        self.set_state(DaemonState::Migrating);
        // QEMU's pid as the vhost-user socket saw it; QMP's confirms it.
        let mut pid = Some(self.vhost_peer_pid.load(SeqCst)).filter(|&p| p > 0);
        let result = self.migrate_inner(dest, params, cancel, &mut pid);
        self.slot.detach();
        let mut sh = lock(&self.shared);
        sh.cancel = None;
        let result = match result {
            Ok(stats) => {
                self.hosts_guest.store(false, SeqCst);
                sh.state = DaemonState::Migrated;
                sh.last_error = None;
                sh.operator_action = None;
                Ok(stats)
            }
            Err(DaemonError::Migration { message, stats }) => {
                let uncertain = stats.state == Phase::Uncertain;
                let message = match pid {
                    // Whatever step noticed it, a dead source QEMU is the news.
                    Some(pid) if !process_alive(pid) => format!(
                        "the source QEMU (pid {pid}) exited during the migration: the guest is gone on the source ({message})"
                    ),
                    _ if uncertain => {
                        let action = format!(
                            "check `freehint status` on the destination's daemon ({dest}); if the guest does not run there, run `freehint resume --control {}` here; never resume it on both sides",
                            self.cfg.control_socket.display()
                        );
                        sh.operator_action = Some(action.clone());
                        format!("{message}; {action}")
                    }
                    _ => message,
                };
                sh.state = if uncertain {
                    DaemonState::Uncertain
                } else {
                    DaemonState::Failed
                };
                sh.last_error = Some(message.clone());
                Err(DaemonError::Migration { message, stats })
            }
            Err(e) => {
                let e = match pid {
                    Some(pid) if !process_alive(pid) => DaemonError::BadRequest(format!(
                        "the source QEMU (pid {pid}) exited during the migration: the guest is gone on the source ({e})"
                    )),
                    _ => e,
                };
                sh.state = DaemonState::Failed;
                sh.last_error = Some(e.to_string());
                Err(e)
            }
        };
        result
    }

    fn migrate_inner(
        &self,
        dest: SocketAddr,
        params: MigrationParams,
        cancel: CancellationToken,
        pid_out: &mut Option<i32>,
    ) -> Result<MigrationStats, DaemonError> {
        if cancel.is_cancelled() {
            return Err(MigrateError::Cancelled.into());
        }
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
        self.refuse_untracked_writers(&mut qmp, pid, meta.dev(), meta.ino())?;
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
        let filter = Arc::new(HintFilter::after(
            empty_bitmap(&ram),
            CmdId(self.last_cmd_id.load(SeqCst)),
        ));
        self.slot.attach(filter.clone(), map.clone());
        let log = CombinedDirtyLog(vec![
            Box::new(uffd_log),
            Box::new(UsedRingLog::new(self.handle.clone(), map, page_bytes)),
        ]);
        let timeout = Duration::from_secs(params.peer_timeout_s);
        let qemu = Arc::new(QemuVmm::new(
            qmp,
            backend.id.clone(),
            self.cfg.state_dir.join("source.state"),
            timeout,
        )?);
        let vmm = Arc::new(vm::SourceVm {
            qemu: qemu.clone(),
            balloon: self.handle.clone(),
        });
        // DONE after a failed attempt goes to the guest even with hints
        // off: it may still hold blocks of an earlier attempt.
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
            first_cmd_id = filter.last_cmd_id().0 + 1,
            "migrating"
        );
        let sender =
            PrecopySender::new(ram, filter.clone(), Box::new(log), hint_source, vmm, params)?
                .with_cancel_token(cancel);
        lock(&self.shared).migration = Some(sender.phase_watch());
        let result = self.runtime.block_on(sender.migrate(dest));
        self.last_cmd_id.store(filter.last_cmd_id().0, SeqCst);
        match result {
            Ok(stats) => Ok(stats),
            Err(failure) => {
                if failure.stats.state == Phase::Uncertain {
                    lock(&self.shared).paused_source = Some(qemu);
                }
                Err(DaemonError::Migration {
                    message: failure.to_string(),
                    stats: Box::new(failure.stats),
                })
            }
        }
    }

    /// Refuses a VM whose RAM is written where dirty tracking cannot see
    /// it: O_DIRECT drives, other vhost-user backends, VFIO devices (QMP),
    /// and any other process that maps the RAM file.
    fn refuse_untracked_writers(
        &self,
        qmp: &mut Qmp,
        qemu_pid: i32,
        dev: u64,
        ino: u64,
    ) -> Result<(), DaemonError> {
        let mut found: Vec<String> = qmp
            .untracked_writers(&self.cfg.vhost_socket)?
            .iter()
            .map(ToString::to_string)
            .collect();
        let me = std::process::id() as i32;
        for p in freehint_dirty_log::processes_mapping(dev, ino, &[qemu_pid, me]) {
            found.push(format!(
                "process {} ({}) maps the guest RAM file: its writes (a vhost-user backend such as virtiofsd?) are not tracked",
                p.pid, p.comm
            ));
        }
        if found.is_empty() {
            Ok(())
        } else {
            Err(DaemonError::UntrackedWriters(found.join("; ")))
        }
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

    /// Takes incoming migrations until one completes, the destination QEMU
    /// has consumed its `-incoming defer` (it loaded device state: it can
    /// take no other attempt), or the daemon shuts down.
    fn incoming_loop(self: Arc<Self>, listener: std::net::TcpListener) {
        while !self.stopping.load(SeqCst) {
            let result = {
                let _busy = lock(&self.busy);
                self.receive_once(&listener)
            };
            match result {
                Ok(Again::No) => return,
                Ok(Again::Yes) => continue,
                Err(e) => {
                    tracing::error!("incoming migration: {e}");
                    {
                        let mut sh = lock(&self.shared);
                        sh.state = DaemonState::Failed;
                        sh.last_error = Some(e.to_string());
                    }
                    if matches!(e, DaemonError::Qmp(QmpError::Closed(_))) {
                        return;
                    }
                    // Not a failed migration but a failed set-up (QEMU not
                    // ready, say): try again a little later.
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }

    /// One incoming attempt; says whether another may follow.
    fn receive_once(&self, listener: &std::net::TcpListener) -> Result<Again, DaemonError> {
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
        let vmm = Arc::new(vm::DestinationVm {
            qemu: qemu.clone(),
            balloon: self.handle.clone(),
            resume: self.cfg.resume,
        });
        let cancel = CancellationToken::new();
        let mut receiver = Receiver::new(ram, vmm, None)
            .preallocate(self.cfg.preallocate)
            .with_cancel_token(cancel.clone());
        {
            let mut sh = lock(&self.shared);
            sh.state = DaemonState::Receiving;
            sh.migration = Some(receiver.phase_watch());
            sh.cancel = Some(cancel.clone());
        }
        if self.stopping.load(SeqCst) {
            cancel.cancel();
        }
        receiver.prepare()?;
        let std_listener = listener
            .try_clone()
            .map_err(io("cloning the incoming listener"))?;
        let result = self.runtime.block_on(async move {
            std_listener
                .set_nonblocking(true)
                .map_err(io("the incoming listener"))?;
            let l = tokio::net::TcpListener::from_std(std_listener)
                .map_err(io("the incoming listener"))?;
            Ok::<_, DaemonError>(receiver.receive(&l).await)
        })?;
        let stats = match &result {
            Ok(s) => s.clone(),
            Err(f) => f.stats.clone(),
        };
        if let Some(id) = stats.last_cmd_id {
            // The VM's counter goes on from the source's.
            self.last_cmd_id.fetch_max(id, SeqCst);
        }
        let mut sh = lock(&self.shared);
        sh.cancel = None;
        sh.received = Some(stats.clone());
        match result {
            Ok(stats) => {
                tracing::info!(
                    bytes_received = stats.bytes_received,
                    total_time_ms = stats.total_time_ms,
                    "incoming migration complete"
                );
                sh.last_error = None;
                self.hosts_guest.store(true, SeqCst);
                if self.cfg.resume {
                    sh.state = DaemonState::Received;
                    drop(sh);
                    self.finish_hints();
                } else {
                    sh.state = DaemonState::ReceivedPaused;
                    sh.paused_destination = Some(qemu);
                }
                Ok(Again::No)
            }
            Err(failure) => {
                let message = failure.to_string();
                tracing::error!("incoming migration: {message}");
                if failure.stats.state == Phase::Uncertain {
                    let action = if failure.stats.guest_held_paused {
                        sh.paused_destination = Some(qemu.clone());
                        format!(
                            "check `freehint status` on the source's daemon; if the guest does not run there, run `freehint resume --control {}` here; never resume it on both sides",
                            self.cfg.control_socket.display()
                        )
                    } else {
                        "resume the guest on the source (`freehint resume --control SOURCE.ctl`, or `freehint resume --qmp SOURCE.qmp` if the source's daemon is gone): this side will never run it".to_string()
                    };
                    sh.state = DaemonState::Uncertain;
                    sh.last_error = Some(format!("{message}; {action}"));
                    sh.operator_action = Some(action);
                } else {
                    sh.state = DaemonState::Failed;
                    sh.last_error = Some(message);
                }
                drop(sh);
                // Another attempt only if QEMU has not consumed its
                // incoming migration (it loads device state only once).
                let again = !self.stopping.load(SeqCst)
                    && failure.stats.state == Phase::Failed
                    && qemu.status().is_ok_and(|s| s == "inmigrate");
                if again {
                    lock(&self.shared).state = DaemonState::Receiving;
                } else {
                    tracing::warn!(
                        "the destination QEMU cannot take another attempt: restart it with -incoming defer to receive again"
                    );
                }
                Ok(if again { Again::Yes } else { Again::No })
            }
        }
    }
}

/// Whether the incoming loop may take another attempt.
enum Again {
    Yes,
    No,
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
