//! Helpers for the end-to-end tests: find the built binaries, run the
//! benchmark command, start a SIMULATED VM process.
//!
//! The binaries must be built first (`cargo build --workspace`, which the
//! README's test command does).

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use freehint_sim_vm::{FromSim, SimVmClient};
use freehint_types::HintSink;

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
            "{} missing: run `cargo build --workspace` before the tests",
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

/// A QEMU process (a real guest), killed when dropped, with its serial
/// console collected line by line.
pub struct QemuGuest {
    child: Child,
    /// Every console line so far.
    pub console: Arc<Mutex<Vec<String>>>,
}

impl QemuGuest {
    /// Spawns `cmd` (a QEMU command line with `-serial stdio`) and collects
    /// its console.
    pub fn spawn(mut cmd: Command) -> QemuGuest {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting QEMU");
        let out = child.stdout.take().expect("piped stdout");
        let console = Arc::new(Mutex::new(Vec::new()));
        let lines = console.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(l);
            }
        });
        QemuGuest { child, console }
    }

    /// Whether a console line contains `needle`.
    pub fn said(&self, needle: &str) -> bool {
        self.console
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains(needle))
    }

    /// The heartbeat numbers printed so far, in order.
    pub fn heartbeats(&self) -> Vec<u64> {
        self.console
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| {
                l.split("freehint-heartbeat ")
                    .nth(1)
                    .and_then(|n| n.trim().parse().ok())
            })
            .collect()
    }
}

impl Drop for QemuGuest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The arguments every test guest uses: firmware paths, q35, `MEM_MIB` of
/// RAM in a shared file, the test kernel and initramfs, serial on stdio.
pub fn guest_args(cmd: &mut Command, guest_dir: &Path, ram: &Path, mem_mib: u64, append: &str) {
    cmd.args([
        "-L",
        "/usr/share/seabios",
        "-L",
        "/usr/share/qemu",
        "-L",
        "/usr/lib/ipxe/qemu",
    ])
    .args([
        "-machine",
        "q35",
        "-m",
        &format!("{mem_mib}M"),
        "-nographic",
        "-nodefaults",
        "-serial",
        "stdio",
    ])
    .arg("-object")
    .arg(format!(
        "memory-backend-file,id=mem0,size={mem_mib}M,mem-path={},share=on",
        ram.display()
    ))
    .args(["-machine", "memory-backend=mem0"])
    .arg("-kernel")
    .arg(guest_dir.join("vmlinuz"))
    .arg("-initrd")
    .arg(guest_dir.join("initramfs.gz"))
    .args(["-append", &format!("console=ttyS0 quiet {append}")]);
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
