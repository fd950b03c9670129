//! `freehint-sim-vm`: the SIMULATED VM process (see the library docs).
//!
//! Started by `freehint bench sim` and by the tests with
//! `LD_PRELOAD=libfreehint_preload.so`, so that the real dirty log can take
//! its userfaultfd. It connects to `--control`, initialises memory, says
//! Ready, then writes memory and answers commands until told to quit.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use clap::Parser;
use freehint_memory::GuestRam;
use freehint_sim_vm::{
    is_pattern_page, pattern_word, DestinationReport, FromSim, SimState, ToSim, HINT_BLOCK_PAGES,
    PAGE_BYTES,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A SIMULATED VM for freehint's tests and benchmarks (not a real guest).
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// The guest RAM file (tmpfs or hugetlbfs); created if missing.
    #[arg(long)]
    ram: PathBuf,
    /// Guest RAM size in MiB.
    #[arg(long)]
    mem_mib: u64,
    /// Share of RAM in use, in percent.
    #[arg(long, default_value_t = 15)]
    used_percent: u64,
    /// Rate at which used memory is rewritten, MiB/s.
    #[arg(long, default_value_t = 16)]
    dirty_mib_per_s: u64,
    /// Unix socket to connect to for control.
    #[arg(long)]
    control: PathBuf,
    /// Random seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Adversarial hint timing: delay hint delivery (so hints generated
    /// before a sync arrive after it) and often write pages right after
    /// hinting them.
    #[arg(long)]
    adversarial: bool,
    /// Content of free memory at start: `old-data` (a guest that has run a
    /// while) or `zero` (a freshly booted guest whose free memory was never
    /// touched).
    #[arg(long, default_value = "old-data")]
    free_memory: String,
    /// Write `{"running": bool, "pid": N}` here whenever the VM starts,
    /// pauses or resumes (and leave it when the controller goes away), so a
    /// test can tell whether this VM runs after its controller died.
    #[arg(long)]
    state_file: Option<PathBuf>,
    /// Write the free pages here (one `start end` page run a line) each
    /// time the VM pauses: the pages a comparison skips.
    #[arg(long)]
    free_pages_file: Option<PathBuf>,
    /// An incoming VM (the destination of a postcopy migration): leave
    /// memory as it is, wait paused for the state (`load_state`), and once
    /// resumed read and check used pages (faulting them in) and write some,
    /// at --dirty-mib-per-s.
    #[arg(long)]
    incoming: bool,
    /// With --incoming: when the controller goes away, write what was
    /// checked here (JSON).
    #[arg(long)]
    report_file: Option<PathBuf>,
}

/// Writes `contents` to `path` atomically (a reader never sees half).
fn write_atomically(path: &std::path::Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    if std::fs::write(&tmp, contents).is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}

const FREE: u8 = 0;
const USED: u8 = 1;

struct Sim {
    ram: GuestRam,
    pages: u64,
    state: Vec<AtomicU8>,
    generation: AtomicU64,
    /// Writers hold it shared while writing; pausing takes it exclusively.
    gate: RwLock<()>,
    paused: AtomicBool,
    quit: AtomicBool,
    /// The cmd_id the reporter works for (0 = none).
    cmd_id: AtomicU32,
    out: Mutex<UnixStream>,
    state_file: Option<PathBuf>,
    free_pages_file: Option<PathBuf>,
    adversarial: bool,
    dirty_pages_per_s: u64,
    hint_steals: AtomicU64,
    /// Pages an incoming VM wrote after it resumed.
    written: Vec<AtomicBool>,
    pages_checked: AtomicU64,
    pattern_errors: AtomicU64,
}

impl Sim {
    fn send(&self, m: &FromSim) {
        let mut line = serde_json::to_string(m).expect("serialisable");
        line.push('\n');
        let _ = self
            .out
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write_all(line.as_bytes());
    }

    /// The address of 4 KiB page `page` (the RAM's own pages may be huge:
    /// hugetlbfs).
    fn page_addr(&self, page: u64) -> *mut u64 {
        let region = &self.ram.regions()[0];
        let per = region.page_bytes() / PAGE_BYTES;
        let base = region.page_ptr(page / per).expect("page in range");
        // SAFETY: `page / per` is a page of the mapping (checked above) and
        // `page % per` 4 KiB pages lie inside it.
        unsafe { base.add(((page % per) * PAGE_BYTES) as usize) as *mut u64 }
    }

    fn fill(&self, page: u64, generation: u64) {
        let ptr = self.page_addr(page);
        for i in 0..PAGE_BYTES / 8 {
            // SAFETY: the page lies inside the shared mapping and is u64
            // aligned (mappings are page aligned).
            unsafe {
                ptr.add(i as usize)
                    .write_volatile(pattern_word(page, generation, i))
            };
        }
    }

    /// Runs `f` unless paused; returns false if paused or quitting.
    fn write_gated(&self, f: impl FnOnce()) -> bool {
        let _g = self.gate.read().unwrap_or_else(|e| e.into_inner());
        if self.paused.load(Ordering::SeqCst) || self.quit.load(Ordering::SeqCst) {
            return false;
        }
        f();
        true
    }

    fn write_page(&self, page: u64) {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        self.fill(page, generation);
    }

    /// Allocates page `p` if it is free: writes it, marks it used, and frees
    /// a random used page instead so the used share stays put.
    fn allocate(&self, p: u64, rng: &mut StdRng) -> bool {
        if self.state[p as usize].load(Ordering::Relaxed) != FREE {
            return false;
        }
        self.write_page(p);
        self.state[p as usize].store(USED, Ordering::Relaxed);
        for _ in 0..64 {
            let q = rng.gen_range(0..self.pages);
            if q != p && self.state[q as usize].load(Ordering::Relaxed) == USED {
                self.state[q as usize].store(FREE, Ordering::Relaxed);
                break;
            }
        }
        true
    }

    /// Allocator churn: like a buddy allocator, which serves small
    /// allocations from blocks already split rather than breaking up a
    /// large free block, take a free page in a block that holds used pages.
    /// Looks in the blocks from `hint_page` on; gives up quietly if none.
    fn allocate_near(&self, hint_page: u64, rng: &mut StdRng) {
        let blocks = self.pages / HINT_BLOCK_PAGES;
        let start_block = hint_page / HINT_BLOCK_PAGES;
        for i in 0..blocks.min(8) {
            let b = (start_block + i * 97) % blocks;
            let first = b * HINT_BLOCK_PAGES;
            let range = first..first + HINT_BLOCK_PAGES;
            let split = range
                .clone()
                .any(|q| self.state[q as usize].load(Ordering::Relaxed) == USED);
            if !split {
                continue;
            }
            if let Some(q) = range
                .into_iter()
                .find(|&q| self.state[q as usize].load(Ordering::Relaxed) == FREE)
            {
                self.allocate(q, rng);
                return;
            }
        }
    }

    /// Records whether the VM runs (see `--state-file`).
    fn record_running(&self, running: bool) {
        if let Some(p) = &self.state_file {
            write_atomically(
                p,
                &format!("{{\"running\":{running},\"pid\":{}}}\n", std::process::id()),
            );
        }
    }

    fn free_runs(&self) -> Vec<(u64, u64)> {
        runs_of(self.pages, |p| {
            self.state[p as usize].load(Ordering::Relaxed) == FREE
        })
    }

    /// Reads page `page` (faulting it in if it is missing) and checks it
    /// is a whole pattern page.
    fn check(&self, page: u64) -> bool {
        let ptr = self.page_addr(page) as *const u64;
        let mut words = [0u64; (PAGE_BYTES / 8) as usize];
        for (i, w) in words.iter_mut().enumerate() {
            // SAFETY: the page lies inside the shared mapping and is u64
            // aligned (mappings are page aligned).
            *w = unsafe { ptr.add(i).read_volatile() };
        }
        is_pattern_page(page, &words)
    }
}

/// Half-open runs of the pages in `0..pages` for which `f` holds.
fn runs_of(pages: u64, f: impl Fn(u64) -> bool) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for p in 0..pages {
        if f(p) {
            match runs.last_mut() {
                Some(r) if r.1 == p => r.1 = p + 1,
                _ => runs.push((p, p + 1)),
            }
        }
    }
    runs
}

/// An incoming VM's workload once resumed: touches random pages at the
/// configured rate; a used page is read and checked (a fault brings it in),
/// then rewritten half of the time; a free page is now and then allocated.
fn incoming_workload(sim: Arc<Sim>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let start = Instant::now();
    let mut done: u64 = 0;
    while !sim.quit.load(Ordering::SeqCst) {
        let due = (start.elapsed().as_secs_f64() * sim.dirty_pages_per_s as f64) as u64;
        if done >= due {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        let batch = (due - done).min(64);
        let ok = sim.write_gated(|| {
            for _ in 0..batch {
                let p = rng.gen_range(0..sim.pages);
                if sim.state[p as usize].load(Ordering::Relaxed) == USED {
                    sim.pages_checked.fetch_add(1, Ordering::Relaxed);
                    if !sim.check(p) {
                        sim.pattern_errors.fetch_add(1, Ordering::Relaxed);
                        eprintln!("freehint-sim-vm: page {p} is not a pattern page");
                    }
                    if rng.gen_bool(0.5) {
                        sim.written[p as usize].store(true, Ordering::Relaxed);
                        sim.write_page(p);
                    }
                } else if rng.gen_ratio(1, 16) {
                    sim.written[p as usize].store(true, Ordering::Relaxed);
                    sim.allocate(p, &mut rng);
                }
            }
        });
        if ok {
            done += batch;
        } else {
            std::thread::sleep(Duration::from_millis(1));
            done = due;
        }
    }
}

/// Rewrites random used pages at the configured rate, and now and then
/// moves a page between used and free (allocator churn).
fn dirtier(sim: Arc<Sim>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let start = Instant::now();
    let mut written: u64 = 0;
    while !sim.quit.load(Ordering::SeqCst) {
        let due = (start.elapsed().as_secs_f64() * sim.dirty_pages_per_s as f64) as u64;
        if written >= due {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        let batch = (due - written).min(256);
        let ok = sim.write_gated(|| {
            for _ in 0..batch {
                let p = rng.gen_range(0..sim.pages);
                if sim.state[p as usize].load(Ordering::Relaxed) == USED {
                    sim.write_page(p);
                } else if rng.gen_ratio(1, 16) {
                    sim.allocate_near(p, &mut rng);
                }
            }
        });
        if ok {
            written += batch;
        } else {
            std::thread::sleep(Duration::from_millis(1));
            written = due; // a paused VM does not catch up
        }
    }
}

/// Reports fully free 4 MiB blocks while a round is open, like the Linux
/// driver, in batches of 16 blocks.
fn reporter(sim: Arc<Sim>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let blocks = sim.pages / HINT_BLOCK_PAGES;
    let mut reported_round = 0u32;
    // Adversarial: batches generated under one cmd_id and held back until
    // the host has moved on to the next round (so after a bitmap sync).
    let mut late: Vec<(u32, Vec<(u64, u64)>)> = Vec::new();
    while !sim.quit.load(Ordering::SeqCst) {
        let cmd = sim.cmd_id.load(Ordering::SeqCst);
        if cmd < 2 || cmd == reported_round || sim.paused.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        for (old_cmd, ranges) in late.drain(..) {
            sim.send(&FromSim::Hints {
                cmd_id: old_cmd,
                ranges,
            });
        }
        reported_round = cmd;
        let mut batch = Vec::new();
        let mut steal = Vec::new();
        for b in 0..blocks {
            if sim.cmd_id.load(Ordering::SeqCst) != cmd || sim.quit.load(Ordering::SeqCst) {
                break;
            }
            let first = b * HINT_BLOCK_PAGES;
            let free = (first..first + HINT_BLOCK_PAGES)
                .all(|p| sim.state[p as usize].load(Ordering::Relaxed) == FREE);
            if !free {
                continue;
            }
            batch.push((first * PAGE_BYTES, HINT_BLOCK_PAGES * PAGE_BYTES));
            steal.push(first);
            if batch.len() == 16 || b + 1 == blocks {
                // The blocks were seen free under `cmd`; with adversarial
                // timing they reach the host a little later, possibly after
                // a sync has closed that round.
                if sim.adversarial && rng.gen_ratio(1, 3) {
                    std::thread::sleep(Duration::from_millis(rng.gen_range(0..30)));
                }
                if sim.paused.load(Ordering::SeqCst) {
                    break;
                }
                if sim.adversarial && rng.gen_ratio(1, 4) {
                    late.push((cmd, std::mem::take(&mut batch)));
                } else {
                    sim.send(&FromSim::Hints {
                        cmd_id: cmd,
                        ranges: std::mem::take(&mut batch),
                    });
                }
                // The shrinker gives hinted blocks back under pressure: a
                // hinted page is written right after its hint.
                let ratio = if sim.adversarial { (1, 4) } else { (1, 64) };
                for first in steal.drain(..) {
                    if rng.gen_ratio(ratio.0, ratio.1) {
                        let p = first + rng.gen_range(0..HINT_BLOCK_PAGES);
                        if sim.write_gated(|| {
                            sim.allocate(p, &mut rng);
                        }) {
                            sim.hint_steals.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
        if !batch.is_empty() && !sim.paused.load(Ordering::SeqCst) {
            sim.send(&FromSim::Hints {
                cmd_id: cmd,
                ranges: batch,
            });
        }
    }
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("freehint-sim-vm: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), String> {
    if args.used_percent > 100 || args.mem_mib == 0 || !args.mem_mib.is_multiple_of(4) {
        return Err(
            "--mem-mib must be a positive multiple of 4 and --used-percent at most 100".into(),
        );
    }
    let zero_free = match args.free_memory.as_str() {
        "old-data" => false,
        "zero" => true,
        other => {
            return Err(format!(
                "--free-memory must be old-data or zero, not {other}"
            ))
        }
    };
    let bytes = args.mem_mib << 20;
    let ram = GuestRam::open_file(&args.ram, bytes).map_err(|e| e.to_string())?;
    let pages = bytes / PAGE_BYTES;
    // The controller may bind its socket a moment after starting us.
    let deadline = Instant::now() + Duration::from_secs(60);
    let control = loop {
        match UnixStream::connect(&args.control) {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(format!("connecting to {}: {e}", args.control.display())),
        }
    };
    let sim = Arc::new(Sim {
        ram,
        pages,
        state: (0..pages).map(|_| AtomicU8::new(FREE)).collect(),
        generation: AtomicU64::new(0),
        gate: RwLock::new(()),
        paused: AtomicBool::new(false),
        quit: AtomicBool::new(false),
        cmd_id: AtomicU32::new(0),
        out: Mutex::new(control.try_clone().map_err(|e| e.to_string())?),
        state_file: args.state_file.clone(),
        free_pages_file: args.free_pages_file.clone(),
        adversarial: args.adversarial,
        dirty_pages_per_s: (args.dirty_mib_per_s << 20) / PAGE_BYTES,
        hint_steals: AtomicU64::new(0),
        written: (0..pages).map(|_| AtomicBool::new(false)).collect(),
        pages_checked: AtomicU64::new(0),
        pattern_errors: AtomicU64::new(0),
    });
    if args.incoming {
        return run_incoming(sim, control, &args);
    }

    // Used memory: whole 4 MiB blocks chosen at random, the remainder in
    // one partly used block, like a buddy allocator keeps free memory in
    // large blocks.
    let mut rng = StdRng::seed_from_u64(args.seed);
    let used_target = pages * args.used_percent / 100;
    let blocks = pages / HINT_BLOCK_PAGES;
    let mut order: Vec<u64> = (0..blocks).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.gen_range(0..=i));
    }
    let mut used = 0;
    for b in order {
        if used >= used_target {
            break;
        }
        let n = (used_target - used).min(HINT_BLOCK_PAGES);
        for p in b * HINT_BLOCK_PAGES..b * HINT_BLOCK_PAGES + n {
            sim.state[p as usize].store(USED, Ordering::Relaxed);
        }
        used += n;
    }
    for p in 0..pages {
        if !zero_free || sim.state[p as usize].load(Ordering::Relaxed) == USED {
            sim.fill(p, 0);
        }
    }
    sim.record_running(true);
    sim.send(&FromSim::Ready {
        pid: std::process::id() as i32,
        pages,
        used_pages: used,
    });

    let threads = [
        {
            let s = sim.clone();
            let seed = args.seed + 1;
            std::thread::spawn(move || dirtier(s, seed))
        },
        {
            let s = sim.clone();
            let seed = args.seed + 2;
            std::thread::spawn(move || reporter(s, seed))
        },
    ];

    for line in BufReader::new(control).lines() {
        let Ok(line) = line else { break };
        let cmd: ToSim = match serde_json::from_str(&line) {
            Ok(c) => c,
            Err(e) => {
                sim.send(&FromSim::Error {
                    message: format!("bad command {line:?}: {e}"),
                });
                continue;
            }
        };
        let reply = match cmd {
            ToSim::StartRound { cmd_id } if cmd_id >= 2 => {
                sim.cmd_id.store(cmd_id, Ordering::SeqCst);
                FromSim::Ack
            }
            ToSim::StartRound { cmd_id } => FromSim::Error {
                message: format!("cmd_id {cmd_id} does not name a round"),
            },
            ToSim::StopRound => {
                sim.cmd_id.store(0, Ordering::SeqCst);
                FromSim::Ack
            }
            ToSim::Finish => {
                sim.cmd_id.store(1, Ordering::SeqCst);
                FromSim::Ack
            }
            ToSim::Pause => {
                sim.paused.store(true, Ordering::SeqCst);
                // Wait for writes in flight.
                drop(sim.gate.write().unwrap_or_else(|e| e.into_inner()));
                if let Some(p) = &sim.free_pages_file {
                    let runs: String = sim
                        .free_runs()
                        .iter()
                        .map(|(s, e)| format!("{s} {e}\n"))
                        .collect();
                    write_atomically(p, &runs);
                }
                sim.record_running(false);
                FromSim::Ack
            }
            ToSim::Resume => {
                sim.paused.store(false, Ordering::SeqCst);
                sim.record_running(true);
                FromSim::Ack
            }
            ToSim::FreePages => FromSim::FreePages {
                runs: sim.free_runs(),
            },
            ToSim::SaveState => FromSim::State {
                state: SimState {
                    generation: sim.generation.load(Ordering::SeqCst),
                    free_runs: sim.free_runs(),
                },
            },
            ToSim::LoadState { .. } => FromSim::Error {
                message: "only an incoming VM (--incoming) loads a state".into(),
            },
            ToSim::Quit => {
                sim.send(&FromSim::Ack);
                break;
            }
        };
        sim.send(&reply);
    }
    sim.quit.store(true, Ordering::SeqCst);
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// An incoming VM: paused until its state is loaded and it is resumed, then
/// [`incoming_workload`]; writes its report when the controller goes away.
fn run_incoming(sim: Arc<Sim>, control: UnixStream, args: &Args) -> Result<(), String> {
    sim.paused.store(true, Ordering::SeqCst);
    sim.record_running(false);
    sim.send(&FromSim::Ready {
        pid: std::process::id() as i32,
        pages: sim.pages,
        used_pages: 0,
    });
    let mut worker = None;
    for line in BufReader::new(control).lines() {
        let Ok(line) = line else { break };
        let reply = match serde_json::from_str::<ToSim>(&line) {
            Err(e) => FromSim::Error {
                message: format!("bad command {line:?}: {e}"),
            },
            Ok(ToSim::LoadState { state }) => {
                sim.generation.store(state.generation, Ordering::SeqCst);
                for s in &sim.state {
                    s.store(USED, Ordering::Relaxed);
                }
                for &(a, b) in &state.free_runs {
                    for p in a..b.min(sim.pages) {
                        sim.state[p as usize].store(FREE, Ordering::Relaxed);
                    }
                }
                FromSim::Ack
            }
            Ok(ToSim::Resume) => {
                sim.paused.store(false, Ordering::SeqCst);
                sim.record_running(true);
                if worker.is_none() {
                    let s = sim.clone();
                    let seed = args.seed + 3;
                    worker = Some(std::thread::spawn(move || incoming_workload(s, seed)));
                }
                FromSim::Ack
            }
            Ok(ToSim::Pause) => {
                sim.paused.store(true, Ordering::SeqCst);
                drop(sim.gate.write().unwrap_or_else(|e| e.into_inner()));
                sim.record_running(false);
                FromSim::Ack
            }
            Ok(ToSim::Quit) => {
                sim.send(&FromSim::Ack);
                break;
            }
            Ok(other) => FromSim::Error {
                message: format!("an incoming VM does not take {other:?}"),
            },
        };
        sim.send(&reply);
    }
    // A postcopy with few pages left can end within a millisecond of the
    // resume, before a busy host ran the workload at all: let it check at
    // least one page (for up to a second), so its report says something.
    // (Within the 2 s the exit below allows in all.)
    let deadline = Instant::now() + Duration::from_secs(2);
    let check_by = Instant::now() + Duration::from_secs(1);
    while worker.as_ref().is_some_and(|w| !w.is_finished())
        && !sim.paused.load(Ordering::SeqCst)
        && sim.pages_checked.load(Ordering::Relaxed) == 0
        && Instant::now() < check_by
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    sim.quit.store(true, Ordering::SeqCst);
    // After a broken postcopy the worker may wait on a fault for a page
    // that never comes (that is the point: it must not read zeros). Give
    // it a moment, then report and exit without it.
    while worker.as_ref().is_some_and(|w| !w.is_finished()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    if let Some(path) = &args.report_file {
        let report = DestinationReport {
            pages_checked: sim.pages_checked.load(Ordering::Relaxed),
            pattern_errors: sim.pattern_errors.load(Ordering::Relaxed),
            written_runs: runs_of(sim.pages, |p| {
                sim.written[p as usize].load(Ordering::Relaxed)
            }),
        };
        let text = serde_json::to_string(&report).map_err(|e| e.to_string())?;
        write_atomically(path, &text);
    }
    if worker.is_some_and(|w| !w.is_finished()) {
        eprintln!("freehint-sim-vm: the incoming VM still waits on a fault; exiting");
        std::process::exit(0);
    }
    Ok(())
}
