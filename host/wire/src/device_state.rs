//! How the VMM's device state crosses the wire.

use crate::{malformed, WireError, MAX_DEVICE_STATE_BYTES};

/// zstd's fastest level: about 600 MB/s on this project's test machine,
/// and a QEMU device state shrinks 2.4× at it.
const ZSTD_LEVEL: i32 = 1;

/// The encoding of the bytes the [`DeviceStateChunk`](crate::Message::DeviceStateChunk)s
/// carry, named by [`Complete`](crate::Message::Complete).
///
/// The device state crosses while the guest is stopped, so its size on the
/// wire is downtime: a QEMU PC guest's is about 340 KB (2.7 ms at 1 Gbit/s)
/// and mostly firmware and padding. [`Zstd`](Self::Zstd) is worth it on a
/// slow link; on a fast one compressing costs more than it saves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceStateEncoding {
    /// The state as the VMM gave it.
    #[default]
    Raw,
    /// One zstd frame.
    Zstd,
}

impl DeviceStateEncoding {
    pub(crate) fn to_u32(self) -> u32 {
        match self {
            Self::Raw => 0,
            Self::Zstd => 1,
        }
    }

    pub(crate) fn from_u32(v: u32) -> Result<Self, WireError> {
        match v {
            0 => Ok(Self::Raw),
            1 => Ok(Self::Zstd),
            other => Err(malformed(
                "completion",
                format!("unknown device state encoding {other}"),
            )),
        }
    }

    /// `state` encoded for the wire.
    pub fn encode(self, state: &[u8]) -> Result<Vec<u8>, WireError> {
        match self {
            Self::Raw => Ok(state.to_vec()),
            Self::Zstd => zstd::bulk::compress(state, ZSTD_LEVEL)
                .map_err(|e| malformed("device state", format!("compressing: {e}"))),
        }
    }

    /// Decodes the bytes received into the state, which must be exactly
    /// `state_bytes` long (at most [`MAX_DEVICE_STATE_BYTES`]): a peer
    /// cannot make this allocate more than that.
    pub fn decode(self, wire: Vec<u8>, state_bytes: u64) -> Result<Vec<u8>, WireError> {
        if state_bytes > MAX_DEVICE_STATE_BYTES {
            return Err(malformed(
                "device state",
                format!("{state_bytes} bytes (at most {MAX_DEVICE_STATE_BYTES})"),
            ));
        }
        let state = match self {
            Self::Raw => wire,
            Self::Zstd => zstd::bulk::decompress(&wire, state_bytes as usize)
                .map_err(|e| malformed("device state", format!("zstd: {e}")))?,
        };
        if state.len() as u64 != state_bytes {
            return Err(malformed(
                "device state",
                format!(
                    "the source announced {state_bytes} bytes and sent {}",
                    state.len()
                ),
            ));
        }
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_encodings_round_trip_and_check_the_length() {
        let state: Vec<u8> = (0..300_000u32).map(|i| (i / 1000) as u8).collect();
        for enc in [DeviceStateEncoding::Raw, DeviceStateEncoding::Zstd] {
            let wire = enc.encode(&state).unwrap();
            assert_eq!(enc.decode(wire.clone(), 300_000).unwrap(), state);
            let e = enc.decode(wire, 299_999).unwrap_err();
            assert!(e.to_string().contains("device state"), "{e}");
        }
        let small = DeviceStateEncoding::Zstd.encode(&state).unwrap();
        assert!(small.len() < state.len() / 10, "{} bytes", small.len());
    }

    #[test]
    fn garbage_and_bombs_are_refused() {
        let e = DeviceStateEncoding::Zstd
            .decode(vec![1, 2, 3, 4, 5], 5)
            .unwrap_err();
        assert!(e.to_string().contains("zstd"), "{e}");
        // 64 MiB of zeros in a few KB: refused beyond the announced size.
        let bomb = DeviceStateEncoding::Zstd
            .encode(&vec![0u8; 64 << 20])
            .unwrap();
        assert!(DeviceStateEncoding::Zstd.decode(bomb, 1 << 20).is_err());
        assert!(DeviceStateEncoding::Raw
            .decode(Vec::new(), MAX_DEVICE_STATE_BYTES + 1)
            .is_err());
        assert!(DeviceStateEncoding::from_u32(2).is_err());
    }
}
