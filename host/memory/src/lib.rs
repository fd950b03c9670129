//! Guest RAM as the freehint daemon sees it.
//!
//! A VMM such as QEMU keeps guest RAM in shared files (`memory-backend-file`
//! on tmpfs or hugetlbfs, or a memfd). The daemon maps the same files with
//! [`vm_memory`] and reads or writes pages through that mapping. Each region
//! knows its page size, detected from the backing file system rather than
//! assumed:
//!
//! * tmpfs / memfd without transparent huge pages: 4 KiB pages;
//! * tmpfs / memfd with shmem THP enabled: tracked in 4 KiB pages (the kernel
//!   splits a huge mapping when part of it is write-protected), reported as
//!   [`PageSize::Thp`] so the sender knows the backing may be huge;
//! * hugetlbfs: the huge page size of the mount (2 MiB or 1 GiB); such a page
//!   is tracked, sent and placed as one unit and never split.
//!
//! Regions are placed in the *RAM* address space
//! ([`freehint_types::RamRange`]), not the guest-physical one: for QEMU a
//! region's `ram_start` is its offset in the memory-backend file. vm-memory's
//! `GuestAddress` inside this crate is that RAM address.

#![deny(missing_docs)]

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryRegion, GuestRegionMmap, MemoryRegionAddress, MmapRegion,
    VolatileMemory, VolatileSlice,
};

/// The size of a base page on the host.
pub const BASE_PAGE_BYTES: u64 = 4096;

const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Errors from setting up or using guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// A backing file could not be opened or inspected.
    #[error("guest RAM file {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// Mapping a region failed.
    #[error("mapping guest RAM region at {ram_start:#x} ({size_bytes} bytes): {reason}")]
    Map {
        /// RAM address of the region's start.
        ram_start: u64,
        /// Size of the region.
        size_bytes: u64,
        /// Why.
        reason: String,
    },
    /// A region is not a whole number of its pages, or is empty.
    #[error("guest RAM region at {ram_start:#x}: size {size_bytes} is not a positive multiple of its page size {page_bytes}")]
    BadSize {
        /// RAM address of the region's start.
        ram_start: u64,
        /// Size of the region.
        size_bytes: u64,
        /// Page size of its backing.
        page_bytes: u64,
    },
    /// Regions overlap or are not sorted.
    #[error("guest RAM regions overlap or are out of order at {ram_start:#x}")]
    Overlap {
        /// RAM address of the offending region's start.
        ram_start: u64,
    },
    /// An I/O operation on a region failed.
    #[error("guest RAM region at {ram_start:#x}: {op}: {source}")]
    Io {
        /// RAM address of the region's start.
        ram_start: u64,
        /// The operation.
        op: &'static str,
        /// What the OS said.
        source: io::Error,
    },
}

/// The page size of a region's backing memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageSize {
    /// Ordinary 4 KiB pages.
    Base,
    /// Shared memory that the kernel may back with transparent huge pages of
    /// `huge_bytes`; tracked and sent in 4 KiB pages.
    Thp {
        /// The PMD huge page size.
        huge_bytes: u64,
    },
    /// hugetlbfs pages of `bytes`, tracked, sent and placed whole.
    HugeTlb {
        /// The huge page size.
        bytes: u64,
    },
}

impl PageSize {
    /// The unit in which the region is tracked, sent and placed.
    pub fn unit_bytes(self) -> u64 {
        match self {
            PageSize::Base | PageSize::Thp { .. } => BASE_PAGE_BYTES,
            PageSize::HugeTlb { bytes } => bytes,
        }
    }

    /// Detects the page size of an open backing file from its file system.
    pub fn detect(file: &File, path: Option<&Path>) -> io::Result<PageSize> {
        // SAFETY: statfs is plain data; fstatfs fills it for a valid fd and
        // we check the return value before reading it.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: `file` is an open fd and `st` is a valid out-pointer.
        if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        #[allow(clippy::unnecessary_cast)]
        let fs_type = st.f_type as i64;
        if fs_type == HUGETLBFS_MAGIC {
            return Ok(PageSize::HugeTlb {
                bytes: st.f_bsize as u64,
            });
        }
        if fs_type == TMPFS_MAGIC && shmem_thp_enabled(path) {
            let huge_bytes =
                std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(2 << 20);
            return Ok(PageSize::Thp { huge_bytes });
        }
        Ok(PageSize::Base)
    }
}

/// Whether shmem THP may back the file: the sysfs policy forces it, or the
/// tmpfs mount holding `path` has a `huge=` option other than `never`.
fn shmem_thp_enabled(path: Option<&Path>) -> bool {
    let policy = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
        .unwrap_or_default();
    let selected = policy
        .split_whitespace()
        .find(|w| w.starts_with('['))
        .unwrap_or("[never]");
    if selected == "[force]" {
        return true;
    }
    let Some(path) = path.and_then(|p| p.canonicalize().ok()) else {
        // A memfd: the sysfs policy governs it.
        return matches!(selected, "[always]" | "[within_size]");
    };
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut best: Option<(usize, bool)> = None;
    for line in mounts.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 4 || fields[2] != "tmpfs" {
            continue;
        }
        let mount_point = Path::new(fields[1]);
        if path.starts_with(mount_point) {
            let len = fields[1].len();
            let huge = fields[3]
                .split(',')
                .any(|o| o.starts_with("huge=") && o != "huge=never" && o != "huge=deny");
            if best.is_none_or(|(l, _)| len > l) {
                best = Some((len, huge));
            }
        }
    }
    best.is_some_and(|(_, huge)| huge)
}

/// Describes one region to map.
#[derive(Debug)]
pub struct RegionSpec {
    /// RAM address of the first byte (for QEMU, the offset in its
    /// memory-backend file; see [`freehint_types::RamRange`]).
    pub ram_start: u64,
    /// Size of the region in bytes.
    pub size_bytes: u64,
    /// The backing file (tmpfs, hugetlbfs or memfd).
    pub file: File,
    /// Offset of the region in the file.
    pub file_offset_bytes: u64,
    /// Path of the file, if it has one (used for page size detection and
    /// for finding the VMM's mapping of it).
    pub path: Option<PathBuf>,
}

/// One region of guest RAM, mapped shared into this process.
#[derive(Debug)]
pub struct RamRegion {
    ram_start: u64,
    size_bytes: u64,
    page_size: PageSize,
    file_offset_bytes: u64,
    path: Option<PathBuf>,
    file: Arc<File>,
    mapping: GuestRegionMmap,
}

impl RamRegion {
    /// RAM address of the first byte (see [`freehint_types::RamRange`]).
    pub fn ram_start(&self) -> u64 {
        self.ram_start
    }

    /// Size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// The detected page size of the backing.
    pub fn page_size(&self) -> PageSize {
        self.page_size
    }

    /// The unit (bytes) in which this region is tracked, sent and placed.
    pub fn page_bytes(&self) -> u64 {
        self.page_size.unit_bytes()
    }

    /// Number of pages (in [`Self::page_bytes`] units).
    pub fn pages(&self) -> u64 {
        self.size_bytes / self.page_bytes()
    }

    /// The backing file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Offset of the region in its backing file.
    pub fn file_offset_bytes(&self) -> u64 {
        self.file_offset_bytes
    }

    /// The backing file's path, if it has one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The host address of the first byte of this process's mapping.
    pub fn host_ptr(&self) -> *mut u8 {
        self.mapping
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .expect("offset 0 is inside every non-empty region")
    }

    /// The host address of page `page` of this region, or `None` if the page
    /// is beyond its end.
    pub fn page_ptr(&self, page: u64) -> Option<*mut u8> {
        if page >= self.pages() {
            return None;
        }
        // SAFETY: page < pages() so the offset lies inside the mapping.
        Some(unsafe { self.host_ptr().add((page * self.page_bytes()) as usize) })
    }

    /// The populated pages of the region's backing file, as half-open page
    /// ranges, found with `SEEK_DATA`/`SEEK_HOLE` without touching memory.
    /// Pages outside these ranges have never been written and read as zero.
    pub fn data_page_ranges(&self) -> Result<Vec<Range<u64>>, MemoryError> {
        let io_err = |op, source| MemoryError::Io {
            ram_start: self.ram_start,
            op,
            source,
        };
        let fd = self.file.as_raw_fd();
        let start = self.file_offset_bytes as i64;
        let end = start + self.size_bytes as i64;
        let page = self.page_bytes() as i64;
        let mut out: Vec<Range<u64>> = Vec::new();
        let mut pos = start;
        while pos < end {
            // SAFETY: lseek on a valid fd has no memory effects.
            let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
            if data < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ENXIO) {
                    break;
                }
                return Err(io_err("SEEK_DATA", e));
            }
            if data >= end {
                break;
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            if hole < 0 {
                return Err(io_err("SEEK_HOLE", io::Error::last_os_error()));
            }
            let hole = hole.min(end);
            let first = ((data - start) / page) as u64;
            let last = ((hole - start) + page - 1) as u64 / page as u64;
            match out.last_mut() {
                Some(prev) if prev.end >= first => prev.end = prev.end.max(last),
                _ => out.push(first..last),
            }
            pos = hole;
        }
        Ok(out)
    }

    /// Reads `buf.len() / page_bytes()` pages starting at `first_page` from
    /// the backing file with `pread`. Reading the file rather than the
    /// mapping costs no page faults in this process and never allocates a
    /// hole. The guest may write the pages meanwhile; the copy may then be
    /// torn, which the dirty log covers.
    pub fn read_pages(&self, first_page: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.check_pages(first_page, buf.len(), "read pages")?;
        use std::os::unix::fs::FileExt;
        self.file
            .read_exact_at(buf, self.file_offset_bytes + first_page * self.page_bytes())
            .map_err(|source| MemoryError::Io {
                ram_start: self.ram_start,
                op: "read pages",
                source,
            })
    }

    /// Maps pages `first_page..first_page + count` into this process's page
    /// tables for reading (`MADV_POPULATE_READ`): one call instead of a page
    /// fault per page when they are then read through the mapping.
    pub fn populate_read(&self, first_page: u64, count: u64) -> Result<(), MemoryError> {
        const MADV_POPULATE_READ: i32 = 22;
        let len = (count * self.page_bytes()) as usize;
        self.check_pages(first_page, len, "populate")?;
        let ptr = self.page_ptr(first_page).expect("checked above");
        self.madvise(
            ptr,
            len,
            MADV_POPULATE_READ,
            "populate (MADV_POPULATE_READ)",
        )
    }

    /// Pages `first_page..first_page + count` as a [`VolatileSlice`]: guest
    /// memory that the guest (or any process mapping the file) may write at
    /// any moment, so it is only ever accessed through raw pointers and
    /// volatile loads and stores, never through a Rust reference.
    pub fn volatile_pages(
        &self,
        first_page: u64,
        count: u64,
    ) -> Result<VolatileSlice<'_, ()>, MemoryError> {
        let len = count
            .checked_mul(self.page_bytes())
            .and_then(|l| usize::try_from(l).ok())
            .unwrap_or(usize::MAX);
        self.check_pages(first_page, len, "map pages")?;
        self.mapping
            .get_slice(MemoryRegionAddress(first_page * self.page_bytes()), len)
            .map_err(|e| MemoryError::Io {
                ram_start: self.ram_start,
                op: "map pages",
                source: io::Error::other(e.to_string()),
            })
    }

    /// Writes whole pages starting at `first_page`: with `pwrite` into the
    /// file (no page faults, no zeroing of new tmpfs pages), or through
    /// the mapping on hugetlbfs, which has no `write(2)`.
    ///
    /// # Safety
    ///
    /// Nothing else may read or write these pages while they are written
    /// (on hugetlbfs the bytes are copied straight into the mapping, so a
    /// running guest could see half a page): call it only on a destination
    /// whose VM has not been resumed, for pages no other thread places.
    pub unsafe fn write_pages(&self, first_page: u64, data: &[u8]) -> Result<(), MemoryError> {
        self.check_pages(first_page, data.len(), "write pages")?;
        if let PageSize::HugeTlb { .. } = self.page_size {
            let dst = self.page_ptr(first_page).expect("checked above");
            // SAFETY: the range lies inside the mapping (checked above), and
            // the caller guarantees that nothing else accesses it meanwhile.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
            return Ok(());
        }
        use std::os::unix::fs::FileExt;
        self.file
            .write_all_at(
                data,
                self.file_offset_bytes + first_page * self.page_bytes(),
            )
            .map_err(|source| MemoryError::Io {
                ram_start: self.ram_start,
                op: "write pages",
                source,
            })
    }

    fn check_pages(
        &self,
        first_page: u64,
        len: usize,
        op: &'static str,
    ) -> Result<(), MemoryError> {
        let page = self.page_bytes();
        let ok = (len as u64).is_multiple_of(page)
            && first_page
                .checked_add(len as u64 / page)
                .is_some_and(|end| end <= self.pages());
        if ok {
            Ok(())
        } else {
            Err(MemoryError::Io {
                ram_start: self.ram_start,
                op,
                source: io::Error::new(io::ErrorKind::InvalidInput, "page range outside region"),
            })
        }
    }

    /// Allocates and touches every page of the region (zero filled), as
    /// QEMU's `-mem-prealloc` does, so that placing pages later costs no
    /// allocation. Uses `MADV_POPULATE_WRITE`: `fallocate` on tmpfs would
    /// defer zeroing each page to its first write.
    pub fn preallocate(&self) -> Result<(), MemoryError> {
        const MADV_POPULATE_WRITE: i32 = 23;
        self.madvise(
            self.host_ptr(),
            self.size_bytes as usize,
            MADV_POPULATE_WRITE,
            "preallocate (MADV_POPULATE_WRITE)",
        )
    }

    /// `madvise` over `len` bytes of this region's mapping from `ptr`. Only
    /// the populate advices are used: they fault pages in and change no
    /// contents.
    fn madvise(
        &self,
        ptr: *mut u8,
        len: usize,
        advice: i32,
        op: &'static str,
    ) -> Result<(), MemoryError> {
        // SAFETY: callers pass a range inside this region's mapping, and
        // the populate advices change no memory contents.
        let rc = unsafe { libc::madvise(ptr as *mut libc::c_void, len, advice) };
        if rc != 0 {
            return Err(MemoryError::Io {
                ram_start: self.ram_start,
                op,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Discards pages `pages` from the backing file (punches a hole): they
    /// read as zero afterwards and use no memory.
    pub fn punch_hole(&self, pages: Range<u64>) -> Result<(), MemoryError> {
        if pages.start >= pages.end || pages.end > self.pages() {
            return Err(MemoryError::Io {
                ram_start: self.ram_start,
                op: "punch hole",
                source: io::Error::new(io::ErrorKind::InvalidInput, "page range outside region"),
            });
        }
        let off = self.file_offset_bytes + pages.start * self.page_bytes();
        let len = (pages.end - pages.start) * self.page_bytes();
        // SAFETY: fallocate on a valid fd; it changes file contents only.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off as i64,
                len as i64,
            )
        };
        if rc != 0 {
            return Err(MemoryError::Io {
                ram_start: self.ram_start,
                op: "punch hole",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

/// Guest RAM: sorted, non-overlapping regions.
#[derive(Debug)]
pub struct GuestRam {
    regions: Vec<RamRegion>,
}

impl GuestRam {
    /// Maps the given regions shared into this process.
    pub fn map(specs: Vec<RegionSpec>) -> Result<Self, MemoryError> {
        let mut regions = Vec::with_capacity(specs.len());
        let mut prev_end = 0u64;
        for spec in specs {
            let file_err = |source| MemoryError::File {
                path: spec
                    .path
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("<memfd>")),
                source,
            };
            let page_size = PageSize::detect(&spec.file, spec.path.as_deref()).map_err(file_err)?;
            let page_bytes = page_size.unit_bytes();
            if spec.size_bytes == 0 || spec.size_bytes % page_bytes != 0 {
                return Err(MemoryError::BadSize {
                    ram_start: spec.ram_start,
                    size_bytes: spec.size_bytes,
                    page_bytes,
                });
            }
            if spec.ram_start < prev_end && !regions.is_empty() {
                return Err(MemoryError::Overlap {
                    ram_start: spec.ram_start,
                });
            }
            let end = spec
                .ram_start
                .checked_add(spec.size_bytes)
                .ok_or(MemoryError::Overlap {
                    ram_start: spec.ram_start,
                })?;
            prev_end = end;
            let file = Arc::new(spec.file);
            let map_err = |reason: String| MemoryError::Map {
                ram_start: spec.ram_start,
                size_bytes: spec.size_bytes,
                reason,
            };
            let fo = FileOffset::from_arc(file.clone(), spec.file_offset_bytes);
            let mmap = MmapRegion::from_file(fo, spec.size_bytes as usize)
                .map_err(|e| map_err(e.to_string()))?;
            let mapping = GuestRegionMmap::new(mmap, GuestAddress(spec.ram_start))
                .ok_or_else(|| map_err("region wraps the address space".into()))?;
            regions.push(RamRegion {
                ram_start: spec.ram_start,
                size_bytes: spec.size_bytes,
                page_size,
                file_offset_bytes: spec.file_offset_bytes,
                path: spec.path,
                file,
                mapping,
            });
        }
        Ok(Self { regions })
    }

    /// Opens `path` (creating it with `size_bytes` if it does not exist, or
    /// checking its size if it does) and maps it as one region at
    /// RAM address 0.
    pub fn open_file(path: &Path, size_bytes: u64) -> Result<Self, MemoryError> {
        let file_err = |source| MemoryError::File {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(file_err)?;
        let len = file.metadata().map_err(file_err)?.len();
        if len == 0 {
            file.set_len(size_bytes).map_err(file_err)?;
        } else if len != size_bytes {
            return Err(file_err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("file is {len} bytes, expected {size_bytes}"),
            )));
        }
        Self::map(vec![RegionSpec {
            ram_start: 0,
            size_bytes,
            file,
            file_offset_bytes: 0,
            path: Some(path.to_path_buf()),
        }])
    }

    /// The regions, sorted by RAM address.
    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// Total size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.size_bytes).sum()
    }

    /// The region holding RAM address `ram_addr`, as (index, region).
    pub fn find(&self, ram_addr: u64) -> Option<(usize, &RamRegion)> {
        let idx = self
            .regions
            .partition_point(|r| r.ram_start + r.size_bytes <= ram_addr);
        let r = self.regions.get(idx)?;
        (ram_addr >= r.ram_start).then_some((idx, r))
    }
}

/// Whether every byte of `pages` (guest memory, possibly being written
/// meanwhile) is zero: volatile 8-byte loads, stopping at the first non-zero
/// word. A page written during the check may be judged either way; the
/// dirty log has it for the next round.
pub fn is_zero_volatile(pages: &VolatileSlice<'_, ()>) -> bool {
    let words = pages.len() / 8;
    let Ok(array) = pages.get_array_ref::<u64>(0, words) else {
        return false;
    };
    // Eight words per step: one branch per cache line, not per word.
    let mut i = 0;
    while i + 8 <= words {
        let mut any = 0u64;
        for k in 0..8 {
            any |= array.load(i + k);
        }
        if any != 0 {
            return false;
        }
        i += 8;
    }
    (i..words).all(|k| array.load(k) == 0)
        && (words * 8..pages.len()).all(|b| pages.get_ref::<u8>(b).is_ok_and(|r| r.load() == 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn holes_are_found_without_reading() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let path = dir.path().join("ram");
        let ram = GuestRam::open_file(&path, 64 * BASE_PAGE_BYTES).unwrap();
        let r = &ram.regions()[0];
        assert_eq!(r.page_size(), PageSize::Base);
        assert_eq!(r.data_page_ranges().unwrap(), Vec::<Range<u64>>::new());
        r.file()
            .write_all_at(&[1u8; 10], 5 * BASE_PAGE_BYTES + 7)
            .unwrap();
        r.file()
            .write_all_at(&[1u8; 4096 * 3], 9 * BASE_PAGE_BYTES)
            .unwrap();
        assert_eq!(r.data_page_ranges().unwrap(), vec![5..6, 9..12]);
        r.punch_hole(10..11).unwrap();
        assert_eq!(r.data_page_ranges().unwrap(), vec![5..6, 9..10, 11..12]);
        assert!(r.punch_hole(60..65).is_err());
    }

    #[test]
    fn memfd_regions_map_with_base_pages_and_round_trip_pages() {
        // SAFETY: memfd_create with a valid C string; the fd is owned below.
        let fd = unsafe { libc::memfd_create(c"freehint-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fd is a fresh descriptor we own.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(32 * 4096).unwrap();
        let ram = GuestRam::map(vec![RegionSpec {
            ram_start: 1 << 20,
            size_bytes: 32 * 4096,
            file,
            file_offset_bytes: 0,
            path: None,
        }])
        .unwrap();
        let r = &ram.regions()[0];
        assert!(matches!(
            r.page_size(),
            PageSize::Base | PageSize::Thp { .. }
        ));
        let page: Vec<u8> = (0..8192).map(|i| (i % 251) as u8).collect();
        // SAFETY: nothing else maps this test region.
        unsafe { r.write_pages(3, &page).unwrap() };
        let mut back = vec![0u8; 8192];
        r.read_pages(3, &mut back).unwrap();
        assert_eq!(back, page);
        // SAFETY: inside the mapping; the same bytes are visible there.
        assert_eq!(unsafe { *r.page_ptr(4).unwrap().add(5) }, page[4096 + 5]);
        assert!(r.read_pages(31, &mut back).is_err(), "runs past the end");
        // SAFETY: as above.
        assert!(
            unsafe { r.write_pages(0, &page[..100]) }.is_err(),
            "not whole pages"
        );
    }

    #[test]
    fn zero_page_detection_sees_every_byte() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let ram = GuestRam::open_file(&dir.path().join("ram"), 4 * BASE_PAGE_BYTES).unwrap();
        let r = &ram.regions()[0];
        let pages = r.volatile_pages(1, 2).unwrap();
        assert!(is_zero_volatile(&pages));
        for pos in [0usize, 1, 63, 2048, 4095, 4096, 8191] {
            pages.get_ref::<u8>(pos).unwrap().store(1);
            assert!(!is_zero_volatile(&pages), "byte {pos}");
            pages.get_ref::<u8>(pos).unwrap().store(0);
        }
        assert!(is_zero_volatile(&pages));
        assert!(r.volatile_pages(3, 2).is_err(), "runs past the end");
    }

    #[test]
    fn find_maps_addresses_to_regions() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let mk = |name: &str, gpa: u64| {
            let p = dir.path().join(name);
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&p)
                .unwrap();
            f.set_len(16 * 4096).unwrap();
            RegionSpec {
                ram_start: gpa,
                size_bytes: 16 * 4096,
                file: f,
                file_offset_bytes: 0,
                path: Some(p),
            }
        };
        let ram = GuestRam::map(vec![mk("a", 0), mk("b", 1 << 20)]).unwrap();
        assert_eq!(ram.find(4096).unwrap().0, 0);
        assert!(ram.find(16 * 4096).is_none());
        assert_eq!(ram.find((1 << 20) + 5).unwrap().0, 1);
        assert!(GuestRam::map(vec![mk("c", 4096), mk("d", 0)]).is_err());
    }
}
