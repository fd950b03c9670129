//! `libfreehint_preload.so`: load it into a VMM with `LD_PRELOAD` and it
//! creates two userfaultfds when the process starts. That is all it does.
//!
//! The first (the lower fd number) is for dirty tracking when the VMM is a
//! migration's source, the second for placing pages when it is the
//! destination of a postcopy migration. Two, because the kernel takes the
//! `UFFDIO_API` handshake once per fd and the two uses need different
//! features: a VMM that received its guest by postcopy can then migrate it
//! out again.
//!
//! The freehint daemon finds the fds under `/proc/PID/fd`
//! (`anon_inode:[userfaultfd]`), duplicates it with `pidfd_getfd`, and does
//! all userfaultfd work (API handshake, registration, write-protect) itself.
//! A userfaultfd acts on the address space of the process that created it,
//! which is why it must be created inside the VMM.
//!
//! The fd is created with `O_CLOEXEC` so that programs the VMM executes do
//! not inherit it. If the kernel refuses (no userfaultfd support, or a
//! seccomp policy), the VMM runs normally and the daemon reports that it
//! found no userfaultfd.

/// Runs when the dynamic loader initialises the library.
extern "C" fn create_userfaultfd() {
    for _ in 0..2 {
        // SAFETY: the userfaultfd syscall only takes flags and returns a
        // new fd (or -1); the fd is intentionally left open for the daemon.
        unsafe {
            libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK);
        }
    }
}

#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = create_userfaultfd;
