//! Finding what a migration needs from the running QEMU: its QMP socket,
//! its RAM file, its userfaultfd (made by our preload library), and
//! whatever writes guest RAM where dirty tracking cannot see it.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use freehint_dirty_log::{DirtyLog, UffdWpDirtyLog};
use freehint_engine::vmm_ram_ranges;
use freehint_memory::GuestRam;
use freehint_qemu::{Qmp, QmpError};

use crate::sink::SharedDirtyLog;
use crate::{lock, DaemonError, VmDaemon};

impl VmDaemon {
    /// Refuses a VM whose RAM is written where dirty tracking cannot see
    /// it: O_DIRECT drives, other vhost-user backends, VFIO devices (QMP),
    /// and any other process that maps the RAM file.
    pub(crate) fn refuse_untracked_writers(
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
    pub(crate) fn dirty_log(
        &self,
        pid: i32,
        ram: &GuestRam,
    ) -> Result<SharedDirtyLog, DaemonError> {
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
}

/// `HOST:PORT` to one address.
pub(crate) fn resolve(to: &str) -> Result<SocketAddr, DaemonError> {
    to.to_socket_addrs()
        .map_err(|e| DaemonError::BadRequest(format!("destination {to:?}: {e}")))?
        .next()
        .ok_or_else(|| DaemonError::BadRequest(format!("destination {to:?} resolves to nothing")))
}

/// Connects to QMP, waiting for QEMU to create the socket.
pub(crate) fn wait_for_qmp(path: &Path) -> Result<Qmp, DaemonError> {
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
pub(crate) fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
    }
}
