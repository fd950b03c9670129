//! The destination side: the incoming loop, one migration received at a
//! time into the destination QEMU's RAM.

use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::Duration;

use freehint_engine::{CancellationToken, Phase, Receiver};
use freehint_memory::GuestRam;
use freehint_qemu::{QemuDestination, QmpError};

use crate::discovery::wait_for_qmp;
use crate::{io, lock, vm, DaemonError, DaemonState, VmDaemon};
use freehint_types::ErrorChain;

impl VmDaemon {
    /// Takes incoming migrations until one completes, the destination QEMU
    /// has consumed its `-incoming defer` (it loaded device state: it can
    /// take no other attempt), or the daemon shuts down.
    pub(crate) fn incoming_loop(self: Arc<Self>, listener: std::net::TcpListener) {
        while !self.stopping.load(SeqCst) {
            let result = {
                let _busy = lock(&self.busy);
                self.receive_once(&listener)
            };
            match result {
                Ok(Again::No) => return,
                Ok(Again::Yes) => continue,
                Err(e) => {
                    tracing::error!("incoming migration: {}", ErrorChain(&e));
                    {
                        let mut sh = lock(&self.shared);
                        sh.state = DaemonState::Failed;
                        sh.last_error = Some(ErrorChain(&e).to_string());
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
        let postcopy_pid = postcopy_pid(&qmp);
        let qemu = Arc::new(QemuDestination::new(
            qmp,
            self.cfg.state_dir.join("destination.state"),
        )?);
        let vmm = Arc::new(vm::DestinationVm {
            qemu: qemu.clone(),
            balloon: self.handle.clone(),
            resume: self.cfg.resume,
            postcopy_pid,
        });
        let cancel = CancellationToken::new();
        let mut receiver = Receiver::new(ram, vmm, None)
            .preallocate(self.cfg.preallocate)
            .with_cancel_token(cancel.clone())
            .with_tls(self.cfg.tls.clone());
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
        // Until the last page has arrived (postcopy), the balloon backend
        // must not read guest RAM through its own mapping: a page still to
        // come would read as zeros and stay zeros. The device starts only
        // when the guest resumes, so holding it for the whole receive costs
        // nothing in precopy.
        self.handle.pause_memory_access();
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
        if result.is_ok() || !stats.postcopy.switched {
            self.handle.resume_memory_access();
        } else {
            // Pages are missing for good unless the source sends them: the
            // guest waits on its faults, and so does the balloon.
            tracing::warn!("postcopy broke: the balloon device stays paused with the guest");
        }
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

/// The destination QEMU's pid if postcopy can place pages in its RAM: it
/// holds a userfaultfd (started with the preload library). Otherwise the
/// receiver refuses postcopy with the reason.
fn postcopy_pid(qmp: &freehint_qemu::Qmp) -> Option<i32> {
    let pid = qmp
        .peer_pid()
        .map_err(|e| tracing::warn!("postcopy not offered: the destination QEMU's pid: {e}"))
        .ok()?;
    match freehint_dirty_log::find_placement_userfaultfd(pid) {
        Ok(_) => Some(pid),
        Err(e) => {
            tracing::info!("postcopy not offered: {e} (start QEMU with the preload library, see `freehint qemu-args`)");
            None
        }
    }
}

/// Whether the incoming loop may take another attempt.
pub(crate) enum Again {
    Yes,
    No,
}
