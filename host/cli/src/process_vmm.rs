//! A [`Vmm`] for any process: stopped with SIGSTOP, resumed with SIGCONT.

use freehint_engine::{Vmm, VmmError};

/// Stops and resumes a VMM process with signals. The device state is empty:
/// this suits processes whose whole state is their RAM file.
#[derive(Debug)]
pub struct SignalVmm {
    pid: i32,
}

impl SignalVmm {
    /// For process `pid`.
    pub fn new(pid: i32) -> Self {
        Self { pid }
    }

    fn signal(&self, sig: i32, name: &str) -> Result<(), VmmError> {
        // SAFETY: kill() has no memory effects in this process.
        if unsafe { libc::kill(self.pid, sig) } != 0 {
            return Err(VmmError(format!(
                "{name} to process {}: {}",
                self.pid,
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }

    fn all_threads_stopped(&self) -> Result<bool, VmmError> {
        let dir = format!("/proc/{}/task", self.pid);
        let tasks = std::fs::read_dir(&dir)
            .map_err(|e| VmmError(format!("process {} is gone: {e}", self.pid)))?;
        for t in tasks.flatten() {
            // A thread that exited meanwhile has no stat: it writes nothing.
            let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
                continue;
            };
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|s| s.split_whitespace().next());
            if !matches!(state, Some("T") | Some("t")) {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

impl Vmm for SignalVmm {
    fn stop(&self) -> Result<(), VmmError> {
        self.signal(libc::SIGSTOP, "SIGSTOP")?;
        // SIGSTOP is asynchronous: wait until every thread of the process
        // is stopped, since any of them may write guest RAM.
        for _ in 0..1000 {
            if self.all_threads_stopped()? {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Err(VmmError(format!("process {} did not stop", self.pid)))
    }

    fn resume(&self) -> Result<(), VmmError> {
        self.signal(libc::SIGCONT, "SIGCONT")
    }

    fn device_state(&self) -> Result<Vec<u8>, VmmError> {
        Ok(Vec::new())
    }

    fn handed_over(&self) -> Result<(), VmmError> {
        Ok(())
    }
}
