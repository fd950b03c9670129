//! The QMP events of a QEMU, with their host timestamps, read on a monitor
//! of their own: every mode of the demo and the benchmark suite is timed
//! from them the same way (downtime: the source's `STOP` to the
//! destination's `RESUME`).
//!
//! Every QEMU the [`Testbed`](crate::Testbed) starts has a second QMP
//! monitor (`VM.events.qmp`) for this, so the observer never competes with
//! whoever drives the migration (freehint's daemon or the demo itself).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// One QMP event.
#[derive(Clone, Debug)]
pub struct QmpEvent {
    /// Its name (`STOP`, `RESUME`, `MIGRATION`, …).
    pub name: String,
    /// QEMU's host timestamp of it (wall clock), in µs since the epoch.
    pub timestamp_us: u64,
    /// Its `data` member (`Null` when it has none).
    pub data: Value,
}

/// The events of one QEMU, collected by a thread as they come.
pub struct QmpEvents {
    events: Arc<Mutex<Vec<QmpEvent>>>,
}

/// The wall clock now, in µs since the epoch: the clock QEMU stamps its
/// events with.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

impl QmpEvents {
    /// Connects to the QMP monitor at `path`, enters command mode and
    /// starts collecting its events.
    pub fn connect(path: &Path) -> std::io::Result<QmpEvents> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut line = String::new();
        reader.read_line(&mut line)?; // the greeting
        (&stream).write_all(b"{\"execute\":\"qmp_capabilities\"}\n")?;
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Err(std::io::Error::other("QMP closed during negotiation"));
            }
            let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
            if v.get("return").is_some() {
                break;
            }
            if let Some(e) = v.get("error") {
                return Err(std::io::Error::other(format!("qmp_capabilities: {e}")));
            }
        }
        stream.set_read_timeout(None)?;
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        std::thread::spawn(move || {
            for line in reader.lines().map_while(Result::ok) {
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                let Some(name) = v.get("event").and_then(Value::as_str) else {
                    continue;
                };
                let ts = &v["timestamp"];
                let timestamp_us = ts["seconds"].as_u64().unwrap_or(0) * 1_000_000
                    + ts["microseconds"].as_u64().unwrap_or(0);
                sink.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(QmpEvent {
                        name: name.to_string(),
                        timestamp_us,
                        data: v.get("data").cloned().unwrap_or(Value::Null),
                    });
            }
        });
        Ok(QmpEvents { events })
    }

    /// Every event so far.
    pub fn all(&self) -> Vec<QmpEvent> {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The timestamp of the first event named `name` at or after `after_us`
    /// whose data satisfies `matches`.
    pub fn first(
        &self,
        name: &str,
        after_us: u64,
        matches: impl Fn(&Value) -> bool,
    ) -> Option<u64> {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|e| e.name == name && e.timestamp_us >= after_us && matches(&e.data))
            .map(|e| e.timestamp_us)
    }

    /// Waits up to `timeout` for [`Self::first`].
    pub fn wait(
        &self,
        name: &str,
        after_us: u64,
        matches: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Option<u64> {
        let mut found = None;
        crate::poll(timeout, || {
            found = self.first(name, after_us, &matches);
            found.is_some()
        });
        found
    }
}

/// A migration timed from QMP events: the same definitions for every mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EventTiming {
    /// When the migrate command was given (host wall clock, µs).
    pub migrate_us: u64,
    /// The source's `STOP` event.
    pub src_stop_us: Option<u64>,
    /// The destination's `RESUME` event.
    pub dst_resume_us: Option<u64>,
    /// The destination's `MIGRATION` event with status `completed` (for
    /// postcopy: its last page placed), when it emitted one.
    pub dst_completed_us: Option<u64>,
}

impl EventTiming {
    /// Reads the timing of a migration started at `migrate_us` from the
    /// source's and destination's events, waiting up to `timeout` for the
    /// destination's `RESUME` (and, with `until_completed`, its `MIGRATION
    /// completed`).
    pub fn read(
        src: &QmpEvents,
        dst: &QmpEvents,
        migrate_us: u64,
        until_completed: bool,
        timeout: Duration,
    ) -> EventTiming {
        let any = |_: &Value| true;
        let dst_resume_us = dst.wait("RESUME", migrate_us, any, timeout);
        let completed = |d: &Value| d["status"] == "completed";
        let dst_completed_us = if until_completed {
            dst.wait("MIGRATION", migrate_us, completed, timeout)
        } else {
            dst.first("MIGRATION", migrate_us, completed)
        };
        EventTiming {
            migrate_us,
            src_stop_us: src.first("STOP", migrate_us, any),
            dst_resume_us,
            dst_completed_us,
        }
    }

    /// Source `STOP` → destination `RESUME`, in ms.
    pub fn downtime_ms(&self) -> Option<u64> {
        let (stop, resume) = (self.src_stop_us?, self.dst_resume_us?);
        Some(resume.saturating_sub(stop) / 1000)
    }

    /// Migrate command → destination `RESUME` (with `postcopy`: → the
    /// destination's `MIGRATION completed`, its last page placed), in ms.
    pub fn total_time_ms(&self, postcopy: bool) -> Option<u64> {
        let end = if postcopy {
            self.dst_completed_us?
        } else {
            self.dst_resume_us?
        };
        Some(end.saturating_sub(self.migrate_us) / 1000)
    }
}
