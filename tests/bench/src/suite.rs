//! The runner: every (link, size, profile, repetition, mode) of a matrix,
//! one at a time, each a fresh guest pair, recorded as a [`RunRecord`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use freehint_demo::{make_disk_image, run_mode, DemoSetup, RunReport};

use crate::link::{Counters, TestLink};
use crate::record::{Link, Mode, Profile, RunKey, RunRecord, RunStatus, SuiteReport};

/// What to run.
#[derive(Clone, Debug)]
pub struct Matrix {
    /// Guest profiles.
    pub profiles: Vec<Profile>,
    /// Guest RAM sizes.
    pub mem_mib: Vec<u64>,
    /// Modes, run round-robin within each repetition.
    pub modes: Vec<Mode>,
    /// Links.
    pub links: Vec<Link>,
    /// Repetitions of each run.
    pub repeat: u32,
    /// Seconds the guest idles before each migration.
    pub idle_s: u64,
}

impl Matrix {
    /// Every run, in the order they run: links outermost (reshaping the
    /// link is cheap, but kept rare), then sizes, profiles, repetitions,
    /// and the modes round-robin inside a repetition so slow drifts of the
    /// machine touch every mode alike.
    pub fn runs(&self) -> Vec<RunKey> {
        let mut keys = Vec::new();
        for &link in &self.links {
            for &mem_mib in &self.mem_mib {
                for &profile in &self.profiles {
                    for rep in 1..=self.repeat {
                        for &mode in &self.modes {
                            keys.push(RunKey {
                                profile,
                                mem_mib,
                                mode,
                                link,
                                rep,
                                idle_s: self.idle_s,
                            });
                        }
                    }
                }
            }
        }
        keys
    }
}

/// MemAvailable of this host, MiB.
pub fn host_available_mib() -> u64 {
    crate::host::meminfo_kib("MemAvailable:").map_or(0, |kib| kib / 1024)
}

/// Why `key` cannot run on this host, if it cannot.
pub fn skip_reason(key: &RunKey, available_mib: u64) -> Option<String> {
    // Room for the runner, the page cache of the disk image, the kernel.
    const MARGIN_MIB: u64 = 1536;
    let need = key.profile.host_mib_estimate(key.mode, key.mem_mib);
    (need + MARGIN_MIB > available_mib).then(|| {
        format!(
            "needs about {need} MiB of host memory (source and destination) plus {MARGIN_MIB} MiB of margin; this host has {available_mib} MiB available"
        )
    })
}

/// A suite under way: runs the matrix and writes the JSON report after
/// every run (a killed suite keeps what it measured).
pub struct Suite {
    /// The testbed's set-up; each run changes its profile fields.
    pub setup: DemoSetup,
    /// The matrix.
    pub matrix: Matrix,
    /// Where the JSON report goes.
    pub json_out: PathBuf,
    /// Where the `page-cache` profile's disk image is made (removed at the
    /// end).
    pub scratch_dir: PathBuf,
    /// The freehint commit the binaries were built from, if known.
    pub built_from: Option<String>,
}

impl Suite {
    /// Runs everything; returns the report (also written to `json_out`).
    pub fn run(&self, command: String) -> anyhow::Result<SuiteReport> {
        let mut report = SuiteReport {
            command,
            started: crate::host::now_rfc3339(),
            machine: crate::host::machine(),
            built_from: self.built_from.clone(),
            runs: Vec::new(),
        };
        let keys = self.matrix.runs();
        // Also kills what a killed earlier suite left in the namespaces.
        let mut link = TestLink::create()?;
        remove_stale_ram_dirs(Path::new("/dev/shm"));
        let disk = if self.matrix.profiles.contains(&Profile::PageCache) {
            Some(DiskImage::make(&self.scratch_dir)?)
        } else {
            None
        };
        let mut shaped = None;
        for (i, key) in keys.iter().enumerate() {
            let head = format!("[{}/{}] {}", i + 1, keys.len(), key.label());
            let record = if let Some(reason) = skip_reason(key, host_available_mib()) {
                RunRecord::unmeasured(*key, RunStatus::Skipped, reason)
            } else {
                if shaped != Some(key.link) {
                    link.shape(key.link)?;
                    shaped = Some(key.link);
                }
                // Let the host reclaim the last run's guest memory first.
                std::thread::sleep(Duration::from_secs(2));
                self.one(key, &link, disk.as_ref().map(|d| d.path.as_path()))
            };
            eprintln!("freehint-bench: {head}: {}", summary(&record));
            report.runs.push(record);
            write_json(&self.json_out, &report)?;
        }
        Ok(report)
    }

    fn one(&self, key: &RunKey, link: &TestLink, disk: Option<&Path>) -> RunRecord {
        let mut setup = self.setup.clone();
        key.profile.configure(&mut setup, disk);
        setup.mem_mib = key.mem_mib;
        setup.idle = Duration::from_secs(key.idle_s);
        setup.netns = Some(link.netns());
        setup.log_dir = self.setup.log_dir.join(key.dir_name());
        let before = link.counters();
        let result = run_mode(&setup, key.mode);
        let after = link.counters();
        match (result, before, after) {
            (Ok(r), Ok(before), Ok(after)) => measured(*key, r, before, after),
            (Err(e), _, _) => RunRecord::unmeasured(*key, RunStatus::Failed, e.to_string()),
            (_, Err(e), _) | (_, _, Err(e)) => {
                RunRecord::unmeasured(*key, RunStatus::Failed, e.to_string())
            }
        }
    }
}

fn measured(key: RunKey, r: RunReport, before: Counters, after: Counters) -> RunRecord {
    let some_ms = |ms: u64| (ms > 0).then_some(ms);
    let mut record = RunRecord::unmeasured(key, RunStatus::Ok, "");
    let missing: Vec<&str> = [
        ("the source's STOP event", r.timing.src_stop_us.is_none()),
        (
            "the destination's RESUME event",
            r.timing.dst_resume_us.is_none(),
        ),
    ]
    .into_iter()
    .filter_map(|(what, missing)| missing.then_some(what))
    .collect();
    if !missing.is_empty() {
        record.reason = format!("no {}: times unknown", missing.join(" and no "));
    }
    record.held_mib = Some(r.held_mib);
    record.bytes_link = Some(after.tx_bytes.saturating_sub(before.tx_bytes));
    record.bytes_link_reverse = Some(after.rx_bytes.saturating_sub(before.rx_bytes));
    record.bytes_tool = Some(r.bytes_tool);
    // freehint's own runs know whether they ended in postcopy (the run's
    // report then ends at the last page placed, see `run_freehint`).
    record.total_time_ms = if key.mode.is_freehint() {
        some_ms(r.total_time_ms)
    } else {
        r.timing.total_time_ms(key.mode == Mode::QemuPostcopy)
    };
    record.downtime_ms = r.timing.downtime_ms();
    record.total_time_tool_ms = some_ms(r.total_time_tool_ms);
    record.downtime_tool_ms = Some(r.downtime_tool_ms);
    record.alive = Some(r.guest_alive_after);
    record.data_check = Some(r.data_check);
    record.guest_pages_allocated = r.guest_pages_allocated;
    record.tool_stats = r.detail;
    record
}

/// One line about a run, for the progress output.
pub fn summary(r: &RunRecord) -> String {
    match r.status {
        RunStatus::Skipped => format!("skipped: {}", r.reason),
        RunStatus::Failed => format!("FAILED: {}", r.reason),
        RunStatus::Ok => {
            let opt = |v: Option<u64>| v.map_or("?".to_string(), |v| v.to_string());
            format!(
                "held {} MiB, {} MiB over the link, {} ms total, {} ms down, alive {}, data {}{}",
                opt(r.held_mib),
                opt(r.bytes_link.map(|b| b >> 20)),
                opt(r.total_time_ms),
                opt(r.downtime_ms),
                if r.alive == Some(true) { "yes" } else { "NO" },
                r.data_check.as_deref().unwrap_or("?"),
                if r.reason.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", r.reason)
                }
            )
        }
    }
}

fn write_json(path: &Path, report: &SuiteReport) -> anyhow::Result<()> {
    use anyhow::Context;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(report)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Removes the guest RAM folders (`freehint-demo*`) in `shm` that no
/// process has open or mapped: what a killed run left (a testbed removes
/// its own when dropped).
pub fn remove_stale_ram_dirs(shm: &Path) {
    let Ok(entries) = std::fs::read_dir(shm) else {
        return;
    };
    let dirs: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("freehint-demo"))
        })
        .collect();
    if dirs.is_empty() {
        return;
    }
    // Every file any process has open or mapped.
    let mut in_use = String::new();
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for p in procs.filter_map(Result::ok) {
            let path = p.path();
            if let Ok(maps) = std::fs::read_to_string(path.join("maps")) {
                in_use.push_str(&maps);
            }
            if let Ok(fds) = std::fs::read_dir(path.join("fd")) {
                for fd in fds.filter_map(Result::ok) {
                    if let Ok(target) = std::fs::read_link(fd.path()) {
                        in_use.push_str(&target.to_string_lossy());
                        in_use.push('\n');
                    }
                }
            }
        }
    }
    for dir in dirs {
        if !in_use.contains(&*dir.to_string_lossy()) {
            eprintln!(
                "freehint-bench: removing {}, left by a killed run",
                dir.display()
            );
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

/// The `page-cache` profile's disk: an ext4 image of 1 GiB of files, the
/// same file for source and destination (shared storage); removed when
/// dropped.
pub struct DiskImage {
    /// The image.
    pub path: PathBuf,
}

impl DiskImage {
    /// Makes it in `dir` (replacing one a killed run left).
    pub fn make(dir: &Path) -> anyhow::Result<DiskImage> {
        use anyhow::Context;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("page-cache.ext4");
        let _ = std::fs::remove_file(&path);
        eprintln!(
            "freehint-bench: making the page-cache profile's disk ({} MiB of files) in {}",
            crate::profile::PAGE_CACHE_BYTES >> 20,
            path.display()
        );
        make_disk_image(
            &path,
            crate::profile::PAGE_CACHE_FILES,
            crate::profile::PAGE_CACHE_BYTES,
        )?;
        Ok(DiskImage { path })
    }
}

impl Drop for DiskImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_run_round_robin_within_a_repetition() {
        let m = Matrix {
            profiles: vec![Profile::Fresh],
            mem_mib: vec![2048],
            modes: vec![Mode::FreehintHints, Mode::QemuNative],
            links: vec![Link::Gbit1],
            repeat: 2,
            idle_s: 0,
        };
        let modes: Vec<(u32, Mode)> = m.runs().iter().map(|k| (k.rep, k.mode)).collect();
        assert_eq!(
            modes,
            [
                (1, Mode::FreehintHints),
                (1, Mode::QemuNative),
                (2, Mode::FreehintHints),
                (2, Mode::QemuNative)
            ]
        );
    }

    #[test]
    fn a_run_too_big_for_the_host_is_skipped_with_the_reason() {
        let key = RunKey {
            profile: Profile::AfterJob,
            mem_mib: 16384,
            mode: Mode::FreehintHints,
            link: Link::Gbit1,
            rep: 1,
            idle_s: 0,
        };
        let reason = skip_reason(&key, 8192).expect("does not fit in 8 GiB");
        assert!(reason.contains("8192 MiB available"), "{reason}");
        assert!(skip_reason(&key, 64 << 10).is_none());
    }
}
