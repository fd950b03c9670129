//! The freehint daemon attached to one QEMU.
//!
//! One process per VM runs everything freehint does for it:
//!
//! * the vhost-user **balloon backend** QEMU connects to
//!   (`-chardev socket,path=VHOST_SOCKET -device vhost-user-device-pci,…`),
//!   for the VM's whole life;
//! * with `--agent-socket`, the link to freehint's **guest agent** (a
//!   virtio-serial port QEMU serves on that socket, see [`agent`]): for
//!   each outgoing migration with hints, the daemon asks the agent first
//!   and falls back to the balloon when it does not answer;
//! * on the source, on request (control socket, [`ControlRequest::Migrate`]):
//!   refuses up front a VM whose RAM is written where dirty tracking cannot
//!   see it (O_DIRECT drives, other vhost-user backends, VFIO, other
//!   processes mapping its RAM), then finds QEMU's pid (`SO_PEERCRED`), its
//!   RAM file (QMP `query-memdev` + `qom-get mem-path`), takes the
//!   userfaultfd our preload library made in QEMU, and runs the engine's
//!   [`PrecopySender`](freehint_engine::PrecopySender) with the balloon as hint source and QEMU (QMP) for
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
//! [`GpaMap`]); hints are translated with the memory table QEMU sent the
//! backend.
//!
//! Files: `lib.rs` (the daemon, its vhost-user host and lifecycle),
//! [`agent`] (the guest agent as a hint source),
//! `serve.rs` (the control socket's server; the protocol is [`control`]),
//! `discovery.rs` (QEMU's QMP, RAM file, userfaultfd, untracked writers),
//! `source.rs` (outgoing migration), `destination.rs` (incoming),
//! [`sink`] (hints and extra dirty logs), [`vm`] (QEMU plus the balloon
//! state as the engine's VMM).

#![deny(missing_docs)]

pub mod agent;
pub mod control;
mod destination;
mod discovery;
pub mod gpa_map;
mod serve;
pub mod sink;
mod source;
pub mod vm;

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use freehint_balloon::{BalloonBackend, BalloonConfig, BalloonHandle};
use freehint_engine::{
    CancellationToken, MigrateError, MigrationStats, Phase, PhaseWatch, ReceiveStats,
};
use freehint_qemu::{QemuDestination, QemuVmm, QmpError};
use freehint_types::{CmdId, ErrorChain};

pub use control::{request, ControlReply, ControlRequest, DaemonState, DaemonStatus, GuestPrepare};
pub use gpa_map::GpaMap;
use sink::{HintSlot, SharedDirtyLog};

/// Errors of the daemon; each displays as one line that says what to do.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Talking to QEMU failed.
    #[error("QEMU")]
    Qmp(#[from] QmpError),
    /// A migration step failed before the migration started.
    #[error(transparent)]
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
    #[error("guest RAM")]
    Memory(#[from] freehint_memory::MemoryError),
    /// Dirty tracking of QEMU could not be set up.
    #[error("dirty tracking of QEMU (pid {pid}; was QEMU started with LD_PRELOAD=libfreehint_preload.so?)")]
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
    #[error(
        "freehint daemon at {path} (is `freehint vm` running with this --control socket?): {what}"
    )]
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
    #[error("{what}")]
    Io {
        /// What failed.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The balloon backend failed.
    #[error("balloon backend")]
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
    /// TLS for every migration connection, in and out; `None`: plain TCP
    /// (the operator's `--insecure`).
    pub tls: Option<Arc<freehint_engine::TlsConfig>>,
    /// Destination: resume the guest as soon as the source commits
    /// (otherwise leave it paused until [`ControlRequest::Resume`]).
    pub resume: bool,
    /// Destination: allocate all guest RAM before the source connects.
    pub preallocate: bool,
    /// Directory for staging QEMU's device state.
    pub state_dir: PathBuf,
    /// The chardev socket of the guest agent's virtio-serial port, if the
    /// VM has one (`-chardev socket,id=fhagent,path=PATH,server=on,wait=off
    /// -device virtserialport,chardev=fhagent,name=org.freehint.agent.0`).
    pub agent_socket: Option<PathBuf>,
}

/// What the daemon keeps between requests.
struct Shared {
    state: DaemonState,
    /// The running or last migration.
    migration: Option<PhaseWatch>,
    /// The running or last outgoing migration's live figures.
    progress: Option<freehint_engine::ProgressWatch>,
    /// Cancels the running migration.
    cancel: Option<CancellationToken>,
    /// Switches the running hybrid migration to postcopy.
    postcopy_now: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// Reconnects the running postcopy after a broken link.
    postcopy_resume: Option<freehint_engine::PostcopyResume>,
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

impl Shared {
    /// The running or last migration's phase (`setup` before its sender
    /// or receiver exists).
    fn migration_phase(&self) -> Phase {
        self.migration
            .as_ref()
            .map_or(Phase::Setup, |w| w.get().phase)
    }
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
                progress: None,
                cancel: None,
                postcopy_now: None,
                postcopy_resume: None,
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
        // Only the daemon's user may connect (and every request's peer is
        // checked too, see serve.rs).
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                &self.cfg.control_socket,
                std::fs::Permissions::from_mode(0o600),
            )
            .map_err(io(format!(
                "making the control socket {} private (0600)",
                self.cfg.control_socket.display()
            )))?;
        }
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
            Err(e) => tracing::warn!("no pid for the vhost-user peer: {}", ErrorChain(&e)),
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
}
