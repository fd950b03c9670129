//! The virtio-balloon config space: four little-endian u32s.

use serde::Serialize;

/// Size of the config space in bytes.
pub const CONFIG_SIZE: usize = 16;

/// Byte offset of `num_pages` (device-owned).
pub const OFF_NUM_PAGES: usize = 0;
/// Byte offset of `actual` (driver-owned).
pub const OFF_ACTUAL: usize = 4;
/// Byte offset of `free_page_hint_cmd_id` (device-owned).
pub const OFF_CMD_ID: usize = 8;
/// Byte offset of `poison_val` (driver-owned).
pub const OFF_POISON_VAL: usize = 12;

/// The device config space.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ConfigSpace {
    /// Target balloon size in 4 KiB pages, set by the host.
    pub num_pages: u32,
    /// Current balloon size in 4 KiB pages, written by the guest.
    pub actual: u32,
    /// Free page hint command id, set by the host.
    pub free_page_hint_cmd_id: u32,
    /// Page poison value, written by the guest.
    pub poison_val: u32,
}

/// Why a config write was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConfigWriteError {
    /// The write does not lie within the 16 bytes, or is empty.
    #[error("config write at offset {offset} of {len} bytes is outside the {CONFIG_SIZE}-byte config space")]
    OutOfRange {
        /// Offset of the write.
        offset: u32,
        /// Length of the write.
        len: usize,
    },
}

impl ConfigSpace {
    /// The little-endian byte image of the config space.
    pub fn to_bytes(&self) -> [u8; CONFIG_SIZE] {
        let mut b = [0u8; CONFIG_SIZE];
        b[OFF_NUM_PAGES..OFF_NUM_PAGES + 4].copy_from_slice(&self.num_pages.to_le_bytes());
        b[OFF_ACTUAL..OFF_ACTUAL + 4].copy_from_slice(&self.actual.to_le_bytes());
        b[OFF_CMD_ID..OFF_CMD_ID + 4].copy_from_slice(&self.free_page_hint_cmd_id.to_le_bytes());
        b[OFF_POISON_VAL..OFF_POISON_VAL + 4].copy_from_slice(&self.poison_val.to_le_bytes());
        b
    }

    /// Reads `size` bytes at `offset`; bytes past the end read as nothing
    /// (the result is truncated), an offset past the end gives an empty
    /// vector.
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let bytes = self.to_bytes();
        let start = (offset as usize).min(CONFIG_SIZE);
        let end = start.saturating_add(size as usize).min(CONFIG_SIZE);
        bytes[start..end].to_vec()
    }

    /// The driver-owned fields (`actual`, `poison_val`) after writing `buf`
    /// at `offset`. Bytes that land on device-owned fields are ignored:
    /// QEMU's generic vhost-user device writes back the whole 16 bytes on
    /// any guest write, with its cached copy of the device fields.
    pub fn written_fields(&self, offset: u32, buf: &[u8]) -> Result<(u32, u32), ConfigWriteError> {
        let start = offset as usize;
        let end = start.checked_add(buf.len());
        match end {
            Some(end) if !buf.is_empty() && end <= CONFIG_SIZE => {
                let mut bytes = self.to_bytes();
                bytes[start..end].copy_from_slice(buf);
                let le = |o: usize| {
                    u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]])
                };
                Ok((le(OFF_ACTUAL), le(OFF_POISON_VAL)))
            }
            _ => Err(ConfigWriteError::OutOfRange {
                offset,
                len: buf.len(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_four_le32() {
        let c = ConfigSpace {
            num_pages: 0x0403_0201,
            actual: 5,
            free_page_hint_cmd_id: 7,
            poison_val: 0xaa,
        };
        let b = c.to_bytes();
        assert_eq!(&b[0..4], &[1, 2, 3, 4]);
        assert_eq!(b[4], 5);
        assert_eq!(b[8], 7);
        assert_eq!(b[12], 0xaa);
        assert_eq!(c.read(8, 4), vec![7, 0, 0, 0]);
        assert_eq!(c.read(14, 8).len(), 2);
        assert!(c.read(99, 4).is_empty());
    }

    #[test]
    fn writes_only_change_driver_fields() {
        let c = ConfigSpace {
            num_pages: 100,
            actual: 0,
            free_page_hint_cmd_id: 9,
            poison_val: 0,
        };
        let mut full = [0u8; 16];
        full[4..8].copy_from_slice(&42u32.to_le_bytes());
        full[12..16].copy_from_slice(&0x55u32.to_le_bytes());
        assert_eq!(c.written_fields(0, &full), Ok((42, 0x55)));
        assert_eq!(c.written_fields(4, &7u32.to_le_bytes()), Ok((7, 0)));
        assert!(c.written_fields(14, &[0; 4]).is_err());
        assert!(c.written_fields(4, &[]).is_err());
        assert!(c.written_fields(u32::MAX, &[0]).is_err());
    }
}
