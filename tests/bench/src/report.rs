//! `freehint-bench report`: docs/BENCHMARKS.md from the suites' JSON.
//!
//! It reads every `suite-*.json` ([`SuiteReport`](crate::record::SuiteReport))
//! of a folder, in file-name order, and the simulated-VM and micro
//! benchmarks' results beside them (`sim4g-*`, `iperf3-*`, `transfer-*`,
//! `hints`, `sync`), and writes one Markdown file: the goals and their
//! verdicts, a section per suite (its command, a summary table per
//! profile, RAM size, link and idle time, its plots), the micro
//! benchmarks, the A/B table of tests/scripts/bench-ab.sh if it was run
//! ([`AB_TABLE`]), and every run of every suite in an appendix. The plots are
//! PNG files in their own folder, linked by relative path.
//!
//! The modules: `load` reads and groups the runs and takes medians,
//! `tables` and `goals` write the Markdown, `plot` draws the PNGs,
//! `micro` writes the simulated-VM and micro benchmarks' sections.

use std::fmt;
use std::path::{Component, Path};

use anyhow::Context;

mod goals;
mod load;
mod micro;
mod plot;
mod tables;

/// Writes the Markdown report `out` (and its plots in `plots_dir`) from the
/// benchmark results in `dir`.
///
/// Fails, naming the file, when a result file cannot be read or is not
/// what it should be, and when the plots' font is missing (see
/// [`FONT_ENV`]).
pub fn write_report(dir: &Path, out: &Path, plots_dir: &Path) -> anyhow::Result<()> {
    let suites = load::load_suites(dir)?;
    let out_dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("creating the folder {}", out_dir.display()))?;
    let mut plots_link = String::new();
    if !suites.is_empty() {
        std::fs::create_dir_all(plots_dir)
            .with_context(|| format!("creating the folder {}", plots_dir.display()))?;
        plots_link = relative_link(out_dir, plots_dir)?;
    }

    let mut md = String::new();
    md.push_str(&header(&suites, &crate::host::today_utc()));
    md.push_str(&goals::section(&suites));
    for suite in &suites {
        md.push_str(&tables::suite_section(suite));
        md.push_str(&plot::suite_plots(suite, plots_dir, &plots_link)?);
    }
    md.push_str("## Simulated VM and micro benchmarks\n\n");
    md.push_str(&micro::sections(dir, &crate::host::machine())?);
    md.push_str(&ab_section(plots_dir)?);
    for suite in &suites {
        md.push_str(&tables::every_run(suite));
    }
    std::fs::write(out, md).with_context(|| format!("writing {}", out.display()))
}

/// The A/B table that tests/scripts/bench-ab.sh writes beside the plots: one
/// build of freehint against another, run in alternation. It is kept across
/// reports (`make bench` does not run it) and embedded as it is.
pub const AB_TABLE: &str = "transport-ab.md";

/// The A/B section: the table in `plots_dir` if bench-ab.sh wrote one, else
/// how to make it.
fn ab_section(plots_dir: &Path) -> anyhow::Result<String> {
    let path = plots_dir.join(AB_TABLE);
    match std::fs::read_to_string(&path) {
        Ok(table) => Ok(format!("{}\n\n", table.trim_end())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(format!(
            "## The TCP path before and after the transport abstraction (A/B)\n\n\
             Not run: `tests/scripts/bench-ab.sh` writes it to {}.\n\n",
            path.display()
        )),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// The environment variable that names the plots' font file, when it is not
/// [`DEFAULT_FONT`].
pub const FONT_ENV: &str = "FREEHINT_BENCH_FONT";

/// The plots' font: DejaVu Sans, from Debian's `fonts-dejavu-core`.
pub const DEFAULT_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// A goal's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The figures meet the target.
    Met,
    /// They do not.
    NotMet,
    /// The runs needed are absent (or none was measured).
    NotMeasured,
}

impl Verdict {
    /// `Met` when `ok`, else `NotMet`.
    pub fn from_bool(ok: bool) -> Verdict {
        if ok {
            Verdict::Met
        } else {
            Verdict::NotMet
        }
    }

    /// The verdict of a goal from its rows': not met if any row is not,
    /// met if every row is, not measured if no row was measured.
    pub fn overall(rows: &[Verdict]) -> Verdict {
        if rows.contains(&Verdict::NotMet) {
            Verdict::NotMet
        } else if rows.contains(&Verdict::Met) {
            Verdict::Met
        } else {
            Verdict::NotMeasured
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Verdict::Met => "met",
            Verdict::NotMet => "**not met**",
            Verdict::NotMeasured => "not measured",
        })
    }
}

/// A ratio as a percentage with `decimals` decimals (`0.15` → `15.0%`).
pub(crate) fn percent(ratio: f64, decimals: usize) -> String {
    format!("{:.*}%", decimals, ratio * 100.0)
}

/// A figure: whole when it is whole, else with one decimal; `–` for none.
pub(crate) fn num(x: Option<f64>) -> String {
    match x {
        None => "–".into(),
        Some(x) if (x - x.round()).abs() < 1e-9 => format!("{x:.0}"),
        Some(x) => format!("{x:.1}"),
    }
}

/// A figure rounded to a whole number; `–` for none.
pub(crate) fn whole(x: Option<f64>) -> String {
    x.map_or_else(|| "–".into(), |x| format!("{x:.0}"))
}

/// Text made safe for a Markdown table cell.
pub(crate) fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace(['\n', '\r'], " ")
}

/// The report's header: where it comes from and how every figure is
/// measured.
fn header(suites: &[load::Suite], date: &str) -> String {
    let mut md = String::from(
        "# Benchmarks\n\n\
         Produced by `make bench` (tests/scripts/bench.sh), which runs every command below \
         and writes this file with `freehint-bench report`; nothing here is typed by hand. \
         ",
    );
    md.push_str(&format!("Written on {date}.\n\n"));
    let mut machines: Vec<&str> = Vec::new();
    for s in suites {
        if !machines.contains(&s.report.machine.as_str()) {
            machines.push(&s.report.machine);
        }
    }
    match machines.as_slice() {
        [] => md.push_str("No real-guest suite was run (no `suite-*.json` results).\n\n"),
        [one] => md.push_str(&format!(
            "The real-guest suites ran on: {}.\n\n",
            one.trim()
        )),
        many => {
            md.push_str("The real-guest suites ran on these machines:\n\n");
            for m in many {
                md.push_str(&format!("- {}\n", m.trim()));
            }
            md.push('\n');
        }
    }
    md.push_str(
        "The real-guest suites (`freehint-bench`) migrate REAL QEMU/Linux guests \
         of several profiles and RAM sizes with every mode, freehint's and QEMU's own, \
         between two network namespaces joined by a veth pair shaped with `tc`, \
         and measure every mode the same way:

- **downtime**: the source's QMP `STOP` event → the destination's QMP `RESUME` event
  (their host timestamps).
- **total time**: the migrate command → the destination's QMP `RESUME` event
  (postcopy: → the destination's last page placed, its `MIGRATION completed` event).
- **link bytes**: bytes that crossed the link from source to destination: the source
  veth's transmitted bytes, Ethernet/IP/TCP headers included.
- **held**: guest RAM − MemFree (MiB) just before the migration: the memory the guest holds.
- **tool figures**, beside them: the tool's own byte count (freehint: `bytes_on_wire`;
  QEMU: `ram.transferred`), total time (freehint: `total_time_ms`; QEMU: `total-time`)
  and downtime (freehint: `downtime_ms`; QEMU: `downtime`).
- **alive**: the guest's heartbeat went on, on the destination (and the source QEMU no
  longer runs the guest). **data check**: `ok` when the guest's checker verified its
  data region on the destination; otherwise what went wrong.

MiB are 2^20 bytes. Tables show medians over the measured runs (status ok); `–` where
no run was measured. Failed and skipped runs are listed, with their reason, in the
appendix.

",
    );
    md
}

/// The link from the report's folder to the plots' folder, `/`-separated
/// (empty when they are the same folder). Both folders must exist.
fn relative_link(from_dir: &Path, to_dir: &Path) -> anyhow::Result<String> {
    let from = from_dir
        .canonicalize()
        .with_context(|| format!("resolving {}", from_dir.display()))?;
    let to = to_dir
        .canonicalize()
        .with_context(|| format!("resolving {}", to_dir.display()))?;
    Ok(relative_between(&from, &to))
}

/// The relative path from one absolute folder to another, `/`-separated.
fn relative_between(from: &Path, to: &Path) -> String {
    let f: Vec<Component> = from.components().collect();
    let t: Vec<Component> = to.components().collect();
    let common = f.iter().zip(&t).take_while(|(a, b)| a == b).count();
    let mut parts: Vec<String> = vec!["..".into(); f.len() - common];
    parts.extend(
        t[common..]
            .iter()
            .map(|c| c.as_os_str().to_string_lossy().into_owned()),
    );
    parts.join("/")
}

/// `NAME` in the plots' folder, as linked from the report.
pub(crate) fn plot_link(plots_link: &str, name: &str) -> String {
    if plots_link.is_empty() {
        name.to_string()
    } else {
        format!("{plots_link}/{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_links() {
        let r = |a: &str, b: &str| relative_between(Path::new(a), Path::new(b));
        assert_eq!(r("/w/docs", "/w/docs/bench"), "bench");
        assert_eq!(r("/w/docs", "/w/docs"), "");
        assert_eq!(r("/w/docs", "/w/plots/x"), "../plots/x");
        assert_eq!(plot_link("", "a.png"), "a.png");
        assert_eq!(plot_link("bench", "a.png"), "bench/a.png");
    }

    #[test]
    fn verdicts_and_figures() {
        use Verdict::*;
        assert_eq!(Verdict::overall(&[Met, NotMeasured]), Met);
        assert_eq!(Verdict::overall(&[Met, NotMet]), NotMet);
        assert_eq!(Verdict::overall(&[NotMeasured]), NotMeasured);
        assert_eq!(Verdict::overall(&[]), NotMeasured);
        assert_eq!(NotMet.to_string(), "**not met**");
        assert_eq!(percent(0.15, 1), "15.0%");
        assert_eq!(percent(1.0833, 0), "108%");
        assert_eq!(num(Some(2.5)), "2.5");
        assert_eq!(num(Some(3.0)), "3");
        assert_eq!(num(None), "–");
        assert_eq!(whole(Some(2.5)), "2");
        assert_eq!(cell("a|b\nc"), "a\\|b c");
    }
}
