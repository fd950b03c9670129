//! The source side: one outgoing migration of this daemon's VM at a time.

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::Duration;

use freehint_dirty_log::CombinedDirtyLog;
use freehint_engine::{
    empty_bitmap, CancellationToken, MigrateError, MigrationParams, MigrationStats, Phase,
    PrecopySender,
};
use freehint_hint_filter::HintFilter;
use freehint_memory::GuestRam;
use freehint_qemu::{QemuVmm, Qmp};
use freehint_types::{CmdId, ErrorChain, HintSource};

use crate::agent::AgentLink;
use crate::control::GuestPrepare;

/// How long the guest may take to drop its caches and compact its memory.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(120);
use crate::discovery::process_alive;
use crate::sink::UsedRingLog;
use crate::{io, lock, vm, DaemonError, DaemonState, GpaMap, VmDaemon};

impl VmDaemon {
    /// The guest agent, connected, if this VM has one and it answers; the
    /// reason it is not used goes to the log (the balloon hints instead).
    fn connect_agent(&self, map: &GpaMap) -> Option<Arc<AgentLink>> {
        let path = self.cfg.agent_socket.as_ref()?;
        // The agent speaks 4 KiB guest pages (AgentLink::connect checks).
        let max_pages = map.mapped_bytes() / 4096;
        match AgentLink::connect(path, self.slot.clone(), max_pages, 0) {
            Ok(a) => Some(Arc::new(a)),
            Err(e) => {
                tracing::warn!(
                    "not using the guest agent: {}; the balloon driver hints instead",
                    ErrorChain(&e)
                );
                None
            }
        }
    }

    pub(crate) fn finish_hints(&self) {
        // The guest holds the blocks it hinted until it reads DONE.
        if let Err(e) = self.handle.finish() {
            tracing::warn!(
                "could not tell the guest that migration is over (DONE): {}",
                ErrorChain(&e)
            );
        }
    }

    /// Migrates the VM to the destination daemon at `dest`. On error the
    /// source guest runs again, unless the error says otherwise (its QEMU
    /// died, or the handover's outcome is uncertain).
    pub fn migrate(
        &self,
        dest: SocketAddr,
        params: MigrationParams,
        guest: GuestPrepare,
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
            sh.progress = None;
        }
        if self.stopping.load(SeqCst) {
            cancel.cancel();
        }
        self.set_state(DaemonState::Migrating);
        // QEMU's pid as the vhost-user socket saw it; QMP's confirms it.
        let mut pid = Some(self.vhost_peer_pid.load(SeqCst)).filter(|&p| p > 0);
        let result = self.migrate_inner(dest, params, guest, cancel, &mut pid);
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
                        "the source QEMU (pid {pid}) exited during the migration: the guest is gone on the source ({})",
                        ErrorChain(&e)
                    )),
                    _ => e,
                };
                sh.state = DaemonState::Failed;
                sh.last_error = Some(ErrorChain(&e).to_string());
                Err(e)
            }
        };
        result
    }

    fn migrate_inner(
        &self,
        dest: SocketAddr,
        params: MigrationParams,
        guest: GuestPrepare,
        cancel: CancellationToken,
        pid_out: &mut Option<i32>,
    ) -> Result<MigrationStats, DaemonError> {
        if cancel.is_cancelled() {
            return Err(MigrateError::Cancelled.into());
        }
        if guest.any() && !params.hints {
            return Err(DaemonError::BadRequest(
                "--guest-drop-caches and --guest-compact make memory free for the hints to skip; they need --hints on".into(),
            ));
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
        // The agent when it answers, else the balloon.
        let agent = if params.hints {
            self.connect_agent(&map)
        } else {
            None
        };
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
        let prepared = match (&agent, guest.any()) {
            (_, false) => None,
            (None, true) => {
                return Err(DaemonError::BadRequest(format!(
                    "--guest-drop-caches and --guest-compact need freehint-agent in the guest, and it {}",
                    if self.cfg.agent_socket.is_some() {
                        "did not answer on --agent-socket (see the daemon's log)"
                    } else {
                        "needs `freehint vm --agent-socket` (see guest-driver/README.md)"
                    }
                )))
            }
            (Some(a), true) => {
                let p = a
                    .prepare(guest.drop_caches, guest.compact, PREPARE_TIMEOUT)
                    .map_err(|e| DaemonError::BadRequest(ErrorChain(&e).to_string()))?;
                tracing::info!(
                    took_ms = p.took.as_millis() as u64,
                    freed_bytes = p.freed_bytes,
                    drop_caches = guest.drop_caches,
                    compact = guest.compact,
                    "the guest prepared"
                );
                Some(p)
            }
        };
        let hint_source: Option<Arc<dyn HintSource>> = match (&agent, params.hints) {
            (Some(a), _) => Some(a.clone()),
            (None, true) => Some(Arc::new(self.handle.clone())),
            (None, false) => None,
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
        let hybrid = params.mode == freehint_engine::MigrationMode::Hybrid;
        let sender =
            PrecopySender::new(ram, filter.clone(), Box::new(log), hint_source, vmm, params)?
                .with_cancel_token(cancel)
                .with_tls(self.cfg.tls.clone());
        {
            let mut sh = lock(&self.shared);
            sh.migration = Some(sender.phase_watch());
            sh.progress = Some(sender.progress_watch());
            sh.postcopy_now = (hybrid).then(|| sender.postcopy_now_flag());
            sh.postcopy_resume = Some(sender.postcopy_resume_handle());
        }
        let mut result = self.runtime.block_on(sender.migrate(dest));
        if let Some(p) = prepared {
            let stats = match &mut result {
                Ok(stats) => stats,
                Err(failure) => &mut failure.stats,
            };
            stats.guest_prepare_ms = Some(p.took.as_millis() as u64);
            stats.guest_prepare_freed_bytes = Some(p.freed_bytes);
        }
        {
            let mut sh = lock(&self.shared);
            sh.postcopy_now = None;
            sh.postcopy_resume = None;
        }
        self.last_cmd_id.store(filter.last_cmd_id().0, SeqCst);
        if let Some(a) = &agent {
            tracing::info!(stats = ?a.stats(), "the guest agent's part in this migration");
        }
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
}
