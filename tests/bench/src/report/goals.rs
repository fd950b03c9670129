//! The goals, judged on the medians of the runs of every suite file (runs
//! of the same profile, RAM, link and idle time in several files are
//! pooled).

use std::collections::BTreeSet;
use std::fmt::Write as _;

use super::load::{self, GroupKey, Groups, Run, Suite};
use super::{num, whole, Verdict};
use crate::record::{Link, Mode, Profile};

/// Goal 1: freehint-hints sends at most this × the memory the guest holds.
pub(crate) const BYTES_PER_HELD_MAX: f64 = 1.1;
/// Goal 2: freehint-hints' total time at 16 GiB is at most this × at 2 GiB.
pub(crate) const TIME_16G_PER_2G_MAX: f64 = 1.3;
/// Goal 2's sizes.
const SMALL_MIB: u64 = 2048;
const BIG_MIB: u64 = 16384;
/// Goal 4: downtime at most this, in ms.
pub(crate) const DOWNTIME_MAX_MS: f64 = 10.0;
/// Goal 5: freehint-hints' total time at most this × freehint-nohints'.
pub(crate) const HINTS_PER_NOHINTS_MAX: f64 = 1.05;
/// Goal 7: freehint-postcopy's link bytes at most this × freehint-hints'.
pub(crate) const POSTCOPY_BYTES_PER_PRECOPY_MAX: f64 = 1.05;
/// Goal 8: remote-fault latency targets, µs.
pub(crate) const FAULT_P50_MAX_US: f64 = 100.0;
pub(crate) const FAULT_P99_MAX_US: f64 = 1000.0;
/// Goal 9: freehint-agent's total time at most this × freehint-hints'.
pub(crate) const AGENT_PER_HINTS_MAX: f64 = 0.5;
/// Goal 9: the agent's first report of a 2 GiB guest within this, ms.
pub(crate) const AGENT_REPORT_MAX_MS: f64 = 20.0;

/// Goal 11: freehint-hints over TLS costs at most this × the same over
/// plain TCP, in bytes and in time.
pub(crate) const TLS_PER_PLAIN_MAX: f64 = 1.15;

/// Every run of every suite, grouped.
struct Pool<'a> {
    groups: Groups<'a>,
}

impl<'a> Pool<'a> {
    /// The runs of a mode in a group (none when absent).
    fn runs(&self, key: &GroupKey, mode: Mode) -> &[Run<'a>] {
        self.groups
            .get(key)
            .and_then(|m| m.get(&mode))
            .map_or(&[], |v| v.as_slice())
    }

    /// The median total time of a mode in a group.
    fn total_ms(&self, key: &GroupKey, mode: Mode) -> Option<f64> {
        load::median_of(self.runs(key, mode), |r| r.total_time_ms.map(|x| x as f64))
    }

    /// The suite files the runs of these modes in these groups come from.
    fn sources(&self, keys: &[GroupKey], modes: &[Mode]) -> String {
        let files: BTreeSet<&str> = keys
            .iter()
            .flat_map(|k| modes.iter().flat_map(move |&m| self.runs(k, m)))
            .map(|r| r.suite.file_name.as_str())
            .collect();
        if files.is_empty() {
            "–".into()
        } else {
            files.into_iter().collect::<Vec<_>>().join(", ")
        }
    }

    /// The groups that have runs of `mode` and pass `keep`.
    fn keys_with(&self, mode: Mode, keep: impl Fn(&GroupKey) -> bool) -> Vec<GroupKey> {
        self.groups
            .iter()
            .filter(|(k, modes)| keep(k) && modes.contains_key(&mode))
            .map(|(k, _)| *k)
            .collect()
    }
}

/// The QEMU modes, in report order.
fn qemu_modes() -> impl Iterator<Item = Mode> {
    Mode::EVERY.into_iter().filter(|m| !m.is_freehint())
}

/// `a / b` when both are there (and `b` is not zero).
fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        (Some(a), Some(_)) if a > 0.0 => Some(f64::INFINITY),
        (Some(_), Some(_)) => Some(1.0),
        _ => None,
    }
}

/// `1.23×`, `–` for none.
fn times(x: Option<f64>) -> String {
    x.map_or_else(|| "–".into(), |x| format!("{x:.2}×"))
}

/// One goal, written.
struct Goal {
    title: String,
    verdict: Verdict,
    body: String,
}

/// The goals' section.
pub(crate) fn section(suites: &[Suite]) -> String {
    let pool = Pool {
        groups: load::group(suites.iter().flat_map(Suite::runs)),
    };
    let goals = [
        goal_bytes(&pool),
        goal_scaling(&pool),
        goal_vs_qemu(&pool),
        goal_downtime(&pool),
        goal_hints_never_cost(&pool),
        goal_postcopy_downtime(&pool),
        goal_postcopy_bytes(&pool),
        goal_fault_latency(&pool),
        goal_agent(&pool),
        goal_drop_caches(&pool),
        goal_tls(&pool),
    ];
    let mut md = String::from(
        "## Goals\n\n\
         Each judged on the medians of the measured runs of every suite file below that \
         has the runs it needs (runs of the same profile, RAM, link and idle time in \
         several files are pooled; the last column names the files). A goal is met \
         when every row measured meets it; rows whose runs are absent are not measured.\n\n\
         | goal | verdict |\n|---|---|\n",
    );
    for (i, g) in goals.iter().enumerate() {
        let _ = writeln!(md, "| {}. {} | {} |", i + 1, g.title, g.verdict);
    }
    md.push('\n');
    for (i, g) in goals.iter().enumerate() {
        let _ = writeln!(md, "### {}. {}: {}\n", i + 1, g.title, g.verdict);
        md.push_str(&g.body);
    }
    md
}

/// The goal's verdict line under its table.
fn finish(title: &str, mut body: String, rows: &[Verdict], none: &str) -> Goal {
    let verdict = Verdict::overall(rows);
    if rows.is_empty() {
        let _ = writeln!(body, "Not measured: {none}\n");
    }
    Goal {
        title: title.into(),
        verdict,
        body,
    }
}

/// Goal 1: bytes over the link ≤ 1.1 × held memory, judged for freehint's
/// default (no wait) and for a bounded wait for the guest's first report.
fn goal_bytes(pool: &Pool) -> Goal {
    let modes = [Mode::FreehintHints, Mode::FreehintHintsWait];
    let mut body = format!(
        "Median link bytes vs the median memory the guest held, on every profile but \
         page-cache; target ≤ {BYTES_PER_HELD_MAX}×. freehint-hints is the default (no \
         wait: hints apply while the first round runs); freehint-hints-wait waits up to \
         {} ms for the guest's first report (`--hint-wait-ms`).\n\n",
        freehint_demo::HINT_WAIT_MS
    );
    let mut verdicts = Vec::new();
    let mut header = false;
    for mode in modes {
        for key in pool.keys_with(mode, |k| k.profile != Profile::PageCache) {
            if !header {
                body.push_str(
                    "| mode | profile | RAM MiB | link | idle s | held MiB | link MiB | link / held | verdict | from |\n\
                     |---|---|---|---|---|---|---|---|---|---|\n",
                );
                header = true;
            }
            let s = load::summarize(pool.runs(&key, mode));
            let r = ratio(s.link_mib, s.held_mib);
            let v = r.map_or(Verdict::NotMeasured, |r| {
                Verdict::from_bool(r <= BYTES_PER_HELD_MAX)
            });
            verdicts.push(v);
            let _ = writeln!(
                body,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {v} | {} |",
                mode.name(),
                key.profile.name(),
                key.mem_mib,
                key.link.name(),
                key.idle_s,
                num(s.held_mib),
                whole(s.link_mib),
                times(r),
                pool.sources(&[key], &[mode]),
            );
        }
    }
    body.push('\n');
    finish(
        &format!("freehint sends ≤ {BYTES_PER_HELD_MAX}× held memory"),
        body,
        &verdicts,
        "no freehint-hints runs outside page-cache.",
    )
}

/// Goal 2: total time at 16 GiB ≤ 1.3 × at 2 GiB on fresh and after-job.
fn goal_scaling(pool: &Pool) -> Goal {
    let mut body = format!(
        "freehint-hints' median total time at {BIG_MIB} MiB vs at {SMALL_MIB} MiB, same \
         link and idle time, on fresh and after-job; target ≤ {TIME_16G_PER_2G_MAX}×. \
         The same ratio of each QEMU mode is beside it (`–` where a size is not measured).\n\n"
    );
    // (profile, link, idle) with runs at either size.
    let mut rows: BTreeSet<(Profile, Link, u64)> = BTreeSet::new();
    let mut qemu: BTreeSet<Mode> = BTreeSet::new();
    for (k, modes) in &pool.groups {
        if matches!(k.profile, Profile::Fresh | Profile::AfterJob)
            && (k.mem_mib == SMALL_MIB || k.mem_mib == BIG_MIB)
        {
            rows.insert((k.profile, k.link, k.idle_s));
            qemu.extend(modes.keys().filter(|m| !m.is_freehint()));
        }
    }
    let qemu: Vec<Mode> = qemu_modes().filter(|m| qemu.contains(m)).collect();
    let mut verdicts = Vec::new();
    if !rows.is_empty() {
        body.push_str(&format!(
            "| profile | link | idle s | {SMALL_MIB} MiB ms | {BIG_MIB} MiB ms | ratio | verdict |"
        ));
        for m in &qemu {
            let _ = write!(body, " {} |", m.name());
        }
        body.push_str(" from |\n|---|---|---|---|---|---|---|");
        body.push_str(&"---|".repeat(qemu.len() + 1));
        body.push('\n');
    }
    for (profile, link, idle_s) in rows {
        let key = |mem_mib| GroupKey {
            profile,
            mem_mib,
            link,
            idle_s,
        };
        let (small, big) = (key(SMALL_MIB), key(BIG_MIB));
        let at = |m: Mode| (pool.total_ms(&small, m), pool.total_ms(&big, m));
        let (a, b) = at(Mode::FreehintHints);
        let r = ratio(b, a);
        let v = r.map_or(Verdict::NotMeasured, |r| {
            Verdict::from_bool(r <= TIME_16G_PER_2G_MAX)
        });
        verdicts.push(v);
        let _ = write!(
            body,
            "| {} | {} | {idle_s} | {} | {} | {} | {v} |",
            profile.name(),
            link.name(),
            num(a),
            num(b),
            times(r)
        );
        for &m in &qemu {
            let (qa, qb) = at(m);
            match ratio(qb, qa) {
                Some(r) => {
                    let _ = write!(body, " {r:.2}× ({} → {} ms) |", num(qa), num(qb));
                }
                None => body.push_str(" – |"),
            }
        }
        let mut modes = vec![Mode::FreehintHints];
        modes.extend(&qemu);
        let _ = writeln!(body, " {} |", pool.sources(&[small, big], &modes));
    }
    body.push('\n');
    finish(
        &format!(
            "freehint-hints' total time at {BIG_MIB} MiB ≤ {TIME_16G_PER_2G_MAX}× at {SMALL_MIB} MiB"
        ),
        body,
        &verdicts,
        &format!("no fresh or after-job runs at {SMALL_MIB} or {BIG_MIB} MiB."),
    )
}

/// Goal 3: on 1gbit, freehint-hints faster than QEMU's best mode.
fn goal_vs_qemu(pool: &Pool) -> Goal {
    let mut body = String::from(
        "On the 1gbit link, for every profile and size: freehint-hints' median total time \
         vs the lowest median total time of the QEMU modes; target: below it.\n\n",
    );
    let keys: Vec<GroupKey> = pool
        .groups
        .keys()
        .filter(|k| k.link == Link::Gbit1)
        .copied()
        .collect();
    let mut verdicts = Vec::new();
    if !keys.is_empty() {
        body.push_str(
            "| profile | RAM MiB | idle s | freehint-hints ms | best QEMU mode | its ms | verdict | from |\n\
             |---|---|---|---|---|---|---|---|\n",
        );
    }
    for key in keys {
        let hints = pool.total_ms(&key, Mode::FreehintHints);
        let best = qemu_modes()
            .filter_map(|m| pool.total_ms(&key, m).map(|t| (m, t)))
            .min_by(|a, b| a.1.total_cmp(&b.1));
        let v = match (hints, best) {
            (Some(h), Some((_, q))) => Verdict::from_bool(h < q),
            _ => Verdict::NotMeasured,
        };
        verdicts.push(v);
        let mut modes = vec![Mode::FreehintHints];
        modes.extend(qemu_modes());
        let _ = writeln!(
            body,
            "| {} | {} | {} | {} | {} | {} | {v} | {} |",
            key.profile.name(),
            key.mem_mib,
            key.idle_s,
            num(hints),
            best.map_or("–", |(m, _)| m.name()),
            num(best.map(|(_, t)| t)),
            pool.sources(&[key], &modes),
        );
    }
    body.push('\n');
    finish(
        "on 1gbit, freehint-hints' total time below QEMU's best",
        body,
        &verdicts,
        "no runs on the 1gbit link.",
    )
}

/// Goal 4: downtime ≤ 10 ms for freehint on fresh and after-job.
fn goal_downtime(pool: &Pool) -> Goal {
    let mut body = format!(
        "Median downtime (the source's `STOP` → the destination's `RESUME`) of \
         freehint-hints and freehint-nohints on fresh and after-job; target ≤ \
         {DOWNTIME_MAX_MS} ms.\n\n"
    );
    let mut rows: Vec<(GroupKey, Mode)> = Vec::new();
    for (k, modes) in &pool.groups {
        if matches!(k.profile, Profile::Fresh | Profile::AfterJob) {
            for m in [Mode::FreehintHints, Mode::FreehintNohints] {
                if modes.contains_key(&m) {
                    rows.push((*k, m));
                }
            }
        }
    }
    let mut verdicts = Vec::new();
    let mut breakdowns = String::new();
    if !rows.is_empty() {
        body.push_str(
            "| profile | RAM MiB | link | idle s | mode | downtime ms | verdict | from |\n\
             |---|---|---|---|---|---|---|---|\n",
        );
    }
    for (key, mode) in rows {
        let runs = pool.runs(&key, mode);
        let downtime = load::summarize(runs).downtime_ms;
        let v = downtime.map_or(Verdict::NotMeasured, |d| {
            Verdict::from_bool(d <= DOWNTIME_MAX_MS)
        });
        verdicts.push(v);
        let _ = writeln!(
            body,
            "| {} | {} | {} | {} | {} | {} | {v} | {} |",
            key.profile.name(),
            key.mem_mib,
            key.link.name(),
            key.idle_s,
            mode.name(),
            num(downtime),
            pool.sources(&[key], &[mode]),
        );
        if v == Verdict::NotMet {
            let measured = runs.iter().filter(|r| r.measured()).count();
            let _ = write!(breakdowns, "- {}, {key}: ", mode.name());
            match load::median_breakdown(runs) {
                Some(fields) if !fields.is_empty() => {
                    let parts: Vec<String> = fields
                        .iter()
                        .map(|(k, x)| format!("`{k}` {}", num(Some(*x))))
                        .collect();
                    let _ = writeln!(
                        breakdowns,
                        "{} (medians of {measured} runs).",
                        parts.join(", ")
                    );
                }
                _ => breakdowns.push_str("the breakdown is not recorded.\n"),
            }
        }
    }
    body.push('\n');
    if !breakdowns.is_empty() {
        body.push_str("Where the downtime is over the target, its breakdown (the runs' `tool_stats.downtime_breakdown`):\n\n");
        body.push_str(&breakdowns);
        body.push('\n');
    }
    finish(
        &format!("freehint's downtime ≤ {DOWNTIME_MAX_MS} ms on fresh and after-job"),
        body,
        &verdicts,
        "no freehint runs on fresh or after-job.",
    )
}

/// Goal 5: hints never cost: with hints ≤ 1.05 × without, at 2 GiB.
fn goal_hints_never_cost(pool: &Pool) -> Goal {
    let mut body = format!(
        "On every profile at {SMALL_MIB} MiB, each link: freehint-hints' median total time \
         vs freehint-nohints'; target ≤ {HINTS_PER_NOHINTS_MAX}×.\n\n"
    );
    let keys: Vec<GroupKey> = pool
        .groups
        .iter()
        .filter(|(k, modes)| {
            k.mem_mib == SMALL_MIB
                && (modes.contains_key(&Mode::FreehintHints)
                    || modes.contains_key(&Mode::FreehintNohints))
        })
        .map(|(k, _)| *k)
        .collect();
    let mut verdicts = Vec::new();
    if !keys.is_empty() {
        body.push_str(
            "| profile | link | idle s | freehint-hints ms | freehint-nohints ms | ratio | verdict | from |\n\
             |---|---|---|---|---|---|---|---|\n",
        );
    }
    for key in keys {
        let h = pool.total_ms(&key, Mode::FreehintHints);
        let n = pool.total_ms(&key, Mode::FreehintNohints);
        let r = ratio(h, n);
        let v = r.map_or(Verdict::NotMeasured, |r| {
            Verdict::from_bool(r <= HINTS_PER_NOHINTS_MAX)
        });
        verdicts.push(v);
        let _ = writeln!(
            body,
            "| {} | {} | {} | {} | {} | {} | {v} | {} |",
            key.profile.name(),
            key.link.name(),
            key.idle_s,
            num(h),
            num(n),
            times(r),
            pool.sources(&[key], &[Mode::FreehintHints, Mode::FreehintNohints]),
        );
    }
    body.push('\n');
    finish(
        &format!(
            "hints never cost: freehint-hints' total time ≤ {HINTS_PER_NOHINTS_MAX}× freehint-nohints' at {SMALL_MIB} MiB"
        ),
        body,
        &verdicts,
        &format!("no freehint runs at {SMALL_MIB} MiB."),
    )
}

/// Goal 9: freehint's guest agent against the stock driver's hints.
fn goal_agent(pool: &Pool) -> Goal {
    let mut body = format!(
        "At {SMALL_MIB} MiB, each link: on after-job (the demo's guest), the agent's \
         first report's median time (`hint_report_ms`, target ≤ {AGENT_REPORT_MAX_MS} ms) \
         and freehint-agent's median total time vs freehint-hints' (the stock driver's \
         hints; target ≤ {AGENT_PER_HINTS_MAX}×); on fragmented, freehint-agent's link \
         bytes vs the memory the guest held (target ≤ {BYTES_PER_HELD_MAX}×). Every \
         figure is shown for both, with the pages the guest allocated during the \
         migration (its kernel's `pgalloc_*` counters, from its heartbeat before the \
         migration to its first on the destination): the stock driver allocates every \
         block it hints, which Debian's init_on_alloc zeroes; the agent allocates \
         none.\n\n"
    );
    let keys = pool.keys_with(Mode::FreehintAgent, |k| {
        k.mem_mib == SMALL_MIB && matches!(k.profile, Profile::AfterJob | Profile::Fragmented)
    });
    let mut verdicts = Vec::new();
    if !keys.is_empty() {
        body.push_str(
            "| profile | link | idle s | report ms | agent ms | hints ms | agent / hints | link MiB | held MiB | link / held | pages allocated: agent | hints | verdict | from |\n\
             |---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        );
    }
    for key in keys {
        let runs = pool.runs(&key, Mode::FreehintAgent);
        let report = load::median_of(runs, |r| tool_figure(r, "hint_report_ms"));
        let a = pool.total_ms(&key, Mode::FreehintAgent);
        let h = pool.total_ms(&key, Mode::FreehintHints);
        let time = ratio(a, h);
        let s = load::summarize(runs);
        let bytes = ratio(s.link_mib, s.held_mib);
        let allocated = |mode| {
            load::median_of(pool.runs(&key, mode), |r| {
                r.guest_pages_allocated.map(|p| p as f64)
            })
        };
        let checks = if key.profile == Profile::AfterJob {
            vec![
                report.map(|r| r <= AGENT_REPORT_MAX_MS),
                time.map(|r| r <= AGENT_PER_HINTS_MAX),
            ]
        } else {
            vec![bytes.map(|r| r <= BYTES_PER_HELD_MAX)]
        };
        let v = if checks.iter().any(Option::is_none) {
            Verdict::NotMeasured
        } else {
            Verdict::from_bool(checks.iter().all(|c| *c == Some(true)))
        };
        verdicts.push(v);
        let _ = writeln!(
            body,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {v} | {} |",
            key.profile.name(),
            key.link.name(),
            key.idle_s,
            num(report),
            num(a),
            num(h),
            times(time),
            whole(s.link_mib),
            num(s.held_mib),
            times(bytes),
            whole(allocated(Mode::FreehintAgent)),
            whole(allocated(Mode::FreehintHints)),
            pool.sources(&[key], &[Mode::FreehintAgent, Mode::FreehintHints]),
        );
    }
    body.push('\n');
    finish(
        &format!(
            "the guest agent reports in ≤ {AGENT_REPORT_MAX_MS} ms, takes ≤ {AGENT_PER_HINTS_MAX}× the stock driver's time, sends ≤ {BYTES_PER_HELD_MAX}× held on fragmented"
        ),
        body,
        &verdicts,
        &format!("no freehint-agent runs of after-job or fragmented at {SMALL_MIB} MiB."),
    )
}

/// Goal 10: `--guest-drop-caches` cuts the bytes by at least what it frees.
fn goal_drop_caches(pool: &Pool) -> Goal {
    let mut body = String::from(
        "On page-cache: freehint-agent-drop-caches' median link bytes vs \
         freehint-agent's, and the median memory the guest freed by dropping its clean \
         page cache (`guest_prepare_freed_bytes`); target: the bytes fall by at least \
         what was freed (within 5%).\n\n",
    );
    let keys = pool.keys_with(Mode::FreehintAgentDropCaches, |k| {
        k.profile == Profile::PageCache
    });
    let mut verdicts = Vec::new();
    if !keys.is_empty() {
        body.push_str(
            "| RAM MiB | link | idle s | agent link MiB | drop-caches link MiB | cut MiB | freed MiB | verdict | from |\n\
             |---|---|---|---|---|---|---|---|---|\n",
        );
    }
    for key in keys {
        let plain = load::summarize(pool.runs(&key, Mode::FreehintAgent)).link_mib;
        let dropping = load::summarize(pool.runs(&key, Mode::FreehintAgentDropCaches)).link_mib;
        let freed = load::median_of(pool.runs(&key, Mode::FreehintAgentDropCaches), |r| {
            tool_figure(r, "guest_prepare_freed_bytes").map(|b| b / 1048576.0)
        });
        let cut = plain.zip(dropping).map(|(p, d)| p - d);
        let v = match (cut, freed) {
            (Some(c), Some(f)) => Verdict::from_bool(c >= f * 0.95),
            _ => Verdict::NotMeasured,
        };
        verdicts.push(v);
        let _ = writeln!(
            body,
            "| {} | {} | {} | {} | {} | {} | {} | {v} | {} |",
            key.mem_mib,
            key.link.name(),
            key.idle_s,
            whole(plain),
            whole(dropping),
            whole(cut),
            whole(freed),
            pool.sources(
                &[key],
                &[Mode::FreehintAgent, Mode::FreehintAgentDropCaches]
            ),
        );
    }
    body.push('\n');
    finish(
        "--guest-drop-caches cuts the bytes by at least the cache it drops",
        body,
        &verdicts,
        "no freehint-agent-drop-caches runs on page-cache.",
    )
}

/// Goal 11: TLS with mutual authentication costs at most 15% in bytes and
/// in time against plain TCP, judged on the unshaped link (loopback), where
/// the cipher's CPU cost shows most.
fn goal_tls(pool: &Pool) -> Goal {
    let mut body = format!(
        "freehint-hints over TLS 1.3 with mutual x509 authentication (as every freehint \
         mode runs since TLS exists) vs freehint-hints-insecure (plain TCP, \
         `--insecure`): median link bytes and median total time, each within \
         {TLS_PER_PLAIN_MAX}× of plain TCP's. Only runs whose stats say `transport: tls` \
         count as TLS (earlier suite files ran freehint-hints over plain TCP). Judged on \
         the unshaped link (loopback), shown for shaped ones.\n\n"
    );
    let keys = pool.keys_with(Mode::FreehintHintsInsecure, |_| true);
    let mut verdicts = Vec::new();
    if !keys.is_empty() {
        body.push_str(
            "| profile | RAM MiB | link | idle s | TLS link MiB | plain link MiB | bytes | TLS ms | plain ms | time | verdict | from |\n\
             |---|---|---|---|---|---|---|---|---|---|---|---|\n",
        );
    }
    for key in keys {
        let tls_runs = over(pool.runs(&key, Mode::FreehintHints), "tls");
        let plain_runs = over(pool.runs(&key, Mode::FreehintHintsInsecure), "tcp");
        let (tls, plain) = (load::summarize(&tls_runs), load::summarize(&plain_runs));
        let total = |runs: &[Run]| load::median_of(runs, |r| r.total_time_ms.map(|x| x as f64));
        let (tls_ms, plain_ms) = (total(&tls_runs), total(&plain_runs));
        let bytes = ratio(tls.link_mib, plain.link_mib);
        let time = ratio(tls_ms, plain_ms);
        let v = match (bytes, time) {
            (Some(b), Some(t)) => {
                Verdict::from_bool(b <= TLS_PER_PLAIN_MAX && t <= TLS_PER_PLAIN_MAX)
            }
            _ => Verdict::NotMeasured,
        };
        let shown = if key.link == Link::Unlimited {
            verdicts.push(v);
            v.to_string()
        } else {
            "not judged (shaped link)".to_string()
        };
        let files: BTreeSet<&str> = tls_runs
            .iter()
            .chain(&plain_runs)
            .map(|r| r.suite.file_name.as_str())
            .collect();
        let _ = writeln!(
            body,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {shown} | {} |",
            key.profile.name(),
            key.mem_mib,
            key.link.name(),
            key.idle_s,
            whole(tls.link_mib),
            whole(plain.link_mib),
            times(bytes),
            whole(tls_ms),
            whole(plain_ms),
            times(time),
            files.into_iter().collect::<Vec<_>>().join(", "),
        );
    }
    body.push('\n');
    finish(
        &format!("TLS costs ≤ {TLS_PER_PLAIN_MAX}× plain TCP in bytes and time"),
        body,
        &verdicts,
        "no freehint-hints-insecure runs beside freehint-hints over TLS on the unshaped link.",
    )
}

/// The runs of `runs` whose stats say they went over `transport`.
fn over<'a>(runs: &[Run<'a>], transport: &str) -> Vec<Run<'a>> {
    runs.iter()
        .filter(|r| {
            r.record
                .tool_stats
                .get("transport")
                .and_then(|t| t.as_str())
                == Some(transport)
        })
        .copied()
        .collect()
}

/// A figure of the tool's own stats (`tool_stats`), as a number.
fn tool_figure(r: &crate::record::RunRecord, key: &str) -> Option<f64> {
    r.tool_stats.get(key).and_then(|v| v.as_f64())
}

/// The groups with runs of `mode`, in order.
fn groups_with(pool: &Pool, mode: Mode) -> Vec<GroupKey> {
    pool.keys_with(mode, |_| true)
}

/// Goal 6: the switch to postcopy costs device state only: freehint-postcopy's
/// downtime ≤ 10 ms.
fn goal_postcopy_downtime(pool: &Pool) -> Goal {
    let mut body = format!(
        "Median downtime (the source's `STOP` → the destination's `RESUME`) of \
         freehint-postcopy, beside QEMU's own postcopy measured the same way; target ≤ \
         {DOWNTIME_MAX_MS} ms.\n\n"
    );
    let keys = groups_with(pool, Mode::FreehintPostcopy);
    let mut verdicts = Vec::new();
    if !keys.is_empty() {
        body.push_str(
            "| profile | RAM MiB | link | idle s | freehint-postcopy ms | qemu-postcopy ms | verdict | from |\n\
             |---|---|---|---|---|---|---|---|\n",
        );
    }
    for key in keys {
        let ours = load::summarize(pool.runs(&key, Mode::FreehintPostcopy)).downtime_ms;
        let qemu = load::summarize(pool.runs(&key, Mode::QemuPostcopy)).downtime_ms;
        let v = ours.map_or(Verdict::NotMeasured, |d| {
            Verdict::from_bool(d <= DOWNTIME_MAX_MS)
        });
        verdicts.push(v);
        let _ = writeln!(
            body,
            "| {} | {} | {} | {} | {} | {} | {v} | {} |",
            key.profile.name(),
            key.mem_mib,
            key.link.name(),
            key.idle_s,
            num(ours),
            num(qemu),
            pool.sources(&[key], &[Mode::FreehintPostcopy, Mode::QemuPostcopy]),
        );
    }
    body.push('\n');
    finish(
        &format!("the switch to postcopy: freehint-postcopy's downtime ≤ {DOWNTIME_MAX_MS} ms"),
        body,
        &verdicts,
        "no freehint-postcopy runs.",
    )
}

/// Goal 7: postcopy with hints sends within 5% of precopy with hints.
fn goal_postcopy_bytes(pool: &Pool) -> Goal {
    let mut body = format!(
        "Median bytes over the link of freehint-postcopy vs freehint-hints (precopy) on the \
         same guest; target ≤ {POSTCOPY_BYTES_PER_PRECOPY_MAX}×. QEMU turns free-page \
         hinting off with postcopy; its postcopy is beside.\n\n"
    );
    let keys = groups_with(pool, Mode::FreehintPostcopy);
    let mut verdicts = Vec::new();
    if !keys.is_empty() {
        body.push_str(
            "| profile | RAM MiB | link | idle s | freehint-postcopy MiB | freehint-hints MiB | ratio | qemu-postcopy MiB | verdict | from |\n\
             |---|---|---|---|---|---|---|---|---|---|\n",
        );
    }
    let mib = |key: &GroupKey, m: Mode| {
        load::median_of(pool.runs(key, m), |r| {
            r.bytes_link.map(|b| b as f64 / 1048576.0)
        })
    };
    for key in keys {
        let (pc, pre, qemu) = (
            mib(&key, Mode::FreehintPostcopy),
            mib(&key, Mode::FreehintHints),
            mib(&key, Mode::QemuPostcopy),
        );
        let r = ratio(pc, pre);
        let v = r.map_or(Verdict::NotMeasured, |r| {
            Verdict::from_bool(r <= POSTCOPY_BYTES_PER_PRECOPY_MAX)
        });
        verdicts.push(v);
        let _ = writeln!(
            body,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {v} | {} |",
            key.profile.name(),
            key.mem_mib,
            key.link.name(),
            key.idle_s,
            whole(pc),
            whole(pre),
            times(r),
            whole(qemu),
            pool.sources(
                &[key],
                &[
                    Mode::FreehintPostcopy,
                    Mode::FreehintHints,
                    Mode::QemuPostcopy
                ]
            ),
        );
    }
    body.push('\n');
    finish(
        &format!(
            "postcopy with hints sends ≤ {POSTCOPY_BYTES_PER_PRECOPY_MAX}× precopy with hints"
        ),
        body,
        &verdicts,
        "no freehint-postcopy runs beside freehint-hints runs.",
    )
}

/// Goal 8: remote-fault latency (the destination's fault event to its
/// wake-up) p50 ≤ 100 µs and p99 ≤ 1 ms, with the bulk stream running.
fn goal_fault_latency(pool: &Pool) -> Goal {
    let mut body = format!(
        "Medians over the runs of freehint-postcopy's own figures (`fault_latency_us_p50`, \
         `_p99`, `_max`: from the fault event to the wake-up, the bulk stream running at \
         the same time); targets p50 ≤ {FAULT_P50_MAX_US} µs and p99 ≤ {FAULT_P99_MAX_US} µs. \
         QEMU reports no per-fault latency; its postcopy's blocked vCPU time is in the \
         suite tables. The goal is set on loopback: it is judged on the real guests' \
         unshaped link (`unlimited`) here and on the simulated VM in \"Postcopy on \
         loopback\" below. Rows on a shaped link show what a slower link adds and are \
         not judged: its urgent channel, marked DSCP 46 (EF), is queued ahead of the \
         bulk stream, but a fault on a page a bulk channel has already taken waits \
         behind that channel's queue, and an answer waits for the bulk segment on the \
         wire (64 KiB, 0.5 ms at 1 Gbit/s).\n\n"
    );
    let keys = groups_with(pool, Mode::FreehintPostcopy);
    let mut verdicts = Vec::new();
    if !keys.is_empty() {
        body.push_str(
            "| profile | RAM MiB | link | idle s | remote faults | p50 µs | p99 µs | max µs | verdict | from |\n\
             |---|---|---|---|---|---|---|---|---|---|\n",
        );
    }
    for key in keys {
        let runs = pool.runs(&key, Mode::FreehintPostcopy);
        let f = |k: &str| load::median_of(runs, |r| tool_figure(r, k));
        let (faults, p50, p99, max) = (
            f("faults_remote"),
            f("fault_latency_us_p50"),
            f("fault_latency_us_p99"),
            f("fault_latency_us_max"),
        );
        let v = match (faults, p50, p99) {
            (Some(n), Some(a), Some(b)) if n > 0.0 => {
                Verdict::from_bool(a <= FAULT_P50_MAX_US && b <= FAULT_P99_MAX_US)
            }
            _ => Verdict::NotMeasured,
        };
        let judged = key.link == Link::Unlimited;
        let shown = if judged {
            verdicts.push(v);
            v.to_string()
        } else {
            "not judged (shaped link)".to_string()
        };
        let _ = writeln!(
            body,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {shown} | {} |",
            key.profile.name(),
            key.mem_mib,
            key.link.name(),
            key.idle_s,
            whole(faults),
            whole(p50),
            whole(p99),
            whole(max),
            pool.sources(&[key], &[Mode::FreehintPostcopy]),
        );
    }
    body.push('\n');
    finish(
        &format!(
            "postcopy's remote faults: p50 ≤ {FAULT_P50_MAX_US} µs, p99 ≤ {FAULT_P99_MAX_US} µs"
        ),
        body,
        &verdicts,
        "no freehint-postcopy runs with remote faults.",
    )
}
