//! Dirty tracking of guest RAM that lives in another process (or this one).
//!
//! [`DirtyLog`] is the one concept: "which pages were written since the last
//! sync". [`UffdWpDirtyLog`] implements it with no help from the VMM beyond a
//! userfaultfd it created at start (the `freehint-preload` library does that):
//!
//! 1. take the VMM's userfaultfd with `pidfd_open` + `pidfd_getfd`;
//! 2. `UFFDIO_API` with `WP_ASYNC | WP_UNPOPULATED | WP_HUGETLBFS_SHMEM` and
//!    `UFFDIO_REGISTER` (mode WP) on the VMM's RAM mappings, issued from
//!    here: a userfaultfd acts on the mm of the process that created it;
//! 3. each sync is `ioctl(PAGEMAP_SCAN)` on `/proc/PID/pagemap` with
//!    `PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC` for category
//!    `PAGE_IS_WRITTEN`: the kernel returns the written ranges and
//!    write-protects them again in the same walk, so no write is lost
//!    between reading and re-arming.
//!
//! Writes are resolved by the kernel (async WP): the VMM never blocks.

#![deny(missing_docs)]

use freehint_linux_sys as sys;

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;

pub use freehint_types::PageRun;

/// Errors from dirty tracking.
#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    /// A system call failed.
    #[error("{op}: {source}")]
    Os {
        /// What was attempted.
        op: String,
        /// What the kernel said.
        source: io::Error,
    },
    /// The VMM process has no userfaultfd to take.
    #[error(
        "process {pid} has no userfaultfd open; start it with LD_PRELOAD=libfreehint_preload.so"
    )]
    NoUserfaultfd {
        /// The VMM's pid.
        pid: i32,
    },
    /// The kernel lacks a feature dirty tracking needs.
    #[error("kernel lacks userfaultfd features {missing:#x} (need WP_ASYNC, WP_UNPOPULATED, WP_HUGETLBFS_SHMEM; Linux >= 6.7)")]
    MissingFeatures {
        /// Feature bits that were asked for and not granted.
        missing: u64,
    },
    /// The userfaultfd was already set up by an earlier dirty log (the
    /// kernel allows UFFDIO_API once per userfaultfd).
    #[error("the VMM's userfaultfd was already initialised by an earlier freehint run; a process supports one dirty-log session per userfaultfd (restart the VMM, or keep one daemon attached)")]
    AlreadyInitialised,
    /// A range to track is not page aligned.
    #[error("range {start:#x}+{len:#x} is not aligned to its page size {page_bytes}")]
    Unaligned {
        /// Start address.
        start: u64,
        /// Length.
        len: u64,
        /// Page size.
        page_bytes: u64,
    },
    /// The kernel returned a range outside what was asked for.
    #[error("PAGEMAP_SCAN returned {start:#x}..{end:#x}, outside the scanned range")]
    BadScanResult {
        /// Start of the returned range.
        start: u64,
        /// End of the returned range.
        end: u64,
    },
}

fn os(op: impl Into<String>) -> impl FnOnce(io::Error) -> DirtyLogError {
    let op = op.into();
    move |source| DirtyLogError::Os { op, source }
}

/// One virtual-address range of the VMM that holds guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrackedRange {
    /// The caller's name for the region the range belongs to.
    pub region: usize,
    /// Start address in the VMM's address space.
    pub vaddr_start: u64,
    /// Length in bytes.
    pub len_bytes: u64,
    /// The page unit of the backing (4 KiB, or the hugetlbfs page size).
    pub page_bytes: u64,
    /// Index of the range's first page within its region.
    pub first_page: u64,
}

/// Which pages were written since the last sync.
///
/// # Examples
///
/// Track the writes to a RAM file mapped in this process (as the tests do;
/// the daemon attaches to QEMU's mappings instead):
///
/// ```
/// use freehint_dirty_log::{DirtyLog, PageRun, TrackedRange, UffdWpDirtyLog};
/// use freehint_memory::GuestRam;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir_in("/dev/shm")?;
/// let ram = GuestRam::open_file(&dir.path().join("ram"), 64 * 4096)?;
/// let region = &ram.regions()[0];
/// let mut log = UffdWpDirtyLog::attach_self(vec![TrackedRange {
///     region: 0,
///     vaddr_start: region.host_ptr() as u64,
///     len_bytes: region.size_bytes(),
///     page_bytes: 4096,
///     first_page: 0,
/// }])?;
///
/// // SAFETY: page 5 lies inside the mapping, which outlives this write.
/// unsafe { region.page_ptr(5).unwrap().write_volatile(1) };
/// let mut written = Vec::new();
/// log.sync(&mut |run| written.push(run))?;
/// assert_eq!(written, [PageRun::page(0, 5)]);
///
/// // The sync re-armed tracking: nothing was written since.
/// written.clear();
/// log.sync(&mut |run| written.push(run))?;
/// assert!(written.is_empty());
/// # Ok(())
/// # }
/// ```
pub trait DirtyLog: Send {
    /// Reports the pages written since the previous call (or since tracking
    /// began) to `sink`, and re-arms tracking for them atomically with the
    /// report: a write that lands after its page was reported is reported by
    /// the next call.
    fn sync(&mut self, sink: &mut dyn FnMut(PageRun)) -> Result<(), DirtyLogError>;
}

/// Several dirty logs read as one: a page is dirty if any of them says so.
/// The logs are synced in order; each keeps its own atomicity guarantee.
pub struct CombinedDirtyLog(pub Vec<Box<dyn DirtyLog>>);

impl DirtyLog for CombinedDirtyLog {
    fn sync(&mut self, sink: &mut dyn FnMut(PageRun)) -> Result<(), DirtyLogError> {
        for log in &mut self.0 {
            log.sync(sink)?;
        }
        Ok(())
    }
}

/// How to find the VMM's mappings of a RAM file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// Start address.
    pub start: u64,
    /// End address (exclusive).
    pub end: u64,
    /// Offset of the mapping in the file.
    pub file_offset: u64,
}

/// The mappings of `path` in `/proc/PID/maps`.
pub fn find_mappings(pid: i32, path: &Path) -> Result<Vec<Mapping>, DirtyLogError> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(os(format!("reading /proc/{pid}/maps")))?;
    let want = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let want = want.to_string_lossy();
    let mut out = Vec::new();
    for line in maps.lines() {
        // start-end perms offset dev inode path
        let mut it = line.splitn(6, ' ');
        let (Some(range), Some(_perms), Some(off), Some(_dev), Some(_inode), Some(rest)) = (
            it.next(),
            it.next(),
            it.next(),
            it.next(),
            it.next(),
            it.next(),
        ) else {
            continue;
        };
        let p = rest.trim_start();
        let p = p.strip_suffix(" (deleted)").unwrap_or(p);
        if p != want {
            continue;
        }
        let Some((s, e)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end), Ok(file_offset)) = (
            u64::from_str_radix(s, 16),
            u64::from_str_radix(e, 16),
            u64::from_str_radix(off, 16),
        ) else {
            continue;
        };
        out.push(Mapping {
            start,
            end,
            file_offset,
        });
    }
    Ok(out)
}

/// A process that maps a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileMapper {
    /// Its pid.
    pub pid: i32,
    /// Its command name (`/proc/PID/comm`).
    pub comm: String,
}

/// Every process (other than those in `except`) that maps the file with
/// device number `dev` and inode `ino` (as `stat` gives them), found in
/// `/proc/*/maps`. Processes that vanish or cannot be read meanwhile are
/// skipped.
pub fn processes_mapping(dev: u64, ino: u64, except: &[i32]) -> Vec<FileMapper> {
    let want = format!("{:02x}:{:02x}", libc::major(dev), libc::minor(dev));
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if except.contains(&pid) {
            continue;
        }
        let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
            continue;
        };
        let maps_it = maps.lines().any(|line| {
            let mut it = line.split_whitespace();
            let (Some(_), Some(_), Some(_), Some(d), Some(i)) =
                (it.next(), it.next(), it.next(), it.next(), it.next())
            else {
                return false;
            };
            d == want && i.parse::<u64>() == Ok(ino)
        });
        if maps_it {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|c| c.trim().to_string())
                .unwrap_or_default();
            out.push(FileMapper { pid, comm });
        }
    }
    out
}

/// Dirty tracking with async userfaultfd write-protect and `PAGEMAP_SCAN`.
#[derive(Debug)]
pub struct UffdWpDirtyLog {
    uffd: OwnedFd,
    pagemap: File,
    ranges: Vec<TrackedRange>,
    buf: Vec<sys::PageRegion>,
}

impl UffdWpDirtyLog {
    /// Tracks `ranges` of process `pid`, using the userfaultfd that process
    /// created (with the preload library). All pages start write-protected:
    /// the first sync reports only pages written after this call.
    pub fn attach_process(pid: i32, ranges: Vec<TrackedRange>) -> Result<Self, DirtyLogError> {
        let fd_num = find_userfaultfd(pid)?;
        let pidfd = sys::pidfd_open(pid).map_err(os(format!("pidfd_open({pid})")))?;
        let uffd = sys::pidfd_getfd(&pidfd, fd_num)
            .map_err(os(format!("pidfd_getfd(pid {pid}, fd {fd_num})")))?;
        let pagemap = File::open(format!("/proc/{pid}/pagemap"))
            .map_err(os(format!("opening /proc/{pid}/pagemap")))?;
        Self::start(uffd, pagemap, ranges)
    }

    /// Tracks `ranges` of this process with a userfaultfd created here.
    pub fn attach_self(ranges: Vec<TrackedRange>) -> Result<Self, DirtyLogError> {
        let uffd = sys::userfaultfd().map_err(os("userfaultfd"))?;
        let pagemap = File::open("/proc/self/pagemap").map_err(os("opening /proc/self/pagemap"))?;
        Self::start(uffd, pagemap, ranges)
    }

    fn start(
        uffd: OwnedFd,
        pagemap: File,
        ranges: Vec<TrackedRange>,
    ) -> Result<Self, DirtyLogError> {
        for r in &ranges {
            if r.vaddr_start % r.page_bytes != 0
                || r.len_bytes % r.page_bytes != 0
                || r.len_bytes == 0
            {
                return Err(DirtyLogError::Unaligned {
                    start: r.vaddr_start,
                    len: r.len_bytes,
                    page_bytes: r.page_bytes,
                });
            }
        }
        let want = sys::UFFD_FEATURE_WP_ASYNC
            | sys::UFFD_FEATURE_WP_UNPOPULATED
            | sys::UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
        let got = sys::uffdio_api(&uffd, want).map_err(|e| {
            if e.raw_os_error() == Some(libc::EINVAL) {
                DirtyLogError::AlreadyInitialised
            } else {
                os("UFFDIO_API")(e)
            }
        })?;
        if got & want != want {
            return Err(DirtyLogError::MissingFeatures {
                missing: want & !got,
            });
        }
        for r in &ranges {
            sys::uffdio_register(
                &uffd,
                r.vaddr_start,
                r.len_bytes,
                sys::UFFDIO_REGISTER_MODE_WP,
            )
            .map_err(os(format!(
                "UFFDIO_REGISTER {:#x}+{:#x}",
                r.vaddr_start, r.len_bytes
            )))?;
            sys::uffdio_writeprotect(&uffd, r.vaddr_start, r.len_bytes).map_err(os(format!(
                "UFFDIO_WRITEPROTECT {:#x}+{:#x}",
                r.vaddr_start, r.len_bytes
            )))?;
        }
        Ok(Self {
            uffd,
            pagemap,
            ranges,
            buf: vec![sys::PageRegion::default(); 4096],
        })
    }

    /// The tracked ranges.
    pub fn ranges(&self) -> &[TrackedRange] {
        &self.ranges
    }
}

impl DirtyLog for UffdWpDirtyLog {
    fn sync(&mut self, sink: &mut dyn FnMut(PageRun)) -> Result<(), DirtyLogError> {
        for r in &self.ranges {
            let end = r.vaddr_start + r.len_bytes;
            let mut pos = r.vaddr_start;
            while pos < end {
                let (n, walk_end) =
                    sys::pagemap_scan_written(&self.pagemap, pos, end, &mut self.buf)
                        .map_err(os("PAGEMAP_SCAN"))?;
                for pr in &self.buf[..n] {
                    if pr.start < pos || pr.end > end || pr.start >= pr.end {
                        return Err(DirtyLogError::BadScanResult {
                            start: pr.start,
                            end: pr.end,
                        });
                    }
                    // Round outwards to the tracking unit (a hugetlb page is
                    // reported whole by the kernel anyway).
                    let first = (pr.start - r.vaddr_start) / r.page_bytes;
                    let last = (pr.end - r.vaddr_start).div_ceil(r.page_bytes);
                    sink(PageRun {
                        region: r.region,
                        first_page: r.first_page + first,
                        count: last - first,
                    });
                }
                if walk_end <= pos {
                    return Err(DirtyLogError::BadScanResult {
                        start: pos,
                        end: walk_end,
                    });
                }
                pos = walk_end;
            }
        }
        Ok(())
    }
}

impl Drop for UffdWpDirtyLog {
    fn drop(&mut self) {
        // Leave the VMM's memory as we found it: unregistering drops the
        // write protection so later writes cost nothing.
        for r in &self.ranges {
            if let Err(e) = sys::uffdio_unregister(&self.uffd, r.vaddr_start, r.len_bytes) {
                tracing::debug!("UFFDIO_UNREGISTER {:#x}: {e}", r.vaddr_start);
            }
        }
    }
}

/// The fd number of the userfaultfd that dirty tracking uses in process
/// `pid`: the lowest-numbered one, the first the preload library created.
pub fn find_userfaultfd(pid: i32) -> Result<i32, DirtyLogError> {
    userfaultfds(pid)?
        .first()
        .copied()
        .ok_or(DirtyLogError::NoUserfaultfd { pid })
}

/// The fd number of the userfaultfd that postcopy's placement uses in
/// process `pid`: the highest-numbered one, the second the preload library
/// created (or the only one, with an older preload library).
///
/// Two, because the kernel takes `UFFDIO_API` once per userfaultfd and the
/// two uses need different features: a VMM that received its guest by
/// postcopy (MISSING faults) can later be the source of a migration (WP
/// async dirty tracking) only on a second, untouched fd.
pub fn find_placement_userfaultfd(pid: i32) -> Result<i32, DirtyLogError> {
    userfaultfds(pid)?
        .last()
        .copied()
        .ok_or(DirtyLogError::NoUserfaultfd { pid })
}

/// Every userfaultfd open in process `pid`, by fd number.
fn userfaultfds(pid: i32) -> Result<Vec<i32>, DirtyLogError> {
    let dir = format!("/proc/{pid}/fd");
    let entries = std::fs::read_dir(&dir).map_err(os(format!("reading {dir}")))?;
    let mut fds: Vec<i32> = entries
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|t| t.as_os_str() == "anon_inode:[userfaultfd]")
        })
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .collect();
    fds.sort_unstable();
    Ok(fds)
}
