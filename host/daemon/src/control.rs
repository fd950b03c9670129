//! The daemon's control socket: one JSON request per connection, one JSON
//! reply.
//!
//! ```text
//! -> {"cmd":"migrate","to":"10.0.0.2:4444","params":{"hints":true}}
//! <- {"result":"migrated","stats":{"bytes_on_wire":...}}
//! -> {"cmd":"status"}
//! <- {"result":"status","role":"source","state":"idle",...}
//! -> {"cmd":"progress"}
//! <- {"result":"progress","progress":{"phase":"precopy","round":2,"bytes_sent":...}}
//! -> {"cmd":"cancel"}
//! <- {"result":"cancelling","phase":"precopy"}
//! ```

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use freehint_engine::{MigrationParams, MigrationStats, Phase, PhaseInfo, ReceiveStats};
use serde::{Deserialize, Serialize};

use crate::DaemonError;

/// What the operator asks the guest to do before a migration's first
/// free-page report, through freehint's guest agent (each is off unless
/// asked for: each costs the guest).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GuestPrepare {
    /// Drop the guest's clean page cache: those pages become free and are
    /// not sent; the guest reads the files from its disk again when it
    /// needs them.
    pub drop_caches: bool,
    /// Compact the guest's memory: free memory forms larger blocks; costs
    /// the guest CPU time and moves (writes) pages.
    pub compact: bool,
}

impl GuestPrepare {
    /// Whether anything is asked.
    pub fn any(&self) -> bool {
        self.drop_caches || self.compact
    }
}

/// A request to the daemon.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlRequest {
    /// Migrate this VM live to the daemon listening at `to` (`HOST:PORT`).
    Migrate {
        /// The destination daemon's `--incoming` address.
        to: String,
        /// Migration parameters (missing fields take their defaults).
        #[serde(default)]
        params: MigrationParams,
        /// What the guest agent does before the first report.
        #[serde(default)]
        guest: GuestPrepare,
    },
    /// What the daemon is doing.
    Status,
    /// The outgoing migration's live figures only: cheap and without side
    /// effects (Status also asks the guest for balloon stats), for
    /// progress bars that poll several times a second.
    Progress,
    /// Resume the guest this daemon holds paused: one received with
    /// `--no-resume`, or one left paused by an uncertain handover (the
    /// operator's decision that this side runs it). Its balloon driver is
    /// told that migration is over.
    Resume,
    /// Cancel the running migration. Before the commit it fails back (the
    /// source guest runs on, untouched); after it, it is too late.
    Cancel,
    /// Switch the running hybrid migration to postcopy at the end of its
    /// current precopy round (the operator's `--postcopy-now`).
    PostcopyNow,
    /// Reconnect the running postcopy whose link broke, now (to `to`, a
    /// new `HOST:PORT` of the destination, if given).
    PostcopyResume {
        /// The destination's new address.
        #[serde(default)]
        to: Option<String>,
    },
    /// Configure fault points (`NAME=ACTION;…`, the `FAILPOINTS` syntax);
    /// only in builds with the `failpoints` feature, for tests.
    Fault {
        /// The fault point spec.
        spec: String,
    },
}

/// The daemon's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ControlReply {
    /// The migration completed; the destination runs the guest.
    Migrated {
        /// What the sender measured.
        stats: MigrationStats,
    },
    /// The migration did not complete; `stats.state` says where the guest
    /// is (`failed`: the source runs it; `uncertain`: both may be paused).
    MigrationFailed {
        /// Why, in one line, with the operator's action when one is needed.
        message: String,
        /// What the sender measured, and the outcome.
        stats: MigrationStats,
    },
    /// The cancel was delivered; the migration's answer says how it ended.
    Cancelling {
        /// The phase it was in.
        phase: Phase,
    },
    /// Done.
    Ok,
    /// The daemon's state.
    Status(DaemonStatus),
    /// The running or last outgoing migration's figures (`null`: none).
    Progress {
        /// The figures.
        progress: Option<freehint_engine::Progress>,
    },
    /// The received guest runs.
    Resumed,
    /// The request failed; the message says why in one line.
    Error {
        /// Why.
        message: String,
    },
}

/// What a daemon does, as `freehint status` shows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DaemonState {
    /// QEMU has not connected to the vhost-user socket yet.
    #[default]
    WaitingForQemu,
    /// Serving the balloon; no migration.
    Idle,
    /// Migrating the guest out.
    Migrating,
    /// Waiting for or receiving an incoming migration.
    Receiving,
    /// The guest moved to the destination.
    Migrated,
    /// The guest arrived and runs here.
    Received,
    /// The guest arrived and waits for `freehint resume`.
    ReceivedPaused,
    /// The last migration failed; the guest runs on the source.
    Failed,
    /// The last handover's outcome is unknown; the guest is paused here and
    /// the operator decides (`operator_action`).
    Uncertain,
    /// The operator resumed the guest here after an uncertain handover.
    ResumedByOperator,
}

/// A snapshot of a daemon.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DaemonStatus {
    /// `source` (migrates out on request) or `destination` (`--incoming`).
    pub role: String,
    /// What the daemon does: `waiting-for-qemu`, `idle`, `migrating`,
    /// `receiving`, `migrated`, `received`, `received-paused`, `failed`,
    /// `uncertain` (the guest is paused here after a handover whose outcome
    /// is unknown: see `operator_action`), `resumed-by-operator`.
    pub state: DaemonState,
    /// The running or last migration: its phase and round.
    pub migration: Option<PhaseInfo>,
    /// The running or last outgoing migration's live figures: bytes sent
    /// and left, rate, estimated downtime, hints (`null` before any).
    pub progress: Option<freehint_engine::Progress>,
    /// What the operator must do, when the daemon cannot decide alone.
    pub operator_action: Option<String>,
    /// The VM's last free-page-hint cmd_id (it goes on across attempts
    /// and migrations).
    pub last_cmd_id: u32,
    /// Whether QEMU is connected to the vhost-user socket.
    pub qemu_connected: bool,
    /// Whether the guest's balloon driver has started the device (QEMU sent
    /// the memory table).
    pub balloon_driver_active: bool,
    /// The last error, if the last migration failed.
    pub last_error: Option<String>,
    /// The last incoming migration's statistics.
    pub received: Option<ReceiveStats>,
    /// The balloon device (counters, guest stats), as JSON.
    pub balloon: serde_json::Value,
}

/// Sends `req` to the daemon at `control` and returns its reply.
pub fn request(control: &Path, req: &ControlRequest) -> Result<ControlReply, DaemonError> {
    let io = |what: &'static str| {
        move |source| DaemonError::Control {
            path: control.to_path_buf(),
            what,
            source,
        }
    };
    let mut s = UnixStream::connect(control).map_err(io("cannot connect"))?;
    let mut line = serde_json::to_string(req).map_err(|e| DaemonError::Protocol(e.to_string()))?;
    line.push('\n');
    s.write_all(line.as_bytes()).map_err(io("cannot send"))?;
    let mut answer = String::new();
    BufReader::new(s)
        .read_line(&mut answer)
        .map_err(io("no answer"))?;
    if answer.is_empty() {
        return Err(DaemonError::Protocol(format!(
            "the daemon at {} closed the connection without answering",
            control.display()
        )));
    }
    serde_json::from_str(&answer).map_err(|e| DaemonError::Protocol(format!("{e}: {answer:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_unknown_fields_are_refused() {
        let r: ControlRequest =
            serde_json::from_str(r#"{"cmd":"migrate","to":"h:1","params":{"hints":false}}"#)
                .unwrap();
        let ControlRequest::Migrate { to, params, guest } = r else {
            panic!("{r:?}")
        };
        assert_eq!(to, "h:1");
        assert!(!guest.any());
        assert!(!params.hints);
        assert_eq!(params.max_rounds, MigrationParams::default().max_rounds);
        assert!(
            serde_json::from_str::<ControlRequest>(r#"{"cmd":"migrate","too":"h:1"}"#).is_err()
        );
        assert!(serde_json::from_str::<ControlRequest>(r#"{"cmd":"explode"}"#).is_err());
    }
}
