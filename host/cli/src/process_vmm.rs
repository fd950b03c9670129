//! A [`Vmm`] for any process: stopped with SIGSTOP, resumed with SIGCONT.

use freehint_types::{Vmm, VmmError, VmmOp};

/// Why a signalled process could not be stopped or resumed.
#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    /// kill() failed.
    #[error("{signal} to process {pid}")]
    Kill {
        /// The signal's name.
        signal: &'static str,
        /// The process.
        pid: i32,
        /// The OS error.
        source: std::io::Error,
    },
    /// The process's threads could not be listed.
    #[error("process {pid} is gone")]
    Gone {
        /// The process.
        pid: i32,
        /// The OS error.
        source: std::io::Error,
    },
    /// Some thread still ran a second after SIGSTOP.
    #[error("process {0} did not stop within a second of SIGSTOP")]
    DidNotStop(i32),
}

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

    fn signal(&self, sig: i32, name: &'static str) -> Result<(), SignalError> {
        // SAFETY: kill() has no memory effects in this process.
        if unsafe { libc::kill(self.pid, sig) } != 0 {
            return Err(SignalError::Kill {
                signal: name,
                pid: self.pid,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    fn all_threads_stopped(&self) -> Result<bool, SignalError> {
        let dir = format!("/proc/{}/task", self.pid);
        let tasks = std::fs::read_dir(&dir).map_err(|source| SignalError::Gone {
            pid: self.pid,
            source,
        })?;
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
        let stopped = || {
            self.signal(libc::SIGSTOP, "SIGSTOP")?;
            // SIGSTOP is asynchronous: wait until every thread of the
            // process is stopped, since any of them may write guest RAM.
            for _ in 0..1000 {
                if self.all_threads_stopped()? {
                    return Ok(());
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Err(SignalError::DidNotStop(self.pid))
        };
        stopped().map_err(|e| VmmError::new(VmmOp::Stop, e))
    }

    fn resume(&self) -> Result<(), VmmError> {
        self.signal(libc::SIGCONT, "SIGCONT")
            .map_err(|e| VmmError::new(VmmOp::Resume, e))
    }

    fn device_state(&self) -> Result<Vec<u8>, VmmError> {
        Ok(Vec::new())
    }

    fn handed_over(&self) -> Result<(), VmmError> {
        Ok(())
    }
}
