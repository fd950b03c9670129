//! Helpers for the end-to-end tests: find the built binaries, run the
//! benchmark command, start a SIMULATED VM process.
//!
//! The binaries must be built first (`cargo build --workspace --features
//! freehint/failpoints,freehint/bench`, which the README's test command
//! does).

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use freehint_sim_vm::{FromSim, SimVmClient};
use freehint_types::HintSink;

pub use freehint_demo::{guest_args, QemuGuest};

/// The directory holding `freehint`, `freehint-sim-vm` and the preload
/// library: `FREEHINT_BIN_DIR`, or the target directory of this test.
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("FREEHINT_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> -> target/<profile>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf();
    for name in ["freehint", "freehint-sim-vm", "libfreehint_preload.so"] {
        assert!(
            dir.join(name).exists(),
            "{} missing: run `cargo build --workspace --features freehint/failpoints,freehint/bench` before the tests",
            dir.join(name).display()
        );
    }
    dir
}

/// Runs `freehint bench sim --json ARGS` and returns its JSON, or the
/// command's stderr if it failed.
pub fn bench_sim(args: &[&str]) -> Result<serde_json::Value, String> {
    let out = Command::new(bin_dir().join("freehint"))
        .args(["bench", "sim", "--json"])
        .args(args)
        .output()
        .expect("running freehint");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        if stderr.contains("unrecognized subcommand 'bench'") {
            return Err(
                "this freehint has no `bench` command: build the workspace with --features freehint/failpoints,freehint/bench, as make test does".into(),
            );
        }
        return Err(format!("{}\n{}", stderr, stdout));
    }
    serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .map_err(|e| format!("bad JSON {stdout:?}: {e}"))
}

/// A running SIMULATED VM process and its control client.
pub struct SimVm {
    /// The process.
    pub child: Child,
    /// The control client (Vmm + HintSource).
    pub client: Arc<SimVmClient>,
    /// Where hints go.
    pub sink: Arc<Mutex<Option<Arc<dyn HintSink>>>>,
    /// Its pid.
    pub pid: i32,
    /// Its RAM file.
    pub ram_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl SimVm {
    /// Starts a simulated VM with `mem_mib` of RAM in /dev/shm.
    pub fn start(mem_mib: u64, dirty_mib_per_s: u64) -> SimVm {
        let dir = tempfile::tempdir_in("/dev/shm").expect("tempdir");
        let ram_path = dir.path().join("source.ram");
        let sock = dir.path().join("control.sock");
        let listener = UnixListener::bind(&sock).expect("bind");
        let bins = bin_dir();
        let child = Command::new(bins.join("freehint-sim-vm"))
            .env("LD_PRELOAD", bins.join("libfreehint_preload.so"))
            .arg("--ram")
            .arg(&ram_path)
            .args([
                "--mem-mib",
                &mem_mib.to_string(),
                "--dirty-mib-per-s",
                &dirty_mib_per_s.to_string(),
            ])
            .arg("--control")
            .arg(&sock)
            .stdin(Stdio::null())
            .spawn()
            .expect("start sim vm");
        let (stream, _) = listener.accept().expect("sim vm connects");
        let sink: Arc<Mutex<Option<Arc<dyn HintSink>>>> = Arc::new(Mutex::new(None));
        let (client, ready) = SimVmClient::new(stream, sink.clone()).expect("sim ready");
        let FromSim::Ready { pid, .. } = ready else {
            panic!("sim said {ready:?}")
        };
        SimVm {
            child,
            client,
            sink,
            pid,
            ram_path,
            _dir: dir,
        }
    }
}

impl Drop for SimVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` every 50 ms; panics naming `what` after `timeout`.
pub fn wait_for(what: &str, timeout: std::time::Duration, mut f: impl FnMut() -> bool) {
    let t = std::time::Instant::now();
    while !f() {
        assert!(
            t.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The patched QEMU and the guest image folder (`FREEHINT_QEMU`,
/// `FREEHINT_GUEST_DIR`); `None` (the test says SKIPPED) without them,
/// unless `FREEHINT_REQUIRE_REAL_GUEST` is set (`make test` as root), where
/// the test fails.
pub fn real_guest_env() -> Option<(PathBuf, PathBuf)> {
    let (Ok(qemu), Ok(guest)) = (
        std::env::var("FREEHINT_QEMU"),
        std::env::var("FREEHINT_GUEST_DIR"),
    ) else {
        assert!(
            std::env::var("FREEHINT_REQUIRE_REAL_GUEST").is_err(),
            "FREEHINT_QEMU and FREEHINT_GUEST_DIR must be set (make test sets them)"
        );
        eprintln!("SKIPPED: no QEMU/guest image (run make test)");
        return None;
    };
    Some((qemu.into(), guest.into()))
}

/// The set-up for a test with a REAL guest of `mem_mib` that writes and
/// frees `work_mib` before migration, logging to `target/…/e2e-logs/NAME`;
/// `None` as for [`real_guest_env`].
pub fn real_guest_setup(
    name: &str,
    mem_mib: u64,
    work_mib: u64,
) -> Option<freehint_demo::DemoSetup> {
    let (patched_qemu, guest_dir) = real_guest_env()?;
    let bins = bin_dir();
    Some(freehint_demo::DemoSetup {
        patched_qemu,
        reference_qemu: "qemu-system-x86_64".into(),
        guest_dir,
        log_dir: bins.join("e2e-logs").join(name),
        bin_dir: bins,
        mem_mib,
        work_mib,
        keep_mib: 0,
        check_mib: 32,
        boot_timeout: std::time::Duration::from_secs(300),
        append: String::new(),
        disk: None,
        ready_lines: Vec::new(),
        idle: std::time::Duration::ZERO,
        netns: None,
    })
}

/// Held by a test that runs REAL guests, so that another such test in the
/// same binary does not run beside it: on two cores a second pair of TCG
/// guests starves the first guest's free-page report, skews what a test
/// measures, and stretches the timing a fault test relies on.
pub fn one_real_guest_test_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Compares two RAM image files page by page (4 KiB), skipping the pages
/// listed free in `free_pages` (one `start end` page run a line, as the
/// simulated VM writes it when paused); returns (pages compared, pages
/// that differ).
pub fn compare_ram_images(source: &Path, destination: &Path, free_pages: &Path) -> (u64, u64) {
    use std::os::unix::fs::FileExt;
    const PAGE: usize = 4096;
    let free: Vec<(u64, u64)> = std::fs::read_to_string(free_pages)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace().map(|n| n.parse::<u64>().ok());
            Some((it.next()??, it.next()??))
        })
        .collect();
    let (s, d) = (
        std::fs::File::open(source).expect("source image"),
        std::fs::File::open(destination).expect("destination image"),
    );
    let pages = s.metadata().expect("stat").len() / PAGE as u64;
    let (mut a, mut b) = (vec![0u8; PAGE], vec![0u8; PAGE]);
    let (mut compared, mut differ) = (0, 0);
    let mut runs = free.iter().peekable();
    for p in 0..pages {
        while runs.peek().is_some_and(|r| r.1 <= p) {
            runs.next();
        }
        if runs.peek().is_some_and(|r| r.0 <= p) {
            continue;
        }
        s.read_exact_at(&mut a, p * PAGE as u64)
            .expect("read source");
        // A destination page never written reads as zero (a hole).
        b.fill(0);
        let _ = d.read_at(&mut b, p * PAGE as u64);
        compared += 1;
        if a != b {
            differ += 1;
        }
    }
    (compared, differ)
}

/// Compares two RAM files page by page (4 KiB); the first differing page.
pub fn first_different_page(a: &Path, b: &Path) -> Option<u64> {
    use std::io::Read;
    let (mut fa, mut fb) = (
        std::fs::File::open(a).expect("opening a RAM file"),
        std::fs::File::open(b).expect("opening a RAM file"),
    );
    let (mut pa, mut pb) = (vec![0u8; 4096], vec![0u8; 4096]);
    for page in 0.. {
        let na = fa.read(&mut pa).expect("reading a RAM file");
        let nb = fb.read(&mut pb).expect("reading a RAM file");
        if na == 0 && nb == 0 {
            return None;
        }
        if na != nb || pa[..na] != pb[..nb] {
            return Some(page);
        }
    }
    None
}

/// Runs `freehint ARGS`; returns (success, stdout, stderr).
pub fn freehint(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin_dir().join("freehint"))
        .args(args)
        .output()
        .expect("running freehint");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `freehint status` of the daemon at `control`, as JSON.
pub fn daemon_status(control: &Path) -> serde_json::Value {
    let (ok, out, err) = freehint(&[
        "status",
        "--json",
        "--control",
        control.to_str().expect("utf-8"),
    ]);
    assert!(ok, "freehint status: {err}");
    serde_json::from_str(&out).expect("status JSON")
}
