//! Guest-physical addresses to RAM-file offsets.
//!
//! The engine addresses QEMU's guest RAM by offset in its memory-backend
//! file (one region at address 0): that layout is the same on both ends
//! whatever the machine's memory map. The guest speaks guest-physical
//! addresses; the vhost-user memory table QEMU sent the balloon backend says
//! where each guest-physical range lives in the file (on x86 the RAM above
//! 4 GiB continues the file where the RAM below the PCI hole stopped).

use freehint_balloon::MemoryTableRegion;
use freehint_types::{GpaRange, RamRange};

/// One guest-physical range and where it lives in the RAM file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    gpa_start: u64,
    len_bytes: u64,
    file_offset_bytes: u64,
}

/// Translates guest-physical ranges into RAM ranges (offsets in the RAM
/// file): the one place where the guest's address space meets the
/// engine's.
///
/// # Examples
///
/// A q35 machine with 4 GiB: 2 GiB below the PCI hole, 2 GiB above 4 GiB,
/// which continues the RAM file where the low part stopped.
///
/// ```
/// use freehint_balloon::MemoryTableRegion;
/// use freehint_daemon::GpaMap;
/// use freehint_types::{GpaRange, RamRange};
///
/// const GIB: u64 = 1 << 30;
/// let region = |gpa_start, size_bytes, file_offset_bytes| MemoryTableRegion {
///     gpa_start,
///     size_bytes,
///     file_offset_bytes,
///     file_dev: 1,
///     file_ino: 7,
/// };
/// let map = GpaMap::new(
///     &[region(0, 2 * GIB, 0), region(4 * GIB, 2 * GIB, 2 * GIB)],
///     1,
///     7,
///     4 * GIB,
/// );
///
/// let mut ram = Vec::new();
/// // A hint just below the hole and one just above 4 GiB.
/// assert!(map.translate(GpaRange::new(2 * GIB - 4096, 4096), &mut ram));
/// assert!(map.translate(GpaRange::new(4 * GIB, 4096), &mut ram));
/// assert_eq!(ram, [RamRange::new(2 * GIB - 4096, 4096), RamRange::new(2 * GIB, 4096)]);
///
/// // A range in the hole is refused whole.
/// assert!(!map.translate(GpaRange::new(3 * GIB, 4096), &mut ram));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GpaMap {
    segments: Vec<Segment>,
    file_bytes: u64,
}

impl GpaMap {
    /// The part of `table` that maps the file `(dev, ino)` of `file_bytes`
    /// bytes; regions of other files and parts past the file's end are left
    /// out.
    pub fn new(table: &[MemoryTableRegion], dev: u64, ino: u64, file_bytes: u64) -> Self {
        let mut segments: Vec<Segment> = table
            .iter()
            .filter(|r| r.file_dev == dev && r.file_ino == ino)
            .filter_map(|r| {
                let end = r
                    .file_offset_bytes
                    .checked_add(r.size_bytes)?
                    .min(file_bytes);
                (end > r.file_offset_bytes).then_some(Segment {
                    gpa_start: r.gpa_start,
                    len_bytes: end - r.file_offset_bytes,
                    file_offset_bytes: r.file_offset_bytes,
                })
            })
            .collect();
        segments.sort_by_key(|s| s.gpa_start);
        Self {
            segments,
            file_bytes,
        }
    }

    /// Whether no guest-physical range maps the file.
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// Bytes of the file the map covers.
    pub fn mapped_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len_bytes).sum()
    }

    /// The file ranges of `range`, pushed to `out`. Returns `false` (and
    /// pushes nothing) if any part of `range` is outside the map or the
    /// range wraps: a guest range is used whole or not at all.
    pub fn translate(&self, range: GpaRange, out: &mut Vec<RamRange>) -> bool {
        let Some(end) = range.end() else {
            return false;
        };
        if range.len_bytes == 0 {
            return false;
        }
        let mark = out.len();
        let mut pos = range.start;
        while pos < end {
            // The segment holding `pos`: the last one starting at or before it.
            let idx = self.segments.partition_point(|s| s.gpa_start <= pos);
            let Some(seg) = idx.checked_sub(1).map(|i| self.segments[i]) else {
                out.truncate(mark);
                return false;
            };
            let seg_end = seg.gpa_start + seg.len_bytes;
            if pos >= seg_end {
                out.truncate(mark);
                return false;
            }
            let take = end.min(seg_end) - pos;
            out.push(RamRange::new(
                seg.file_offset_bytes + (pos - seg.gpa_start),
                take,
            ));
            pos += take;
        }
        debug_assert!(out[mark..]
            .iter()
            .all(|r| r.start + r.len_bytes <= self.file_bytes));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GIB: u64 = 1 << 30;

    fn region(gpa: u64, size: u64, off: u64, ino: u64) -> MemoryTableRegion {
        MemoryTableRegion {
            gpa_start: gpa,
            size_bytes: size,
            file_offset_bytes: off,
            file_dev: 1,
            file_ino: ino,
        }
    }

    /// q35 with 4 GiB: 2 GiB below the hole, 2 GiB at 4 GiB.
    fn q35() -> GpaMap {
        GpaMap::new(
            &[
                region(4 * GIB, 2 * GIB, 2 * GIB, 7),
                region(0, 0xa0000, 0, 7),
                region(0xc0000, 2 * GIB - 0xc0000, 0xc0000, 7),
                region(0xfffc0000, 0x40000, 0, 99), // the BIOS, another file
            ],
            1,
            7,
            4 * GIB,
        )
    }

    #[test]
    fn high_memory_continues_the_file() {
        let m = q35();
        let mut out = Vec::new();
        assert!(m.translate(GpaRange::new(4 * GIB + 4096, 8192), &mut out));
        assert_eq!(out, vec![RamRange::new(2 * GIB + 4096, 8192)]);
        assert_eq!(m.mapped_bytes(), 4 * GIB - 0x20000);
    }

    #[test]
    fn holes_and_other_files_are_refused_whole() {
        let m = q35();
        let mut out = vec![RamRange::new(1, 1)];
        // Crosses the VGA hole.
        assert!(!m.translate(GpaRange::new(0x9f000, 0x2000), &mut out));
        // The PCI hole / BIOS file.
        assert!(!m.translate(GpaRange::new(0xfffc0000, 4096), &mut out));
        // Past the end, empty, wrapping.
        assert!(!m.translate(GpaRange::new(6 * GIB, 4096), &mut out));
        assert!(!m.translate(GpaRange::new(4096, 0), &mut out));
        assert!(!m.translate(GpaRange::new(u64::MAX - 10, 4096), &mut out));
        assert_eq!(out, vec![RamRange::new(1, 1)], "nothing pushed");
    }

    #[test]
    fn a_range_over_two_adjacent_segments_is_split() {
        let m = GpaMap::new(
            &[region(0, 8192, 0, 7), region(8192, 8192, 65536, 7)],
            1,
            7,
            1 << 20,
        );
        let mut out = Vec::new();
        assert!(m.translate(GpaRange::new(4096, 8192), &mut out));
        assert_eq!(
            out,
            vec![RamRange::new(4096, 4096), RamRange::new(65536, 4096)]
        );
    }

    proptest! {
        /// Whatever the guest sends, translated ranges stay inside the file
        /// and cover exactly the bytes asked for.
        #[test]
        fn translated_ranges_stay_in_the_file(start in 0u64..8 * GIB, len in 0u64..GIB) {
            let m = q35();
            let mut out = Vec::new();
            if m.translate(GpaRange::new(start, len), &mut out) {
                prop_assert_eq!(out.iter().map(|r| r.len_bytes).sum::<u64>(), len);
                for r in &out {
                    prop_assert!(r.start + r.len_bytes <= 4 * GIB);
                }
            } else {
                prop_assert!(out.is_empty());
            }
        }
    }
}
