//! The benchmark suite: `freehint bench sim|hints|sync`.
//!
//! Built only with the cargo feature `bench` (`make test`, `make demo` and
//! `make bench` turn it on): `bench sim` drives the SIMULATED VM of
//! `tests/sim-vm`, a test crate the product binary must not depend on.

mod micro;
mod sim;

use anyhow::{bail, Result};
use clap::Subcommand;

pub use sim::accept_within;
use sim::SimArgs;

/// Examples for `freehint bench --help`.
pub const BENCH_EXAMPLE: &str = "\
Examples:
  freehint bench sim --mem-mib 1024 --used-percent 15 --dirty-mib-per-s 64 --hints on --json
  freehint bench sim --mem-mib 4096 --hints off --json --keep-memory /tmp/images
  freehint bench sim --mem-mib 2048 --used-percent 20 --dirty-mib-per-s 64 --mode postcopy --json
  freehint bench hints --mem-mib 4096
  freehint bench sync --mem-mib 4096

`bench sim` runs a SIMULATED VM (a process that dirties memory and reports
free pages like a guest would; not a real guest), migrates it over loopback
TCP to a receiver in another process, and compares the two RAM images page
by page. With --mode postcopy or hybrid, an incoming simulated VM runs on
the destination RAM and checks the pages it reads while they arrive. It
needs the freehint-sim-vm binary and the preload library next
to this one (cargo build --workspace --features freehint/bench).";

/// Which benchmark.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Migrate a SIMULATED VM over loopback TCP and check every page.
    Sim(Box<SimArgs>),
    /// Hint application rate: how much hinted guest memory per second the
    /// filter absorbs (in-process, no guest).
    Hints {
        /// Guest RAM size in MiB.
        #[arg(long, default_value_t = 4096)]
        mem_mib: u64,
        /// Times to hint all of RAM.
        #[arg(long, default_value_t = 200)]
        passes: u32,
    },
    /// One dirty-log sync of a populated tmpfs mapping in this process with
    /// few pages written (the real uffd-wp + PAGEMAP_SCAN path).
    Sync {
        /// RAM size in MiB.
        #[arg(long, default_value_t = 4096)]
        mem_mib: u64,
        /// Pages written before each sync.
        #[arg(long, default_value_t = 64)]
        dirty_pages: u64,
        /// Syncs to time.
        #[arg(long, default_value_t = 50)]
        syncs: u32,
    },
}

/// Runs one benchmark.
pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Sim(a) => {
            let json = a.json;
            let r = sim::sim(*a)?;
            if json {
                crate::emit(serde_json::to_string(&r)?);
            } else {
                println!("{}", r.stats.summary());
                println!(
                    "{} pages compared, {} mismatched",
                    r.pages_compared, r.mismatched_pages
                );
            }
            if let Some(e) = &r.error {
                bail!("{e}");
            }
            if r.device_state_intact == Some(false) {
                bail!("the device state arrived damaged");
            }
            if r.mismatched_pages != 0 {
                bail!(
                    "{} pages differ between source and destination",
                    r.mismatched_pages
                );
            }
            Ok(())
        }
        BenchCommand::Hints { mem_mib, passes } => micro::hints_rate(mem_mib, passes),
        BenchCommand::Sync {
            mem_mib,
            dirty_pages,
            syncs,
        } => micro::sync_time(mem_mib, dirty_pages, syncs),
    }
}
