//! The control socket's server side: one thread per request, answered
//! from the daemon's state (the protocol and the client are in
//! [`crate::control`]).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

use freehint_engine::{Phase, PhaseWatch};
use freehint_types::{DestinationVmm, ErrorChain, Vmm};

use crate::discovery::resolve;
use crate::{
    lock, spawn, ControlReply, ControlRequest, DaemonError, DaemonState, DaemonStatus, VmDaemon,
};

/// Whether the process at the other end of a control connection may ask
/// anything: it must run as the daemon's user, or as root. The socket is
/// created 0600 as well; this check holds however its mode is changed.
fn allowed_peer(conn: &UnixStream) -> Result<(), String> {
    let cred = freehint_qemu::socket_peer_cred(conn)
        .map_err(|e| format!("cannot tell who connected (SO_PEERCRED: {e})"))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let own = unsafe { libc::geteuid() };
    if cred.uid == own || cred.uid == 0 {
        Ok(())
    } else {
        Err(format!(
            "the control socket takes requests from uid {own} (the daemon's) or root only; pid {} runs as uid {}",
            cred.pid, cred.uid
        ))
    }
}

impl VmDaemon {
    pub(crate) fn serve_control(self: Arc<Self>, listener: UnixListener) {
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
        let Ok(mut writer) = conn.try_clone() else {
            return;
        };
        let reply = match allowed_peer(&conn) {
            Err(why) => {
                tracing::warn!("control request refused: {why}");
                ControlReply::Error {
                    message: format!("refused: {why}"),
                }
            }
            Ok(()) => {
                let mut line = String::new();
                if BufReader::new(conn).read_line(&mut line).is_err() {
                    return;
                }
                self.reply_to(&line)
            }
        };
        let mut out = serde_json::to_string(&reply).unwrap_or_else(|e| {
            format!(r#"{{"result":"error","message":"cannot encode the reply: {e}"}}"#)
        });
        out.push('\n');
        let _ = writer.write_all(out.as_bytes());
    }

    /// The reply to one request line.
    fn reply_to(&self, line: &str) -> ControlReply {
        match serde_json::from_str::<ControlRequest>(line) {
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
                        message: ErrorChain(&e).to_string(),
                    },
                    Err(_) => ControlReply::Error {
                        message: "internal error: the request handler panicked".into(),
                    },
                }
            }
        }
    }

    /// Carries out one control request.
    pub fn handle_request(&self, req: ControlRequest) -> Result<ControlReply, DaemonError> {
        match req {
            ControlRequest::Status => Ok(ControlReply::Status(self.status())),
            ControlRequest::Progress => Ok(ControlReply::Progress {
                progress: lock(&self.shared).progress.as_ref().map(|p| p.get()),
            }),
            ControlRequest::Migrate { to, params, guest } => {
                // A destination becomes a source once the guest runs here.
                if !self.hosts_guest.load(SeqCst) {
                    return Err(DaemonError::BadRequest(
                        "this daemon's QEMU does not run the guest (it waits for an incoming migration, or the guest moved away); ask the daemon of the QEMU that runs it".into(),
                    ));
                }
                params.validate().map_err(|e| {
                    DaemonError::BadRequest(format!("invalid parameters: {}", ErrorChain(&e)))
                })?;
                let dest = resolve(&to)?;
                let stats = self.migrate(dest, params, guest)?;
                Ok(ControlReply::Migrated { stats })
            }
            ControlRequest::Resume => self.resume(),
            ControlRequest::Cancel => {
                let sh = lock(&self.shared);
                let Some(token) = &sh.cancel else {
                    return Err(DaemonError::BadRequest("no migration is running".into()));
                };
                // Before the sender exists the migration is in its set-up.
                let phase = sh.migration_phase();
                if matches!(
                    phase,
                    Phase::Committed | Phase::Postcopy | Phase::PostcopyPaused | Phase::Completed
                ) {
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
            ControlRequest::PostcopyNow => {
                let sh = lock(&self.shared);
                let Some(flag) = &sh.postcopy_now else {
                    return Err(DaemonError::BadRequest(
                        "no hybrid migration is running (postcopy-now switches one started with --mode hybrid)".into(),
                    ));
                };
                let phase = sh.migration_phase();
                if !matches!(phase, Phase::Setup | Phase::Precopy) {
                    return Err(DaemonError::BadRequest(format!(
                        "too late to switch to postcopy: the migration is {phase}"
                    )));
                }
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
                Ok(ControlReply::Ok)
            }
            ControlRequest::PostcopyResume { to } => {
                let sh = lock(&self.shared);
                let Some(handle) = &sh.postcopy_resume else {
                    return Err(DaemonError::BadRequest(
                        "no migration is running here".into(),
                    ));
                };
                let phase = sh.migration_phase();
                if phase != Phase::PostcopyPaused {
                    return Err(DaemonError::BadRequest(format!(
                        "nothing to resume: the migration is {phase}, not a postcopy whose link broke"
                    )));
                }
                let to = match to {
                    None => None,
                    Some(t) => Some(resolve(&t)?),
                };
                handle.resume(to);
                Ok(ControlReply::Ok)
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
                return Err(DaemonError::BadRequest(ErrorChain(&e).to_string()));
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
                return Err(DaemonError::BadRequest(ErrorChain(&e).to_string()));
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
            tracing::debug!("requesting guest stats: {}", ErrorChain(&e));
        }
        let sh = lock(&self.shared);
        DaemonStatus {
            role: self.role().into(),
            state: sh.state,
            migration: sh.migration.as_ref().map(PhaseWatch::get),
            progress: sh.progress.as_ref().map(|p| p.get()),
            operator_action: sh.operator_action.clone(),
            last_cmd_id: self.last_cmd_id.load(SeqCst),
            qemu_connected: self.connected.load(SeqCst),
            balloon_driver_active: !self.handle.memory_table().is_empty(),
            last_error: sh.last_error.clone(),
            received: sh.received.clone(),
            balloon: serde_json::to_value(self.handle.status()).unwrap_or_default(),
        }
    }
}
