//! Loading the suites' JSON and grouping their runs: what the tables, the
//! goals and the plots are computed from.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use crate::record::{Link, Mode, Profile, RunRecord, RunStatus, SuiteReport};

/// Bytes in a MiB.
pub(crate) const BYTES_PER_MIB: f64 = 1_048_576.0;

/// One `suite-*.json` file, loaded.
pub(crate) struct Suite {
    /// Its file name, e.g. `suite-profiles.json`.
    pub file_name: String,
    /// Its content.
    pub report: SuiteReport,
    /// For each run (same index as `report.runs`): the numeric fields of
    /// `tool_stats.downtime_breakdown`, in the order the file has them;
    /// `None` when the run has no such object.
    pub breakdowns: Vec<Option<Vec<(String, f64)>>>,
}

impl Suite {
    /// The file name without `.json`: the prefix of this suite's plots.
    pub fn stem(&self) -> &str {
        self.file_name
            .strip_suffix(".json")
            .unwrap_or(&self.file_name)
    }

    /// Every run, in the file's order.
    pub fn runs(&self) -> impl Iterator<Item = Run<'_>> {
        self.report
            .runs
            .iter()
            .enumerate()
            .map(move |(i, record)| Run {
                suite: self,
                record,
                breakdown: self.breakdowns.get(i).and_then(|b| b.as_deref()),
            })
    }
}

/// One run of a suite, with the suite it came from.
#[derive(Clone, Copy)]
pub(crate) struct Run<'a> {
    /// The suite file it is in.
    pub suite: &'a Suite,
    /// The record.
    pub record: &'a RunRecord,
    /// Its downtime breakdown (see [`Suite::breakdowns`]).
    pub breakdown: Option<&'a [(String, f64)]>,
}

impl Run<'_> {
    /// Whether the run was measured (its figures count in medians).
    pub fn measured(&self) -> bool {
        self.record.status == RunStatus::Ok
    }
}

/// The `suite-*.json` files of `dir`, in file-name order, loaded.
pub(crate) fn load_suites(dir: &Path) -> anyhow::Result<Vec<Suite>> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("reading the folder {}", dir.display()))?;
    let mut paths: Vec<(String, PathBuf)> = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("reading the folder {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("suite-") && name.ends_with(".json") {
            paths.push((name, entry.path()));
        }
    }
    paths.sort();
    paths
        .into_iter()
        .map(|(name, path)| load_suite(&name, &path))
        .collect()
}

/// Loads one suite file.
pub(crate) fn load_suite(file_name: &str, path: &Path) -> anyhow::Result<Suite> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let report: SuiteReport = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a suite report", path.display()))?;
    // `tool_stats` is a `serde_json::Value`, whose objects keep their keys
    // sorted; the breakdown is read again here to keep the file's order.
    let raw: RawSuite = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a suite report", path.display()))?;
    let mut breakdowns: Vec<_> = raw.runs.into_iter().map(|r| r.tool_stats.0).collect();
    breakdowns.resize(report.runs.len(), None);
    Ok(Suite {
        file_name: file_name.to_string(),
        report,
        breakdowns,
    })
}

#[derive(Deserialize)]
struct RawSuite {
    runs: Vec<RawRun>,
}

#[derive(Deserialize)]
struct RawRun {
    #[serde(default)]
    tool_stats: RawToolStats,
}

/// `tool_stats`, of which only `downtime_breakdown` is kept (its numeric
/// fields, in order). Anything else, of any shape, is ignored.
#[derive(Default)]
struct RawToolStats(Option<Vec<(String, f64)>>);

/// An object's numeric fields in order (`None` when it is no object).
struct NumericFields(Option<Vec<(String, f64)>>);

/// The `visit_*` methods of a visitor that takes any value that is not an
/// object as `$none`.
macro_rules! anything_else_is {
    ($none:expr) => {
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok($none)
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok($none)
        }
        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok($none)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok($none)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
            Ok($none)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok($none)
        }
        fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
            Ok($none)
        }
    };
}

impl<'de> Deserialize<'de> for RawToolStats {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawToolStats;
            anything_else_is!(RawToolStats(None));
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawToolStats, A::Error> {
                let mut found = None;
                while let Some(key) = map.next_key::<String>()? {
                    if key == "downtime_breakdown" {
                        found = map.next_value::<NumericFields>()?.0;
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(RawToolStats(found))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for NumericFields {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = NumericFields;
            anything_else_is!(NumericFields(None));
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<NumericFields, A::Error> {
                let mut fields = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    if let Some(x) = map.next_value::<serde_json::Value>()?.as_f64() {
                        fields.push((key, x));
                    }
                }
                Ok(NumericFields(Some(fields)))
            }
        }
        d.deserialize_any(V)
    }
}

/// The median: the middle value, or the mean of the two middle values of
/// an even count; `None` for no values.
pub(crate) fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// What the runs of one summary table share.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct GroupKey {
    /// The guest's profile.
    pub profile: Profile,
    /// Guest RAM.
    pub mem_mib: u64,
    /// The link.
    pub link: Link,
    /// Idle seconds before the migration.
    pub idle_s: u64,
}

impl GroupKey {
    /// The group of a run.
    pub fn of(r: &RunRecord) -> GroupKey {
        GroupKey {
            profile: r.profile,
            mem_mib: r.mem_mib,
            link: r.link,
            idle_s: r.idle_s,
        }
    }
}

impl fmt::Display for GroupKey {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "{}, {} MiB, {}, idle {} s",
            self.profile.name(),
            self.mem_mib,
            self.link.name(),
            self.idle_s
        )
    }
}

/// Runs by group, then by mode, each list in the order given.
pub(crate) type Groups<'a> = BTreeMap<GroupKey, BTreeMap<Mode, Vec<Run<'a>>>>;

/// Groups runs by (profile, RAM, link, idle time), then by mode.
pub(crate) fn group<'a>(runs: impl IntoIterator<Item = Run<'a>>) -> Groups<'a> {
    let mut groups = Groups::new();
    for run in runs {
        groups
            .entry(GroupKey::of(run.record))
            .or_default()
            .entry(run.record.mode)
            .or_default()
            .push(run);
    }
    groups
}

/// Whether a flag held in every measured run.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum AllRuns {
    /// No measured run.
    NoRuns,
    /// In every measured run.
    Yes,
    /// Not in this many of the measured runs.
    No(usize),
    /// Some measured run did not record it (and none said no).
    NotRecorded,
}

/// The data check over the measured runs.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum DataCheck {
    /// No measured run.
    NoRuns,
    /// `ok` in every measured run.
    Ok,
    /// What went wrong, by repetition.
    Failed(Vec<(u32, String)>),
    /// Some measured run did not record it (and none failed).
    NotRecorded,
}

/// One mode's figures in one group: counts of runs, and medians over the
/// measured ones.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ModeSummary {
    /// Records of this mode in the group.
    pub runs: usize,
    /// Measured runs.
    pub measured: usize,
    /// Failed runs.
    pub failed: usize,
    /// Skipped runs.
    pub skipped: usize,
    /// Median memory the guest held (MiB).
    pub held_mib: Option<f64>,
    /// Median bytes over the link, source to destination (MiB).
    pub link_mib: Option<f64>,
    /// Median of the tool's own byte count (MiB).
    pub tool_mib: Option<f64>,
    /// Median total time (ms).
    pub total_time_ms: Option<f64>,
    /// Median downtime (ms).
    pub downtime_ms: Option<f64>,
    /// The guest lived on, in every measured run.
    pub alive: AllRuns,
    /// The data check, over the measured runs.
    pub data_check: DataCheck,
}

/// Bytes in MiB.
pub(crate) fn mib(bytes: u64) -> f64 {
    bytes as f64 / BYTES_PER_MIB
}

/// The median of one figure over the measured runs that have it.
pub(crate) fn median_of(runs: &[Run], figure: impl Fn(&RunRecord) -> Option<f64>) -> Option<f64> {
    let values: Vec<f64> = runs
        .iter()
        .filter(|r| r.measured())
        .filter_map(|r| figure(r.record))
        .collect();
    median(&values)
}

/// Counts and medians of one mode's runs in one group.
pub(crate) fn summarize(runs: &[Run]) -> ModeSummary {
    let count = |s: RunStatus| runs.iter().filter(|r| r.record.status == s).count();
    let measured: Vec<&RunRecord> = runs
        .iter()
        .filter(|r| r.measured())
        .map(|r| r.record)
        .collect();
    let alive = if measured.is_empty() {
        AllRuns::NoRuns
    } else {
        let dead = measured.iter().filter(|r| r.alive == Some(false)).count();
        if dead > 0 {
            AllRuns::No(dead)
        } else if measured.iter().all(|r| r.alive == Some(true)) {
            AllRuns::Yes
        } else {
            AllRuns::NotRecorded
        }
    };
    let data_check = if measured.is_empty() {
        DataCheck::NoRuns
    } else {
        let failed: Vec<(u32, String)> = measured
            .iter()
            .filter_map(|r| match r.data_check.as_deref() {
                Some("ok") | None => None,
                Some(what) => Some((r.rep, what.to_string())),
            })
            .collect();
        if !failed.is_empty() {
            DataCheck::Failed(failed)
        } else if measured.iter().all(|r| r.data_check.is_some()) {
            DataCheck::Ok
        } else {
            DataCheck::NotRecorded
        }
    };
    ModeSummary {
        runs: runs.len(),
        measured: measured.len(),
        failed: count(RunStatus::Failed),
        skipped: count(RunStatus::Skipped),
        held_mib: median_of(runs, |r| r.held_mib.map(|x| x as f64)),
        link_mib: median_of(runs, |r| r.bytes_link.map(mib)),
        tool_mib: median_of(runs, |r| r.bytes_tool.map(mib)),
        total_time_ms: median_of(runs, |r| r.total_time_ms.map(|x| x as f64)),
        downtime_ms: median_of(runs, |r| r.downtime_ms.map(|x| x as f64)),
        alive,
        data_check,
    }
}

/// The median of each field of the measured runs' downtime breakdowns, in
/// the order of their first appearance; `None` when no measured run has a
/// breakdown.
pub(crate) fn median_breakdown(runs: &[Run]) -> Option<Vec<(String, f64)>> {
    let mut fields: Vec<(String, Vec<f64>)> = Vec::new();
    let mut any = false;
    for b in runs
        .iter()
        .filter(|r| r.measured())
        .filter_map(|r| r.breakdown)
    {
        any = true;
        for (key, x) in b {
            match fields.iter_mut().find(|(k, _)| k == key) {
                Some((_, xs)) => xs.push(*x),
                None => fields.push((key.clone(), vec![*x])),
            }
        }
    }
    any.then(|| {
        fields
            .into_iter()
            .filter_map(|(k, xs)| median(&xs).map(|m| (k, m)))
            .collect()
    })
}

/// The most common value (the first of those equally common).
pub(crate) fn most_common<T: PartialEq + Copy>(values: impl IntoIterator<Item = T>) -> Option<T> {
    let mut counts: Vec<(T, usize)> = Vec::new();
    for v in values {
        match counts.iter_mut().find(|(x, _)| *x == v) {
            Some((_, n)) => *n += 1,
            None => counts.push((v, 1)),
        }
    }
    let max = counts.iter().map(|(_, n)| *n).max()?;
    counts.into_iter().find(|(_, n)| *n == max).map(|(v, _)| v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::RunKey;

    fn record(mode: Mode, mem_mib: u64, rep: u32, status: RunStatus) -> RunRecord {
        let mut r = RunRecord::unmeasured(
            RunKey {
                profile: Profile::Fresh,
                mem_mib,
                mode,
                link: Link::Gbit1,
                rep,
                idle_s: 10,
            },
            status,
            "",
        );
        if status == RunStatus::Ok {
            r.held_mib = Some(100 * rep as u64);
            r.bytes_link = Some(u64::from(rep) << 20);
            r.total_time_ms = Some(1000 + rep as u64);
            r.alive = Some(true);
            r.data_check = Some("ok".into());
        }
        r
    }

    fn suite(runs: Vec<RunRecord>) -> Suite {
        let n = runs.len();
        Suite {
            file_name: "suite-t.json".into(),
            report: SuiteReport {
                command: "c".into(),
                started: "s".into(),
                machine: "m".into(),
                built_from: None,
                runs,
            },
            breakdowns: vec![None; n],
        }
    }

    #[test]
    fn median_of_odd_even_and_none() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[5.0]), Some(5.0));
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[10.0, 1.0, 1000.0]), Some(10.0));
    }

    #[test]
    fn groups_by_key_then_mode_in_order() {
        let s = suite(vec![
            record(Mode::QemuNative, 4096, 1, RunStatus::Ok),
            record(Mode::FreehintHints, 2048, 1, RunStatus::Ok),
            record(Mode::FreehintHints, 4096, 1, RunStatus::Ok),
            record(Mode::FreehintHints, 2048, 2, RunStatus::Failed),
        ]);
        let g = group(s.runs());
        let keys: Vec<u64> = g.keys().map(|k| k.mem_mib).collect();
        assert_eq!(keys, [2048, 4096]);
        let at4g: Vec<Mode> = g.values().nth(1).unwrap().keys().copied().collect();
        assert_eq!(at4g, [Mode::FreehintHints, Mode::QemuNative]);
        let reps: Vec<u32> = g.values().next().unwrap()[&Mode::FreehintHints]
            .iter()
            .map(|r| r.record.rep)
            .collect();
        assert_eq!(reps, [1, 2]);
    }

    #[test]
    fn summary_counts_statuses_and_takes_medians_over_measured_runs() {
        let mut dead = record(Mode::FreehintHints, 2048, 4, RunStatus::Ok);
        dead.alive = Some(false);
        dead.data_check = Some("page 7 differs".into());
        let s = suite(vec![
            record(Mode::FreehintHints, 2048, 1, RunStatus::Ok),
            record(Mode::FreehintHints, 2048, 2, RunStatus::Failed),
            record(Mode::FreehintHints, 2048, 3, RunStatus::Ok),
            record(Mode::FreehintHints, 2048, 5, RunStatus::Skipped),
            dead,
        ]);
        let runs: Vec<Run> = s.runs().collect();
        let m = summarize(&runs);
        assert_eq!((m.runs, m.measured, m.failed, m.skipped), (5, 3, 1, 1));
        assert_eq!(m.held_mib, Some(300.0));
        assert_eq!(m.link_mib, Some(3.0));
        assert_eq!(m.total_time_ms, Some(1003.0));
        assert_eq!(m.tool_mib, None);
        assert_eq!(m.alive, AllRuns::No(1));
        assert_eq!(
            m.data_check,
            DataCheck::Failed(vec![(4, "page 7 differs".into())])
        );
        let none = summarize(&runs[1..2]);
        assert_eq!(none.total_time_ms, None);
        assert_eq!(none.alive, AllRuns::NoRuns);
    }

    #[test]
    fn breakdown_keeps_the_file_order_and_takes_medians() {
        let json = r#"{"command":"c","started":"s","machine":"m","runs":[
          {"profile":"fresh","mem_mib":2048,"mode":"freehint-hints","link":"1gbit","rep":1,
           "idle_s":0,"status":"ok","reason":"","held_mib":1,"bytes_link":1,
           "bytes_link_reverse":null,"bytes_tool":null,"total_time_ms":1,"downtime_ms":30,
           "total_time_tool_ms":null,"downtime_tool_ms":null,"alive":true,"data_check":"ok",
           "tool_stats":{"z":1,"downtime_breakdown":{"stop_ms":2,"note":"x","load_ms":10}}},
          {"profile":"fresh","mem_mib":2048,"mode":"freehint-hints","link":"1gbit","rep":2,
           "idle_s":0,"status":"ok","reason":"","held_mib":1,"bytes_link":1,
           "bytes_link_reverse":null,"bytes_tool":null,"total_time_ms":1,"downtime_ms":30,
           "total_time_tool_ms":null,"downtime_tool_ms":null,"alive":true,"data_check":"ok",
           "tool_stats":{"downtime_breakdown":{"stop_ms":4,"load_ms":20,"resume_ms":1}}},
          {"profile":"fresh","mem_mib":2048,"mode":"qemu-native","link":"1gbit","rep":1,
           "idle_s":0,"status":"ok","reason":"","held_mib":1,"bytes_link":1,
           "bytes_link_reverse":null,"bytes_tool":null,"total_time_ms":1,"downtime_ms":30,
           "total_time_tool_ms":null,"downtime_tool_ms":null,"alive":true,"data_check":"ok",
           "tool_stats":[1,2]}]}"#;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("suite-b.json");
        std::fs::write(&path, json).unwrap();
        let s = load_suite("suite-b.json", &path).unwrap();
        assert_eq!(s.breakdowns[2], None);
        let runs: Vec<Run> = s.runs().take(2).collect();
        assert_eq!(
            median_breakdown(&runs).unwrap(),
            [
                ("stop_ms".to_string(), 3.0),
                ("load_ms".to_string(), 15.0),
                ("resume_ms".to_string(), 1.0)
            ]
        );
        let qemu: Vec<Run> = s.runs().skip(2).collect();
        assert_eq!(median_breakdown(&qemu), None);
    }

    #[test]
    fn most_common_prefers_the_first_of_equals() {
        assert_eq!(most_common([2, 1, 1, 2, 3]), Some(2));
        assert_eq!(most_common([2, 1, 1]), Some(1));
        assert_eq!(most_common(Vec::<u8>::new()), None);
    }
}
