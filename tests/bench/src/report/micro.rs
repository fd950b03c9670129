//! The simulated-VM and micro benchmarks' sections (`sim4g-*`, `iperf3-*`,
//! `transfer-*`, `hints`, `sync`, each `NAME.json` with its command in
//! `NAME.cmd`), as the report has shown them since before the suite:
//! same tables, same targets, same verdicts.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::Value;

use super::{percent, Verdict};

/// One result file of the micro benchmarks.
struct BenchFile {
    path: PathBuf,
    value: Value,
}

impl BenchFile {
    /// A field, or an error naming the file and the field.
    fn field(&self, key: &str) -> anyhow::Result<&Value> {
        self.value
            .get(key)
            .ok_or_else(|| anyhow::anyhow!("{}: no field `{key}`", self.path.display()))
    }

    /// A numeric field.
    fn f64(&self, key: &str) -> anyhow::Result<f64> {
        self.field(key)?
            .as_f64()
            .ok_or_else(|| anyhow::anyhow!("{}: `{key}` is not a number", self.path.display()))
    }

    /// A numeric field as the JSON has it (`12`, `3.5`).
    fn raw(&self, key: &str) -> anyhow::Result<String> {
        match self.field(key)? {
            Value::Number(n) => Ok(n.to_string()),
            _ => anyhow::bail!("{}: `{key}` is not a number", self.path.display()),
        }
    }
}

/// The folder of results.
struct Results<'a> {
    dir: &'a Path,
}

impl Results<'_> {
    fn json_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    /// When `NAME.json` was written (its modification time), RFC 3339.
    fn written_at(&self, name: &str) -> anyhow::Result<String> {
        let path = self.json_path(name);
        let t = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .with_context(|| format!("reading the time of {}", path.display()))?;
        Ok(crate::host::rfc3339(t))
    }

    /// Whether `NAME.json` is there.
    fn has(&self, name: &str) -> bool {
        self.json_path(name).exists()
    }

    /// Whether any of `names` is there; an error naming the first missing
    /// one when some are and some are not.
    fn has_all(&self, names: &[String]) -> anyhow::Result<bool> {
        let missing: Vec<&String> = names.iter().filter(|n| !self.has(n)).collect();
        match missing.first() {
            None => Ok(true),
            Some(_) if missing.len() == names.len() => Ok(false),
            Some(first) => anyhow::bail!(
                "{}: missing, while other results of its benchmark are there",
                self.json_path(first).display()
            ),
        }
    }

    /// `NAME.json`: a JSON object, or output whose last line is one (the
    /// commands may log before it).
    fn load(&self, name: &str) -> anyhow::Result<BenchFile> {
        let path = self.json_path(name);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let json = if text.trim_start().starts_with("{\n") {
            text.as_str()
        } else {
            text.trim().lines().last().unwrap_or("")
        };
        let value: Value = serde_json::from_str(json)
            .with_context(|| format!("{}: not the JSON of a benchmark", path.display()))?;
        Ok(BenchFile { path, value })
    }

    /// The command that wrote `NAME.json`, from `NAME.cmd`.
    fn cmd(&self, name: &str) -> anyhow::Result<String> {
        let path = self.dir.join(format!("{name}.cmd"));
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        Ok(text.trim().replace("./target/release/freehint", "freehint"))
    }

    /// iperf3's received rate, in MiB/s.
    fn iperf_mib_s(&self, name: &str) -> anyhow::Result<f64> {
        let r = self.load(name)?;
        r.value
            .pointer("/end/sum_received/bits_per_second")
            .and_then(Value::as_f64)
            .map(|b| b / 8.0 / 1_048_576.0)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: no number end.sum_received.bits_per_second",
                    r.path.display()
                )
            })
    }
}

/// The upper median, as these sections have always taken it (the middle
/// of three, of five).
fn median_upper(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Bytes as whole MiB.
fn mib(bytes: f64) -> String {
    format!("{:.0}", bytes / 1_048_576.0)
}

/// The sections, in Markdown; a section whose results are absent says it
/// was not run.
pub(crate) fn sections(dir: &Path, this_machine: &str) -> anyhow::Result<String> {
    let res = Results { dir };
    let mut md = String::new();
    md.push_str(&format!(
        "The simulated-VM and micro benchmarks below ran on the machine that wrote \
         this report: {this_machine}. Their guest is the **simulated VM** \
         (`tests/sim-vm`): a separate\n"
    ));
    md.push_str(
        "process that maps its RAM file shared, is tracked by the real uffd-wp +
PAGEMAP_SCAN dirty log, writes memory, churns an allocator and reports its
free 4 MiB blocks as hints like the Linux driver. Every run compares source
and destination page by page outside the guest's free pages at switchover.

A property of this machine matters for reading the numbers: it is itself a
VM, and the first touch of memory the kernel has not used lately is slow
(the host backs it on demand). A destination that allocates its RAM while
pages arrive pays that on every page. The `--preallocate-destination` runs
populate the destination's RAM first, as QEMU's `-mem-prealloc` would, and
show what the transfer itself costs.

",
    );
    let sim = sim_section(&res, &mut md)?;
    postcopy_section(&res, &mut md)?;
    transfer_section(&res, &mut md)?;
    hints_section(&res, &mut md)?;
    sync_section(&res, &mut md, sim)?;
    Ok(md)
}

/// Postcopy and hybrid on the simulated VM over loopback: the destination
/// VM runs while its pages arrive; the fault latency with the bulk stream
/// running at the same time.
fn postcopy_section(res: &Results, md: &mut String) -> anyhow::Result<()> {
    md.push_str("## Postcopy on loopback: 2 GiB, 20% used, 64 MiB/s dirtied\n\n");
    let runs: Vec<(&str, &str)> = vec![
        ("postcopy", "on"),
        ("postcopy", "off"),
        ("hybrid", "on"),
        ("hybrid", "off"),
    ];
    let mut names = Vec::new();
    for (mode, h) in &runs {
        for i in 1..=3 {
            names.push(format!("sim2g-{mode}-hints-{h}-{i}"));
        }
    }
    if !res.has_all(&names)? {
        not_run(md, "`sim2g-*`", res.dir);
        return Ok(());
    }
    md.push_str(
        "The destination is a second simulated VM resumed on the RAM as it arrives \
(its faults served through its own userfaultfd), reading and checking the pages \
it touches. Three repetitions each; medians (upper, of three). Hybrid runs two \
live rounds (`--min-rounds 3 --max-rounds 3`) and switches at the round limit. \
Fault latency: from the fault event on the destination to its wake-up, while \
the bulk stream runs; targets p50 ≤ 100 µs, p99 ≤ 1000 µs.

| mode | hints | MiB on wire | total ms | downtime ms | pending pages | requested | read ahead | streamed | remote faults | local faults | p50 µs | p99 µs | max µs | mismatched | p50/p99 |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
",
    );
    for (mode, h) in &runs {
        let files: Vec<BenchFile> = (1..=3)
            .map(|i| res.load(&format!("sim2g-{mode}-hints-{h}-{i}")))
            .collect::<anyhow::Result<_>>()?;
        let med = |k: &str| -> anyhow::Result<f64> {
            Ok(median_upper(
                files
                    .iter()
                    .map(|f| f.f64(k))
                    .collect::<anyhow::Result<_>>()?,
            ))
        };
        let mismatched: f64 = files
            .iter()
            .map(|f| f.f64("mismatched_pages"))
            .sum::<anyhow::Result<f64>>()?;
        let (p50, p99) = (med("fault_latency_us_p50")?, med("fault_latency_us_p99")?);
        let verdict = if med("faults_remote")? == 0.0 {
            Verdict::NotMeasured
        } else {
            Verdict::from_bool(p50 <= 100.0 && p99 <= 1000.0)
        };
        let _ = writeln!(
            md,
            "| {mode} | {h} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {p50:.0} | {p99:.0} | {:.0} | {mismatched:.0} | {verdict} |",
            mib(med("bytes_on_wire")?),
            med("total_time_ms")?,
            med("downtime_ms")?,
            med("postcopy_pending_pages")?,
            med("pages_requested")?,
            // Absent from runs made before the urgent channel read ahead.
            med("pages_read_ahead").unwrap_or(0.0),
            med("pages_streamed")?,
            med("faults_remote")?,
            med("faults_local")?,
            med("fault_latency_us_max")?,
        );
    }
    let _ = writeln!(
        md,
        "\nThese runs ended between {} and {} (UTC, their result files' times). \
Commands (repetitions 2 and 3 are the same):\n",
        res.written_at(&names[0])?,
        res.written_at(&names[names.len() - 1])?
    );
    for (mode, h) in &runs {
        let _ = writeln!(md, "    {}", res.cmd(&format!("sim2g-{mode}-hints-{h}-1"))?);
    }
    md.push('\n');
    Ok(())
}

/// A section's "not run" line.
fn not_run(md: &mut String, what: &str, dir: &Path) {
    let _ = writeln!(md, "Not run: no {what} results in `{}`.\n", dir.display());
}

const PRE: [&str; 2] = ["", "prealloc-"];
const HINTS: [&str; 2] = ["on", "off"];

/// Hints on vs off on the simulated VM. Returns whether it was run.
fn sim_section(res: &Results, md: &mut String) -> anyhow::Result<bool> {
    md.push_str("## Hints on vs off: 4 GiB, 15% used, 16 MiB/s dirtied\n\n");
    let mut names = Vec::new();
    for pre in PRE {
        for h in HINTS {
            for i in 1..=3 {
                names.push(format!("sim4g-{pre}hints-{h}-{i}"));
            }
        }
    }
    if !res.has_all(&names)? {
        not_run(md, "`sim4g-*`", res.dir);
        return Ok(false);
    }
    md.push_str(
        "Three interleaved repetitions of each run; the table shows each run, the
verdicts use the median of the three.

| run | hints | rep | MiB on wire | total ms | downtime ms | rounds | pages sent | skipped free | stale hints dropped | mismatched |
|---|---|---|---|---|---|---|---|---|---|---|
",
    );
    // (bytes_on_wire, total_time_ms) medians by (prealloc, hints).
    let mut med = Vec::new();
    for pre in PRE {
        let label = if pre.is_empty() {
            "destination allocates on arrival"
        } else {
            "destination preallocated"
        };
        for h in HINTS {
            let rs = (1..=3)
                .map(|i| res.load(&format!("sim4g-{pre}hints-{h}-{i}")))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let m = |k: &str| -> anyhow::Result<f64> {
                Ok(median_upper(
                    rs.iter().map(|r| r.f64(k)).collect::<anyhow::Result<_>>()?,
                ))
            };
            med.push(((pre, h), (m("bytes_on_wire")?, m("total_time_ms")?)));
            for (i, r) in rs.iter().enumerate() {
                let _ = writeln!(
                    md,
                    "| {label} | {h} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    i + 1,
                    mib(r.f64("bytes_on_wire")?),
                    r.raw("total_time_ms")?,
                    r.raw("downtime_ms")?,
                    r.raw("rounds")?,
                    r.raw("pages_sent")?,
                    r.raw("pages_skipped_free")?,
                    r.raw("hint_ranges_dropped_stale")?,
                    r.raw("mismatched_pages")?,
                );
            }
        }
    }
    md.push_str("\nCommands (each run three times):\n\n");
    for pre in PRE {
        for h in HINTS {
            let _ = writeln!(md, "    {}", res.cmd(&format!("sim4g-{pre}hints-{h}-1"))?);
        }
    }
    md.push_str("\n| target | median with hints | median without | ratio | verdict |\n");
    md.push_str("|---|---|---|---|---|\n");
    let get = |pre: &str, h: &str| {
        med.iter()
            .find(|((p, x), _)| *p == pre && *x == h)
            .map(|(_, m)| *m)
            .unwrap_or_default()
    };
    for (pre, label) in [("", "on arrival"), ("prealloc-", "preallocated")] {
        let (on_bytes, on_ms) = get(pre, "on");
        let (off_bytes, off_ms) = get(pre, "off");
        let rb = on_bytes / off_bytes;
        let rt = on_ms / off_ms;
        let _ = writeln!(
            md,
            "| bytes on wire ≤ 20% ({label}) | {} MiB | {} MiB | {} | {} |",
            mib(on_bytes),
            mib(off_bytes),
            percent(rb, 1),
            Verdict::from_bool(rb <= 0.20)
        );
        let _ = writeln!(
            md,
            "| total time ≤ 30% ({label}) | {on_ms} ms | {off_ms} ms | {} | {} |",
            percent(rt, 1),
            Verdict::from_bool(rt <= 0.30)
        );
    }
    md.push('\n');
    Ok(true)
}

/// The transfer rate of dirty data vs iperf3 on loopback.
fn transfer_section(res: &Results, md: &mut String) -> anyhow::Result<()> {
    md.push_str("## Transfer rate of dirty data vs plain loopback TCP\n\n");
    let mut names: Vec<String> = (1..=5)
        .flat_map(|n| [format!("iperf3-{n}"), format!("transfer-2-{n}")])
        .collect();
    names.push("transfer-1-1".into());
    if !res.has_all(&names)? {
        not_run(md, "`iperf3-*` and `transfer-*`", res.dir);
        return Ok(());
    }
    md.push_str(
        "Five pairs, each a plain loopback TCP stream (iperf3, one stream, 3 s) and
right after it freehint's first round of a 4 GiB guest whose every page
holds data (no zero pages, no hints), destination preallocated, 2 bulk
channels (the default here). The rate is the round's bytes over its
duration (`peak_bandwidth_mib_per_s`). This machine's own loopback rate
varies from run to run, hence the pairs.

| pair | iperf3 MiB/s | freehint MiB/s | share | total ms for 4 GiB |
|---|---|---|---|---|
",
    );
    let mut shares = Vec::new();
    for n in 1..=5 {
        let ip = res.iperf_mib_s(&format!("iperf3-{n}"))?;
        let r = res.load(&format!("transfer-2-{n}"))?;
        let bw = r.f64("peak_bandwidth_mib_per_s")?;
        shares.push(bw / ip);
        let _ = writeln!(
            md,
            "| {n} | {ip:.0} | {bw:.0} | {} | {} |",
            percent(bw / ip, 0),
            r.raw("total_time_ms")?
        );
    }
    let above = shares.iter().filter(|&&x| x >= 0.8).count();
    let med_share = median_upper(shares);
    let _ = writeln!(
        md,
        "\nMedian share: **{}** (target ≥ 80%: {}); {above} of 5 pairs at or above 80%.\n",
        percent(med_share, 0),
        Verdict::from_bool(med_share >= 0.8)
    );
    let _ = writeln!(
        md,
        "Commands:\n\n    {}\n    {}\n",
        res.cmd("iperf3-1")?,
        res.cmd("transfer-2-1")?
    );
    let one = res.load("transfer-1-1")?;
    let _ = writeln!(
        md,
        "With one bulk channel the same round ran at {:.0} MiB/s\n\
         (two channels keep both cores busy on each side):\n\n    {}\n",
        one.f64("peak_bandwidth_mib_per_s")?,
        res.cmd("transfer-1-1")?
    );
    Ok(())
}

/// The hint application rate.
fn hints_section(res: &Results, md: &mut String) -> anyhow::Result<()> {
    md.push_str("## Hint application rate\n\n");
    if !res.has("hints") {
        not_run(md, "`hints`", res.dir);
        return Ok(());
    }
    let h = res.load("hints")?;
    let rate = h.f64("hinted_gib_per_s")?;
    let _ = writeln!(
        md,
        "Hinting all of a 4 GiB guest in 4 MiB blocks, 16 per call, repeatedly, under the \
         hint lock: **{rate:.0} GiB/s** of hinted guest memory (target ≥ 50 GiB/s: {}).\n\n    {}\n",
        Verdict::from_bool(rate >= 50.0),
        res.cmd("hints")?
    );
    Ok(())
}

/// The dirty log's sync time, alone and inside the simulated migrations.
fn sync_section(res: &Results, md: &mut String, sim_was_run: bool) -> anyhow::Result<()> {
    md.push_str("## Dirty-log sync\n\n");
    if !res.has("sync") {
        not_run(md, "`sync`", res.dir);
        return Ok(());
    }
    let s = res.load("sync")?;
    let max_us = s.f64("sync_max_us")?;
    let _ = writeln!(
        md,
        "One sync (PAGEMAP_SCAN with write-protect re-arm over a populated 4 GiB tmpfs \
         mapping, {} pages written before each), over {} syncs: median **{:.2} ms**, \
         mean {:.2} ms, max {:.2} ms (target ≤ 5 ms: {}).\n\n    {}\n",
        s.raw("dirty_pages")?,
        s.raw("syncs")?,
        s.f64("sync_median_us")? / 1000.0,
        s.f64("sync_mean_us")? / 1000.0,
        max_us / 1000.0,
        Verdict::from_bool(max_us <= 5000.0),
        res.cmd("sync")?
    );
    if !sim_was_run {
        return Ok(());
    }
    md.push_str(
        "Syncs inside the migrations above (scan plus bitmap merge under the hint
lock, while pages are being sent, with the simulated guest running):

| run | syncs | mean µs | max µs |
|---|---|---|---|
",
    );
    for n in [
        "sim4g-hints-on-1",
        "sim4g-hints-off-1",
        "sim4g-prealloc-hints-on-1",
        "sim4g-prealloc-hints-off-1",
    ] {
        let r = res.load(n)?;
        let _ = writeln!(
            md,
            "| {n} | {} | {} | {} |",
            r.raw("syncs")?,
            r.raw("sync_mean_us")?,
            r.raw("sync_max_us")?
        );
    }
    md.push('\n');
    Ok(())
}
