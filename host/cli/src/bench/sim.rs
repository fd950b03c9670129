//! `freehint bench sim`: a SIMULATED VM migrated over loopback TCP, checked
//! page by page.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use freehint_dirty_log::UffdWpDirtyLog;
use freehint_engine::{
    empty_bitmap, vmm_ram_ranges, MigrationStats, Phase, PhaseWatch, PrecopySender, ReceiveStats,
};
use freehint_hint_filter::{HintFilter, IdentityMappedSink};
use freehint_memory::GuestRam;
use freehint_sim_vm::{
    device_state_pattern, split_device_state, DestinationReport, FromSim, SimVmClient, ToSim,
};
use freehint_types::{HintSink, HintSource};
use serde::Serialize;

use crate::{runtime, OnOff, ParamArgs};

/// Arguments of `bench sim`.
#[derive(clap::Args, Debug)]
pub struct SimArgs {
    /// Guest RAM size in MiB.
    #[arg(long, default_value_t = 1024)]
    pub mem_mib: u64,
    /// Share of RAM the simulated guest uses, percent.
    #[arg(long, default_value_t = 15)]
    pub used_percent: u64,
    /// Rate at which the simulated guest rewrites used memory, MiB/s.
    #[arg(long, default_value_t = 16)]
    pub dirty_mib_per_s: u64,
    /// Free-page hints on or off (`hints` in --config FILE).
    #[arg(long, value_enum)]
    pub hints: Option<OnOff>,
    /// Print one JSON object instead of a summary.
    #[arg(long)]
    pub json: bool,
    /// Leave source.ram, destination.ram and free-at-switchover.txt here.
    #[arg(long)]
    pub keep_memory: Option<PathBuf>,
    /// Adversarial hint timing in the simulated guest (late hints, pages
    /// written right after they are hinted).
    #[arg(long)]
    pub adversarial: bool,
    /// Free memory of the simulated guest at start: old-data or zero.
    #[arg(long, default_value = "old-data")]
    pub free_memory: String,
    /// Preallocate the destination RAM before the migration (like QEMU's
    /// -mem-prealloc), so that the transfer rate is not bounded by
    /// allocating fresh memory.
    #[arg(long)]
    pub preallocate_destination: bool,
    /// Random seed of the simulated guest.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Hand over this many MiB of simulated device state (a pattern the
    /// destination checks), e.g. more than one 16 MiB frame.
    #[arg(long, default_value_t = 0)]
    pub device_state_mib: u64,
    /// Keep everything in this directory instead of a temporary one:
    /// source.ram, destination.ram, the free pages at switchover
    /// (free-pages.txt), and state files the simulated VM and the receiver
    /// keep up to date (source.state.json: `running`; destination.state.json:
    /// `phase`, `destination_running`), so a test can tell who runs the
    /// guest even if a process was killed.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Put both RAM files in this directory instead of the work directory:
    /// a hugetlbfs mount (2 MiB pages: each huge page is tracked, sent and
    /// placed whole) or another tmpfs. They are removed at the end.
    #[arg(long, value_name = "DIR")]
    pub ram_dir: Option<PathBuf>,
    /// Migrate over TLS 1.3 with mutual authentication, with the
    /// certificates in DIR (see `freehint tls init`). Without it, plain TCP
    /// on loopback: this is a benchmark of the engine, not a migration
    /// between hosts.
    #[arg(long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// With --tls-dir: the pinned mode (see `freehint vm --help`); both
    /// sides use DIR's host certificate, so pin its own fingerprint.
    #[arg(long, value_name = "SHA256", requires = "tls_dir")]
    pub tls_pin: Vec<freehint_engine::tls::CertificateFingerprint>,
    /// What carries the migration: tcp, or rdma (page data read by the
    /// destination with RDMA READ; needs an RDMA device on --address's
    /// interface, e.g. soft-RoCE: `rdma link add rxe0 type rxe netdev
    /// eth0`). RDMA takes no TLS.
    #[arg(long, value_enum, default_value_t = SimTransport::Tcp, conflicts_with = "tls_dir")]
    pub transport: SimTransport,
    /// The address the destination listens on and the source connects to
    /// (with rdma, one that an RDMA device serves).
    #[arg(long, default_value = "127.0.0.1")]
    pub address: std::net::IpAddr,
    #[command(flatten)]
    pub params: ParamArgs,
}

/// What carries a `bench sim` migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SimTransport {
    /// TCP (plain, or TLS with --tls-dir).
    Tcp,
    /// RDMA (rdma_cm; needs a build with the `rdma` feature).
    Rdma,
}

/// The result of `bench sim`.
#[derive(Debug, Serialize)]
pub struct SimReport {
    /// What ran.
    pub mode: &'static str,
    /// Guest RAM, MiB.
    pub mem_mib: u64,
    /// Used share, percent.
    pub used_percent: u64,
    /// Dirty rate, MiB/s.
    pub dirty_mib_per_s: u64,
    /// Hints on?
    pub hints: bool,
    /// `precopy`, `postcopy` or `hybrid` (what was asked; `postcopy` in
    /// the stats says whether the switch happened).
    pub migration_mode: &'static str,
    /// The sender's stats.
    #[serde(flatten)]
    pub stats: MigrationStats,
    /// Pages compared (all pages not free at switchover).
    pub pages_compared: u64,
    /// Pages that differ between source and destination.
    pub mismatched_pages: u64,
    /// Postcopy and hybrid: used pages the incoming simulated VM read and
    /// checked on the destination while its RAM arrived.
    pub destination_pages_checked: Option<u64>,
    /// Of those, pages that were not a whole pattern page (must be 0).
    pub destination_pattern_errors: Option<u64>,
    /// Pages the incoming simulated VM wrote (not compared: they differ by
    /// design; each used one was checked before it was written).
    pub destination_written_pages: Option<u64>,
    /// Whether the device state arrived intact (`null` if none was sent or
    /// the destination did not load it).
    pub device_state_intact: Option<bool>,
    /// The receiver's stats.
    pub receiver: Option<ReceiveStats>,
    /// Why the migration failed, if it did.
    pub error: Option<String>,
}

/// Where our other binaries are: next to this one.
fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the freehint binary")?;
    let p = exe.parent().context("binary has no directory")?.join(name);
    if !p.exists() {
        bail!(
            "{} not found; build the whole workspace (cargo build --workspace)",
            p.display()
        );
    }
    Ok(p)
}

/// Kills a child process when dropped.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn sim(a: SimArgs) -> Result<SimReport> {
    let resolved = a.params.resolve(a.hints)?;
    let mut params = resolved.params.clone();
    // The benchmark's baseline is precopy into an image: postcopy and
    // hybrid (which need a destination VM) only when asked for.
    if *resolved.source("mode") == crate::params::Source::Default {
        params.mode = freehint_engine::MigrationMode::Precopy;
    }
    let hints = params.hints;
    let mode = params.mode;
    let peer_timeout_s = params.peer_timeout_s;
    let temp;
    let work: &Path = match &a.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            d
        }
        None => {
            temp = tempfile::Builder::new()
                .prefix("freehint-bench-")
                .tempdir_in("/dev/shm")
                .context("making a work directory in /dev/shm")?;
            temp.path()
        }
    };
    let (src_path, dst_path) = match &a.ram_dir {
        None => (work.join("source.ram"), work.join("destination.ram")),
        Some(dir) => {
            let name =
                |side: &str| dir.join(format!("freehint-bench-{}-{side}.ram", std::process::id()));
            (name("source"), name("destination"))
        }
    };
    // RAM files outside the work directory go when the run ends.
    let _ram_files = a
        .ram_dir
        .as_ref()
        .map(|_| RemoveOnDrop(vec![src_path.clone(), dst_path.clone()]));
    let control_path = work.join("control.sock");
    let _ = std::fs::remove_file(&control_path);
    let listener =
        UnixListener::bind(&control_path).context("binding the simulated VM's control socket")?;

    let mut sim_cmd = Command::new(sibling("freehint-sim-vm")?);
    sim_cmd
        .env("LD_PRELOAD", sibling("libfreehint_preload.so")?)
        .arg("--ram")
        .arg(&src_path)
        .arg("--mem-mib")
        .arg(a.mem_mib.to_string())
        .arg("--used-percent")
        .arg(a.used_percent.to_string())
        .arg("--dirty-mib-per-s")
        .arg(a.dirty_mib_per_s.to_string())
        .arg("--control")
        .arg(&control_path)
        .arg("--seed")
        .arg(a.seed.to_string())
        .arg("--free-memory")
        .arg(&a.free_memory)
        .arg("--state-file")
        .arg(work.join("source.state.json"))
        .arg("--free-pages-file")
        .arg(work.join("free-pages.txt"))
        .stdin(Stdio::null());
    if a.adversarial {
        sim_cmd.arg("--adversarial");
    }
    let mut sim_child = ChildGuard(sim_cmd.spawn().context("starting the simulated VM")?);
    let stream = accept_from(&listener, &mut sim_child.0)?;
    let sink_slot: Arc<Mutex<Option<Arc<dyn HintSink>>>> = Arc::new(Mutex::new(None));
    let (client, ready) = SimVmClient::new(stream, sink_slot.clone())?;
    let FromSim::Ready { pid, .. } = ready else {
        bail!("simulated VM said {ready:?} instead of Ready");
    };
    let device_state_bytes = (a.device_state_mib << 20) as usize;
    client.set_device_state_bytes(device_state_bytes);

    // Postcopy: the guest runs on the destination while its RAM arrives,
    // so a simulated VM must be there to run it.
    let postcopy = params.mode.may_postcopy();
    let dst_control = work.join("destination-vm.sock");
    let dst_report = work.join("destination-vm.report.json");
    let _ = std::fs::remove_file(&dst_report);
    let mut dst_sim = if postcopy {
        if a.preallocate_destination {
            bail!("--preallocate-destination and --mode {}: a preallocated destination never faults; use one or the other", params.mode.name());
        }
        let mut c = Command::new(sibling("freehint-sim-vm")?);
        c.env("LD_PRELOAD", sibling("libfreehint_preload.so")?)
            .arg("--incoming")
            .arg("--ram")
            .arg(&dst_path)
            .arg("--mem-mib")
            .arg(a.mem_mib.to_string())
            .arg("--dirty-mib-per-s")
            .arg(a.dirty_mib_per_s.to_string())
            .arg("--control")
            .arg(&dst_control)
            .arg("--seed")
            .arg(a.seed.to_string())
            .arg("--state-file")
            .arg(work.join("destination-vm.state.json"))
            .arg("--report-file")
            .arg(&dst_report)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        Some(ChildGuard(
            c.spawn().context("starting the incoming simulated VM")?,
        ))
    } else {
        None
    };
    let mut recv_cmd = Command::new(std::env::current_exe()?);
    if a.preallocate_destination {
        recv_cmd.arg("receive").arg("--preallocate");
    } else {
        recv_cmd.arg("receive");
    }
    if postcopy {
        recv_cmd.arg("--sim-vm-control").arg(&dst_control);
    }
    let tls_args = crate::tls::TlsArgs {
        insecure: a.tls_dir.is_none(),
        tls_dir: a.tls_dir.clone(),
        tls_peer_name: None,
        tls_source_name: Vec::new(),
        tls_pin: a.tls_pin.clone(),
    };
    recv_cmd.args(tls_args.to_args());
    let tls = match &a.tls_dir {
        Some(_) => tls_args.resolve(crate::tls::Role::Send)?,
        None => None,
    };
    let mut recv_child = ChildGuard(
        recv_cmd
            .arg("--listen")
            .arg(match a.transport {
                SimTransport::Tcp => format!("{}", std::net::SocketAddr::new(a.address, 0)),
                SimTransport::Rdma => format!("rdma://{}", std::net::SocketAddr::new(a.address, 0)),
            })
            .args(["--json", "--mem-mib"])
            .arg(a.mem_mib.to_string())
            .arg("--ram")
            .arg(&dst_path)
            .arg("--state-file")
            .arg(work.join("destination.state.json"))
            // The source connects once its first hint round is under way;
            // a source that fails before must not leave the receiver
            // waiting forever.
            .arg("--accept-timeout-s")
            .arg((params.peer_timeout_s + params.hint_wait_ms / 1000 + 30).to_string())
            .arg("--device-state-file")
            .arg(work.join("destination.device-state"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the receiver")?,
    );
    let mut recv_out = BufReader::new(recv_child.0.stdout.take().context("receiver stdout")?);
    let mut line = String::new();
    recv_out.read_line(&mut line)?;
    let endpoint: freehint_engine::Endpoint = line
        .trim()
        .strip_prefix("listening on ")
        .with_context(|| format!("receiver said {line:?}"))?
        .parse()
        .map_err(|e: String| anyhow::anyhow!(e))?;
    let addr = endpoint.addr;

    let ram = Arc::new(GuestRam::open_file(&src_path, a.mem_mib << 20)?);
    let log = UffdWpDirtyLog::attach_process(pid, vmm_ram_ranges(pid, &ram)?)?;
    let filter = Arc::new(HintFilter::new(empty_bitmap(&ram)));
    *sink_slot.lock().unwrap_or_else(|e| e.into_inner()) =
        Some(Arc::new(IdentityMappedSink(filter.clone())));
    let hint_source: Option<Arc<dyn HintSource>> = if hints { Some(client.clone()) } else { None };
    let sender = PrecopySender::new(
        ram.clone(),
        filter,
        Box::new(log),
        hint_source,
        client.clone(),
        params,
    )?
    .with_tls(tls)
    .with_scheme(endpoint.scheme);
    crate::cancel_on_signals(sender.cancel_token())?;
    // A source in postcopy never gives its guest up on its own: it waits
    // for the destination to come back. Here nothing restarts a receiver
    // that died, so its death ends the run.
    watch_exit(
        recv_child.0.id(),
        sender.phase_watch(),
        sender.cancel_token(),
    );
    let (stats, error) = match runtime()?.block_on(sender.migrate(addr)) {
        Ok(stats) => (stats, None),
        Err(f) => (f.stats.clone(), Some(f.to_string())),
    };

    // The receiver ends on its own: after the handover, on the source's
    // error, or within its timeouts. Give it twice the peer timeout; one
    // that never saw the source connect has nothing to wait for.
    let never_connected = std::fs::read_to_string(work.join("destination.state.json"))
        .is_ok_and(|s| s.contains("\"phase\":\"setup\""));
    if never_connected {
        let _ = recv_child.0.kill();
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut recv_out, &mut rest);
        let _ = tx.send(rest);
    });
    let rest = rx
        .recv_timeout(Duration::from_secs(2 * peer_timeout_s + 10))
        .unwrap_or_else(|_| {
            tracing::error!("the receiver did not end within twice the peer timeout; killing it");
            String::new()
        });
    drop(recv_child);
    // The receiver prints its stats (also when it failed) as its last line.
    let receiver: Option<ReceiveStats> =
        serde_json::from_str(rest.trim().lines().last().unwrap_or("")).ok();

    // The incoming simulated VM ends once the receiver has (its control
    // socket closes), and writes what it checked.
    let mut dst_checked: Option<DestinationReport> = None;
    if let Some(mut child) = dst_sim.take() {
        // After a broken postcopy it waits on its faults for pages that
        // will never come: that is its job, not a hang to wait out.
        let wait = if stats.state == Phase::Completed {
            30
        } else {
            2
        };
        let deadline = Instant::now() + Duration::from_secs(wait);
        while child.0.try_wait()?.is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(child);
        dst_checked = std::fs::read(&dst_report)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
    }
    let (mut pages_compared, mut mismatched_pages) = (0, 0);
    let mut device_state_intact = None;
    if stats.state == Phase::Completed {
        let mut skip = client
            .free_at_stop()
            .context("the simulated VM was never stopped")?;
        if postcopy {
            // The incoming VM ran on the destination (after a switch to
            // postcopy, or after a hybrid migration that converged).
            let report = dst_checked
                .as_ref()
                .context("the incoming simulated VM wrote no report")?;
            skip.extend(report.written_runs.iter().copied());
            skip.sort_unstable();
        }
        let dst = GuestRam::open_file(&dst_path, a.mem_mib << 20)?;
        (pages_compared, mismatched_pages) = compare(&ram, &dst, &skip)?;
        if device_state_bytes > 0 {
            let got = std::fs::read(work.join("destination.device-state")).unwrap_or_default();
            let pattern = match split_device_state(&got) {
                Ok((_, p)) => p.to_vec(),
                Err(_) => got,
            };
            device_state_intact = Some(pattern == device_state_pattern(device_state_bytes));
        }
    }
    let _ = client.request(&ToSim::Quit);

    if let (Some(dir), Some(free)) = (&a.keep_memory, client.free_at_stop()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut f = std::fs::File::create(dir.join("free-at-switchover.txt"))?;
        for (s, e) in &free {
            writeln!(f, "{s} {e}")?;
        }
        copy_image(&src_path, &dir.join("source.ram"))?;
        copy_image(&dst_path, &dir.join("destination.ram"))?;
    }
    Ok(SimReport {
        mode: if hints { "sim-hints" } else { "sim-nohints" },
        mem_mib: a.mem_mib,
        used_percent: a.used_percent,
        dirty_mib_per_s: a.dirty_mib_per_s,
        hints,
        migration_mode: mode.name(),
        stats,
        pages_compared,
        mismatched_pages,
        destination_pages_checked: dst_checked.as_ref().map(|r| r.pages_checked),
        destination_pattern_errors: dst_checked.as_ref().map(|r| r.pattern_errors),
        destination_written_pages: dst_checked
            .as_ref()
            .map(|r| r.written_runs.iter().map(|(a, b)| b - a).sum()),
        device_state_intact,
        receiver,
        error,
    })
}

/// Cancels `token` if the receiver, process `pid` (a child of ours), fails
/// (exits with a status other than 0, or is killed) while the source is in
/// postcopy, where it would wait for it forever; before that, the source
/// sees the failure itself. Leaves the child to be reaped by its owner.
fn watch_exit(pid: u32, phase: PhaseWatch, token: freehint_engine::CancellationToken) {
    std::thread::spawn(move || {
        // SAFETY: a zeroed siginfo_t is a valid value of that plain C type.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid writes only into `info`, a live local siginfo_t;
        // WNOWAIT leaves the child waitable, so its Child still reaps it.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        // SAFETY: waitid filled `info` for a child that changed state, so
        // its status field is the one set.
        let status = unsafe { info.si_status() };
        let failed = info.si_code != libc::CLD_EXITED || status != 0;
        if rc != 0 || !failed {
            return;
        }
        while !token.is_cancelled() {
            match phase.get().phase {
                Phase::Postcopy | Phase::PostcopyPaused => {
                    tracing::error!(
                        "the receiver failed in postcopy and nothing restarts it here; cancelling"
                    );
                    token.cancel();
                }
                p if p.is_final() => return,
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    });
}

/// Removes its files when dropped.
struct RemoveOnDrop(Vec<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn copy_image(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

/// Waits at most `timeout` for one connection on `listener`.
pub fn accept_within(
    listener: &UnixListener,
    timeout: Duration,
) -> Result<std::os::unix::net::UnixStream> {
    accept_polling(listener, timeout, || Ok(()))?
        .with_context(|| format!("nothing connected within {} s", timeout.as_secs()))
}

/// Waits for the simulated VM to connect, noticing if it dies first.
fn accept_from(
    listener: &UnixListener,
    child: &mut Child,
) -> Result<std::os::unix::net::UnixStream> {
    accept_polling(listener, Duration::from_secs(600), || {
        if let Some(status) = child.try_wait()? {
            bail!("the simulated VM exited before connecting ({status})");
        }
        Ok(())
    })?
    .context("the simulated VM did not connect within 600 s")
}

/// Polls `listener` for one connection until `timeout` (`None` then),
/// asking `still_waiting` between polls whether to go on.
fn accept_polling(
    listener: &UnixListener,
    timeout: Duration,
    mut still_waiting: impl FnMut() -> Result<()>,
) -> Result<Option<std::os::unix::net::UnixStream>> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(Some(s));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                still_waiting()?;
                if Instant::now() > deadline {
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Compares every page not free at switchover, read from the two RAM files
/// (`pread`, never through a reference into the mappings); returns
/// (compared, differing).
fn compare(src: &GuestRam, dst: &GuestRam, free: &[(u64, u64)]) -> Result<(u64, u64)> {
    // `free` counts the simulated VM's 4 KiB pages; the RAM's own pages may
    // be huge (hugetlbfs): compare each 4 KiB part of them.
    const SIM_PAGE: usize = 4096;
    let s = &src.regions()[0];
    let d = &dst.regions()[0];
    let page = s.page_bytes() as usize;
    let (mut a, mut b) = (vec![0u8; page], vec![0u8; page]);
    let mut free_it = free.iter().peekable();
    let (mut compared, mut bad) = (0, 0);
    for p in 0..s.pages() {
        s.read_pages(p, &mut a)?;
        d.read_pages(p, &mut b)?;
        for (i, (x, y)) in a.chunks(SIM_PAGE).zip(b.chunks(SIM_PAGE)).enumerate() {
            let q = p * (page / SIM_PAGE) as u64 + i as u64;
            while free_it.peek().is_some_and(|r| r.1 <= q) {
                free_it.next();
            }
            if free_it.peek().is_some_and(|r| r.0 <= q) {
                continue;
            }
            compared += 1;
            if x != y {
                bad += 1;
                if bad <= 5 {
                    tracing::error!("4 KiB page {q} differs");
                }
            }
        }
    }
    Ok((compared, bad))
}
