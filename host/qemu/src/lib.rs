//! QEMU as a freehint [`Vmm`] and [`DestinationVmm`].
//!
//! freehint moves guest RAM itself; QEMU moves only device state. Both QEMUs
//! run with RAM in a shared `memory-backend-file` and the migration
//! capability `x-ignore-shared`, so a QEMU migration carries no RAM. The
//! source writes its device state to a file (`migrate` to `file:`), the
//! bytes travel on freehint's control channel, and the destination (started
//! with `-incoming defer`) loads them with `migrate-incoming` from a file
//! before `cont`.
//!
//! [`Qmp`] is a small typed client: no maintained Rust QMP crate covers
//! capabilities negotiation, events and errors with the blocking I/O this
//! needs, and the protocol is a few JSON lines.

#![deny(missing_docs)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use freehint_types::{DestinationVmm, Vmm, VmmError, VmmOp};
use serde_json::{json, Value};

/// Errors talking to QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The QMP socket failed.
    #[error("QMP socket {path}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// QEMU answered a command with an error.
    #[error("QEMU refused {command}: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// QEMU said something that is not QMP.
    #[error("QEMU sent unexpected QMP: {0}")]
    Protocol(String),
    /// QEMU closed the socket (it exited or crashed).
    #[error("QEMU closed its QMP socket {0} (did it exit?)")]
    Closed(PathBuf),
    /// QEMU runs without something freehint needs.
    #[error("{0}")]
    Unsupported(String),
    /// The file device state is staged in could not be written or read.
    #[error("device state file {path}")]
    StateFile {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// QEMU did not pause when told to stop.
    #[error("QEMU is {0} after stop")]
    NotPaused(String),
    /// The source sent an empty device state for a QEMU destination.
    #[error("the source sent no device state for QEMU")]
    NoDeviceState,
    /// A wait ran out.
    #[error("timed out after {seconds} s waiting for {what}")]
    Timeout {
        /// What.
        what: String,
        /// How long.
        seconds: u64,
    },
}

/// Something in the VM that writes guest RAM where freehint's dirty
/// tracking (QEMU's userfaultfd) cannot see it; migrating such a VM would
/// lose those writes, so it is refused up front.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UntrackedWriter {
    /// The device or drive, as QEMU names it.
    pub name: String,
    /// Why its writes escape dirty tracking, and what to do instead.
    pub reason: String,
}

impl std::fmt::Display for UntrackedWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.name, self.reason)
    }
}

/// A VM's guest RAM as QEMU reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamBackend {
    /// The memory backend's id.
    pub id: String,
    /// Its file.
    pub path: PathBuf,
    /// Its size.
    pub size_bytes: u64,
}

/// A QMP connection.
#[derive(Debug)]
pub struct Qmp {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: Vec<Value>,
}

impl Qmp {
    /// Connects to QEMU's QMP socket (`-qmp unix:PATH,server=on,wait=off`)
    /// and negotiates capabilities.
    pub fn connect(path: &Path) -> Result<Self, QmpError> {
        let io = |source| QmpError::Io {
            path: path.to_path_buf(),
            source,
        };
        let stream = UnixStream::connect(path).map_err(io)?;
        stream.set_read_timeout(Some(READ_TIMEOUT)).map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        let mut qmp = Self {
            path: path.to_path_buf(),
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        let greeting = qmp.read()?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!("no greeting: {greeting}")));
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Err(QmpError::Closed(self.path.clone()));
        }
        serde_json::from_str(&line).map_err(|e| QmpError::Protocol(format!("{e}: {line:?}")))
    }

    /// Runs a command and returns its `return` value. Events that arrive
    /// meanwhile are kept for [`Self::take_events`].
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                source,
            })?;
        loop {
            let v = self.read()?;
            if v.get("event").is_some() {
                self.push_event(v);
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: e["class"].as_str().unwrap_or("?").to_string(),
                    desc: e["desc"].as_str().unwrap_or("?").to_string(),
                });
            }
            return Err(QmpError::Protocol(v.to_string()));
        }
    }

    /// The pid of the QEMU process at the other end of the socket
    /// (`SO_PEERCRED`).
    pub fn peer_pid(&self) -> Result<i32, QmpError> {
        socket_peer_pid(&self.writer).map_err(|source| QmpError::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// The VM's guest RAM: its one shared `memory-backend-file`.
    pub fn shared_ram_backend(&mut self) -> Result<RamBackend, QmpError> {
        let memdevs = self.execute("query-memdev", json!({}))?;
        let shared: Vec<&Value> = memdevs
            .as_array()
            .map(|a| a.iter().filter(|m| m["share"] == json!(true)).collect())
            .unwrap_or_default();
        let m = match shared.as_slice() {
            [one] => *one,
            [] => {
                return Err(QmpError::Unsupported(
                    "QEMU has no shared memory backend: start it with -object \
                     memory-backend-file,id=mem0,size=...,mem-path=/dev/shm/NAME,share=on \
                     -machine memory-backend=mem0"
                        .into(),
                ))
            }
            many => {
                return Err(QmpError::Unsupported(format!(
                    "QEMU has {} shared memory backends; freehint migrates VMs with exactly one",
                    many.len()
                )))
            }
        };
        let id = m["id"]
            .as_str()
            .ok_or_else(|| QmpError::Protocol(format!("query-memdev entry without id: {m}")))?
            .to_string();
        let size_bytes = m["size"]
            .as_u64()
            .ok_or_else(|| QmpError::Protocol(format!("query-memdev entry without size: {m}")))?;
        let path = self
            .execute(
                "qom-get",
                json!({ "path": format!("/objects/{id}"), "property": "mem-path" }),
            )
            .ok()
            .and_then(|v| v.as_str().map(PathBuf::from))
            .ok_or_else(|| {
                QmpError::Unsupported(format!(
                    "memory backend {id} has no file (mem-path): freehint needs memory-backend-file"
                ))
            })?;
        Ok(RamBackend {
            id,
            path,
            size_bytes,
        })
    }

    /// The VM's devices and drives whose writes to guest RAM freehint's
    /// dirty tracking cannot see:
    ///
    /// * drives with `cache.direct` on (`cache=none`, or `aio=native` /
    ///   `io_uring` with O_DIRECT): the host kernel completes their reads by
    ///   DMA into pinned guest pages, which can land after a dirty-log sync
    ///   re-protected the page, unseen;
    /// * vhost-user devices other than freehint's balloon (on
    ///   `own_vhost_socket`) and VFIO devices: other processes or hardware
    ///   write guest RAM through their own mappings.
    pub fn untracked_writers(
        &mut self,
        own_vhost_socket: &Path,
    ) -> Result<Vec<UntrackedWriter>, QmpError> {
        let mut out = Vec::new();
        let blocks = self.execute("query-block", json!({}))?;
        for b in blocks.as_array().into_iter().flatten() {
            let Some(inserted) = b.get("inserted") else {
                continue;
            };
            if inserted["cache"]["direct"] == json!(true) {
                let device = b["device"].as_str().filter(|d| !d.is_empty());
                let name = device
                    .or_else(|| b["qdev"].as_str())
                    .or_else(|| inserted["node-name"].as_str())
                    .unwrap_or("?");
                out.push(UntrackedWriter {
                    name: format!(
                        "drive {name} ({})",
                        inserted["file"].as_str().unwrap_or("?")
                    ),
                    reason: "uses cache.direct=on (cache=none, or O_DIRECT for aio=native/io_uring): \
                             the host kernel writes guest RAM by DMA into pinned pages, which dirty \
                             tracking cannot see; use cache=writeback or writethrough"
                        .into(),
                });
            }
        }
        let chardevs = self.execute("query-chardev", json!({}))?;
        let chardev_file = |label: &str| -> Option<String> {
            chardevs
                .as_array()?
                .iter()
                .find(|c| c["label"] == json!(label))
                .and_then(|c| c["filename"].as_str().map(str::to_string))
        };
        let own = own_vhost_socket.display().to_string();
        for dir in ["/machine/peripheral", "/machine/peripheral-anon"] {
            let children = self.execute("qom-list", json!({ "path": dir }))?;
            for c in children.as_array().into_iter().flatten() {
                let Some(ty) = c["type"]
                    .as_str()
                    .and_then(|t| t.strip_prefix("child<"))
                    .and_then(|t| t.strip_suffix('>'))
                else {
                    continue;
                };
                let id = c["name"].as_str().unwrap_or("?");
                let path = format!("{dir}/{id}");
                if ty.starts_with("vfio") {
                    out.push(UntrackedWriter {
                        name: format!("device {id} ({ty})"),
                        reason: "a passed-through device writes guest RAM by DMA, which dirty \
                                 tracking cannot see"
                            .into(),
                    });
                } else if ty.starts_with("vhost-user-") {
                    let label = self
                        .execute("qom-get", json!({ "path": path, "property": "chardev" }))
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string));
                    let file = label.as_deref().and_then(chardev_file);
                    if file.as_deref().is_some_and(|f| f.contains(&own)) {
                        continue; // freehint's own balloon
                    }
                    out.push(UntrackedWriter {
                        name: format!("device {id} ({ty})"),
                        reason: format!(
                            "its vhost-user backend ({}) writes guest RAM through its own mapping, \
                             which dirty tracking of QEMU cannot see",
                            file.unwrap_or_else(|| "unknown socket".into())
                        ),
                    });
                }
            }
        }
        Ok(out)
    }

    /// An upper estimate of the device state QEMU's migration carries with
    /// `x-ignore-shared`: its RAM blocks other than the shared backend
    /// `ram_backend_id` (VRAM, ROMs), plus a margin for device registers.
    /// `None` if this QEMU cannot say (`x-query-ramblock` is unstable).
    pub fn device_state_estimate_bytes(
        &mut self,
        ram_backend_id: &str,
    ) -> Result<Option<u64>, QmpError> {
        let Ok(r) = self.execute("x-query-ramblock", json!({})) else {
            return Ok(None);
        };
        let Some(text) = r["human-readable-text"].as_str() else {
            return Ok(None);
        };
        Ok(Some(
            ramblock_bytes_except(text, ram_backend_id) + (1 << 20),
        ))
    }

    /// Events received so far.
    pub fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }

    /// The VM's run state (`running`, `paused`, `inmigrate`, …).
    pub fn status(&mut self) -> Result<String, QmpError> {
        let r = self.execute("query-status", json!({}))?;
        r["status"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| QmpError::Protocol(format!("query-status returned {r}")))
    }

    /// Sets the migration capabilities freehint needs: `x-ignore-shared`
    /// (RAM is ours) and `events`.
    pub fn set_freehint_capabilities(&mut self) -> Result<(), QmpError> {
        self.execute(
            "migrate-set-capabilities",
            json!({ "capabilities": [
                { "capability": "x-ignore-shared", "state": true },
                { "capability": "events", "state": true },
            ]}),
        )?;
        Ok(())
    }

    /// Runs `command` (`migrate` or `migrate-incoming`) to `uri` and waits
    /// for the `MIGRATION` event that ends it (`completed`, `failed` or
    /// `cancelled`; [`Self::set_freehint_capabilities`] turns the events
    /// on), at most `timeout`. Waiting on the event, not polling
    /// `query-migrate`, costs the stopped guest no polling interval and
    /// QEMU no QMP traffic while it saves or loads.
    pub fn migrate_and_wait(
        &mut self,
        command: &str,
        uri: &str,
        timeout: Duration,
    ) -> Result<(), QmpError> {
        // An event of an earlier migration on this connection must not end
        // this one.
        self.events.retain(|e| e["event"] != "MIGRATION");
        self.execute(command, json!({ "uri": uri }))?;
        let deadline = Instant::now() + timeout;
        let timed_out = || QmpError::Timeout {
            what: format!("QEMU's {command} of its device state"),
            seconds: timeout.as_secs(),
        };
        loop {
            if let Some(status) = self.take_migration_end() {
                if status == "completed" {
                    return Ok(());
                }
                let r = self.execute("query-migrate", json!({}))?;
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: status,
                    desc: r["error-desc"]
                        .as_str()
                        .unwrap_or("no reason given")
                        .to_string(),
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(timed_out());
            }
            match self.read_within(left)? {
                Some(v) if v.get("event").is_some() => self.push_event(v),
                Some(v) => return Err(QmpError::Protocol(format!("unasked-for reply {v}"))),
                None => return Err(timed_out()),
            }
        }
    }

    /// Removes the first buffered `MIGRATION` event with an end status and
    /// returns that status.
    fn take_migration_end(&mut self) -> Option<String> {
        let at = self.events.iter().position(|e| {
            e["event"] == "MIGRATION"
                && matches!(
                    e["data"]["status"].as_str(),
                    Some("completed" | "failed" | "cancelled")
                )
        })?;
        let event = self.events.remove(at);
        event["data"]["status"].as_str().map(str::to_string)
    }

    /// Keeps an event for [`Self::take_events`], dropping the oldest beyond
    /// [`MAX_BUFFERED_EVENTS`] (a long-lived connection sees many).
    fn push_event(&mut self, event: Value) {
        if self.events.len() >= MAX_BUFFERED_EVENTS {
            self.events.remove(0);
        }
        self.events.push(event);
    }

    /// One message, waiting at most `wait` (not zero); `None` if none came.
    fn read_within(&mut self, wait: Duration) -> Result<Option<Value>, QmpError> {
        self.set_read_timeout(wait)?;
        let read = self.read();
        self.set_read_timeout(READ_TIMEOUT)?;
        match read {
            Err(QmpError::Io { source, .. })
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            other => other.map(Some),
        }
    }

    fn set_read_timeout(&self, wait: Duration) -> Result<(), QmpError> {
        self.reader
            .get_ref()
            .set_read_timeout(Some(wait))
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                source,
            })
    }
}

/// How long one QMP read may wait before the connection counts as broken.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Events kept for [`Qmp::take_events`] at most.
pub const MAX_BUFFERED_EVENTS: usize = 256;

fn read_state(path: &Path) -> Result<Vec<u8>, QmpError> {
    std::fs::read(path).map_err(|source| QmpError::StateFile {
        path: path.to_path_buf(),
        source,
    })
}

/// A QMP connection with freehint's capabilities set, a file to stage
/// device state in, and how long QEMU may take for each step; shared by
/// both ends.
#[derive(Debug)]
struct Connection {
    qmp: Mutex<Qmp>,
    state_file: PathBuf,
    timeout: Duration,
}

impl Connection {
    fn new(mut qmp: Qmp, state_file: PathBuf, timeout: Duration) -> Result<Self, QmpError> {
        qmp.set_freehint_capabilities()?;
        Ok(Self {
            qmp: Mutex::new(qmp),
            state_file,
            timeout,
        })
    }

    fn qmp(&self) -> std::sync::MutexGuard<'_, Qmp> {
        self.qmp.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cont(&self) -> Result<(), VmmError> {
        self.qmp()
            .execute("cont", json!({}))
            .map(|_| ())
            .map_err(|e| VmmError::new(VmmOp::Resume, e))
    }
}

/// The source QEMU.
#[derive(Debug)]
pub struct QemuVmm {
    conn: Connection,
    ram_backend_id: String,
}

impl QemuVmm {
    /// Wraps a QMP connection to the QEMU whose guest RAM is the shared
    /// backend `ram_backend_id`; device state is staged in `state_file`;
    /// QEMU gets `timeout` for each step.
    pub fn new(
        qmp: Qmp,
        ram_backend_id: String,
        state_file: PathBuf,
        timeout: Duration,
    ) -> Result<Self, QmpError> {
        Ok(Self {
            conn: Connection::new(qmp, state_file, timeout)?,
            ram_backend_id,
        })
    }

    /// Whether the guest runs.
    pub fn running(&self) -> Result<bool, QmpError> {
        Ok(self.conn.qmp().status()? == "running")
    }
}

impl Vmm for QemuVmm {
    fn stop(&self) -> Result<(), VmmError> {
        let mut q = self.conn.qmp();
        let mut stopped = || {
            q.execute("stop", json!({}))?;
            match q.status()?.as_str() {
                "paused" | "postmigrate" => Ok(()),
                other => Err(QmpError::NotPaused(other.to_string())),
            }
        };
        stopped().map_err(|e| VmmError::new(VmmOp::Stop, e))
    }

    fn resume(&self) -> Result<(), VmmError> {
        self.conn.cont()
    }

    fn device_state(&self) -> Result<Vec<u8>, VmmError> {
        let file = &self.conn.state_file;
        let _ = std::fs::remove_file(file);
        let mut q = self.conn.qmp();
        let mut saved = || {
            q.migrate_and_wait(
                "migrate",
                &format!("file:{}", file.display()),
                self.conn.timeout,
            )?;
            read_state(file)
        };
        saved().map_err(|e| VmmError::new(VmmOp::SaveDeviceState, e))
    }

    fn device_state_estimate_bytes(&self) -> Result<Option<u64>, VmmError> {
        self.conn
            .qmp()
            .device_state_estimate_bytes(&self.ram_backend_id)
            .map_err(|e| VmmError::new(VmmOp::EstimateDeviceState, e))
    }

    fn handed_over(&self) -> Result<(), VmmError> {
        // The destination runs the guest: this QEMU has nothing left to do.
        let _ = self.conn.qmp().execute("quit", json!({}));
        Ok(())
    }
}

/// The destination QEMU, started with `-incoming defer` on the same RAM
/// file layout.
#[derive(Debug)]
pub struct QemuDestination {
    conn: Connection,
}

impl QemuDestination {
    /// Wraps a QMP connection; device state is staged in `state_file`.
    pub fn new(qmp: Qmp, state_file: PathBuf) -> Result<Self, QmpError> {
        Ok(Self {
            conn: Connection::new(qmp, state_file, Duration::from_secs(60))?,
        })
    }

    /// Whether the guest runs.
    pub fn running(&self) -> Result<bool, QmpError> {
        Ok(self.conn.qmp().status()? == "running")
    }

    /// QEMU's run state (`inmigrate` until device state is loaded).
    pub fn status(&self) -> Result<String, QmpError> {
        self.conn.qmp().status()
    }
}

impl DestinationVmm for QemuDestination {
    fn load_device_state(&self, state: &[u8], timeout: Duration) -> Result<(), VmmError> {
        let file = &self.conn.state_file;
        let loaded = || {
            if state.is_empty() {
                return Err(QmpError::NoDeviceState);
            }
            std::fs::write(file, state).map_err(|source| QmpError::StateFile {
                path: file.clone(),
                source,
            })?;
            self.conn.qmp().migrate_and_wait(
                "migrate-incoming",
                &format!("file:{}", file.display()),
                timeout,
            )
        };
        loaded().map_err(|e| VmmError::new(VmmOp::LoadDeviceState, e))
    }

    fn resume(&self) -> Result<(), VmmError> {
        self.conn.cont()
    }
}

/// Bytes used by the RAM blocks in `x-query-ramblock`'s table other than
/// `except` (columns: name, page size, offset, used, total, HVA, RO).
fn ramblock_bytes_except(table: &str, except: &str) -> u64 {
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            // "4 KiB" is two columns.
            let (name, used) = (cols.first()?, cols.get(4)?);
            (*name != except)
                .then(|| u64::from_str_radix(used.trim_start_matches("0x"), 16).ok())?
        })
        .sum()
}

/// Who is at the other end of a connected Unix socket (`SO_PEERCRED`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    /// Its pid (0 if it has none in this pid namespace).
    pub pid: i32,
    /// Its effective uid when it connected.
    pub uid: u32,
}

/// The credentials of the process at the other end of a connected Unix
/// socket (`SO_PEERCRED`).
pub fn socket_peer_cred(socket: &std::os::unix::net::UnixStream) -> std::io::Result<PeerCred> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given, and
    // the fd is an open socket borrowed for the call.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(PeerCred {
        pid: cred.pid,
        uid: cred.uid,
    })
}

/// The pid of the process at the other end of a connected Unix socket
/// (`SO_PEERCRED`): QEMU's, on its QMP or vhost-user socket.
pub fn socket_peer_pid(socket: &std::os::unix::net::UnixStream) -> std::io::Result<i32> {
    let cred = socket_peer_cred(socket)?;
    if cred.pid <= 0 {
        return Err(std::io::Error::other(
            "the peer has no pid in this namespace",
        ));
    }
    Ok(cred.pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ramblock_table_sums_everything_but_the_shared_backend() {
        // As QEMU 10.0 prints it for a q35 guest with a VGA card.
        let t = "              Block Name    PSize              Offset               Used              Total                HVA  RO
                    mem0    4 KiB  0x0000000000000000 0x0000000010000000 0x0000000010000000 0x00007f3b5ffff000  rw
   0000:00:02.0/vga.vram    4 KiB  0x0000000010080000 0x0000000001000000 0x0000000001000000 0x00007f3b5d800000  rw
                 pc.bios    4 KiB  0x0000000010000000 0x0000000000040000 0x0000000000040000 0x00007f3b5f600000  ro
";
        assert_eq!(ramblock_bytes_except(t, "mem0"), (16 << 20) + (256 << 10));
    }

    /// A QMP peer playing `script` (after the greeting and capabilities),
    /// and a client connected to it.
    fn scripted(
        script: impl FnOnce(&mut BufReader<UnixStream>, &mut UnixStream) + Send + 'static,
    ) -> (Qmp, std::thread::JoinHandle<()>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let peer = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut w = stream.try_clone().unwrap();
            let mut r = BufReader::new(stream);
            writeln!(w, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#).unwrap();
            expect_command(&mut r, "qmp_capabilities");
            writeln!(w, r#"{{"return": {{}}}}"#).unwrap();
            script(&mut r, &mut w);
        });
        (Qmp::connect(&path).unwrap(), peer, dir)
    }

    fn expect_command(r: &mut BufReader<UnixStream>, command: &str) {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["execute"], command, "{line}");
    }

    #[test]
    fn a_migration_ends_at_its_own_completed_event_not_an_earlier_one() {
        let (mut qmp, peer, _dir) = scripted(|r, w| {
            // An earlier migration's end, arriving during another command.
            expect_command(r, "query-status");
            writeln!(
                w,
                r#"{{"event": "MIGRATION", "data": {{"status": "completed"}}}}"#
            )
            .unwrap();
            writeln!(w, r#"{{"return": {{"status": "paused"}}}}"#).unwrap();
            expect_command(r, "migrate");
            writeln!(w, r#"{{"return": {{}}}}"#).unwrap();
            std::thread::sleep(Duration::from_millis(100));
            writeln!(
                w,
                r#"{{"event": "MIGRATION", "data": {{"status": "active"}}}}"#
            )
            .unwrap();
            writeln!(
                w,
                r#"{{"event": "MIGRATION", "data": {{"status": "completed"}}}}"#
            )
            .unwrap();
        });
        assert_eq!(qmp.status().unwrap(), "paused");
        let started = Instant::now();
        qmp.migrate_and_wait("migrate", "file:/x", Duration::from_secs(10))
            .unwrap();
        assert!(started.elapsed() >= Duration::from_millis(100));
        peer.join().unwrap();
        // The events that ended no migration are still there to take.
        let left = qmp.take_events();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0]["data"]["status"], "active");
    }

    #[test]
    fn a_failed_migration_says_qemus_reason() {
        let (mut qmp, peer, _dir) = scripted(|r, w| {
            expect_command(r, "migrate-incoming");
            writeln!(w, r#"{{"return": {{}}}}"#).unwrap();
            writeln!(
                w,
                r#"{{"event": "MIGRATION", "data": {{"status": "failed"}}}}"#
            )
            .unwrap();
            expect_command(r, "query-migrate");
            writeln!(
                w,
                r#"{{"return": {{"status": "failed", "error-desc": "Unknown savevm section"}}}}"#
            )
            .unwrap();
        });
        let e = qmp
            .migrate_and_wait("migrate-incoming", "file:/x", Duration::from_secs(10))
            .unwrap_err();
        assert!(
            matches!(&e, QmpError::Command { class, desc, .. }
                if class == "failed" && desc == "Unknown savevm section"),
            "{e:?}"
        );
        peer.join().unwrap();
    }

    #[test]
    fn a_migration_that_never_ends_times_out() {
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let (mut qmp, peer, _dir) = scripted(move |r, w| {
            expect_command(r, "migrate");
            writeln!(w, r#"{{"return": {{}}}}"#).unwrap();
            let _ = done_rx.recv();
        });
        let e = qmp
            .migrate_and_wait("migrate", "file:/x", Duration::from_millis(200))
            .unwrap_err();
        assert!(matches!(e, QmpError::Timeout { .. }), "{e:?}");
        drop(done_tx);
        peer.join().unwrap();
    }

    #[test]
    fn events_nobody_takes_stay_bounded() {
        let (mut qmp, peer, _dir) = scripted(|r, w| {
            expect_command(r, "query-status");
            for _ in 0..MAX_BUFFERED_EVENTS + 10 {
                writeln!(w, r#"{{"event": "RESUME", "data": {{}}}}"#).unwrap();
            }
            writeln!(w, r#"{{"return": {{"status": "running"}}}}"#).unwrap();
        });
        assert_eq!(qmp.status().unwrap(), "running");
        assert_eq!(qmp.take_events().len(), MAX_BUFFERED_EVENTS);
        peer.join().unwrap();
    }
}
