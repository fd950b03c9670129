//! The vhost dirty log (`VHOST_USER_SET_LOG_BASE`, protocol feature
//! `LOG_SHMFD`): a bitmap in memory shared with the frontend, one bit per
//! 4 KiB guest-physical page, that a backend sets for every page it writes
//! while the frontend has acked `VHOST_F_LOG_ALL` (during the frontend's
//! own migration).
//!
//! This device writes guest memory only in its used rings, so it marks
//! those pages after each queue it processes. freehint itself does not
//! need this log (it tracks used-ring writes itself, see the daemon's
//! `UsedRingLog`), but QEMU refuses to migrate a vhost-user device without
//! `LOG_SHMFD`, and the device's state goes through QEMU's migration.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU8, Ordering};

use freehint_types::GpaRange;

/// Page size the log counts in (`VHOST_LOG_PAGE`).
const LOG_PAGE_BYTES: u64 = 4096;

/// A mapped vhost dirty log.
pub(crate) struct VhostLog {
    map: *mut u8,
    map_len: usize,
    /// Where the bitmap starts in the mapping (`mmap_offset`).
    offset: usize,
}

// SAFETY: the mapping is owned by this value and only accessed through
// atomic byte operations, which are safe from any thread.
unsafe impl Send for VhostLog {}
// SAFETY: as above.
unsafe impl Sync for VhostLog {}

impl VhostLog {
    /// Maps the log QEMU sent: `size` bytes of bitmap at `offset` in `fd`.
    ///
    /// The file must hold all of them: a page of the mapping past its end
    /// would raise SIGBUS when marked. (QEMU's log is a memfd sealed
    /// against shrinking; a frontend that shrinks the file afterwards can
    /// still crash the device, as it can with guest memory.)
    pub(crate) fn map(fd: &OwnedFd, size: u64, offset: u64) -> std::io::Result<VhostLog> {
        let bad = || std::io::Error::new(std::io::ErrorKind::InvalidInput, "bad log size/offset");
        let end = size.checked_add(offset).ok_or_else(bad)?;
        let map_len = usize::try_from(end).map_err(|_| bad())?;
        if size == 0 {
            return Err(bad());
        }
        let file_len = std::fs::File::from(fd.try_clone()?).metadata()?.len();
        if file_len < end {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "log file shorter than its offset + size",
            ));
        }
        // SAFETY: a fresh shared mapping of the whole of [0, offset + size)
        // of the file, which holds that much (checked above); no existing
        // memory is affected; the result is checked before use.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(VhostLog {
            map: map.cast(),
            map_len,
            offset: offset as usize,
        })
    }

    /// Marks every page `range` touches; pages beyond the log are ignored.
    pub(crate) fn mark(&self, range: GpaRange) {
        if range.len_bytes == 0 {
            return;
        }
        let first = range.start / LOG_PAGE_BYTES;
        let last = range.start.saturating_add(range.len_bytes - 1) / LOG_PAGE_BYTES;
        for page in first..=last {
            let byte = (page / 8) as usize;
            if byte >= self.map_len - self.offset {
                return;
            }
            // SAFETY: `offset + byte` is inside the mapping (checked
            // above), which lives as long as `self`; the frontend reads and
            // clears these bytes concurrently, so they are only touched
            // atomically (AtomicU8 has the size and alignment of u8).
            let cell = unsafe { &*(self.map.add(self.offset + byte) as *const AtomicU8) };
            cell.fetch_or(1 << (page % 8), Ordering::SeqCst);
        }
    }
}

impl Drop for VhostLog {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`, owned by self.
        unsafe {
            libc::munmap(self.map.cast(), self.map_len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_the_pages_a_range_touches_and_ignores_pages_beyond_the_log() {
        let f = tempfile_in_shm();
        f.set_len(64 + 2).unwrap();
        let fd = OwnedFd::from(f.try_clone().unwrap());
        let log = VhostLog::map(&fd, 2, 64).unwrap();
        log.mark(GpaRange::new(4096 * 3 + 100, 4096)); // pages 3 and 4
        log.mark(GpaRange::new(4096 * 15, 1)); // page 15
        log.mark(GpaRange::new(4096 * 16, 4096)); // beyond: ignored
        let mut bytes = vec![0u8; 66];
        use std::os::unix::fs::FileExt;
        f.read_exact_at(&mut bytes, 0).unwrap();
        assert_eq!(&bytes[64..], &[0b0001_1000, 0b1000_0000]);
        assert!(bytes[..64].iter().all(|&b| b == 0));
    }

    /// An anonymous file (memfd), private to each test.
    fn tempfile_in_shm() -> std::fs::File {
        use std::os::fd::FromRawFd;
        // SAFETY: the name is a valid C string; the new fd is owned by the
        // File below and by nothing else.
        let fd = unsafe { libc::memfd_create(c"vhost-log-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: fd was just created and is owned by nobody else.
        unsafe { std::fs::File::from_raw_fd(fd) }
    }

    #[test]
    fn an_empty_overflowing_or_unbacked_log_is_refused() {
        let f = tempfile_in_shm();
        f.set_len(4096).unwrap();
        let fd = OwnedFd::from(f);
        assert!(VhostLog::map(&fd, 0, 0).is_err());
        assert!(VhostLog::map(&fd, u64::MAX, 1).is_err());
        assert!(
            VhostLog::map(&fd, 4096, 1).is_err(),
            "past the end of the file"
        );
        assert!(VhostLog::map(&fd, 4000, 96).is_ok());
    }
}
