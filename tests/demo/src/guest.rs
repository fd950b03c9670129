//! A QEMU process running the test guest (tests/guest), with its serial
//! console collected line by line.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A QEMU process (a real guest), killed when dropped, with its serial
/// console (`-serial stdio`) collected line by line and, optionally, copied
/// to a log file.
pub struct QemuGuest {
    child: Child,
    /// Every console line so far.
    pub console: Arc<Mutex<Vec<String>>>,
}

impl QemuGuest {
    /// Spawns `cmd` (a QEMU command line with `-serial stdio`), collecting
    /// its console and appending it to `log` if given. QEMU's own stderr
    /// goes to `stderr_log` if given, else to ours.
    pub fn spawn(
        mut cmd: Command,
        log: Option<&Path>,
        stderr_log: Option<&Path>,
    ) -> std::io::Result<QemuGuest> {
        let stderr = match stderr_log {
            Some(p) => Stdio::from(std::fs::File::create(p)?),
            None => Stdio::inherit(),
        };
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()?;
        let out = child
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("QEMU's stdout was not piped"))?;
        let mut file = match log {
            Some(p) => Some(std::fs::File::create(p)?),
            None => None,
        };
        let console = Arc::new(Mutex::new(Vec::new()));
        let lines = console.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(f) = file.as_mut() {
                    let _ = writeln!(f, "{l}");
                }
                lines.lock().unwrap_or_else(|e| e.into_inner()).push(l);
            }
        });
        Ok(QemuGuest { child, console })
    }

    /// QEMU's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether QEMU still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` for QEMU to exit; whether it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let t = Instant::now();
        while t.elapsed() < timeout {
            if !self.running() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Kills QEMU (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn lines(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.console.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a console line contains `needle`.
    pub fn said(&self, needle: &str) -> bool {
        self.lines().iter().any(|l| l.contains(needle))
    }

    /// The numbers printed after `prefix` (as in `PREFIX 17`), in order.
    pub fn numbers(&self, prefix: &str) -> Vec<u64> {
        self.lines()
            .iter()
            .filter_map(|l| {
                l.split(prefix)
                    .nth(1)
                    .and_then(|n| n.split_whitespace().next())
                    .and_then(|n| n.parse().ok())
            })
            .collect()
    }

    /// The heartbeat numbers printed so far (`freehint-heartbeat N`), in order.
    pub fn heartbeats(&self) -> Vec<u64> {
        self.numbers("freehint-heartbeat ")
    }

    /// The data checks passed so far (`freehint-check ok N`), in order.
    pub fn checks_ok(&self) -> Vec<u64> {
        self.numbers("freehint-check ok ")
    }

    /// The disk checks passed so far (`freehint-disk ok N`: pass N of
    /// `fh-diskcheck` read every file of the disk intact), in order. A pass
    /// that found a file changed says `freehint-disk FAIL` instead.
    pub fn disk_checks_ok(&self) -> Vec<u64> {
        self.numbers("freehint-disk ok ")
    }

    /// The guest's MemFree in KiB at its last heartbeat
    /// (`freehint-heartbeat N free KIB`).
    pub fn mem_free_kib(&self) -> Option<u64> {
        self.lines().iter().rev().find_map(|l| {
            l.split("freehint-heartbeat ")
                .nth(1)?
                .split(" free ")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
    }

    /// The pages the guest's kernel had allocated since boot, at each
    /// heartbeat so far (`pgalloc P`), in order.
    pub fn pages_allocated(&self) -> Vec<u64> {
        self.numbers(" pgalloc ")
    }

    /// MemTotal − MemFree in MiB, from the `freehint-meminfo` lines the
    /// guest prints when its workload is done.
    pub fn used_mib(&self) -> Option<u64> {
        let kib = |key: &str| -> Option<u64> {
            self.lines().iter().rev().find_map(|l| {
                l.split(&format!("freehint-meminfo {key}: "))
                    .nth(1)
                    .and_then(|n| n.trim().parse().ok())
            })
        };
        Some(kib("MemTotal")?.saturating_sub(kib("MemFree")?) / 1024)
    }
}

impl Drop for QemuGuest {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Where a guest's RAM lives on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RamBacking {
    /// A file mapped shared (in /dev/shm): what freehint needs, to read
    /// and track the RAM from its own process.
    SharedFile(PathBuf),
    /// QEMU's own anonymous memory (`memory-backend-ram`).
    Anonymous,
}

/// The arguments every test guest uses: firmware paths, q35 under TCG,
/// `mem_mib` of RAM in a shared file `ram`, the test kernel and initramfs
/// from `guest_dir`, serial on stdio, and `append` on the kernel command
/// line (see tests/guest/init.sh for the `freehint.*` options).
pub fn guest_args(cmd: &mut Command, guest_dir: &Path, ram: &Path, mem_mib: u64, append: &str) {
    guest_args_with(
        cmd,
        guest_dir,
        &RamBacking::SharedFile(ram.to_path_buf()),
        mem_mib,
        append,
    )
}

/// [`guest_args`] with the RAM backed as `ram` says.
pub fn guest_args_with(
    cmd: &mut Command,
    guest_dir: &Path,
    ram: &RamBacking,
    mem_mib: u64,
    append: &str,
) {
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
    .arg(match ram {
        RamBacking::SharedFile(path) => format!(
            "memory-backend-file,id=mem0,size={mem_mib}M,mem-path={},share=on",
            path.display()
        ),
        RamBacking::Anonymous => format!("memory-backend-ram,id=mem0,size={mem_mib}M"),
    })
    .args(["-machine", "memory-backend=mem0"])
    .arg("-kernel")
    .arg(guest_dir.join("vmlinuz"))
    .arg("-initrd")
    .arg(guest_dir.join("initramfs.gz"))
    .args(["-append", &format!("console=ttyS0 quiet {append}")]);
}
