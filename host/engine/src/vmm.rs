//! [`ImageVmm`]: the destination VMM of a bare RAM image.

use std::time::Duration;

use freehint_types::{DestinationVmm, VmmError};

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
