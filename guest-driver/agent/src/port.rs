//! The virtio-serial port to the host.
//!
//! The guest's `virtio_console` driver tells whether a host program has the
//! port's chardev open: while none has, a read returns end-of-file and
//! `poll` says `POLLHUP` at once, and a write would wait. The agent opens
//! the port non-blocking so that it never waits on an absent host: it
//! polls for a host every [`HOST_POLL`], and gives up a reply when the
//! host goes away in the middle of it.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often the agent looks for a host while none is connected.
pub const HOST_POLL: Duration = Duration::from_millis(20);

/// How long a reply may wait for room in the port before it is given up.
const WRITE_STALL: Duration = Duration::from_secs(2);

/// The `/dev` node of the virtio-serial port named `name` (a
/// `virtserialport`'s `name=`), from `/sys/class/virtio-ports/*/name`.
pub fn find(name: &str) -> Option<PathBuf> {
    let dir = std::fs::read_dir("/sys/class/virtio-ports").ok()?;
    for entry in dir.flatten() {
        let Ok(got) = std::fs::read_to_string(entry.path().join("name")) else {
            continue;
        };
        if got.trim_end() == name {
            return Some(Path::new("/dev").join(entry.file_name()));
        }
    }
    None
}

/// What one read from the port gave.
pub enum Received {
    /// Bytes from the host.
    Bytes(usize),
    /// No host has the port open.
    NoHost,
}

/// The port, open for reading and writing, non-blocking.
pub struct Port {
    file: File,
}

impl Port {
    /// Opens the port's device node.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::options()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)?;
        Ok(Self { file })
    }

    /// Waits until the host sends something or goes away (at most
    /// `timeout`), then reads into `buf`.
    pub fn read(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<Received> {
        match self.poll(libc::POLLIN, timeout)? {
            Ready::Hangup => return Ok(Received::NoHost),
            Ready::Timeout => return Ok(Received::Bytes(0)),
            Ready::Yes => {}
        }
        match self.file.read(buf) {
            Ok(0) => Ok(Received::NoHost),
            Ok(n) => Ok(Received::Bytes(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Received::Bytes(0)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(Received::Bytes(0)),
            Err(e) => Err(e),
        }
    }

    /// Writes all of `bytes`, waiting for room in the port; fails if the
    /// host goes away or the port stays full for [`WRITE_STALL`].
    pub fn write_all(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            match self.file.write(bytes) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    match self.poll(libc::POLLOUT, WRITE_STALL)? {
                        Ready::Yes => {}
                        Ready::Hangup => {
                            return Err(io::Error::new(
                                io::ErrorKind::BrokenPipe,
                                "the host closed the port",
                            ))
                        }
                        Ready::Timeout => {
                            return Err(io::Error::new(
                                io::ErrorKind::TimedOut,
                                "the host reads nothing",
                            ))
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn poll(&self, events: libc::c_short, timeout: Duration) -> io::Result<Ready> {
        let mut pfd = libc::pollfd {
            fd: self.file.as_raw_fd(),
            events,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: `pfd` is one valid pollfd that lives across the call, and
        // nfds is 1.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(Ready::Timeout)
            } else {
                Err(e)
            };
        }
        Ok(if rc == 0 {
            Ready::Timeout
        } else if pfd.revents & events != 0 {
            Ready::Yes
        } else if pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0 {
            Ready::Hangup
        } else {
            Ready::Timeout
        })
    }
}

enum Ready {
    Yes,
    Hangup,
    Timeout,
}
