//! `freehint status`: a daemon's state as a short table for people, or as
//! the control protocol's JSON for programs.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use freehint_daemon::{request, ControlReply, ControlRequest, DaemonState, DaemonStatus};
use freehint_engine::Phase;
use indicatif::{HumanBytes, HumanCount};

pub const STATUS_EXAMPLE: &str = "\
Examples:
  freehint status --control /run/fh/a.ctl
  freehint status --control /run/fh/a.ctl --control /run/fh/b.ctl   # source and destination
  freehint status --control /run/fh/a.ctl --json

The table has one row per daemon: its control socket (VM), role, state,
whether the guest runs on its QEMU (GUEST: running, paused, moved-away,
not-here), the migration's phase and round, bytes sent (source) or
received (destination), and the pages free-page hints took off the send
list (and the guest memory its hints covered). The last error and the operator's action, when the daemon needs one
(after an uncertain handover: resume the guest on exactly one side), follow
the table.

--json prints the daemon's full state (with the balloon's counters and the
migration's live figures) as the control protocol returns it; an array with
several --control.";

/// Arguments of `freehint status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// A daemon's control socket; repeat it to see several daemons (the
    /// source's and the destination's) in one table.
    #[arg(long, required = true, value_name = "SOCKET")]
    control: Vec<PathBuf>,
    /// Print the state as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Asks the daemon at `control` for its status.
fn fetch(control: &std::path::Path) -> Result<DaemonStatus> {
    match request(control, &ControlRequest::Status)? {
        ControlReply::Status(s) => Ok(s),
        ControlReply::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer from the daemon: {other:?}"),
    }
}

/// `freehint status`.
pub fn status(a: StatusArgs) -> Result<()> {
    if let [one] = a.control.as_slice() {
        let s = fetch(one)?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&s)?);
        } else {
            print!("{}", render(&[(one.display().to_string(), Ok(s))]));
        }
        return Ok(());
    }
    let all: Vec<(String, Result<DaemonStatus>)> = a
        .control
        .iter()
        .map(|c| (c.display().to_string(), fetch(c)))
        .collect();
    let failed = all.iter().filter(|(_, r)| r.is_err()).count();
    if a.json {
        let values: Vec<serde_json::Value> = all
            .iter()
            .map(|(vm, r)| match r {
                Ok(s) => serde_json::to_value(s).unwrap_or_default(),
                Err(e) => serde_json::json!({ "control": vm, "error": crate::one_line(e) }),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&values)?);
    } else {
        print!("{}", render(&all));
    }
    if failed > 0 {
        bail!("{failed} of {} daemons did not answer", all.len());
    }
    Ok(())
}

/// Where the guest is, as far as this daemon's QEMU goes.
fn guest(s: &DaemonStatus) -> &'static str {
    use DaemonState::*;
    let phase = s.migration.map(|m| m.phase);
    match s.state {
        WaitingForQemu => "no-qemu",
        Idle | Received | ResumedByOperator => "running",
        Migrating => match phase {
            None | Some(Phase::Setup | Phase::Precopy | Phase::Failed) => "running",
            Some(Phase::Completed) => "moved-away",
            Some(_) => "paused",
        },
        Receiving => match phase {
            // The guest runs here while its last pages arrive.
            Some(Phase::Postcopy) => "running",
            Some(Phase::PostcopyPaused) => "waiting-for-pages",
            _ => "not-here",
        },
        Migrated => "moved-away",
        ReceivedPaused | Uncertain => "paused",
        // A source runs the guest on after a failed attempt; a destination
        // never ran it, unless it had received it before and failed to
        // send it on.
        Failed => {
            let arrived = s
                .received
                .as_ref()
                .is_some_and(|r| r.state == Phase::Completed);
            if s.role == "source" || arrived {
                "running"
            } else {
                "not-here"
            }
        }
    }
}

/// The table (and the error and action lines after it).
pub fn render(daemons: &[(String, Result<DaemonStatus>)]) -> String {
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for (vm, r) in daemons {
        let s = match r {
            Ok(s) => s,
            Err(e) => {
                rows.push([
                    vm.clone(),
                    "-".into(),
                    "unreachable".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                ]);
                notes.push(format!("{vm}: error: {}", crate::one_line(e)));
                continue;
            }
        };
        let state = serde_json::to_value(s.state)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        let (phase, round) = match s.migration {
            Some(m) => (m.phase.to_string(), m.round.to_string()),
            None => ("-".into(), "-".into()),
        };
        let bytes = match (&s.progress, &s.received) {
            // The outgoing migration is the later one on a daemon that
            // received its guest and sent it on.
            (Some(p), _) => format!("{} sent", HumanBytes(p.bytes_sent)),
            (None, Some(r)) => format!("{} received", HumanBytes(r.bytes_received)),
            (None, None) => "-".into(),
        };
        let hints = match &s.progress {
            Some(p) if p.hint_pages_cleared > 0 || p.hinted_bytes > 0 => format!(
                "{} pages skipped ({} hinted)",
                HumanCount(p.hint_pages_cleared),
                HumanBytes(p.hinted_bytes)
            ),
            Some(_) => "0".into(),
            None => "-".into(),
        };
        rows.push([
            vm.clone(),
            s.role.clone(),
            state,
            guest(s).into(),
            phase,
            round,
            bytes,
            hints,
        ]);
        if let Some(e) = &s.last_error {
            notes.push(format!("{vm}: last error: {e}"));
        }
        if let Some(action) = &s.operator_action {
            notes.push(format!("{vm}: operator action: {action}"));
        }
    }
    let mut out = crate::table::aligned(
        &[
            "VM", "ROLE", "STATE", "GUEST", "PHASE", "ROUND", "BYTES", "HINTS",
        ],
        &rows,
    );
    for n in notes {
        out.push_str(&n.replace('\n', " "));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use freehint_engine::{PhaseInfo, Progress, ReceiveStats};

    use super::*;

    fn source_migrating() -> DaemonStatus {
        DaemonStatus {
            role: "source".into(),
            state: DaemonState::Migrating,
            migration: Some(PhaseInfo {
                phase: Phase::Precopy,
                round: 3,
            }),
            progress: Some(Progress {
                phase: Phase::Precopy,
                round: 3,
                bytes_sent: 3 << 30,
                hint_pages_cleared: 12345,
                hinted_bytes: 100 << 20,
                ..Default::default()
            }),
            qemu_connected: true,
            ..Default::default()
        }
    }

    #[test]
    fn a_source_and_a_destination_share_one_aligned_table() {
        let dst = DaemonStatus {
            role: "destination".into(),
            state: DaemonState::Receiving,
            migration: Some(PhaseInfo {
                phase: Phase::Precopy,
                round: 3,
            }),
            ..Default::default()
        };
        let t = render(&[
            ("/run/fh/a.ctl".into(), Ok(source_migrating())),
            ("/run/fh/b.ctl".into(), Ok(dst)),
        ]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(
            lines[0].starts_with("VM             ROLE         STATE"),
            "{t}"
        );
        assert!(
            lines[1].contains("source")
                && lines[1].contains("migrating")
                && lines[1].contains("running")
                && lines[1].contains("precopy")
                && lines[1].contains("3.00 GiB sent")
                && lines[1].contains("12,345 pages"),
            "{t}"
        );
        assert!(
            lines[2].contains("destination") && lines[2].contains("not-here"),
            "{t}"
        );
        // Columns line up: GUEST starts at the same place in every line.
        let col = lines[0].find("GUEST").unwrap();
        assert_eq!(&lines[1][col..col + 7], "running");
        assert_eq!(&lines[2][col..col + 8], "not-here");
    }

    #[test]
    fn an_uncertain_daemon_says_paused_and_names_the_action() {
        let s = DaemonStatus {
            role: "destination".into(),
            state: DaemonState::Uncertain,
            migration: Some(PhaseInfo {
                phase: Phase::Uncertain,
                round: 5,
            }),
            last_error: Some("the link died after the commit".into()),
            operator_action: Some("run `freehint resume --control b.ctl` here".into()),
            received: Some(ReceiveStats {
                bytes_received: 1 << 20,
                ..Default::default()
            }),
            ..Default::default()
        };
        let t = render(&[("b.ctl".into(), Ok(s))]);
        assert!(
            t.contains("paused") && t.contains("1.00 MiB received"),
            "{t}"
        );
        assert!(t.contains("b.ctl: last error: the link died after the commit\n"));
        assert!(t.contains("b.ctl: operator action: run `freehint resume --control b.ctl` here\n"));
    }

    #[test]
    fn where_the_guest_is_follows_state_role_and_phase() {
        let mut s = source_migrating();
        assert_eq!(guest(&s), "running");
        s.migration = Some(PhaseInfo {
            phase: Phase::Stopped,
            round: 4,
        });
        assert_eq!(guest(&s), "paused");
        s.state = DaemonState::Migrated;
        assert_eq!(guest(&s), "moved-away");
        s.state = DaemonState::Failed;
        assert_eq!(guest(&s), "running");
        s.role = "destination".into();
        assert_eq!(guest(&s), "not-here");
        s.received = Some(ReceiveStats {
            state: Phase::Completed,
            ..Default::default()
        });
        assert_eq!(guest(&s), "running");
    }

    #[test]
    fn an_unreachable_daemon_is_a_row_and_one_error_line() {
        let t = render(&[(
            "gone.ctl".into(),
            Err(anyhow::anyhow!("cannot connect\nat all")),
        )]);
        assert!(t.contains("unreachable"), "{t}");
        assert!(
            t.ends_with("gone.ctl: error: cannot connect at all\n"),
            "{t}"
        );
    }

    #[test]
    fn the_status_of_a_daemon_without_progress_still_reads() {
        // A daemon from before the progress field.
        let s: DaemonStatus = serde_json::from_str(
            r#"{"role":"source","state":"idle","migration":null,"operator_action":null,
                "last_cmd_id":1,"qemu_connected":true,"balloon_driver_active":true,
                "last_error":null,"received":null,"balloon":{}}"#,
        )
        .unwrap();
        assert_eq!(s.progress, None);
        assert!(render(&[("a.ctl".into(), Ok(s))]).contains("running"));
    }
}
