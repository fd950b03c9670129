//! Raw kernel interfaces the host crates share: userfaultfd ioctls and
//! messages (write-protect mode for dirty tracking, missing mode for
//! postcopy placement), `PAGEMAP_SCAN`, pidfd, and the TCP socket figures
//! postcopy sizes its queues by (`TCP_INFO`, `FIONREAD`, the thread CPU clock).
//!
//! The `libc` crate does not carry `PAGEMAP_SCAN` or the userfaultfd
//! structures, and its `tcp_info` is glibc's shorter one, so they are
//! declared here from the kernel's UAPI headers (`linux/userfaultfd.h`,
//! `linux/fs.h`, `linux/tcp.h`).

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

/// A `UFFDIO_COPY` or `UFFDIO_ZEROPAGE` that stopped early: how far it got,
/// and why it stopped.
#[derive(Debug)]
pub struct PartialPlacement {
    /// Bytes placed (whole pages, from the start) before the error.
    pub placed_bytes: u64,
    /// Why the placement stopped.
    pub error: io::Error,
}

/// `UFFDIO_COPY` of `src` (this process) to `dst` (the registered mm),
/// waking the faulting threads. The kernel copies page by page; on an
/// error, the pages before the failing one are in place
/// ([`PartialPlacement::placed_bytes`]).
pub fn uffdio_copy(uffd: &OwnedFd, dst: u64, src: &[u8]) -> Result<(), PartialPlacement> {
    let mut c = UffdioCopy {
        dst,
        src: src.as_ptr() as u64,
        len: src.len() as u64,
        mode: 0,
        copy: 0,
    };
    ioctl(uffd, UFFDIO_COPY, &mut c)
        .map(|_| ())
        .map_err(|error| PartialPlacement {
            // `copy` holds the bytes copied, or a negative errno when none
            // were.
            placed_bytes: u64::try_from(c.copy).unwrap_or(0),
            error,
        })
}

/// `UFFDIO_ZEROPAGE` of `[start, start + len)`, waking the faulting
/// threads. Like [`uffdio_copy`], it may stop part way.
pub fn uffdio_zeropage(uffd: &OwnedFd, start: u64, len: u64) -> Result<(), PartialPlacement> {
    let mut z = UffdioZeropage {
        range: UffdioRange { start, len },
        mode: 0,
        zeropage: 0,
    };
    ioctl(uffd, UFFDIO_ZEROPAGE, &mut z)
        .map(|_| ())
        .map_err(|error| PartialPlacement {
            // `zeropage` holds the bytes zeroed, or a negative errno.
            placed_bytes: u64::try_from(z.zeropage).unwrap_or(0),
            error,
        })
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

/// The head of the kernel's `struct tcp_info` (`linux/tcp.h`), through
/// `tcpi_min_rtt`; the kernel fills as much as the caller's buffer holds.
#[repr(C)]
#[derive(Default)]
struct RawTcpInfo {
    head_u8: [u8; 8],
    rto_to_total_retrans: [u32; 24],
    pacing_rate: u64,
    max_pacing_rate: u64,
    bytes_acked: u64,
    bytes_received: u64,
    segs_out: u32,
    segs_in: u32,
    notsent_bytes: u32,
    min_rtt: u32,
}

/// The figures of one TCP socket that postcopy's queue sizing reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpFigures {
    /// Smoothed round-trip time, µs (queueing included).
    pub rtt_us: u32,
    /// The receiver's own round-trip estimate, µs (0 before it has one).
    pub rcv_rtt_us: u32,
    /// Smallest round-trip time seen, µs: the path without its queues.
    pub min_rtt_us: u32,
    /// Bytes the peer has acknowledged, since the connection opened.
    pub bytes_acked: u64,
    /// Bytes received, since the connection opened.
    pub bytes_received: u64,
}

/// CPU time the calling thread has used (`CLOCK_THREAD_CPUTIME_ID`): time
/// it ran, not time it waited for a CPU.
pub fn thread_cpu_time() -> std::time::Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through the pointer, which
    // points to `t`, a live local of that type.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    if rc < 0 {
        return std::time::Duration::ZERO;
    }
    std::time::Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// Bytes a socket holds received and not yet read (`FIONREAD`).
pub fn readable_bytes(fd: &impl AsRawFd) -> io::Result<u64> {
    socket_queue_bytes(fd, libc::FIONREAD)
}

/// Bytes a TCP socket holds that its peer has not acknowledged yet, sent
/// or not (`SIOCOUTQ`).
pub fn unacknowledged_bytes(fd: &impl AsRawFd) -> io::Result<u64> {
    socket_queue_bytes(fd, libc::TIOCOUTQ)
}

/// One of the socket ioctls that report a queue's length as a c_int.
fn socket_queue_bytes(fd: &impl AsRawFd, request: libc::Ioctl) -> io::Result<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD and SIOCOUTQ (TIOCOUTQ) on a socket write one c_int
    // through the pointer, which points to `n`, a live local of that type.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request, &mut n as *mut libc::c_int) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as u64)
}

/// `TCP_INFO` of a TCP socket.
pub fn tcp_figures(fd: &impl AsRawFd) -> io::Result<TcpFigures> {
    let mut info = RawTcpInfo::default();
    let mut len = std::mem::size_of::<RawTcpInfo>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, a live
    // local of exactly that size made of plain integers, and stores the
    // length it wrote in `len`, a live local.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            &mut info as *mut RawTcpInfo as *mut libc::c_void,
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // After the 8 bytes of u8 fields: rto, ato, snd_mss, rcv_mss, unacked,
    // sacked, lost, retrans, fackets, four last_* times, pmtu,
    // rcv_ssthresh, then tcpi_rtt (index 15), rttvar, snd_ssthresh,
    // snd_cwnd, advmss, reordering, then tcpi_rcv_rtt (index 21).
    let u = &info.rto_to_total_retrans;
    Ok(TcpFigures {
        rtt_us: u[15],
        rcv_rtt_us: u[21],
        min_rtt_us: info.min_rtt,
        bytes_acked: info.bytes_acked,
        bytes_received: info.bytes_received,
    })
}

/// Puts the calling thread in the `SCHED_FIFO` class at `priority`
/// (1..=99): it then runs as soon as it wakes, ahead of every ordinary
/// thread. Needs `CAP_SYS_NICE` (or an `RLIMIT_RTPRIO` that allows it).
pub fn set_this_thread_fifo(priority: i32) -> io::Result<()> {
    let p = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: pid 0 is the calling thread; the kernel reads one
    // sched_param from `&p`, a live local.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &p) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
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
        // Through tcpi_min_rtt.
        assert_eq!(std::mem::size_of::<RawTcpInfo>(), 152);
    }

    #[test]
    fn tcp_figures_agree_with_glibcs_head_and_count_the_bytes() {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut b, _) = l.accept().unwrap();
        let sent = vec![7u8; 300_000];
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; 300_000];
            b.read_exact(&mut got).unwrap();
            b.write_all(b"k").unwrap();
            b
        });
        a.write_all(&sent).unwrap();
        let mut k = [0u8; 1];
        a.read_exact(&mut k).unwrap();
        let b = reader.join().unwrap();
        let fa = tcp_figures(&a).unwrap();
        let fb = tcp_figures(&b).unwrap();
        // Every byte written was acknowledged before the peer answered.
        // (Give or take the sequence number of the connection's SYN, which
        // one side counts and the other does not.)
        assert!((300_000..=300_001).contains(&fa.bytes_acked), "{fa:?}");
        assert!((300_000..=300_001).contains(&fb.bytes_received), "{fb:?}");
        assert!(
            (1..1_000_000).contains(&fa.min_rtt_us),
            "{fa:?}: loopback, under a second"
        );
        // The same fields as glibc's (shorter) struct reads them.
        let mut g: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `g`, a live
        // local of that size made of plain integers.
        let rc = unsafe {
            libc::getsockopt(
                a.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                &mut g as *mut libc::tcp_info as *mut libc::c_void,
                &mut len,
            )
        };
        assert_eq!(rc, 0);
        let fa2 = tcp_figures(&a).unwrap();
        assert_eq!((g.tcpi_rtt, g.tcpi_rcv_rtt), (fa2.rtt_us, fa2.rcv_rtt_us));
    }
}
