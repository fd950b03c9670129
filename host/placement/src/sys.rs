//! The userfaultfd ioctls and messages this crate needs, declared from the
//! kernel's UAPI header `linux/userfaultfd.h` (the `libc` crate does not
//! carry them).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

pub(crate) const UFFD_API: u64 = 0xAA;
/// MISSING faults on shmem (memfd, /dev/shm) mappings.
pub(crate) const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
/// MISSING faults on hugetlbfs mappings.
pub(crate) const UFFD_FEATURE_MISSING_HUGETLBFS: u64 = 1 << 4;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
/// `uffd_msg.event` of a page fault.
pub(crate) const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// `uffd_msg.arg.pagefault.flags`: the access was a write.
pub(crate) const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;

const UFFDIO_API: u64 = 0xC018_AA3F;
const UFFDIO_REGISTER: u64 = 0xC020_AA00;
const UFFDIO_UNREGISTER: u64 = 0x8010_AA01;
const UFFDIO_COPY: u64 = 0xC028_AA03;
const UFFDIO_ZEROPAGE: u64 = 0xC020_AA04;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
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

/// `struct uffd_msg` (32 bytes), the page-fault member of its union.
#[repr(C)]
#[derive(Default, Clone, Copy)]
pub(crate) struct UffdMsg {
    pub(crate) event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    pub(crate) flags: u64,
    pub(crate) address: u64,
    ptid: u32,
    pad: u32,
}

fn ioctl<T>(fd: &impl AsRawFd, req: u64, arg: &mut T) -> io::Result<()> {
    // SAFETY: every caller passes the request number whose argument layout
    // `T` copies (#[repr(C)], from linux/userfaultfd.h); `arg` is a live
    // exclusive borrow for the call's duration.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg as *mut T) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A new userfaultfd in this process (non-blocking, close-on-exec).
pub(crate) fn userfaultfd() -> io::Result<OwnedFd> {
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

/// `UFFDIO_API`; the features the kernel grants.
pub(crate) fn uffdio_api(uffd: &OwnedFd, features: u64) -> io::Result<u64> {
    let mut a = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    ioctl(uffd, UFFDIO_API, &mut a)?;
    Ok(a.features)
}

/// `UFFDIO_REGISTER` in MISSING mode.
pub(crate) fn uffdio_register_missing(uffd: &OwnedFd, start: u64, len: u64) -> io::Result<()> {
    let mut r = UffdioRegister {
        range: UffdioRange { start, len },
        mode: UFFDIO_REGISTER_MODE_MISSING,
        ioctls: 0,
    };
    ioctl(uffd, UFFDIO_REGISTER, &mut r)
}

/// `UFFDIO_UNREGISTER`.
pub(crate) fn uffdio_unregister(uffd: &OwnedFd, start: u64, len: u64) -> io::Result<()> {
    let mut r = UffdioRange { start, len };
    ioctl(uffd, UFFDIO_UNREGISTER, &mut r)
}

/// `UFFDIO_COPY` of `len` bytes at `src` (this process) to `dst` (the
/// registered mm), waking the faulting threads.
pub(crate) fn uffdio_copy(uffd: &OwnedFd, dst: u64, src: *const u8, len: u64) -> io::Result<()> {
    let mut c = UffdioCopy {
        dst,
        src: src as u64,
        len,
        mode: 0,
        copy: 0,
    };
    ioctl(uffd, UFFDIO_COPY, &mut c)
}

/// `UFFDIO_ZEROPAGE` of `[start, start + len)`, waking the faulting threads.
pub(crate) fn uffdio_zeropage(uffd: &OwnedFd, start: u64, len: u64) -> io::Result<()> {
    let mut z = UffdioZeropage {
        range: UffdioRange { start, len },
        mode: 0,
        zeropage: 0,
    };
    ioctl(uffd, UFFDIO_ZEROPAGE, &mut z)
}

/// One message, if one is waiting.
pub(crate) fn read_msg(uffd: &OwnedFd) -> io::Result<Option<UffdMsg>> {
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

/// Waits up to `timeout_ms` for the fd to be readable; whether it is.
pub(crate) fn poll_readable(uffd: &OwnedFd, timeout_ms: i32) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd: uffd.as_raw_fd(),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The sizes the ioctl numbers encode (linux/userfaultfd.h).
    #[test]
    fn structs_match_the_kernel_sizes() {
        assert_eq!(std::mem::size_of::<UffdioApi>(), 24);
        assert_eq!(std::mem::size_of::<UffdioRegister>(), 32);
        assert_eq!(std::mem::size_of::<UffdioRange>(), 16);
        assert_eq!(std::mem::size_of::<UffdioCopy>(), 40);
        assert_eq!(std::mem::size_of::<UffdioZeropage>(), 32);
        assert_eq!(std::mem::size_of::<UffdMsg>(), 32);
        assert_eq!((UFFDIO_COPY >> 16) & 0x3fff, 40);
        assert_eq!((UFFDIO_ZEROPAGE >> 16) & 0x3fff, 32);
        assert_eq!((UFFDIO_REGISTER >> 16) & 0x3fff, 32);
    }
}
