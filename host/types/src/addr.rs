//! The two address spaces freehint works in, each its own type.
//!
//! * A [`GpaRange`] is in the **guest-physical** address space: what the
//!   guest's kernel and its balloon driver speak. It has holes (on x86 the
//!   PCI hole below 4 GiB) and parts that are not RAM at all.
//! * A [`RamRange`] is in the **RAM** address space the engine migrates:
//!   byte offsets into the concatenated RAM regions, which for QEMU are
//!   offsets in its memory-backend file. It has no holes, and it is the
//!   same on both ends whatever the machine's memory map.
//!
//! A guest-physical range becomes RAM ranges only through a translation
//! that knows the VMM's memory map (the daemon's `GpaMap`, built from the
//! vhost-user memory table), or through [`GpaRange::identity`] for a VM
//! whose RAM starts at guest-physical 0 without holes (the simulated VM).

use std::fmt;

macro_rules! byte_range {
    ($(#[$doc:meta])* $name:ident, $space:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name {
            #[doc = concat!("First byte of the range, in the ", $space, " address space.")]
            pub start: u64,
            /// Length of the range in bytes.
            pub len_bytes: u64,
        }

        impl $name {
            /// A range of `len_bytes` bytes starting at `start`.
            pub const fn new(start: u64, len_bytes: u64) -> Self {
                Self { start, len_bytes }
            }

            /// One past the last byte, or `None` if the range wraps the
            /// address space.
            pub fn end(&self) -> Option<u64> {
                self.start.checked_add(self.len_bytes)
            }

            /// Whether the range holds no byte.
            pub fn is_empty(&self) -> bool {
                self.len_bytes == 0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self.end() {
                    Some(end) => write!(f, "{} [{:#x}, {:#x})", $space, self.start, end),
                    None => write!(
                        f,
                        "{} [{:#x}, +{:#x} wraps)",
                        $space, self.start, self.len_bytes
                    ),
                }
            }
        }
    };
}

byte_range!(
    /// A range of guest-physical memory: `len_bytes` bytes starting at
    /// guest-physical address `start`. Ranges from the guest are untrusted:
    /// they may be empty, wrap, or lie outside RAM.
    ///
    /// # Examples
    ///
    /// ```
    /// use freehint_types::GpaRange;
    ///
    /// let r = GpaRange::new(0x1000, 0x2000);
    /// assert_eq!(r.end(), Some(0x3000));
    /// assert_eq!(GpaRange::new(u64::MAX, 2).end(), None, "wraps");
    /// ```
    GpaRange,
    "gpa"
);

byte_range!(
    /// A range of the RAM being migrated: `len_bytes` bytes starting at RAM
    /// offset `start` (for QEMU, the offset in its memory-backend file).
    /// This is the space of the migration bitmap, the wire protocol and
    /// the RAM regions.
    RamRange,
    "ram"
);

impl GpaRange {
    /// The same bytes as a [`RamRange`], for a VM whose RAM is laid out at
    /// guest-physical 0 with no holes, so that both spaces coincide (the
    /// simulated VM). A real VMM's ranges go through its memory map.
    pub const fn identity(self) -> RamRange {
        RamRange::new(self.start, self.len_bytes)
    }
}
