//! The VM as the engine sees it on each side: QEMU (device state, stop,
//! resume) plus the state of freehint's own balloon backend, which QEMU
//! does not migrate (the poison value, the stats buffer the device holds,
//! the balloon's pages): both travel in one device-state blob.
//!
//! Blob layout (little endian): magic `FHDS`, version u16 (1), reserved
//! u16, balloon-state length u32, the balloon state (JSON), then QEMU's
//! device state.

use std::sync::Arc;
use std::time::Duration;

use freehint_balloon::{BalloonError, BalloonHandle, BalloonState};
use freehint_qemu::{QemuDestination, QemuVmm};
use freehint_types::{DestinationVmm, Vmm, VmmError, VmmOp};

const MAGIC: &[u8; 4] = b"FHDS";
const VERSION: u16 = 1;
const HEAD_BYTES: usize = 12;

/// A device-state blob that cannot be made or read.
#[derive(Debug, thiserror::Error)]
pub enum DeviceStateError {
    /// The blob does not start with the magic.
    #[error("not a freehint device-state blob")]
    NotABlob,
    /// A blob of another version.
    #[error("device-state blob version {found}, this build reads {VERSION}")]
    Version {
        /// The blob's version.
        found: u16,
    },
    /// The balloon state's length runs past the blob.
    #[error("the balloon state runs past the end of the device-state blob")]
    Truncated,
    /// The balloon state could not be encoded or decoded.
    #[error("balloon state (JSON)")]
    Json(#[from] serde_json::Error),
    /// The balloon backend refused the state.
    #[error("balloon state")]
    Balloon(#[from] BalloonError),
}

/// Packs QEMU's device state and the balloon's state into one blob.
pub fn encode(qemu: &[u8], balloon: &BalloonState) -> Result<Vec<u8>, DeviceStateError> {
    let b = serde_json::to_vec(balloon)?;
    let mut out = Vec::with_capacity(HEAD_BYTES + b.len() + qemu.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(&b);
    out.extend_from_slice(qemu);
    Ok(out)
}

/// Splits a blob made by [`encode`] into QEMU's device state and the
/// balloon's state.
pub fn decode(blob: &[u8]) -> Result<(&[u8], BalloonState), DeviceStateError> {
    if blob.len() < HEAD_BYTES || &blob[0..4] != MAGIC {
        return Err(DeviceStateError::NotABlob);
    }
    let version = u16::from_le_bytes([blob[4], blob[5]]);
    if version != VERSION {
        return Err(DeviceStateError::Version { found: version });
    }
    let len = u32::from_le_bytes([blob[8], blob[9], blob[10], blob[11]]) as usize;
    let balloon_end = HEAD_BYTES
        .checked_add(len)
        .filter(|&e| e <= blob.len())
        .ok_or(DeviceStateError::Truncated)?;
    let balloon: BalloonState = serde_json::from_slice(&blob[HEAD_BYTES..balloon_end])?;
    Ok((&blob[balloon_end..], balloon))
}

/// The source: QEMU, and the balloon whose state goes along.
pub struct SourceVm {
    /// The source QEMU.
    pub qemu: Arc<QemuVmm>,
    /// Its balloon backend.
    pub balloon: BalloonHandle,
}

impl Vmm for SourceVm {
    fn stop(&self) -> Result<(), VmmError> {
        self.qemu.stop()
    }

    fn resume(&self) -> Result<(), VmmError> {
        self.qemu.resume()
    }

    fn device_state(&self) -> Result<Vec<u8>, VmmError> {
        // QEMU stopped the device (GET_VRING_BASE) before `stop` returned,
        // and the backend finished every chain before answering: its state
        // is final.
        let qemu = self.qemu.device_state()?;
        encode(&qemu, &self.balloon.export_state())
            .map_err(|e| VmmError::new(VmmOp::SaveDeviceState, e))
    }

    fn device_state_estimate_bytes(&self) -> Result<Option<u64>, VmmError> {
        Ok(self
            .qemu
            .device_state_estimate_bytes()?
            .map(|b| b + (64 << 10)))
    }

    fn handed_over(&self) -> Result<(), VmmError> {
        self.qemu.handed_over()
    }
}

/// The destination: QEMU (started with `-incoming defer`), its balloon
/// backend, and whether to resume the guest once committed.
pub struct DestinationVm {
    /// The destination QEMU.
    pub qemu: Arc<QemuDestination>,
    /// Its balloon backend.
    pub balloon: BalloonHandle,
    /// Resume after the commit (otherwise wait for `freehint resume`).
    pub resume: bool,
    /// The QEMU process whose userfaultfd postcopy uses, if it has one.
    pub postcopy_pid: Option<i32>,
}

impl DestinationVmm for DestinationVm {
    fn load_device_state(&self, blob: &[u8], timeout: Duration) -> Result<(), VmmError> {
        let failed = |e: DeviceStateError| VmmError::new(VmmOp::LoadDeviceState, e);
        let (qemu, balloon) = decode(blob).map_err(failed)?;
        self.qemu.load_device_state(qemu, timeout)?;
        self.balloon
            .import_state(&balloon)
            .map_err(|e| failed(e.into()))
    }

    fn resume(&self) -> Result<(), VmmError> {
        if self.resume {
            self.qemu.resume()
        } else {
            tracing::info!("guest received; left paused (--no-resume)");
            Ok(())
        }
    }

    fn postcopy_pid(&self) -> Option<i32> {
        self.postcopy_pid
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_round_trip_and_bad_ones_are_refused() {
        let state: BalloonState = serde_json::from_str(
            r#"{"version":1,"num_pages_4k":0,"actual_pages_4k":0,"poison_val":170,
                "free_page_hint_cmd_id":1,"held_stats_head":3,"inflated_pfns_4k":[],
                "guest_stats":{"by_tag":{},"updates":0},"cmd_id_fences":[]}"#,
        )
        .unwrap();
        let blob = encode(b"qemu-state", &state).unwrap();
        let (qemu, back) = decode(&blob).unwrap();
        assert_eq!(qemu, b"qemu-state");
        assert_eq!(back, state);
        assert!(decode(b"QEVM").is_err());
        let mut bad = blob.clone();
        bad[4] = 9;
        assert!(decode(&bad).unwrap_err().to_string().contains("version 9"));
        let mut long = blob[..HEAD_BYTES].to_vec();
        long[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode(&long), Err(DeviceStateError::Truncated)));
    }
}
