//! The `freehint` command: the QEMU daemon and its requests, send/receive
//! for any VMM process, and the benchmark suite.

mod bench;
mod process_vmm;
mod qemu_cmds;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use freehint_dirty_log::UffdWpDirtyLog;
use freehint_engine::{
    empty_bitmap, vmm_ram_ranges, MigrationParams, NoDeviceVmm, PrecopySender, Receiver,
};
use freehint_hint_filter::HintFilter;
use freehint_memory::GuestRam;

const SEND_EXAMPLE: &str = "\
Example (any process whose guest RAM is a shared file, started with the preload library):
  LD_PRELOAD=target/release/libfreehint_preload.so my-vmm --ram /dev/shm/vm.ram &
  freehint receive --listen 127.0.0.1:7070 --ram /dev/shm/vm-dst.ram --mem-mib 1024 &
  freehint send --pid $! --ram /dev/shm/vm.ram --to 127.0.0.1:7070

The process is stopped with SIGSTOP for the final round and resumed with
SIGCONT if the migration fails. It is left stopped after a successful one.";

const RECEIVE_EXAMPLE: &str = "\
Example:
  freehint receive --listen 0.0.0.0:7070 --ram /dev/shm/vm-dst.ram --mem-mib 1024 --json

Prints `listening on ADDR` once it accepts connections, then the stats of
the migration it received. The RAM file is created if missing; it must be
on tmpfs or hugetlbfs for the VMM to share it.";

const BENCH_EXAMPLE: &str = "\
Examples:
  freehint bench sim --mem-mib 1024 --used-percent 15 --dirty-mib-per-s 64 --hints on --json
  freehint bench sim --mem-mib 4096 --hints off --json --keep-memory /tmp/images
  freehint bench hints --mem-mib 4096
  freehint bench sync --mem-mib 4096

`bench sim` runs a SIMULATED VM (a process that dirties memory and reports
free pages like a guest would; not a real guest), migrates it over loopback
TCP to a receiver in another process, and compares the two RAM images page
by page.";

#[derive(Parser, Debug)]
#[command(
    name = "freehint",
    version,
    about = "Live migration of a VM's guest RAM that skips the memory the guest does not use."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon attached to one QEMU (balloon backend + migration).
    #[command(after_help = qemu_cmds::VM_EXAMPLE)]
    Vm(qemu_cmds::VmArgs),
    /// Ask a source daemon to migrate its QEMU guest live.
    #[command(after_help = qemu_cmds::MIGRATE_EXAMPLE)]
    Migrate(qemu_cmds::MigrateArgs),
    /// Print a daemon's state as JSON.
    Status(qemu_cmds::ControlArgs),
    /// Resume a guest a destination daemon received with --no-resume.
    Resume(qemu_cmds::ControlArgs),
    /// Migrate a running process's guest RAM to a receiver.
    #[command(after_help = SEND_EXAMPLE)]
    Send(SendArgs),
    /// Receive one migration into a RAM file.
    #[command(after_help = RECEIVE_EXAMPLE)]
    Receive(ReceiveArgs),
    /// The benchmark suite.
    #[command(after_help = BENCH_EXAMPLE)]
    Bench {
        #[command(subcommand)]
        which: bench::BenchCommand,
    },
}

/// Migration parameters shared by every command that sends.
#[derive(Args, Debug, Clone)]
pub struct ParamArgs {
    /// Number of TCP connections carrying page data.
    #[arg(long, default_value_t = MigrationParams::default().bulk_channels)]
    pub bulk_channels: u8,
    /// Most bytes of page data per batch.
    #[arg(long, default_value_t = MigrationParams::default().batch_bytes)]
    pub batch_bytes: u64,
    /// Switch over once the rest is estimated to take this long, in ms.
    #[arg(long, default_value_t = MigrationParams::default().downtime_target_ms)]
    pub downtime_target_ms: u64,
    /// Switch over after this many rounds at most.
    #[arg(long, default_value_t = MigrationParams::default().max_rounds)]
    pub max_rounds: u32,
    /// Do at least this many rounds before switching over.
    #[arg(long, default_value_t = MigrationParams::default().min_rounds)]
    pub min_rounds: u32,
    /// Seconds to wait for the peer at each step.
    #[arg(long, default_value_t = MigrationParams::default().peer_timeout_s)]
    pub peer_timeout_s: u64,
    /// With hints on, wait at most this many ms for the guest's first
    /// free-page report before sending (balloon guests). The wait ends
    /// sooner when the report is done or its hints slow down; later hints
    /// still apply.
    #[arg(long, default_value_t = MigrationParams::default().hint_wait_ms)]
    pub hint_wait_ms: u64,
}

impl ParamArgs {
    /// The validated parameter set.
    pub fn params(&self, hints: bool) -> Result<MigrationParams> {
        let p = MigrationParams {
            bulk_channels: self.bulk_channels,
            batch_bytes: self.batch_bytes,
            downtime_target_ms: self.downtime_target_ms,
            max_rounds: self.max_rounds,
            min_rounds: self.min_rounds,
            hints,
            peer_timeout_s: self.peer_timeout_s,
            hint_wait_ms: self.hint_wait_ms,
        };
        p.validate().context("invalid migration parameters")?;
        Ok(p)
    }
}

/// `on` or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

#[derive(Args, Debug)]
struct SendArgs {
    /// Pid of the VMM process (started with LD_PRELOAD=libfreehint_preload.so).
    #[arg(long)]
    pid: i32,
    /// The VMM's guest RAM file (as mapped by the VMM, shared).
    #[arg(long)]
    ram: PathBuf,
    /// Address of the receiver.
    #[arg(long)]
    to: SocketAddr,
    /// Print the stats as JSON instead of a summary.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    params: ParamArgs,
}

#[derive(Args, Debug)]
struct ReceiveArgs {
    /// Address to listen on (port 0 picks one).
    #[arg(long)]
    listen: SocketAddr,
    /// The destination RAM file.
    #[arg(long)]
    ram: PathBuf,
    /// Guest RAM size in MiB (must match the source).
    #[arg(long)]
    mem_mib: u64,
    /// Print the stats as JSON instead of a summary.
    #[arg(long)]
    json: bool,
    /// Seconds to wait for the source at each step.
    #[arg(long, default_value_t = 60)]
    timeout_s: u64,
    /// Allocate all of the destination RAM before accepting (like QEMU's
    /// -mem-prealloc).
    #[arg(long)]
    preallocate: bool,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FREEHINT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Vm(a) => qemu_cmds::vm(a),
        Command::Migrate(a) => qemu_cmds::migrate(a),
        Command::Status(a) => qemu_cmds::status(a),
        Command::Resume(a) => qemu_cmds::resume(a),
        Command::Send(a) => send(a),
        Command::Receive(a) => receive(a),
        Command::Bench { which } => bench::run(which),
    };
    if let Err(e) = result {
        eprintln!("freehint: error: {e:#}");
        std::process::exit(1);
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn send(a: SendArgs) -> Result<()> {
    let params = a.params.params(false)?;
    let size = std::fs::metadata(&a.ram)
        .with_context(|| format!("reading {}", a.ram.display()))?
        .len();
    let ram = Arc::new(GuestRam::open_file(&a.ram, size)?);
    let log = UffdWpDirtyLog::attach_process(a.pid, vmm_ram_ranges(a.pid, &ram)?)?;
    let filter = Arc::new(HintFilter::new(empty_bitmap(&ram)));
    let vmm = Arc::new(process_vmm::SignalVmm::new(a.pid));
    let sender = PrecopySender::new(ram, filter, Box::new(log), None, vmm, params)?;
    let stats = runtime()?.block_on(sender.migrate(a.to))?;
    if a.json {
        println!("{}", serde_json::to_string(&stats)?);
    } else {
        println!("{}", stats.summary());
    }
    Ok(())
}

fn receive(a: ReceiveArgs) -> Result<()> {
    let ram = Arc::new(GuestRam::open_file(&a.ram, a.mem_mib << 20)?);
    let rt = runtime()?;
    let stats = rt.block_on(async {
        let mut receiver =
            Receiver::new(ram, Arc::new(NoDeviceVmm), Duration::from_secs(a.timeout_s))
                .preallocate(a.preallocate);
        receiver.prepare()?;
        let listener = tokio::net::TcpListener::bind(a.listen)
            .await
            .with_context(|| format!("listening on {}", a.listen))?;
        println!("listening on {}", listener.local_addr()?);
        use std::io::Write;
        std::io::stdout().flush()?;
        receiver
            .receive(&listener)
            .await
            .map_err(anyhow::Error::from)
    })?;
    if a.json {
        println!("{}", serde_json::to_string(&stats)?);
    } else {
        println!(
            "received {} pages with data and {} zero pages in {} rounds, {} ms",
            stats.pages_placed, stats.pages_zero, stats.rounds, stats.total_time_ms
        );
    }
    Ok(())
}
