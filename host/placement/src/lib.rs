//! Postcopy page placement into a VMM's guest RAM.
//!
//! Once the destination's guest runs, a page it has not received yet must
//! appear in one step: a `memcpy` into a page the guest can already map
//! would let it read a torn page. This crate registers the guest RAM
//! mapping for MISSING userfaults, reads the faults (the pages the guest
//! needs now) and places pages with `UFFDIO_COPY` / `UFFDIO_ZEROPAGE`,
//! which allocate, fill and map a page atomically and wake the threads
//! waiting on it.
//!
//! Why MISSING mode on the RAM file (shmem or hugetlbfs) rather than MINOR
//! mode with `UFFDIO_CONTINUE`: pages placed before the guest resumes (the
//! precopy rounds) are written through the daemon's own mapping of the same
//! file, so they are in the page cache and never fault; only the pages
//! still missing fault, and one ioctl places each. MINOR mode would need
//! every page in the page cache first and a second mapping write before
//! each `UFFDIO_CONTINUE`. A page already in the page cache makes
//! `UFFDIO_COPY` fail with `EEXIST`: [`Placed::AlreadyPresent`], which is
//! how "a page already placed is not placed again" is checked.
//!
//! The userfaultfd may belong to another process (the destination QEMU's,
//! taken with `pidfd_getfd` from the fd our preload library opened): the
//! ioctls then act on that process's address space, and the addresses are
//! that process's.
#![deny(missing_docs)]

use std::io;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use freehint_linux_sys as sys;

/// What can go wrong while placing pages.
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    /// The kernel refused the userfaultfd API handshake.
    #[error("userfaultfd API handshake: {0}")]
    Api(#[source] io::Error),
    /// The kernel lacks a feature this needs.
    #[error("this kernel's userfaultfd lacks {feature}")]
    Unsupported {
        /// The missing feature, by its UAPI name.
        feature: &'static str,
    },
    /// Creating a userfaultfd in this process failed.
    #[error("creating a userfaultfd: {0}")]
    Create(#[source] io::Error),
    /// Registering a range failed.
    #[error("registering {len_bytes} bytes at {start:#x} for missing faults: {source}")]
    Register {
        /// Start address.
        start: u64,
        /// Length in bytes.
        len_bytes: u64,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// A range to register is not whole pages of a power-of-two size.
    #[error("{len_bytes} bytes at {start:#x} are not whole pages of {page_bytes} bytes")]
    Unaligned {
        /// Start address.
        start: u64,
        /// Length in bytes.
        len_bytes: u64,
        /// The page unit asked for.
        page_bytes: u64,
    },
    /// A placement is not inside a registered range, or not whole pages.
    #[error("{len_bytes} bytes at {address:#x}: not whole pages of one registered range")]
    Outside {
        /// Start address.
        address: u64,
        /// Length in bytes.
        len_bytes: u64,
    },
    /// The kernel refused a placement.
    #[error("placing {len_bytes} bytes at {address:#x}: {source}")]
    Place {
        /// Start address.
        address: u64,
        /// Length in bytes.
        len_bytes: u64,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// Reading or waiting for fault messages failed.
    #[error("reading userfaultfd messages: {0}")]
    Read(#[source] io::Error),
}

/// A page the guest needs now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// The faulting address, rounded down to the registered range's page.
    pub address: u64,
    /// Whether the access was a write.
    pub write: bool,
}

/// The outcome of one placement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placed {
    /// The page is now mapped with the given content.
    Now,
    /// The page was already there (placed before, or written before the
    /// guest resumed); nothing changed.
    AlreadyPresent,
}

/// A registered range: its start, length and page unit, in bytes.
#[derive(Clone, Copy, Debug)]
struct Range {
    start: u64,
    len_bytes: u64,
    page_bytes: u64,
}

/// Guest RAM registered for MISSING faults through one userfaultfd.
#[derive(Debug)]
pub struct MissingPlacer {
    uffd: OwnedFd,
    ranges: Vec<Range>,
}

/// How many times a placement is retried when the kernel says the address
/// space is changing (`EAGAIN`).
const EAGAIN_RETRIES: u32 = 100;

/// How often a hugetlbfs placement that says EEXIST while the pool has
/// pages is tried again (1 ms apart) before the page counts as present.
const HUGE_EEXIST_RETRIES: u32 = 10;

impl MissingPlacer {
    /// Takes `uffd` (not yet through `UFFDIO_API`) and enables missing
    /// faults on shmem and hugetlbfs with it.
    pub fn new(uffd: OwnedFd) -> Result<Self, PlacementError> {
        let want = sys::UFFD_FEATURE_MISSING_SHMEM | sys::UFFD_FEATURE_MISSING_HUGETLBFS;
        let granted = sys::uffdio_api(&uffd, want).map_err(PlacementError::Api)?;
        if granted & sys::UFFD_FEATURE_MISSING_SHMEM == 0 {
            return Err(PlacementError::Unsupported {
                feature: "UFFD_FEATURE_MISSING_SHMEM",
            });
        }
        if granted & sys::UFFD_FEATURE_MISSING_HUGETLBFS == 0 {
            return Err(PlacementError::Unsupported {
                feature: "UFFD_FEATURE_MISSING_HUGETLBFS",
            });
        }
        Ok(Self {
            uffd,
            ranges: Vec::new(),
        })
    }

    /// A placer on a new userfaultfd of this process (tests, embedders).
    pub fn in_this_process() -> Result<Self, PlacementError> {
        Self::new(sys::userfaultfd().map_err(PlacementError::Create)?)
    }

    /// Registers `[start, start + len_bytes)`, a shared file mapping in
    /// units of `page_bytes` (4 KiB, or the hugetlbfs page size), for
    /// missing faults: from now on a read or write of a page not in the
    /// file waits until it is placed.
    pub fn register(
        &mut self,
        start: u64,
        len_bytes: u64,
        page_bytes: u64,
    ) -> Result<(), PlacementError> {
        if !page_bytes.is_power_of_two()
            || !start.is_multiple_of(page_bytes)
            || len_bytes == 0
            || !len_bytes.is_multiple_of(page_bytes)
        {
            return Err(PlacementError::Unaligned {
                start,
                len_bytes,
                page_bytes,
            });
        }
        sys::uffdio_register(
            &self.uffd,
            start,
            len_bytes,
            sys::UFFDIO_REGISTER_MODE_MISSING,
        )
        .map_err(|source| PlacementError::Register {
            start,
            len_bytes,
            source,
        })?;
        self.ranges.push(Range {
            start,
            len_bytes,
            page_bytes,
        });
        Ok(())
    }

    /// The next fault, waiting at most `timeout`; `None` when none came.
    pub fn next_fault(&self, timeout: Duration) -> Result<Option<Fault>, PlacementError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(m) = sys::read_uffd_msg(&self.uffd).map_err(PlacementError::Read)? {
                if m.event != sys::UFFD_EVENT_PAGEFAULT {
                    continue;
                }
                let page = self.range_of(m.address, 1).map_or(4096, |r| r.page_bytes);
                return Ok(Some(Fault {
                    address: m.address & !(page - 1),
                    write: m.flags & sys::UFFD_PAGEFAULT_FLAG_WRITE != 0,
                }));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
            sys::poll_readable(&self.uffd, ms).map_err(PlacementError::Read)?;
        }
    }

    /// Places `content` (whole pages, one or many: one system call for a
    /// run) at `address` and wakes whoever waits on them. A page found
    /// already present ends the placement there with
    /// [`Placed::AlreadyPresent`]; the pages before it are placed. On an
    /// error, [`PlacementError::Place`] names where it stopped: the pages
    /// before that are placed.
    pub fn place(&self, address: u64, content: &[u8]) -> Result<Placed, PlacementError> {
        self.check(address, content.len() as u64)?;
        self.placing(address, content.len() as u64, |at, done| {
            sys::uffdio_copy(&self.uffd, at, &content[done as usize..])
        })
    }

    /// Places zero pages over `[address, address + len_bytes)` and wakes
    /// whoever waits on them; stops like [`Self::place`].
    pub fn place_zero(&self, address: u64, len_bytes: u64) -> Result<Placed, PlacementError> {
        self.check(address, len_bytes)?;
        self.placing(address, len_bytes, |at, done| {
            sys::uffdio_zeropage(&self.uffd, at, len_bytes - done)
        })
    }

    /// Runs `op(at, done_bytes)` until all of `[address, address +
    /// len_bytes)` is placed, going on from where a short placement
    /// stopped (the kernel reports one as `EAGAIN`).
    fn placing(
        &self,
        address: u64,
        len_bytes: u64,
        op: impl Fn(u64, u64) -> Result<(), sys::PartialPlacement>,
    ) -> Result<Placed, PlacementError> {
        let mut done_bytes = 0u64;
        let mut tries = 0;
        let mut huge_tries = 0;
        loop {
            let at = address + done_bytes;
            let Err(partial) = op(at, done_bytes) else {
                return Ok(Placed::Now);
            };
            done_bytes += partial.placed_bytes;
            if partial.placed_bytes > 0 {
                tries = 0;
                if done_bytes >= len_bytes {
                    return Ok(Placed::Now);
                }
                continue;
            }
            match partial.error.raw_os_error() {
                // A hugetlbfs copy that finds no free huge page says EEXIST
                // rather than ENOMEM when the page tables around the
                // address exist (mm/hugetlb.c, hugetlb_mfill_atomic_pte).
                // With the pool empty, that is what it means; with pages
                // in it, they may have come a moment too late: try again
                // before believing the page is there.
                Some(libc::EEXIST) if huge_tries < HUGE_EEXIST_RETRIES && self.is_huge(at) => {
                    if self.huge_page_pool_empty(at) {
                        return Err(PlacementError::Place {
                            address: at,
                            len_bytes: len_bytes - done_bytes,
                            source: io::Error::from_raw_os_error(libc::ENOMEM),
                        });
                    }
                    huge_tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Some(libc::EEXIST) => return Ok(Placed::AlreadyPresent),
                Some(libc::EAGAIN) if tries < EAGAIN_RETRIES => tries += 1,
                _ => {
                    return Err(PlacementError::Place {
                        address: at,
                        len_bytes: len_bytes - done_bytes,
                        source: partial.error,
                    })
                }
            }
        }
    }

    /// Whether `address` lies in a hugetlbfs range.
    fn is_huge(&self, address: u64) -> bool {
        self.range_of(address, 1)
            .is_some_and(|r| r.page_bytes > 4096)
    }

    /// Whether the page size of the range holding `address` (a hugetlbfs
    /// one) has no free huge page left on this host (none that is not
    /// reserved).
    fn huge_page_pool_empty(&self, address: u64) -> bool {
        let Some(r) = self.range_of(address, 1) else {
            return false;
        };
        let read = |what: &str| {
            let path = format!(
                "/sys/kernel/mm/hugepages/hugepages-{}kB/{what}",
                r.page_bytes >> 10
            );
            std::fs::read_to_string(path)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
        };
        // Free pages include those reserved for other mappings.
        match (read("free_hugepages"), read("resv_hugepages")) {
            (Some(free), Some(reserved)) => free <= reserved,
            _ => false,
        }
    }

    fn range_of(&self, address: u64, len_bytes: u64) -> Option<&Range> {
        self.ranges.iter().find(|r| {
            address >= r.start
                && address
                    .checked_add(len_bytes)
                    .is_some_and(|end| end <= r.start + r.len_bytes)
        })
    }

    fn check(&self, address: u64, len_bytes: u64) -> Result<(), PlacementError> {
        match self.range_of(address, len_bytes) {
            Some(r)
                if len_bytes > 0
                    && (address - r.start).is_multiple_of(r.page_bytes)
                    && len_bytes.is_multiple_of(r.page_bytes) =>
            {
                Ok(())
            }
            _ => Err(PlacementError::Outside { address, len_bytes }),
        }
    }
}

impl MissingPlacer {
    /// Unregisters every range now: faults waiting in them are woken and
    /// go on as ordinary faults (a page not placed reads as zeros), and no
    /// later access faults here. Drop does the same.
    pub fn unregister_all(&self) {
        for r in &self.ranges {
            // Best effort: a mapping already gone has nothing to unregister.
            let _ = sys::uffdio_unregister(&self.uffd, r.start, r.len_bytes);
        }
    }
}

impl Drop for MissingPlacer {
    fn drop(&mut self) {
        for r in &self.ranges {
            // Best effort: a mapping already gone has nothing to unregister.
            let _ = sys::uffdio_unregister(&self.uffd, r.start, r.len_bytes);
        }
    }
}
