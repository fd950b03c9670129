//! `freehint-bench report`: docs/BENCHMARKS.md from the suites' JSON.

use std::path::Path;

/// Writes the Markdown report `out` (and its plots in `plots_dir`) from the
/// benchmark results in `dir`.
pub fn write_report(dir: &Path, out: &Path, plots_dir: &Path) -> anyhow::Result<()> {
    let _ = (dir, out, plots_dir);
    anyhow::bail!("the report is not written yet")
}
