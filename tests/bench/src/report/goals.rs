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
