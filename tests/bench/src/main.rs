//! `freehint-bench`: the benchmark suite's runner and report writer.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use freehint_bench::record::{Link, Mode, Profile};
use freehint_bench::suite::{skip_reason, Matrix, Suite};
use freehint_demo::DemoSetup;

const ABOUT: &str = "\
The freehint benchmark suite: migrates REAL QEMU/Linux guests of several
profiles and RAM sizes with every mode (freehint with and without hints,
QEMU's own precopy, free-page-hint, free-page-reporting, multifd, postcopy),
each between two network namespaces joined by a veth pair shaped with tc,
and measures every mode the same way:

  downtime    the source's QMP STOP event to the destination's RESUME event
  total time  the migrate command to the destination's RESUME event
              (postcopy: to its last page placed, MIGRATION completed)
  bytes       what crossed the link (the veth's counters), the tool's own
              figure beside it
  health      the guest's heartbeat goes on on the destination and its data
              check passes there

Each run boots a fresh guest pair. A progress line is printed per run and the
JSON report (one object per run) is rewritten after each. Needs root (network
namespaces, tc). `make bench` builds everything, runs the standard matrix and
writes docs/BENCHMARKS.md with `freehint-bench report`.

Example: one profile, both freehint modes and QEMU's best, on a 1 Gbit/s link:

  freehint-bench --profiles after-job --modes freehint-hints,freehint-nohints,qemu-native-fph \\
      --link 1gbit --repeat 3 --json target/bench/mine.json";

#[derive(Parser, Debug)]
#[command(
    name = "freehint-bench",
    about = "The freehint benchmark suite: real guests, every mode measured the same way",
    long_about = ABOUT,
    args_conflicts_with_subcommands = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Guest profiles (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Profile::ALL)]
    profiles: Vec<Profile>,
    /// Guest RAM sizes in MiB (comma-separated); a size this host cannot
    /// hold is skipped with the reason.
    #[arg(long, value_delimiter = ',', default_values_t = [2048u64], value_parser = clap::value_parser!(u64).range(512..=65536))]
    mem_mib: Vec<u64>,
    /// Modes (comma-separated), run round-robin.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Mode::EVERY)]
    modes: Vec<Mode>,
    /// Links between source and destination (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Link::Unlimited])]
    link: Vec<Link>,
    /// Repetitions of each run; reports use the median.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    repeat: u32,
    /// Seconds each guest idles after its workload, before the migration
    /// (free page reporting discards freed memory after a few seconds).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=600))]
    idle_s: u64,
    /// The JSON report.
    #[arg(long = "json", default_value = "target/bench/suite.json")]
    json_out: PathBuf,
    /// Only list the runs (and those that would be skipped), run nothing.
    #[arg(long)]
    list: bool,
    /// The patched QEMU (tests/qemu/build-qemu.sh prints it).
    #[arg(long, env = "FREEHINT_QEMU")]
    qemu: Option<PathBuf>,
    /// The reference QEMU.
    #[arg(long, default_value = "/usr/bin/qemu-system-x86_64")]
    reference_qemu: PathBuf,
    /// The guest image folder (tests/guest/build-guest-image.sh prints it).
    #[arg(long, env = "FREEHINT_GUEST_DIR")]
    guest_dir: Option<PathBuf>,
    /// Where `freehint` and `libfreehint_preload.so` are (default: next to
    /// this program).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// The freehint commit those binaries were built from, recorded in the
    /// JSON and the report (`make bench` gives `git describe --always
    /// --dirty`), so that suites run on different days say what they ran.
    #[arg(long, env = "FREEHINT_BENCH_BUILT_FROM")]
    built_from: Option<String>,
    /// Consoles and logs of every run go in a folder per run here.
    #[arg(long, default_value = "target/bench/logs")]
    log_dir: PathBuf,
    /// Where the page-cache profile's disk image is made (1 GiB; removed
    /// at the end).
    #[arg(long, default_value = "target/bench/scratch")]
    scratch_dir: PathBuf,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Writes docs/BENCHMARKS.md (tables and PNG plots) from the results in
    /// a folder (`make bench` writes them to target/bench).
    Report {
        /// The folder of results.
        #[arg(long, default_value = "target/bench")]
        dir: PathBuf,
        /// The Markdown report.
        #[arg(long, default_value = "docs/BENCHMARKS.md")]
        out: PathBuf,
        /// Where the plots go (linked from the report by relative path).
        #[arg(long, default_value = "docs/bench")]
        plots_dir: PathBuf,
    },
}

fn main() {
    let args = Args::parse();
    let result = match args.command {
        Some(Command::Report {
            dir,
            out,
            plots_dir,
        }) => freehint_bench::report::write_report(&dir, &out, &plots_dir),
        None => run(args.run),
    };
    if let Err(e) = result {
        eprintln!("freehint-bench: {e:#}");
        std::process::exit(1);
    }
}

fn run(a: RunArgs) -> anyhow::Result<()> {
    let matrix = Matrix {
        profiles: a.profiles,
        mem_mib: a.mem_mib,
        modes: a.modes,
        links: a.link,
        repeat: a.repeat,
        idle_s: a.idle_s,
    };
    if a.list {
        let available = freehint_bench::suite::host_available_mib();
        for key in matrix.runs() {
            let skip =
                skip_reason(&key, available).map_or(String::new(), |r| format!(": skipped, {r}"));
            println!("{}{skip}", key.label());
        }
        return Ok(());
    }
    // SAFETY: geteuid() only reads the process's credentials.
    anyhow::ensure!(
        unsafe { libc::geteuid() } == 0,
        "the suite must run as root: it creates network namespaces and shapes their link with tc"
    );
    let qemu = a.qemu.context(
        "no patched QEMU: pass --qemu or set FREEHINT_QEMU (tests/qemu/build-qemu.sh prints it)",
    )?;
    let guest_dir = a.guest_dir.context(
        "no guest image: pass --guest-dir or set FREEHINT_GUEST_DIR (tests/guest/build-guest-image.sh prints it)",
    )?;
    let bin_dir = match a.bin_dir {
        Some(d) => d,
        None => std::env::current_exe()?
            .parent()
            .context("where freehint-bench is")?
            .to_path_buf(),
    };
    let setup = DemoSetup {
        patched_qemu: qemu,
        reference_qemu: a.reference_qemu,
        guest_dir,
        bin_dir,
        log_dir: std::path::absolute(&a.log_dir)?,
        mem_mib: 2048,
        work_mib: 0,
        keep_mib: 0,
        check_mib: 16,
        boot_timeout: Duration::from_secs(900),
        append: String::new(),
        disk: None,
        ready_lines: Vec::new(),
        idle: Duration::ZERO,
        netns: None,
    };
    let suite = Suite {
        setup,
        matrix,
        json_out: a.json_out.clone(),
        scratch_dir: std::path::absolute(&a.scratch_dir)?,
        built_from: a.built_from.clone(),
    };
    let command = std::env::args()
        .map(|a| if a.contains(' ') { format!("'{a}'") } else { a })
        .collect::<Vec<_>>()
        .join(" ");
    let report = suite.run(command)?;
    let failed = report
        .runs
        .iter()
        .filter(|r| r.status == freehint_bench::record::RunStatus::Failed)
        .count();
    eprintln!(
        "freehint-bench: {} runs, {failed} failed; report in {}",
        report.runs.len(),
        a.json_out.display()
    );
    Ok(())
}
