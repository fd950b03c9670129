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
    /// The device state to hand to the destination (may be empty).
    fn device_state(&self) -> Result<Vec<u8>, VmmError>;
    /// The destination runs the guest now: release the source.
    fn handed_over(&self) -> Result<(), VmmError>;
}

/// The destination VM, as the receiver needs it.
pub trait DestinationVmm: Send + Sync {
    /// Loads device state received from the source.
    fn load_device_state(&self, state: &[u8]) -> Result<(), VmmError>;
    /// Starts the guest: all RAM has been placed.
    fn resume(&self) -> Result<(), VmmError>;
}

/// A destination with no devices, whose RAM is just the file the receiver
/// writes (a bare RAM image, as the simulated VM's bench uses it).
#[derive(Debug, Default)]
pub struct NoDeviceVmm;

impl DestinationVmm for NoDeviceVmm {
    fn load_device_state(&self, state: &[u8]) -> Result<(), VmmError> {
        if state.is_empty() {
            Ok(())
        } else {
            Err(VmmError(format!(
                "this destination has no devices but got {} bytes of device state",
                state.len()
            )))
        }
    }

    fn resume(&self) -> Result<(), VmmError> {
        Ok(())
    }
}
