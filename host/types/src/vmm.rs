//! The VMM, as the engine needs it: stop, resume, device state.

use std::fmt;
use std::time::Duration;

use crate::BoxError;

/// An operation of a [`Vmm`] or [`DestinationVmm`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmmOp {
    /// [`Vmm::stop`].
    Stop,
    /// [`Vmm::resume`] or [`DestinationVmm::resume`].
    Resume,
    /// [`Vmm::device_state`].
    SaveDeviceState,
    /// [`Vmm::device_state_estimate_bytes`].
    EstimateDeviceState,
    /// [`Vmm::handed_over`].
    HandOver,
    /// [`DestinationVmm::load_device_state`].
    LoadDeviceState,
}

impl fmt::Display for VmmOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VmmOp::Stop => "stop the VM",
            VmmOp::Resume => "resume the VM",
            VmmOp::SaveDeviceState => "save the device state",
            VmmOp::EstimateDeviceState => "estimate the device state's size",
            VmmOp::HandOver => "release the source VM",
            VmmOp::LoadDeviceState => "load the device state",
        })
    }
}

/// An error from the VMM: `op` failed, for the reason in `source` (the
/// implementation's own error type).
#[derive(Debug, thiserror::Error)]
#[error("could not {op}")]
pub struct VmmError {
    /// What the VMM was asked to do.
    pub op: VmmOp,
    /// Why it could not.
    #[source]
    pub source: BoxError,
}

impl VmmError {
    /// `op` failed because of `source`.
    pub fn new(op: VmmOp, source: impl Into<BoxError>) -> Self {
        Self {
            op,
            source: source.into(),
        }
    }
}

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
    /// Starts the guest: all RAM has been placed, or (postcopy) the RAM
    /// still to come is registered for missing faults.
    fn resume(&self) -> Result<(), VmmError>;
    /// The process whose address space maps guest RAM and holds a
    /// userfaultfd the receiver may take (the preload library's), for
    /// postcopy: the guest then runs before all its RAM has arrived.
    /// `None` (the default): this VMM cannot run a guest with RAM missing.
    fn postcopy_pid(&self) -> Option<i32> {
        None
    }
}
