use std::time::Duration;

/// An error from the VMM.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct VmmError(pub String);

/// The source VM, as the sender needs it for switchover.
pub trait Vmm: Send + Sync {
    /// Stops the guest's vCPUs (and anything else that writes guest RAM).
    /// After this returns, guest RAM no longer changes.
    fn stop(&self) -> Result<(), VmmError>;
    /// Resumes the guest after a failed migration.
    fn resume(&self) -> Result<(), VmmError>;
    /// The device state to hand to the destination (may be empty). Called
    /// with the VM stopped.
    fn device_state(&self) -> Result<Vec<u8>, VmmError>;
    /// An upper estimate of [`Self::device_state`]'s size, taken while the
    /// VM still runs, so that a state too large to migrate is refused
    /// before the guest is stopped. `None` if the VMM cannot tell.
    fn device_state_estimate_bytes(&self) -> Result<Option<u64>, VmmError> {
        Ok(None)
    }
    /// The destination runs the guest now: release the source.
    fn handed_over(&self) -> Result<(), VmmError>;
}

/// The destination VM, as the receiver needs it.
pub trait DestinationVmm: Send + Sync {
    /// Loads device state received from the source, within `timeout`
    /// (the migration's peer timeout, which both sides share).
    fn load_device_state(&self, state: &[u8], timeout: Duration) -> Result<(), VmmError>;
    /// Starts the guest: all RAM has been placed.
    fn resume(&self) -> Result<(), VmmError>;
}

/// A destination whose VM is its RAM file and an opaque device-state blob
/// (a bare RAM image, as `freehint receive` and the simulated VM's bench
/// use it): loading keeps the blob, resuming just records that it ran.
#[derive(Debug, Default)]
pub struct ImageVmm {
    state: std::sync::Mutex<Option<Vec<u8>>>,
    running: std::sync::atomic::AtomicBool,
}

impl ImageVmm {
    /// The device state loaded, if any.
    pub fn device_state(&self) -> Option<Vec<u8>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether the VM was resumed.
    pub fn running(&self) -> bool {
        self.running.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl DestinationVmm for ImageVmm {
    fn load_device_state(&self, state: &[u8], _timeout: Duration) -> Result<(), VmmError> {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = Some(state.to_vec());
        Ok(())
    }

    fn resume(&self) -> Result<(), VmmError> {
        self.running
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}
