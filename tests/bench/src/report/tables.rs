//! A suite's tables: a summary per group (profile, RAM, link, idle time)
//! with one row per mode, and every run for the appendix.

use std::fmt::Write as _;

use super::load::{self, mib, AllRuns, DataCheck, ModeSummary, Suite};
use super::{cell, num, whole};
use crate::record::RunStatus;

/// A suite's section: its command, when and where it ran, and a summary
/// table per group. The plots follow it.
pub(crate) fn suite_section(suite: &Suite) -> String {
    let r = &suite.report;
    let mut md = format!("## Suite: {}\n\n", suite.file_name);
    let built = r.built_from.as_deref().map_or(String::new(), |c| {
        format!(", freehint built from {}", c.trim())
    });
    let _ = writeln!(
        md,
        "Started {} on {}{built}. Its command:\n\n```\n{}\n```\n",
        r.started.trim(),
        r.machine.trim(),
        r.command.trim()
    );
    let groups = load::group(suite.runs());
    if groups.is_empty() {
        md.push_str("It has no runs.\n\n");
        return md;
    }
    if let Some(line) = transports(suite) {
        let _ = writeln!(md, "{line}\n");
    }
    let _ = writeln!(
        md,
        "{} runs in {} groups; medians over each mode's measured runs.\n",
        r.runs.len(),
        groups.len()
    );
    for (key, modes) in &groups {
        let _ = writeln!(md, "### {key}\n");
        md.push_str(
            "| mode | runs measured | held MiB | link MiB | tool MiB | total ms | downtime ms | alive (all runs) | data check (all runs) |\n\
             |---|---|---|---|---|---|---|---|---|\n",
        );
        for (mode, runs) in modes {
            let s = load::summarize(runs);
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                mode.name(),
                measured_cell(&s),
                num(s.held_mib),
                whole(s.link_mib),
                whole(s.tool_mib),
                num(s.total_time_ms),
                num(s.downtime_ms),
                alive_cell(&s.alive),
                data_check_cell(&s.data_check),
            );
        }
        md.push('\n');
    }
    md
}

/// What carried each freehint mode's runs, from their stats' `transport`
/// (`None` for a suite without freehint runs). Runs whose stats have no
/// `transport` were made before freehint had TLS: they ran over plain TCP.
fn transports(suite: &Suite) -> Option<String> {
    use std::collections::{BTreeMap, BTreeSet};
    let mut by_mode: BTreeMap<crate::record::Mode, BTreeSet<String>> = BTreeMap::new();
    for r in suite.report.runs.iter().filter(|r| r.mode.is_freehint()) {
        let t = match r.tool_stats.get("transport").and_then(|v| v.as_str()) {
            Some("tls") => "TLS".to_string(),
            Some("tcp") => "plain TCP".to_string(),
            Some(other) => other.to_string(),
            None if r.status == RunStatus::Ok => "plain TCP (before TLS existed)".to_string(),
            None => continue,
        };
        by_mode.entry(r.mode).or_default().insert(t);
    }
    if by_mode.is_empty() {
        return None;
    }
    let parts: Vec<String> = by_mode
        .iter()
        .map(|(m, t)| {
            format!(
                "{} {}",
                m.name(),
                t.iter().cloned().collect::<Vec<_>>().join(" and ")
            )
        })
        .collect();
    Some(format!("freehint's connections: {}.", parts.join("; ")))
}

/// `2 of 3 (1 failed)`.
fn measured_cell(s: &ModeSummary) -> String {
    let mut text = format!("{} of {}", s.measured, s.runs);
    let mut why = Vec::new();
    if s.failed > 0 {
        why.push(format!("{} failed", s.failed));
    }
    if s.skipped > 0 {
        why.push(format!("{} skipped", s.skipped));
    }
    if !why.is_empty() {
        let _ = write!(text, " ({})", why.join(", "));
    }
    text
}

/// `yes`, `**NO**` (how many), `–`, or not recorded.
fn alive_cell(a: &AllRuns) -> String {
    match a {
        AllRuns::NoRuns => "–".into(),
        AllRuns::Yes => "yes".into(),
        AllRuns::No(n) => format!("**NO** ({n} not alive)"),
        AllRuns::NotRecorded => "not recorded".into(),
    }
}

/// `ok`, or what failed in which repetition.
fn data_check_cell(d: &DataCheck) -> String {
    match d {
        DataCheck::NoRuns => "–".into(),
        DataCheck::Ok => "ok".into(),
        DataCheck::Failed(what) => what
            .iter()
            .map(|(rep, w)| format!("**rep {rep}: {}**", cell(w)))
            .collect::<Vec<_>>()
            .join("; "),
        DataCheck::NotRecorded => "not recorded".into(),
    }
}

/// An optional whole number, `–` for none.
fn opt_u64(x: Option<u64>) -> String {
    x.map_or_else(|| "–".into(), |x| x.to_string())
}

/// An optional byte count in whole MiB, `–` for none.
fn opt_mib(x: Option<u64>) -> String {
    whole(x.map(mib))
}

/// The appendix table of a suite: every record in order, with the reason
/// of every failed and skipped run.
pub(crate) fn every_run(suite: &Suite) -> String {
    let mut md = format!("## Appendix: every run of {}\n\n", suite.file_name);
    if suite.report.runs.is_empty() {
        md.push_str("It has no runs.\n\n");
        return md;
    }
    md.push_str(
        "| # | profile | RAM MiB | link | idle s | mode | rep | status | held MiB | link MiB | reverse MiB | tool MiB | total ms | downtime ms | tool total ms | tool downtime ms | alive | data check | reason |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for (i, r) in suite.report.runs.iter().enumerate() {
        let status = match r.status {
            RunStatus::Ok => "ok",
            RunStatus::Failed => "**failed**",
            RunStatus::Skipped => "skipped",
        };
        let alive = match r.alive {
            None => "–",
            Some(true) => "yes",
            Some(false) => "**NO**",
        };
        let data_check = match r.data_check.as_deref() {
            None => "–".to_string(),
            Some("ok") => "ok".to_string(),
            Some(what) => format!("**{}**", cell(what)),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {status} | {} | {} | {} | {} | {} | {} | {} | {} | {alive} | {data_check} | {} |",
            i + 1,
            r.profile.name(),
            r.mem_mib,
            r.link.name(),
            r.idle_s,
            r.mode.name(),
            r.rep,
            opt_u64(r.held_mib),
            opt_mib(r.bytes_link),
            opt_mib(r.bytes_link_reverse),
            opt_mib(r.bytes_tool),
            opt_u64(r.total_time_ms),
            opt_u64(r.downtime_ms),
            opt_u64(r.total_time_tool_ms),
            opt_u64(r.downtime_tool_ms),
            cell(&r.reason),
        );
    }
    md.push('\n');
    md
}
