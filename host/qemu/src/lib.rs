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

use freehint_engine::{DestinationVmm, Vmm, VmmError};
use serde_json::{json, Value};

/// Errors talking to QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The QMP socket failed.
    #[error("QMP socket {path}: {source}")]
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
    /// A wait ran out.
    #[error("timed out after {seconds} s waiting for {what}")]
    Timeout {
        /// What.
        what: String,
        /// How long.
        seconds: u64,
    },
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
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(io)?;
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
                self.events.push(v);
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

    /// Polls `query-migrate` until it completes or fails.
    pub fn wait_migration(&mut self, timeout: Duration) -> Result<Value, QmpError> {
        let start = Instant::now();
        loop {
            let r = self.execute("query-migrate", json!({}))?;
            match r["status"].as_str() {
                Some("completed") => return Ok(r),
                Some("failed") | Some("cancelled") => {
                    return Err(QmpError::Command {
                        command: "migrate".into(),
                        class: r["status"].as_str().unwrap_or("?").to_string(),
                        desc: r["error-desc"]
                            .as_str()
                            .unwrap_or("no reason given")
                            .to_string(),
                    })
                }
                _ => {}
            }
            if start.elapsed() > timeout {
                return Err(QmpError::Timeout {
                    what: "QEMU's device-state migration".into(),
                    seconds: timeout.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn vmm_err(e: QmpError) -> VmmError {
    VmmError(e.to_string())
}

fn read_state(path: &Path) -> Result<Vec<u8>, VmmError> {
    std::fs::read(path)
        .map_err(|e| VmmError(format!("reading device state {}: {e}", path.display())))
}

/// A QMP connection with freehint's capabilities set and a file to stage
/// device state in; shared by both ends.
#[derive(Debug)]
struct Connection {
    qmp: Mutex<Qmp>,
    state_file: PathBuf,
}

impl Connection {
    fn new(mut qmp: Qmp, state_file: PathBuf) -> Result<Self, QmpError> {
        qmp.set_freehint_capabilities()?;
        Ok(Self {
            qmp: Mutex::new(qmp),
            state_file,
        })
    }

    fn qmp(&self) -> std::sync::MutexGuard<'_, Qmp> {
        self.qmp.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cont(&self) -> Result<(), VmmError> {
        self.qmp()
            .execute("cont", json!({}))
            .map(|_| ())
            .map_err(vmm_err)
    }
}

/// The source QEMU.
#[derive(Debug)]
pub struct QemuVmm {
    conn: Connection,
}

impl QemuVmm {
    /// Wraps a QMP connection; device state is staged in `state_file`.
    pub fn new(qmp: Qmp, state_file: PathBuf) -> Result<Self, QmpError> {
        Ok(Self {
            conn: Connection::new(qmp, state_file)?,
        })
    }
}

impl Vmm for QemuVmm {
    fn stop(&self) -> Result<(), VmmError> {
        let mut q = self.conn.qmp();
        q.execute("stop", json!({})).map_err(vmm_err)?;
        match q.status().map_err(vmm_err)?.as_str() {
            "paused" | "postmigrate" => Ok(()),
            other => Err(VmmError(format!("QEMU is {other} after stop"))),
        }
    }

    fn resume(&self) -> Result<(), VmmError> {
        self.conn.cont()
    }

    fn device_state(&self) -> Result<Vec<u8>, VmmError> {
        let file = &self.conn.state_file;
        let _ = std::fs::remove_file(file);
        let mut q = self.conn.qmp();
        q.execute(
            "migrate",
            json!({ "uri": format!("file:{}", file.display()) }),
        )
        .map_err(vmm_err)?;
        q.wait_migration(Duration::from_secs(60)).map_err(vmm_err)?;
        read_state(file)
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
            conn: Connection::new(qmp, state_file)?,
        })
    }
}

impl DestinationVmm for QemuDestination {
    fn load_device_state(&self, state: &[u8]) -> Result<(), VmmError> {
        if state.is_empty() {
            return Err(VmmError("the source sent no device state for QEMU".into()));
        }
        let file = &self.conn.state_file;
        std::fs::write(file, state)
            .map_err(|e| VmmError(format!("writing device state {}: {e}", file.display())))?;
        let mut q = self.conn.qmp();
        q.execute(
            "migrate-incoming",
            json!({ "uri": format!("file:{}", file.display()) }),
        )
        .map_err(vmm_err)?;
        q.wait_migration(Duration::from_secs(60)).map_err(vmm_err)?;
        Ok(())
    }

    fn resume(&self) -> Result<(), VmmError> {
        self.conn.cont()
    }
}

/// The pid of the process at the other end of a connected Unix socket
/// (`SO_PEERCRED`): QEMU's, on its QMP or vhost-user socket.
pub fn socket_peer_pid(socket: &std::os::unix::net::UnixStream) -> std::io::Result<i32> {
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
    if cred.pid <= 0 {
        return Err(std::io::Error::other(
            "the peer has no pid in this namespace",
        ));
    }
    Ok(cred.pid)
}
