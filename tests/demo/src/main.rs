//! `freehint-demo`: migrates a real guest five ways and prints one table.
//! `make demo` builds everything and runs it; see `freehint-demo --help`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use freehint_demo::{run_mode, DemoSetup, Mode, RunReport};

const ABOUT: &str = "\
Live-migrates a REAL QEMU/Linux guest that has written and freed most of its
memory, between two QEMUs on this host: with freehint (free-page hints on,
then off) and with QEMU's own migration (its virtio-balloon free-page-hint
off, then on). Each mode boots a fresh guest. Prints one table and writes
the runs as JSON (--out). `make demo` builds QEMU, the guest image and
freehint first, then runs this.";

#[derive(Parser, Debug)]
#[command(name = "freehint-demo", about = ABOUT)]
struct Args {
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 2048)]
    mem_mib: u64,
    /// MiB the guest writes and frees before migration (0: idle guest).
    #[arg(long, default_value_t = 1400)]
    work_mib: u64,
    /// Of --work-mib, MiB the guest keeps resident: an application's data,
    /// which any migration must send. (The guest's kernel and its page
    /// structures, about 80 MiB for 2 GiB, are not in MemTotal, so a bare
    /// busybox guest's "used" undercounts what it really holds.)
    #[arg(long, default_value_t = 128)]
    keep_mib: u64,
    /// MiB of the data region the guest's checker verifies (every 500 ms,
    /// which under TCG keeps the guest CPU busy: keep it small).
    #[arg(long, default_value_t = 16)]
    check_mib: u64,
    /// More guest kernel options, e.g. `init_on_alloc=0` (Debian's kernel
    /// zeroes every page it allocates, also the free pages the balloon
    /// driver takes to hint them, which dirties them).
    #[arg(long, default_value = "")]
    guest_append: String,
    /// Modes to run, in order (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Mode::ALL)]
    modes: Vec<Mode>,
    /// Run the modes this many times, round-robin; the summary uses the
    /// median of each mode.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    repeat: u32,
    /// The patched QEMU (tests/qemu/build-qemu.sh prints it).
    #[arg(long, env = "FREEHINT_QEMU")]
    qemu: PathBuf,
    /// The reference QEMU.
    #[arg(long, default_value = "/usr/bin/qemu-system-x86_64")]
    reference_qemu: PathBuf,
    /// The guest image folder (tests/guest/build-guest-image.sh prints it).
    #[arg(long, env = "FREEHINT_GUEST_DIR")]
    guest_dir: PathBuf,
    /// Where `freehint` and `libfreehint_preload.so` are (default: next to
    /// this program).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// The report.
    #[arg(long, default_value = "target/demo/report.json")]
    out: PathBuf,
    /// Logs (consoles, daemons, QEMU) of each run go in a folder here.
    #[arg(long, default_value = "target/demo/logs")]
    log_dir: PathBuf,
    /// Instead of the five modes: start a source guest under freehint and
    /// a destination, print the `freehint migrate` command to run yourself
    /// (in another terminal: it shows its progress there), and check the
    /// guest once it has moved.
    #[arg(long)]
    interactive: bool,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("freehint-demo: {e:#}");
        std::process::exit(1);
    }
}

fn run(a: Args) -> Result<()> {
    let bin_dir = match a.bin_dir {
        Some(d) => d,
        None => std::env::current_exe()?
            .parent()
            .context("where freehint-demo is")?
            .to_path_buf(),
    };
    let setup = DemoSetup {
        patched_qemu: a.qemu,
        reference_qemu: a.reference_qemu,
        guest_dir: a.guest_dir,
        bin_dir,
        log_dir: std::path::absolute(&a.log_dir)?,
        mem_mib: a.mem_mib,
        work_mib: a.work_mib,
        keep_mib: a.keep_mib,
        check_mib: a.check_mib,
        boot_timeout: Duration::from_secs(600),
        append: a.guest_append.clone(),
        disk: None,
        ready_lines: Vec::new(),
        idle: Duration::ZERO,
        netns: None,
    };
    if a.interactive {
        let (alive, check) = freehint_demo::interactive(&setup)?;
        eprintln!(
            "freehint-demo: on the destination: alive {}, data {check}",
            if alive { "yes" } else { "NO" }
        );
        anyhow::ensure!(alive && check == "ok", "the guest did not arrive whole");
        return Ok(());
    }
    let mut rows: Vec<RunReport> = Vec::new();
    let runs: Vec<Mode> = (0..a.repeat)
        .flat_map(|_| a.modes.iter().copied())
        .collect();
    for (i, mode) in runs.into_iter().enumerate() {
        if i > 0 {
            // Let the host reclaim the last run's guest memory first.
            std::thread::sleep(Duration::from_secs(2));
        }
        eprintln!(
            "freehint-demo: {}: booting a {} MiB guest that writes {} MiB and frees all but {} MiB, then migrating ...",
            mode.name(),
            setup.mem_mib,
            setup.work_mib,
            setup.keep_mib
        );
        let r = run_mode(&setup, mode).with_context(|| format!("{} run", mode.name()))?;
        eprintln!(
            "freehint-demo: {}: {:.0} MiB in {} ms, downtime {} ms, alive {}, data {}",
            mode.name(),
            r.bytes_tool as f64 / 1048576.0,
            r.total_time_ms,
            r.downtime_ms,
            r.guest_alive_after,
            r.data_check
        );
        rows.push(r);
        if let Some(dir) = a.out.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&a.out, serde_json::to_string_pretty(&rows)?)
            .with_context(|| format!("writing {}", a.out.display()))?;
    }
    print!("{}", table(&rows));
    eprintln!("freehint-demo: report in {}", a.out.display());
    Ok(())
}

fn table(rows: &[RunReport]) -> String {
    let mut s = String::new();
    if let Some(r) = rows.first() {
        s += &format!(
            "REAL guest: {} MiB RAM, {} MiB used at migration (TCG, loopback)\n\
             freehint migrates over TLS 1.3 with mutual authentication (freehint-hints-insecure: \
             plain TCP); QEMU's modes over plain TCP\n",
            r.guest_mem_mib, r.guest_used_mib
        );
    }
    s += &format!(
        "{:<17} {:>12} {:>9} {:>12} {:>6} {:>6}\n",
        "mode", "MiB on wire", "total ms", "downtime ms", "alive", "data"
    );
    for r in rows {
        s += &format!(
            "{:<17} {:>12.1} {:>9} {:>12} {:>6} {:>6}\n",
            r.mode.name(),
            r.bytes_tool as f64 / 1048576.0,
            r.total_time_ms,
            r.downtime_ms,
            if r.guest_alive_after { "yes" } else { "NO" },
            r.data_check
        );
    }
    let median = |m: Mode, f: fn(&RunReport) -> u64| -> Option<f64> {
        let mut v: Vec<u64> = rows.iter().filter(|r| r.mode == m).map(f).collect();
        v.sort_unstable();
        (!v.is_empty()).then(|| v[v.len() / 2] as f64)
    };
    for (mode, what) in [
        (Mode::FreehintHints, "freehint with hints"),
        (Mode::FreehintAgent, "freehint with its guest agent"),
    ] {
        let pair =
            |f: fn(&RunReport) -> u64| Some((median(mode, f)?, median(Mode::QemuNativeFph, f)?));
        if let (Some((fb, qb)), Some((ft, qt)), Some((fd, _))) = (
            pair(|r| r.bytes_tool),
            pair(|r| r.total_time_ms),
            pair(|r| r.downtime_ms),
        ) {
            s += &format!(
                "{what} vs QEMU with free-page-hint (medians): {:.2}x the bytes, {:.2}x the time (targets <= 0.7x); downtime {fd:.0} ms (target <= 50 ms)\n",
                fb / qb.max(1.0),
                ft / qt.max(1.0),
            );
        }
    }
    s
}
