//! The `freehint_free` kernel module's ioctl, as
//! `guest-driver/module/freehint_free_uapi.h` defines it.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use freehint_agent_protocol::{FreeContent, PfnRange};

/// `FREEHINT_FREE_VERSION`.
const VERSION: u32 = 1;
/// `FREEHINT_FREE_MAX_CAPACITY`.
pub const MAX_CAPACITY: usize = 1 << 22;
/// `FREEHINT_FREE_TRUNCATED`.
const TRUNCATED: u32 = 1;
/// `FREEHINT_FREE_ZEROED`.
const ZEROED: u32 = 2;
/// `FREEHINT_FREE_POISONED`.
const POISONED: u32 = 4;
/// `FREEHINT_FREE_POISON_BYTE`.
const POISON_BYTE: u8 = 0xaa;

/// `struct freehint_pfn_range`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RawRange {
    first_pfn: u64,
    pages: u64,
}

/// `struct freehint_free_request`.
#[repr(C)]
#[derive(Default)]
struct Request {
    version: u32,
    min_order: u32,
    ranges: u64,
    capacity: u32,
    count: u32,
    pages: u64,
    lock_ns: u64,
    took_ns: u64,
    flags: u32,
    reserved: u32,
}

const _: () = assert!(std::mem::size_of::<Request>() == 56);
const _: () = assert!(std::mem::size_of::<RawRange>() == 16);

/// `_IOWR('f', 1, struct freehint_free_request)`.
const IOC_FREE_RANGES: u64 =
    (3 << 30) | ((std::mem::size_of::<Request>() as u64) << 16) | (0x66 << 8) | 1;

/// One snapshot of the guest's free memory.
pub struct Snapshot {
    /// Merged free ranges, in increasing PFN order within a zone.
    pub ranges: Vec<PfnRange>,
    /// Pages in them.
    pub pages: u64,
    /// The array was full before every free range was in it.
    pub truncated: bool,
    /// What a free page holds in this guest.
    pub free_content: FreeContent,
    /// The longest a zone lock was held.
    pub lock: Duration,
}

/// `/dev/freehint_free`, open.
pub struct FreeRanges {
    file: File,
    buf: Vec<RawRange>,
}

impl FreeRanges {
    /// Opens the module's device.
    pub fn open(path: &Path) -> io::Result<Self> {
        Ok(Self {
            file: File::options().read(true).open(path)?,
            buf: Vec::new(),
        })
    }

    /// The free ranges of orders ≥ `min_order`, in an array of at most
    /// `capacity` ranges.
    pub fn snapshot(&mut self, min_order: u8, capacity: usize) -> io::Result<Snapshot> {
        let capacity = capacity.clamp(1, MAX_CAPACITY);
        self.buf.resize(capacity, RawRange::default());
        let mut req = Request {
            version: VERSION,
            min_order: u32::from(min_order),
            ranges: self.buf.as_mut_ptr() as u64,
            capacity: capacity as u32,
            ..Request::default()
        };
        // SAFETY: FREEHINT_IOC_FREE_RANGES reads and writes `req` (a live,
        // properly laid out struct freehint_free_request) and writes at
        // most `req.capacity` ranges to `req.ranges`, which points at
        // `self.buf`, holding exactly that many; neither moves during the
        // call.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), IOC_FREE_RANGES as _, &mut req) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let count = (req.count as usize).min(capacity);
        let ranges = self.buf[..count]
            .iter()
            .map(|r| PfnRange {
                first_pfn: r.first_pfn,
                pages: r.pages,
            })
            .collect();
        let free_content = if req.flags & POISONED != 0 {
            FreeContent::Pattern(POISON_BYTE)
        } else if req.flags & ZEROED != 0 {
            FreeContent::Zero
        } else {
            FreeContent::Undefined
        };
        Ok(Snapshot {
            ranges,
            pages: req.pages,
            truncated: req.flags & TRUNCATED != 0,
            free_content,
            lock: Duration::from_nanos(req.lock_ns),
        })
    }
}
