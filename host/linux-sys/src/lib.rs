//! Raw kernel interfaces the host crates share: userfaultfd ioctls and
//! messages (write-protect mode for dirty tracking, missing mode for
//! postcopy placement), `PAGEMAP_SCAN`, pidfd.
//!
//! The `libc` crate does not carry `PAGEMAP_SCAN` or the userfaultfd
//! structures, so they are declared here from the kernel's UAPI headers
//! (`linux/userfaultfd.h`, `linux/fs.h`).

#![deny(missing_docs)]

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `UFFD_API`.
pub const UFFD_API: u64 = 0xAA;
/// Write-protect faults on hugetlbfs and shmem.
pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// Write-protect also pages that are not yet populated.
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// Resolve write-protect faults in the kernel (no fault messages).
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
/// MISSING faults on hugetlbfs mappings.
pub const UFFD_FEATURE_MISSING_HUGETLBFS: u64 = 1 << 4;
/// MISSING faults on shmem (memfd, /dev/shm) mappings.
pub const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
/// `UFFDIO_REGISTER_MODE_MISSING`: faults on pages not present.
pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
/// `UFFDIO_REGISTER_MODE_WP`: write-protect faults.
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// `uffd_msg.event` of a page fault.
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// `uffd_msg.arg.pagefault.flags`: the access was a write.
pub const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;

const UFFDIO_API: u64 = 0xC018_AA3F;
const UFFDIO_REGISTER: u64 = 0xC020_AA00;
const UFFDIO_UNREGISTER: u64 = 0x8010_AA01;
const UFFDIO_WRITEPROTECT: u64 = 0xC018_AA06;
const UFFDIO_COPY: u64 = 0xC028_AA03;
const UFFDIO_ZEROPAGE: u64 = 0xC020_AA04;

/// `PAGEMAP_SCAN`: `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: u64 = 0xC060_6610;
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
/// Page category: written since write protection was applied.
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg` (32 bytes), read as its page-fault member (the other
/// events' members overlay the same bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UffdMsg {
    /// `UFFD_EVENT_*`.
    pub event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    /// `UFFD_PAGEFAULT_FLAG_*`.
    pub flags: u64,
    /// The faulting address.
    pub address: u64,
    ptid: u32,
    pad: u32,
}

/// `struct page_region`: one run of pages in the same categories.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PageRegion {
    /// Start address.
    pub start: u64,
    /// End address (exclusive).
    pub end: u64,
    /// Category bits.
    pub categories: u64,
}

#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

fn ioctl<T>(fd: &impl AsRawFd, req: u64, arg: &mut T) -> io::Result<i32> {
    // SAFETY: every caller passes the request number that matches the layout
    // of `T`, which is a #[repr(C)] copy of the kernel's UAPI struct.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg as *mut T) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// `UFFDIO_API`: enables `features`; returns the features the kernel grants.
pub fn uffdio_api(uffd: &OwnedFd, features: u64) -> io::Result<u64> {
    let mut a = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    ioctl(uffd, UFFDIO_API, &mut a)?;
    Ok(a.features)
}

/// `UFFDIO_REGISTER` in `mode` (`UFFDIO_REGISTER_MODE_*`).
pub fn uffdio_register(uffd: &OwnedFd, start: u64, len: u64, mode: u64) -> io::Result<()> {
    let mut r = UffdioRegister {
        range: UffdioRange { start, len },
        mode,
        ioctls: 0,
    };
    ioctl(uffd, UFFDIO_REGISTER, &mut r).map(|_| ())
}

/// `UFFDIO_UNREGISTER`.
pub fn uffdio_unregister(uffd: &OwnedFd, start: u64, len: u64) -> io::Result<()> {
    let mut r = UffdioRange { start, len };
    ioctl(uffd, UFFDIO_UNREGISTER, &mut r).map(|_| ())
}

/// `UFFDIO_WRITEPROTECT`: write-protects the range.
pub fn uffdio_writeprotect(uffd: &OwnedFd, start: u64, len: u64) -> io::Result<()> {
    let mut w = UffdioWriteprotect {
        range: UffdioRange { start, len },
        mode: UFFDIO_WRITEPROTECT_MODE_WP,
    };
    ioctl(uffd, UFFDIO_WRITEPROTECT, &mut w).map(|_| ())
}

/// A new userfaultfd in this process (non-blocking, close-on-exec).
pub fn userfaultfd() -> io::Result<OwnedFd> {
    // SAFETY: the userfaultfd syscall takes one flags argument and returns
    // a new fd or -1; it touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by the kernel and is owned by nobody
    // else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `UFFDIO_COPY` of `len` bytes at `src` (this process) to `dst` (the
/// registered mm), waking the faulting threads.
pub fn uffdio_copy(uffd: &OwnedFd, dst: u64, src: &[u8]) -> io::Result<()> {
    let mut c = UffdioCopy {
        dst,
        src: src.as_ptr() as u64,
        len: src.len() as u64,
        mode: 0,
        copy: 0,
    };
    ioctl(uffd, UFFDIO_COPY, &mut c).map(|_| ())
}

/// `UFFDIO_ZEROPAGE` of `[start, start + len)`, waking the faulting threads.
pub fn uffdio_zeropage(uffd: &OwnedFd, start: u64, len: u64) -> io::Result<()> {
    let mut z = UffdioZeropage {
        range: UffdioRange { start, len },
        mode: 0,
        zeropage: 0,
    };
    ioctl(uffd, UFFDIO_ZEROPAGE, &mut z).map(|_| ())
}

/// One userfaultfd message, if one is waiting (the fd is non-blocking).
pub fn read_uffd_msg(uffd: &OwnedFd) -> io::Result<Option<UffdMsg>> {
    let mut m = UffdMsg::default();
    let n = std::mem::size_of::<UffdMsg>();
    // SAFETY: reads at most `n` bytes into `m`, a live local of exactly `n`
    // bytes with no invalid bit patterns.
    let rc = unsafe {
        libc::read(
            uffd.as_raw_fd(),
            &mut m as *mut UffdMsg as *mut libc::c_void,
            n,
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock => Ok(None),
            _ => Err(e),
        };
    }
    if rc as usize != n {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("userfaultfd message of {rc} bytes, expected {n}"),
        ));
    }
    Ok(Some(m))
}

/// Waits up to `timeout_ms` for `fd` to be readable; whether it is.
pub fn poll_readable(fd: &impl AsRawFd, timeout_ms: i32) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd, a live local, for the call's duration.
    let rc = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc > 0 && p.revents & libc::POLLIN != 0)
}

/// One `PAGEMAP_SCAN` that reports written pages in `start..end` into `buf`
/// and write-protects them again. Returns the number of entries filled and
/// the address where the walk stopped (`end` unless `buf` filled up).
pub fn pagemap_scan_written(
    pagemap: &File,
    start: u64,
    end: u64,
    buf: &mut [PageRegion],
) -> io::Result<(usize, u64)> {
    let mut arg = PmScanArg {
        size: std::mem::size_of::<PmScanArg>() as u64,
        flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
        start,
        end,
        walk_end: 0,
        vec: buf.as_mut_ptr() as u64,
        vec_len: buf.len() as u64,
        max_pages: 0,
        category_inverted: 0,
        category_mask: PAGE_IS_WRITTEN,
        category_anyof_mask: 0,
        return_mask: PAGE_IS_WRITTEN,
    };
    let n = ioctl(pagemap, PAGEMAP_SCAN, &mut arg)?;
    Ok((n as usize, arg.walk_end))
}

/// `pidfd_open(pid, 0)`.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `pidfd_getfd(pidfd, targetfd, 0)`: a duplicate of another process's fd.
pub fn pidfd_getfd(pidfd: &OwnedFd, target_fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target_fd, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_sizes_match_the_kernel_abi() {
        assert_eq!(std::mem::size_of::<PmScanArg>(), 96);
        assert_eq!(std::mem::size_of::<PageRegion>(), 24);
        assert_eq!(std::mem::size_of::<UffdioApi>(), 24);
        assert_eq!(std::mem::size_of::<UffdioRegister>(), 32);
        assert_eq!(std::mem::size_of::<UffdioWriteprotect>(), 24);
        assert_eq!(std::mem::size_of::<UffdioRange>(), 16);
        assert_eq!(std::mem::size_of::<UffdioCopy>(), 40);
        assert_eq!(std::mem::size_of::<UffdioZeropage>(), 32);
        assert_eq!(std::mem::size_of::<UffdMsg>(), 32);
        // The sizes the ioctl numbers encode.
        assert_eq!((UFFDIO_COPY >> 16) & 0x3fff, 40);
        assert_eq!((UFFDIO_ZEROPAGE >> 16) & 0x3fff, 32);
        assert_eq!((UFFDIO_REGISTER >> 16) & 0x3fff, 32);
    }
}
