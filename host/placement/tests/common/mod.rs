//! memfd files and their shared mappings, for the placement tests.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// A new memfd of `len_bytes` (`flags`: `MFD_*` beyond `MFD_CLOEXEC`).
pub fn memfd(name: &CStr, flags: libc::c_uint, len_bytes: u64) -> OwnedFd {
    // SAFETY: `name` is NUL-terminated and outlives the call.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | flags) };
    assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
    // SAFETY: `fd` is new and ours alone.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: plain syscall on our fd.
    let rc = unsafe { libc::ftruncate(fd.as_raw_fd(), len_bytes as i64) };
    assert_eq!(rc, 0, "ftruncate: {}", io::Error::last_os_error());
    fd
}

/// A new shared read-write mapping of the first `len_bytes` of `fd`; its
/// address. Left mapped until the test process ends.
pub fn map_shared(fd: &OwnedFd, len_bytes: u64) -> io::Result<u64> {
    // SAFETY: a new shared mapping of `len_bytes` of `fd`, which is at least
    // that long; the kernel picks the address, so nothing of ours is
    // replaced.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len_bytes as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(p as u64)
}
