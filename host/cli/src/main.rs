//! The `freehint` command: the QEMU daemon and its requests, send/receive
//! for any VMM process, and the benchmark suite.

#[cfg(feature = "bench")]
mod bench;
mod generate;
mod params;
mod process_vmm;
mod progress;
mod qemu_args;
mod qemu_cmds;
mod status;
mod table;
mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use freehint_dirty_log::UffdWpDirtyLog;
use freehint_engine::{
    empty_bitmap, vmm_ram_ranges, CancellationToken, ImageVmm, PhaseWatch, PrecopySender, Receiver,
};
use freehint_hint_filter::HintFilter;
use freehint_memory::GuestRam;

pub use params::ParamArgs;

const SEND_EXAMPLE: &str = "\
Example (any process whose guest RAM is a shared file, started with the preload library):
  freehint tls init /tmp/fh-tls
  LD_PRELOAD=target/release/libfreehint_preload.so my-vmm --ram /dev/shm/vm.ram &
  freehint receive --listen 127.0.0.1:7070 --ram /dev/shm/vm-dst.ram --mem-mib 1024 --tls-dir /tmp/fh-tls &
  freehint send --pid $! --ram /dev/shm/vm.ram --to 127.0.0.1:7070 --tls-dir /tmp/fh-tls
  freehint send --pid $! --ram /dev/shm/vm.ram --to 127.0.0.1:7070 --insecure --config send.toml

Migration parameters: flags, then --config FILE (TOML, see `freehint config
show --help`), then the defaults; `send` has no free-page hints.

On a terminal a progress bar (stderr) shows the round, bytes sent and left,
the rate and the estimated downtime; --json-progress prints them as one
JSON line per second instead.

The process is stopped with SIGSTOP for the final round and resumed with
SIGCONT if the migration fails. It is left stopped after a successful one.
Ctrl-C (SIGINT) or SIGTERM cancels: before the destination is told to take
over, the process is resumed untouched. If the link dies after that, the
process stays stopped and the error says so: resume it (kill -CONT) only if
the destination did not take over.";

const RECEIVE_EXAMPLE: &str = "\
Example:
  freehint receive --listen 0.0.0.0:7070 --ram /dev/shm/vm-dst.ram --mem-mib 1024 --tls-dir /etc/freehint/tls --json

Prints `listening on ADDR` once it accepts connections, then the stats of
the migration it received. With --tls-dir, a connection without a
certificate from the CA is refused (one log line each) and the wait goes
on. The RAM file is created if missing; it must be
on tmpfs or hugetlbfs for the VMM to share it. The image counts as resumed
only once the source commits; until then Ctrl-C gives up cleanly.";

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
    /// Show daemons' state: a table for people, or JSON (--json).
    #[command(after_help = status::STATUS_EXAMPLE)]
    Status(status::StatusArgs),
    /// Resume a guest a daemon holds paused (after --no-resume, or an
    /// uncertain handover), or a paused QEMU whose daemon is gone (--qmp).
    #[command(after_help = qemu_cmds::RESUME_EXAMPLE)]
    Resume(qemu_cmds::ResumeArgs),
    /// Cancel the migration a source daemon runs (the guest runs on).
    Cancel(qemu_cmds::ControlArgs),
    /// Print the QEMU options that attach a guest to freehint (shared
    /// memory backend, the balloon device on the daemon's socket, the
    /// preload library).
    #[command(after_help = qemu_args::QEMU_ARGS_EXAMPLE)]
    QemuArgs(qemu_args::QemuArgsArgs),
    /// Migrate a running process's guest RAM to a receiver.
    #[command(after_help = SEND_EXAMPLE)]
    Send(SendArgs),
    /// Receive one migration into a RAM file.
    #[command(after_help = RECEIVE_EXAMPLE)]
    Receive(ReceiveArgs),
    /// The benchmark suite (builds with the cargo feature `bench` only).
    #[cfg(feature = "bench")]
    #[command(after_help = bench::BENCH_EXAMPLE)]
    Bench {
        #[command(subcommand)]
        which: bench::BenchCommand,
    },
    /// TLS for migration connections: make a test CA and certificates.
    Tls {
        #[command(subcommand)]
        which: tls::TlsCommand,
    },
    /// Show the effective migration parameters (defaults, --config FILE,
    /// flags).
    Config {
        #[command(subcommand)]
        which: params::ConfigCommand,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish,
    /// powershell).
    #[command(after_help = generate::COMPLETIONS_EXAMPLE)]
    Completions(generate::CompletionsArgs),
    /// Print the man page, or write every page into a directory.
    #[command(after_help = generate::MAN_EXAMPLE)]
    Man(generate::ManArgs),
    /// Tools for tests: fault points.
    Debug {
        #[command(subcommand)]
        which: DebugCommand,
    },
}

/// `freehint debug …`.
#[derive(Subcommand, Debug)]
enum DebugCommand {
    /// List the fault points (docs/FAULTS.md) as JSON, one per line; fails
    /// if this build has none (build with --features freehint/failpoints).
    FaultPoints,
    /// Configure fault points in a running daemon (`NAME=ACTION;…`).
    Fault {
        /// The daemon's control socket.
        #[arg(long)]
        control: PathBuf,
        /// The spec, in FAILPOINTS syntax.
        spec: String,
    },
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
    /// Address of the receiver: HOST:PORT (TCP), or rdma://HOST:PORT
    /// (RDMA through the device that serves HOST; no TLS: give --insecure).
    #[arg(long)]
    to: freehint_engine::Endpoint,
    /// Print the stats as JSON instead of a summary.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    progress: progress::ProgressArgs,
    #[command(flatten)]
    params: ParamArgs,
    #[command(flatten)]
    tls: tls::TlsArgs,
}

#[derive(Args, Debug)]
struct ReceiveArgs {
    /// Address to listen on: HOST:PORT (TCP), or rdma://HOST:PORT (RDMA
    /// on the device that serves HOST; no TLS: give --insecure). Port 0
    /// picks one.
    #[arg(long)]
    listen: freehint_engine::Endpoint,
    #[command(flatten)]
    tls: tls::TlsArgs,
    /// The destination RAM file.
    #[arg(long)]
    ram: PathBuf,
    /// Guest RAM size in MiB (must match the source).
    #[arg(long)]
    mem_mib: u64,
    /// Print the stats as JSON instead of a summary.
    #[arg(long)]
    json: bool,
    /// Give up if no source connects within this many seconds (default:
    /// wait as long as it takes). Once a source is connected, its
    /// --peer-timeout-s bounds every wait.
    #[arg(long)]
    accept_timeout_s: Option<u64>,
    /// Allocate all of the destination RAM before accepting (like QEMU's
    /// -mem-prealloc).
    #[arg(long)]
    preallocate: bool,
    /// Write `{"phase", "destination_running", "pid"}` here at every phase
    /// change (for tests that must know the outcome even if this process
    /// is killed).
    #[arg(long)]
    state_file: Option<PathBuf>,
    /// Write the device state received here (it is otherwise discarded).
    #[arg(long)]
    device_state_file: Option<PathBuf>,
    /// The destination VM is an incoming SIMULATED VM (tests/sim-vm,
    /// `--incoming`) that connects to this Unix socket: with it, the
    /// receiver can take postcopy migrations (`freehint bench sim`).
    #[cfg(feature = "bench")]
    #[arg(long, value_name = "SOCKET")]
    sim_vm_control: Option<PathBuf>,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FREEHINT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(|| progress::Stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = parse();
    if let Err(e) = freehint_engine::fault::configure_from_env() {
        eprintln!("freehint: error: FAILPOINTS: {e}");
        std::process::exit(2);
    }
    let result = match cli.command {
        Command::Vm(a) => qemu_cmds::vm(a),
        Command::Migrate(a) => qemu_cmds::migrate(a),
        Command::Status(a) => status::status(a),
        Command::Resume(a) => qemu_cmds::resume(a),
        Command::Cancel(a) => qemu_cmds::cancel(a),
        Command::QemuArgs(a) => qemu_args::qemu_args(a),
        Command::Send(a) => send(a),
        Command::Tls { which } => tls::run(which),
        Command::Receive(a) => receive(a),
        #[cfg(feature = "bench")]
        Command::Bench { which } => bench::run(which),
        Command::Config {
            which: params::ConfigCommand::Show(a),
        } => params::show(a),
        Command::Completions(a) => generate::completions(a),
        Command::Man(a) => generate::man(a),
        Command::Debug { which } => debug(which),
    };
    if let Err(e) = result {
        eprintln!("freehint: error: {}", one_line(&e));
        std::process::exit(1);
    }
}

/// The command line definition, with the defaults of the migration
/// parameters in their help (completions and the man page use it too).
pub fn cli_command() -> clap::Command {
    params::with_param_defaults(Cli::command())
}

/// Parses the command line (exits with clap's message on a usage error).
fn parse() -> Cli {
    let mut matches = cli_command().get_matches();
    Cli::from_arg_matches_mut(&mut matches).unwrap_or_else(|e| e.exit())
}

/// An error and its causes in one line, each cause once.
fn one_line(e: &anyhow::Error) -> String {
    freehint_types::ErrorChain(e.as_ref()).to_string()
}

fn debug(which: DebugCommand) -> Result<()> {
    match which {
        DebugCommand::FaultPoints => {
            if !freehint_engine::fault::compiled_in() {
                bail!("this build has no fault points; build with --features freehint/failpoints (make test does)");
            }
            for p in freehint_engine::fault::POINTS {
                println!(
                    "{}",
                    serde_json::json!({
                        "name": p.name,
                        "side": p.side,
                        "handover": p.handover,
                        "place": p.place,
                    })
                );
            }
            Ok(())
        }
        DebugCommand::Fault { control, spec } => qemu_cmds::fault(&control, spec),
    }
}

/// Prints one line of results on stdout. A reader that went away (a
/// closed pipe) is not an error worth a panic: the outcome is also in the
/// exit status and the logs.
pub fn emit(line: impl std::fmt::Display) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

/// Runs `cancel` on the first SIGINT or SIGTERM (a migration fails back if
/// it has not committed); the second one ends the process at once.
pub fn on_first_signal(cancel: impl FnOnce() + Send + 'static) -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .context("installing the signal handler")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut it = signals.forever();
            if it.next().is_some() {
                progress::eprint_line("freehint: cancelling (the guest runs on unless the destination already took over); signal again to quit at once");
                cancel();
            }
            if it.next().is_some() {
                std::process::exit(130);
            }
        })
        .context("starting the signal thread")?;
    Ok(())
}

/// Cancels `token` on the first SIGINT or SIGTERM (see [`on_first_signal`]).
pub fn cancel_on_signals(token: CancellationToken) -> Result<()> {
    on_first_signal(move || token.cancel())
}

/// Writes `{"phase", "destination_running", "pid"}` to `path` at every
/// change of `watch`, atomically.
fn write_state_file(
    watch: &PhaseWatch,
    path: PathBuf,
    running: impl Fn() -> bool + Send + Sync + 'static,
) {
    watch.on_change(move |info| {
        let body = serde_json::json!({
            "phase": info.phase,
            "round": info.round,
            "destination_running": running(),
            "pid": std::process::id(),
        });
        let tmp = path.with_extension("tmp");
        if std::fs::write(&tmp, format!("{body}\n")).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    });
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn send(a: SendArgs) -> Result<()> {
    let params = a.params.resolve_without_hints()?;
    let tls = a.tls.resolve(tls::Role::Send)?;
    let size = std::fs::metadata(&a.ram)
        .with_context(|| format!("reading {}", a.ram.display()))?
        .len();
    let ram = Arc::new(GuestRam::open_file(&a.ram, size)?);
    let log = UffdWpDirtyLog::attach_process(a.pid, vmm_ram_ranges(a.pid, &ram)?)?;
    let filter = Arc::new(HintFilter::new(empty_bitmap(&ram)));
    let vmm = Arc::new(process_vmm::SignalVmm::new(a.pid));
    if a.to.scheme == freehint_engine::Scheme::Rdma && tls.is_some() {
        bail!("--to rdma://...: RDMA connections carry no TLS; run them on a trusted fabric with --insecure");
    }
    let sender = PrecopySender::new(ram, filter, Box::new(log), None, vmm, params)?
        .with_tls(tls)
        .with_scheme(a.to.scheme);
    cancel_on_signals(sender.cancel_token())?;
    let watch = sender.progress_watch();
    let reporter = progress::Reporter::start(&a.progress, move || Some(watch.get()));
    let result = runtime()?.block_on(sender.migrate(a.to.addr));
    reporter.stop();
    match result {
        Ok(stats) => report(a.json, &stats, stats.summary(), None),
        Err(f) => report(a.json, &f.stats, "", Some(f.to_string())),
    }
}

/// Prints the outcome of a migration: `stats` as JSON (with `error` when it
/// failed), or `summary`; a failure becomes the command's error.
pub fn report(
    json: bool,
    stats: &impl serde::Serialize,
    summary: impl std::fmt::Display,
    error: Option<String>,
) -> Result<()> {
    if json {
        let mut v = serde_json::to_value(stats)?;
        if let Some(e) = &error {
            v["error"] = e.clone().into();
        }
        emit(v);
    } else if error.is_none() {
        emit(summary);
    }
    match error {
        Some(e) => Err(anyhow::Error::msg(e)),
        None => Ok(()),
    }
}

/// The VM a `freehint receive` hands the guest to.
enum ReceivingVm {
    /// A bare RAM image.
    Image(Arc<ImageVmm>),
    /// An incoming simulated VM.
    #[cfg(feature = "bench")]
    Sim(Arc<freehint_sim_vm::SimVmClient>),
}

impl ReceivingVm {
    fn open(a: &ReceiveArgs) -> Result<Self> {
        #[cfg(feature = "bench")]
        if let Some(path) = &a.sim_vm_control {
            let _ = std::fs::remove_file(path);
            let listener = std::os::unix::net::UnixListener::bind(path)
                .with_context(|| format!("binding {}", path.display()))?;
            let stream = bench::accept_within(&listener, Duration::from_secs(60))
                .context("waiting for the incoming simulated VM")?;
            let (client, _ready) =
                freehint_sim_vm::SimVmClient::new(stream, Arc::new(std::sync::Mutex::new(None)))?;
            return Ok(ReceivingVm::Sim(client.incoming()));
        }
        let _ = a;
        Ok(ReceivingVm::Image(Arc::new(ImageVmm::default())))
    }

    fn vmm(&self) -> Arc<dyn freehint_types::DestinationVmm> {
        match self {
            ReceivingVm::Image(v) => v.clone(),
            #[cfg(feature = "bench")]
            ReceivingVm::Sim(v) => v.clone(),
        }
    }

    fn running_fn(&self) -> Box<dyn Fn() -> bool + Send + Sync> {
        match self {
            ReceivingVm::Image(v) => {
                let v = v.clone();
                Box::new(move || v.running())
            }
            #[cfg(feature = "bench")]
            ReceivingVm::Sim(v) => {
                let v = v.clone();
                Box::new(move || v.running())
            }
        }
    }

    fn device_state(&self) -> Option<Vec<u8>> {
        match self {
            ReceivingVm::Image(v) => v.device_state(),
            #[cfg(feature = "bench")]
            ReceivingVm::Sim(v) => v.loaded_device_state(),
        }
    }
}

/// Receives one migration on an RDMA listener at `addr`.
#[cfg(feature = "rdma")]
async fn receive_rdma(
    receiver: &Receiver,
    addr: SocketAddr,
) -> Result<Result<freehint_engine::ReceiveStats, freehint_engine::ReceiveFailure>> {
    use std::io::Write;
    let listener = freehint_engine::RdmaListener::bind(addr)?;
    println!("listening on rdma://{}", listener.local_addr());
    std::io::stdout().flush()?;
    Ok(receiver
        .receive_on(&freehint_engine::Listener::Rdma(&listener))
        .await)
}

#[cfg(not(feature = "rdma"))]
async fn receive_rdma(
    _receiver: &Receiver,
    _addr: SocketAddr,
) -> Result<Result<freehint_engine::ReceiveStats, freehint_engine::ReceiveFailure>> {
    bail!("this freehint was built without RDMA (build it with the cargo feature `rdma`)")
}

fn receive(a: ReceiveArgs) -> Result<()> {
    let tls = a.tls.resolve(tls::Role::Receive)?;
    let rdma = a.listen.scheme == freehint_engine::Scheme::Rdma;
    if rdma && tls.is_some() {
        bail!("--listen rdma://...: RDMA connections carry no TLS; run them on a trusted fabric with --insecure");
    }
    let ram = Arc::new(GuestRam::open_file(&a.ram, a.mem_mib << 20)?);
    let vm = ReceivingVm::open(&a)?;
    let mut receiver = Receiver::new(ram, vm.vmm(), a.accept_timeout_s.map(Duration::from_secs))
        .preallocate(a.preallocate)
        .with_tls(tls);
    receiver.prepare()?;
    if let Some(path) = a.state_file.clone() {
        write_state_file(&receiver.phase_watch(), path, vm.running_fn());
    }
    cancel_on_signals(receiver.cancel_token())?;
    let rt = runtime()?;
    let result = rt.block_on(async {
        use std::io::Write;
        if rdma {
            return receive_rdma(&receiver, a.listen.addr).await;
        }
        let listener = tokio::net::TcpListener::bind(a.listen.addr)
            .await
            .with_context(|| format!("listening on {}", a.listen))?;
        println!("listening on {}", listener.local_addr()?);
        std::io::stdout().flush()?;
        Ok::<_, anyhow::Error>(receiver.receive(&listener).await)
    })?;
    if let (Some(path), Some(state)) = (&a.device_state_file, vm.device_state()) {
        std::fs::write(path, state).with_context(|| format!("writing {}", path.display()))?;
    }
    match result {
        Ok(stats) => {
            let summary = format!(
                "received {} pages with data and {} zero pages in {} rounds, {} ms",
                stats.pages_placed, stats.pages_zero, stats.rounds, stats.total_time_ms
            );
            report(a.json, &stats, summary, None)
        }
        Err(f) => report(a.json, &f.stats, "", Some(f.to_string())),
    }
}
