//! The freehint demo and its building blocks: live migration of a REAL
//! QEMU/Linux guest (tests/guest) between two QEMUs on this host, with
//! freehint (hints on and off) and with QEMU's own migration (its
//! virtio-balloon `free-page-hint` off and on) as the reference.
//!
//! [`run_mode`] does one whole run and returns its [`RunReport`]; the
//! `freehint-demo` binary runs the five modes and prints a table; the
//! end-to-end tests use the same pieces ([`Testbed`]).

#![deny(missing_docs)]

pub mod disk;
pub mod events;
pub mod guest;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use freehint_engine::MigrationStats;
use freehint_qemu::Qmp;
use serde::{Deserialize, Serialize};
use serde_json::json;

pub use disk::{make_disk_image, DiskAio, DiskCache, DiskConfig};
pub use events::{now_us, EventTiming, QmpEvents};
pub use guest::{guest_args, guest_args_with, QemuGuest, RamBacking};

/// Errors of a demo run; each displays as one line.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A process or file could not be set up.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Something did not happen in time.
    #[error("timed out after {timeout_s} s waiting for {what} (logs in {log_dir})")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        timeout_s: u64,
        /// Where the logs are.
        log_dir: String,
    },
    /// `freehint migrate` failed.
    #[error("freehint migrate failed: {0}")]
    Migrate(String),
    /// QEMU's own migration failed.
    #[error("QEMU migration: {0}")]
    Qemu(String),
    /// A freehint helper command failed.
    #[error("{0}")]
    Setup(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DemoError {
    let what = what.into();
    move |source| DemoError::Io { what, source }
}

/// One way of migrating the guest.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// freehint with free-page hints.
    FreehintHints,
    /// freehint with free-page hints, waiting up to
    /// [`HINT_WAIT_MS`] for the guest's first report before sending (fewer
    /// bytes on a link faster than the guest reports).
    FreehintHintsWait,
    /// [`Mode::FreehintHints`] over plain TCP (`--insecure`): every other
    /// freehint mode migrates over TLS with mutual authentication, and
    /// this one shows what TLS costs.
    FreehintHintsInsecure,
    /// freehint without hints.
    FreehintNohints,
    /// freehint in postcopy with hints: the guest moves at once and its
    /// pages follow (faults on the destination are served first).
    FreehintPostcopy,
    /// [`Mode::FreehintPostcopy`] over plain TCP (`--insecure`): what TLS
    /// costs postcopy's switch and its remote faults.
    FreehintPostcopyInsecure,
    /// freehint in hybrid mode with hints: precopy rounds, then postcopy if
    /// they stop converging.
    FreehintHybrid,
    /// freehint with the hints of its own guest agent (the freehint_free
    /// module's snapshot of every free page, over a virtio-serial port)
    /// instead of the balloon driver's.
    FreehintAgent,
    /// [`Mode::FreehintAgent`] with `--guest-drop-caches`: the agent drops
    /// the guest's clean page cache before the first report.
    FreehintAgentDropCaches,
    /// QEMU's own precopy migration, plain virtio-balloon.
    QemuNative,
    /// QEMU's own migration with virtio-balloon `free-page-hint=on`.
    QemuNativeFph,
    /// QEMU's own migration with virtio-balloon `free-page-reporting=on`
    /// (KubeVirt's default): the guest's freed memory is discarded on the
    /// host while it idles, and reads as zero pages.
    QemuNativeFpr,
    /// QEMU's own migration with 2 multifd channels and virtio-balloon
    /// `free-page-hint=on`.
    QemuMultifdFph,
    /// QEMU's own postcopy: one precopy pass is started, then QEMU is told
    /// to switch to postcopy at once.
    QemuPostcopy,
}

impl Mode {
    /// The demo's five, in the order it runs them.
    pub const ALL: [Mode; 5] = [
        Mode::FreehintHints,
        Mode::FreehintAgent,
        Mode::FreehintNohints,
        Mode::QemuNative,
        Mode::QemuNativeFph,
    ];

    /// Every mode, in report order (the benchmark suite's default).
    pub const EVERY: [Mode; 14] = [
        Mode::FreehintHints,
        Mode::FreehintHintsInsecure,
        Mode::FreehintHintsWait,
        Mode::FreehintAgent,
        Mode::FreehintAgentDropCaches,
        Mode::FreehintNohints,
        Mode::FreehintPostcopy,
        Mode::FreehintPostcopyInsecure,
        Mode::FreehintHybrid,
        Mode::QemuNative,
        Mode::QemuNativeFph,
        Mode::QemuNativeFpr,
        Mode::QemuMultifdFph,
        Mode::QemuPostcopy,
    ];

    /// The name used in the report.
    pub fn name(self) -> &'static str {
        match self {
            Mode::FreehintHints => "freehint-hints",
            Mode::FreehintHintsWait => "freehint-hints-wait",
            Mode::FreehintHintsInsecure => "freehint-hints-insecure",
            Mode::FreehintNohints => "freehint-nohints",
            Mode::FreehintPostcopy => "freehint-postcopy",
            Mode::FreehintPostcopyInsecure => "freehint-postcopy-insecure",
            Mode::FreehintHybrid => "freehint-hybrid",
            Mode::FreehintAgent => "freehint-agent",
            Mode::FreehintAgentDropCaches => "freehint-agent-drop-caches",
            Mode::QemuNative => "qemu-native",
            Mode::QemuNativeFph => "qemu-native-fph",
            Mode::QemuNativeFpr => "qemu-native-fpr",
            Mode::QemuMultifdFph => "qemu-multifd-fph",
            Mode::QemuPostcopy => "qemu-postcopy",
        }
    }

    /// Whether freehint migrates the guest (else QEMU's own migration).
    pub fn is_freehint(self) -> bool {
        matches!(
            self,
            Mode::FreehintHints
                | Mode::FreehintHintsWait
                | Mode::FreehintHintsInsecure
                | Mode::FreehintNohints
                | Mode::FreehintPostcopy
                | Mode::FreehintPostcopyInsecure
                | Mode::FreehintHybrid
                | Mode::FreehintAgent
                | Mode::FreehintAgentDropCaches
        )
    }

    /// Whether the migration may end in postcopy (the guest runs on the
    /// destination before all its pages are there): total time then ends
    /// when the last page is placed, not at the destination's `RESUME`.
    pub fn postcopy(self) -> bool {
        matches!(
            self,
            Mode::FreehintPostcopy
                | Mode::FreehintPostcopyInsecure
                | Mode::FreehintHybrid
                | Mode::QemuPostcopy
        )
    }

    /// Whether the guest hints its free pages to the migrating side.
    pub fn hints(self) -> bool {
        matches!(
            self,
            Mode::FreehintHints
                | Mode::FreehintHintsWait
                | Mode::FreehintHintsInsecure
                | Mode::FreehintPostcopy
                | Mode::FreehintPostcopyInsecure
                | Mode::FreehintHybrid
                | Mode::FreehintAgent
                | Mode::FreehintAgentDropCaches
                | Mode::QemuNativeFph
                | Mode::QemuMultifdFph
        )
    }
}

/// `freehint migrate --hint-wait-ms` of [`Mode::FreehintHintsWait`]: long
/// enough for any guest of the suite to finish its report (the wait ends
/// at the report's end, or once its hints slow down).
pub const HINT_WAIT_MS: u64 = 10_000;

/// What one run measured: one object of `target/demo/report.json`. Time
/// is measured the same way for every mode, from QMP events
/// ([`EventTiming`]); the tool's own figures are beside it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunReport {
    /// How the guest was migrated.
    pub mode: Mode,
    /// Guest RAM size.
    pub guest_mem_mib: u64,
    /// The guest's MemTotal − MemFree when its workload was done.
    pub guest_used_mib: u64,
    /// Guest RAM − MemFree (the guest's last heartbeat before the
    /// migration): all the memory the guest holds, its kernel included.
    pub held_mib: u64,
    /// The tool's own count of the bytes it sent (freehint: every socket,
    /// headers included; QEMU: `ram.transferred` of query-migrate).
    pub bytes_tool: u64,
    /// The migrate command → the destination's `RESUME` event (postcopy:
    /// → its `MIGRATION completed` event); 0 if an event is missing.
    pub total_time_ms: u64,
    /// The source's `STOP` event → the destination's `RESUME` event; 0 if
    /// an event is missing.
    pub downtime_ms: u64,
    /// The tool's own total time (freehint: first connection to the
    /// destination's confirmation; QEMU: `total-time`).
    pub total_time_tool_ms: u64,
    /// The tool's own downtime (freehint: its stop to the destination's
    /// confirmation; QEMU: `downtime`).
    pub downtime_tool_ms: u64,
    /// The events the times come from.
    pub timing: EventTiming,
    /// Pages the guest's kernel allocated from its last heartbeat before
    /// the migrate command to its first on the destination (`pgalloc_*` of
    /// /proc/vmstat): the stock balloon driver allocates every block it
    /// hints (and with Debian's init_on_alloc the kernel zeroes them);
    /// `None` if a heartbeat is missing.
    #[serde(default)]
    pub guest_pages_allocated: Option<u64>,
    /// The guest's heartbeat went on, on the destination.
    pub guest_alive_after: bool,
    /// `ok` when the guest's checker verified its data region on the
    /// destination; otherwise what went wrong.
    pub data_check: String,
    /// The migration's own figures (freehint's stats or QEMU's
    /// query-migrate answer), for the curious.
    pub detail: serde_json::Value,
}

/// Two network namespaces joined by a link: the source's processes run in
/// one, the destination's in the other, so that the migration crosses the
/// link (see the benchmark suite, tests/bench). Unix sockets (QMP, control,
/// vhost-user) work across namespaces.
#[derive(Clone, Debug)]
pub struct NetnsPair {
    /// The source's namespace.
    pub src_ns: String,
    /// The destination's namespace.
    pub dst_ns: String,
    /// The destination's address on the link.
    pub dst_ip: String,
}

/// Where everything a run needs is.
#[derive(Clone, Debug)]
pub struct DemoSetup {
    /// QEMU built by tests/qemu/build-qemu.sh (vhost-user device patch).
    pub patched_qemu: PathBuf,
    /// The reference QEMU (bookworm-backports).
    pub reference_qemu: PathBuf,
    /// vmlinuz + initramfs.gz from tests/guest/build-guest-image.sh.
    pub guest_dir: PathBuf,
    /// Holds `freehint` and `libfreehint_preload.so`.
    pub bin_dir: PathBuf,
    /// Logs of each run go to a folder per run in here.
    pub log_dir: PathBuf,
    /// Guest RAM.
    pub mem_mib: u64,
    /// MiB the guest writes and frees before migration (0: idle guest).
    pub work_mib: u64,
    /// Of `work_mib`, MiB the guest keeps resident (an application's data).
    pub keep_mib: u64,
    /// MiB of the data region the guest's checker verifies.
    pub check_mib: u64,
    /// How long the guest may take to boot and run its workload.
    pub boot_timeout: Duration,
    /// More guest kernel options (e.g. `freehint.noballoon`).
    pub append: String,
    /// A virtio-blk disk for every QEMU of the run (the same image file:
    /// shared storage), which the guest checks with `fh-diskcheck` (see
    /// [`disk`]); `None`: no disk.
    pub disk: Option<DiskConfig>,
    /// Console lines the guest must also have printed before it counts as
    /// ready (e.g. `freehint-hotset ready`).
    pub ready_lines: Vec<String>,
    /// How long the guest idles once ready, before the migration (free page
    /// reporting acts after a few seconds).
    pub idle: Duration,
    /// Run the source's and the destination's processes in these network
    /// namespaces (`None`: all on this host's loopback).
    pub netns: Option<NetnsPair>,
}

/// How long a freshly started destination QEMU is left to settle before a
/// migration starts (its start-up would otherwise compete for the CPU with
/// the migration on a small machine), in every mode alike.
pub const SETTLE: Duration = Duration::from_secs(1);

/// Polls `f` every 20 ms until it holds or `timeout` passes.
pub fn poll(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    loop {
        if f() {
            return true;
        }
        if t.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> Result<u16, DemoError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(io("finding a free port"))?;
    Ok(l.local_addr().map_err(io("finding a free port"))?.port())
}

/// A `freehint vm` daemon process, killed when dropped.
pub struct Daemon {
    child: Child,
    /// Its control socket.
    pub control: PathBuf,
    /// Its vhost-user socket.
    pub vhost_socket: PathBuf,
    /// The QMP socket it uses.
    pub qmp: PathBuf,
}

impl Daemon {
    /// Whether the daemon still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` for the daemon to exit; whether it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        poll(timeout, || !matches!(self.child.try_wait(), Ok(None)))
    }

    /// Sends the daemon signal `sig` (e.g. `libc::SIGTERM`).
    pub fn signal(&mut self, sig: i32) {
        // SAFETY: kill() has no memory effects; the pid is our child's.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A source and a destination under freehint ([`Testbed::freehint_pair`]).
/// Dropping it kills the QEMUs, then the daemons.
pub struct FreehintPair {
    /// The source guest.
    pub src: QemuGuest,
    /// The destination QEMU (`-incoming defer`).
    pub dst: QemuGuest,
    /// The source's daemon.
    pub src_daemon: Daemon,
    /// The destination's daemon.
    pub dst_daemon: Daemon,
    /// The destination daemon's `--incoming` address.
    pub addr: String,
}

/// The sockets, RAM files and logs of one run; RAM files (in /dev/shm)
/// are removed when dropped.
pub struct Testbed {
    /// The set-up.
    pub setup: DemoSetup,
    /// This run's log folder.
    pub logs: PathBuf,
    /// Give freehint's QEMUs the guest agent's virtio-serial port, their
    /// daemons `--agent-socket`, and the guest `freehint.agent` (it starts
    /// freehint-agent): the daemon then takes its hints from the agent.
    pub agent: bool,
    /// More arguments for every `freehint vm` this testbed starts.
    pub daemon_args: Vec<String>,
    /// Every `freehint vm` migrates over TLS with mutual authentication
    /// (certificates from `freehint tls init`, made for this testbed); off:
    /// `--insecure`, plain TCP.
    pub tls: bool,
    sockets: tempfile::TempDir,
    ram: tempfile::TempDir,
}

impl Testbed {
    /// A fresh testbed whose logs go to `setup.log_dir/name`.
    pub fn new(setup: &DemoSetup, name: &str) -> Result<Testbed, DemoError> {
        let logs = setup.log_dir.join(name);
        let _ = std::fs::remove_dir_all(&logs);
        std::fs::create_dir_all(&logs).map_err(io(format!("creating {}", logs.display())))?;
        Ok(Testbed {
            setup: setup.clone(),
            logs,
            agent: false,
            daemon_args: Vec::new(),
            tls: true,
            sockets: tempfile::Builder::new()
                .prefix("freehint-demo")
                .tempdir()
                .map_err(io("creating a socket folder"))?,
            ram: tempfile::Builder::new()
                .prefix("freehint-demo")
                .tempdir_in("/dev/shm")
                .map_err(io("creating a RAM folder in /dev/shm"))?,
        })
    }

    /// The TLS directory of this testbed's daemons, made on first use: a
    /// CA, and certificates naming the destination's address.
    pub fn tls_dir(&self) -> Result<PathBuf, DemoError> {
        let dir = self.sockets.path().join("tls");
        if dir.join("ca-cert.pem").exists() {
            return Ok(dir);
        }
        let mut c = Command::new(self.setup.bin_dir.join("freehint"));
        c.arg("tls").arg("init").arg(&dir);
        if let Some(n) = &self.setup.netns {
            c.arg("--name").arg(&n.dst_ip);
        }
        let out = c.output().map_err(io("running freehint tls init"))?;
        if !out.status.success() {
            return Err(DemoError::Setup(format!(
                "freehint tls init {}: {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(dir)
    }

    /// A socket path in this testbed.
    pub fn socket(&self, name: &str) -> PathBuf {
        self.sockets.path().join(name)
    }

    /// The RAM file of VM `vm`.
    pub fn ram(&self, vm: &str) -> PathBuf {
        self.ram.path().join(format!("{vm}.ram"))
    }

    /// A command running `program` on `vm`'s side: in its network
    /// namespace if the set-up has them (VMs named `dst…` on the
    /// destination's side, the others on the source's).
    pub fn command(&self, vm: &str, program: &Path) -> Command {
        match &self.setup.netns {
            None => Command::new(program),
            Some(n) => {
                let ns = if vm.starts_with("dst") {
                    &n.dst_ns
                } else {
                    &n.src_ns
                };
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns]).arg(program);
                cmd
            }
        }
    }

    /// The address the destination listens on: its address on the link, or
    /// 127.0.0.1.
    pub fn listen_host(&self) -> &str {
        self.setup
            .netns
            .as_ref()
            .map_or("127.0.0.1", |n| n.dst_ip.as_str())
    }

    /// The QMP events of VM `vm` (its second monitor, `VM.events.qmp`).
    pub fn events(&self, vm: &str) -> Result<QmpEvents, DemoError> {
        QmpEvents::connect(&self.socket(&format!("{vm}.events.qmp")))
            .map_err(io(format!("connecting to {vm} QEMU's event monitor")))
    }

    fn timeout(&self, what: &str, timeout: Duration) -> DemoError {
        DemoError::Timeout {
            what: what.into(),
            timeout_s: timeout.as_secs(),
            log_dir: self.logs.display().to_string(),
        }
    }

    /// Starts `freehint vm` for VM `vm` (`extra`: e.g. `--incoming ADDR`)
    /// and waits for its vhost-user socket.
    pub fn daemon(&self, vm: &str, extra: &[&str]) -> Result<Daemon, DemoError> {
        let (control, vhost_socket, qmp) = (
            self.socket(&format!("{vm}.ctl")),
            self.socket(&format!("{vm}.vhost")),
            self.socket(&format!("{vm}.qmp")),
        );
        let log = self.logs.join(format!("{vm}.daemon.log"));
        let agent = self.socket(&format!("{vm}.agent"));
        let agent_args = if self.agent {
            vec!["--agent-socket".into(), agent.into_os_string()]
        } else {
            Vec::new()
        };
        let tls_args = if self.tls {
            vec!["--tls-dir".into(), self.tls_dir()?.into_os_string()]
        } else {
            vec!["--insecure".into()]
        };
        let child = self
            .command(vm, &self.setup.bin_dir.join("freehint"))
            .arg("vm")
            .arg("--vhost-socket")
            .arg(&vhost_socket)
            .arg("--qmp")
            .arg(&qmp)
            .arg("--control")
            .arg(&control)
            .args(agent_args)
            .args(tls_args)
            .args(&self.daemon_args)
            .args(extra)
            .env("FREEHINT_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(&log).map_err(io(format!("creating {}", log.display())))?,
            ))
            .spawn()
            .map_err(io("starting freehint vm"))?;
        let mut d = Daemon {
            child,
            control,
            vhost_socket,
            qmp,
        };
        let t = Duration::from_secs(10);
        if !poll(t, || d.vhost_socket.exists()) || !d.running() {
            return Err(self.timeout(&format!("the {vm} daemon's socket"), t));
        }
        Ok(d)
    }

    fn guest_cmd(&self, qemu: &Path, vm: &str, ram: RamBacking) -> Command {
        let s = &self.setup;
        let mut cmd = self.command(vm, qemu);
        let mut append = format!(
            "freehint.memwork={} freehint.keep={} freehint.check={} {}",
            s.work_mib, s.keep_mib, s.check_mib, s.append
        );
        if self.agent {
            append += " freehint.agent";
        }
        let mut guest_dir = s.guest_dir.clone();
        if let Some(disk) = &s.disk {
            append = format!("{append} {}", DiskConfig::KERNEL_OPTION);
            guest_dir = DiskConfig::guest_dir(&s.guest_dir);
            disk.qemu_args(&mut cmd);
        }
        guest_args_with(&mut cmd, &guest_dir, &ram, s.mem_mib, &append);
        for monitor in ["qmp", "events.qmp"] {
            cmd.arg("-qmp").arg(format!(
                "unix:{},server=on,wait=off",
                self.socket(&format!("{vm}.{monitor}")).display()
            ));
        }
        cmd
    }

    fn spawn_guest(&self, vm: &str, cmd: Command) -> Result<QemuGuest, DemoError> {
        let g = QemuGuest::spawn(
            cmd,
            Some(&self.logs.join(format!("{vm}.console.log"))),
            Some(&self.logs.join(format!("{vm}.qemu.log"))),
        )
        .map_err(io("starting QEMU"))?;
        let qmp = self.socket(&format!("{vm}.qmp"));
        let t = Duration::from_secs(20);
        if !poll(t, || qmp.exists()) {
            return Err(self.timeout(&format!("{vm} QEMU's QMP socket"), t));
        }
        Ok(g)
    }

    /// Starts the patched QEMU for VM `vm` with our balloon (the generic
    /// vhost-user device on `daemon`'s socket) and the preload library.
    pub fn freehint_qemu(
        &self,
        vm: &str,
        daemon: &Daemon,
        incoming: bool,
    ) -> Result<QemuGuest, DemoError> {
        let mut cmd = self.guest_cmd(
            &self.setup.patched_qemu,
            vm,
            RamBacking::SharedFile(self.ram(vm)),
        );
        freehint_device_args(
            &mut cmd,
            &self.setup.bin_dir.join("libfreehint_preload.so"),
            &daemon.vhost_socket,
        );
        if self.agent {
            // The destination needs the same devices; its socket is its own.
            let vm_socket = self.socket(&format!("{vm}.agent"));
            cmd.args(agent_port_args(&vm_socket));
        }
        if incoming {
            cmd.args(["-incoming", "defer"]);
        }
        self.spawn_guest(vm, cmd)
    }

    /// Starts the reference QEMU for VM `vm` for QEMU's own `mode`, with
    /// its own virtio-balloon as that mode wants it and anonymous RAM (what
    /// its users run: a hole reads as the shared zero page, where a shared
    /// memory file would allocate a page on every read); `incoming`: start
    /// with `-incoming defer`.
    pub fn native_qemu(
        &self,
        vm: &str,
        mode: Mode,
        incoming: bool,
    ) -> Result<QemuGuest, DemoError> {
        let mut cmd = self.guest_cmd(&self.setup.reference_qemu, vm, RamBacking::Anonymous);
        match mode {
            Mode::QemuNativeFph | Mode::QemuMultifdFph => {
                cmd.args(["-object", "iothread,id=io0"]).args([
                    "-device",
                    "virtio-balloon-pci,id=balloon0,free-page-hint=on,iothread=io0",
                ]);
            }
            Mode::QemuNativeFpr => {
                cmd.args([
                    "-device",
                    "virtio-balloon-pci,id=balloon0,free-page-reporting=on",
                ]);
            }
            _ => {
                cmd.args(["-device", "virtio-balloon-pci,id=balloon0"]);
            }
        }
        if incoming {
            cmd.args(["-incoming", "defer"]);
        }
        self.spawn_guest(vm, cmd)
    }

    /// A source VM under freehint that has booted and run its workload,
    /// and a destination waiting for it: `freehint vm` daemons (the
    /// destination's with `--incoming` on a free port, and `dst_extra`)
    /// and patched QEMUs.
    pub fn freehint_pair(&self, dst_extra: &[&str]) -> Result<FreehintPair, DemoError> {
        let addr = format!("{}:{}", self.listen_host(), free_port()?);
        let src_daemon = self.daemon("src", &[])?;
        let mut dst_args = vec!["--incoming", addr.as_str()];
        dst_args.extend_from_slice(dst_extra);
        let dst_daemon = self.daemon("dst", &dst_args)?;
        let src = self.freehint_qemu("src", &src_daemon, false)?;
        self.wait_ready(&src)?;
        let dst = self.freehint_qemu("dst", &dst_daemon, true)?;
        Ok(FreehintPair {
            src,
            dst,
            src_daemon,
            dst_daemon,
            addr,
        })
    }

    /// Waits until the destination daemon is ready to receive (it has
    /// found its QEMU waiting with `-incoming defer`), then lets QEMU's
    /// start-up settle for [`SETTLE`], as for QEMU's own migration.
    pub fn settle_destination(&self, daemon: &Daemon) -> Result<(), DemoError> {
        let t = Duration::from_secs(20);
        let receiving = || {
            Command::new(self.setup.bin_dir.join("freehint"))
                .args(["status", "--json"])
                .arg("--control")
                .arg(&daemon.control)
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("\"receiving\""))
        };
        if !poll(t, receiving) {
            return Err(self.timeout("the destination daemon to be ready", t));
        }
        std::thread::sleep(SETTLE);
        Ok(())
    }

    /// Waits until the guest has booted and run its workload.
    pub fn wait_ready(&self, g: &QemuGuest) -> Result<(), DemoError> {
        let t = self.setup.boot_timeout;
        if !poll(t, || g.said("freehint-guest: ready")) {
            return Err(self.timeout("the guest to boot and run its workload", t));
        }
        for line in &self.setup.ready_lines {
            if !poll(t, || g.said(line)) {
                return Err(self.timeout(&format!("the guest to say {line:?}"), t));
            }
        }
        // A couple of heartbeats and data checks, so "went on" is clear.
        let t = Duration::from_secs(30);
        if !poll(t, || g.heartbeats().len() >= 2 && !g.checks_ok().is_empty()) {
            return Err(self.timeout("the guest's heartbeat and data check", t));
        }
        std::thread::sleep(self.setup.idle);
        Ok(())
    }
}

/// What attaches freehint to a QEMU (besides the shared memory backend of
/// [`guest_args`]): the preload library, and our balloon as the generic
/// vhost-user device on the daemon's `vhost_socket`. `freehint qemu-args`
/// prints the same options, and a test of the `freehint` package checks
/// that it does.
pub fn freehint_device_args(cmd: &mut Command, preload: &Path, vhost_socket: &Path) {
    cmd.env("LD_PRELOAD", preload)
        .arg("-chardev")
        .arg(format!("socket,id=fh0,path={}", vhost_socket.display()))
        .args([
            "-device",
            "vhost-user-device-pci,chardev=fh0,virtio-id=5,num_vqs=5,config_size=16",
        ]);
}

/// QEMU's options for freehint's guest agent port, served on `socket`
/// (what `freehint qemu-args --agent-socket` prints).
pub fn agent_port_args(socket: &Path) -> Vec<String> {
    vec![
        "-device".into(),
        "virtio-serial-pci,id=fhserial".into(),
        "-chardev".into(),
        format!(
            "socket,id=fhagent,path={},server=on,wait=off",
            socket.display()
        ),
        "-device".into(),
        "virtserialport,bus=fhserial.0,chardev=fhagent,name=org.freehint.agent.0".into(),
    ]
}

/// Runs `freehint migrate --json` against the source daemon.
pub fn freehint_migrate(
    bin_dir: &Path,
    control: &Path,
    to: &str,
    hints: bool,
    extra: &[&str],
) -> Result<MigrationStats, DemoError> {
    let out = Command::new(bin_dir.join("freehint"))
        .arg("migrate")
        .arg("--control")
        .arg(control)
        .args([
            "--to",
            to,
            "--json",
            "--hints",
            if hints { "on" } else { "off" },
        ])
        .args(extra)
        .output()
        .map_err(io("running freehint migrate"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(DemoError::Migrate(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    serde_json::from_str(stdout.trim())
        .map_err(|e| DemoError::Migrate(format!("unreadable stats {stdout:?}: {e}")))
}

/// After a migration: whether the guest's heartbeat went on on the
/// destination past where the source stopped, and whether its checker
/// verified the data region there (`ok`, or what went wrong).
pub fn check_after(src: &QemuGuest, dst: &QemuGuest, timeout: Duration) -> (bool, String) {
    let last_beat = src.heartbeats().last().copied().unwrap_or(0);
    let last_check = src.checks_ok().last().copied();
    let alive = poll(timeout, || {
        dst.heartbeats().last().is_some_and(|&n| n > last_beat + 2)
    });
    let verified = poll(Duration::from_secs(5), || {
        dst.said("freehint-check FAIL")
            || dst
                .checks_ok()
                .last()
                .is_some_and(|&n| last_check.is_none_or(|l| n > l))
    });
    let check = if dst.said("freehint-check FAIL") {
        "FAIL: the data region differs on the destination".to_string()
    } else if verified {
        "ok".to_string()
    } else {
        "no check ran on the destination".to_string()
    };
    (alive, check)
}

/// Sets up a source guest under freehint (booted, workload done) and a
/// destination waiting for it, prints the `freehint migrate` command for
/// the user to run in another terminal, and waits until the guest has
/// moved (the source QEMU exits after the handover), then checks it on the
/// destination. Returns (alive on the destination, data check).
pub fn interactive(setup: &DemoSetup) -> Result<(bool, String), DemoError> {
    let bed = Testbed::new(setup, "interactive")?;
    let FreehintPair {
        mut src,
        dst,
        src_daemon,
        dst_daemon,
        addr,
    } = bed.freehint_pair(&[])?;
    bed.settle_destination(&dst_daemon)?;
    let freehint = setup.bin_dir.join("freehint");
    eprintln!(
        "freehint-demo: the source guest runs ({} MiB used); a destination QEMU waits on {addr}.\n\
         Migrate it from another terminal:\n\n    \
         {} migrate --control {} --to {addr}\n\n\
         Both daemons: {} status --control {} --control {}\n\
         freehint-demo: waiting for the guest to move (Ctrl-C ends the demo) ...",
        src.used_mib().unwrap_or(0),
        freehint.display(),
        src_daemon.control.display(),
        freehint.display(),
        src_daemon.control.display(),
        dst_daemon.control.display(),
    );
    while src.running() {
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(check_after(&src, &dst, Duration::from_secs(30)))
}

/// One whole run of `mode`: boots a source guest, lets it run its
/// workload, migrates it to a second QEMU and checks it there.
pub fn run_mode(setup: &DemoSetup, mode: Mode) -> Result<RunReport, DemoError> {
    let mut bed = Testbed::new(setup, mode.name())?;
    bed.agent = matches!(mode, Mode::FreehintAgent | Mode::FreehintAgentDropCaches);
    bed.tls = !matches!(
        mode,
        Mode::FreehintHintsInsecure | Mode::FreehintPostcopyInsecure
    );
    if mode.is_freehint() {
        run_freehint(&bed, mode)
    } else {
        run_native(&bed, mode)
    }
}

/// How long the destination's `RESUME` (or postcopy's last page) may take
/// to show once the migrating side says it is done.
const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Guest RAM − MemFree at the guest's last heartbeat.
fn held_mib(bed: &Testbed, src: &QemuGuest) -> u64 {
    bed.setup
        .mem_mib
        .saturating_sub(src.mem_free_kib().unwrap_or(0) / 1024)
}

fn run_freehint(bed: &Testbed, mode: Mode) -> Result<RunReport, DemoError> {
    let FreehintPair {
        src,
        dst,
        src_daemon,
        dst_daemon,
        addr,
    } = bed.freehint_pair(&[])?;
    let used = src.used_mib().unwrap_or(0);
    bed.settle_destination(&dst_daemon)?;
    let (src_events, dst_events) = (bed.events("src")?, bed.events("dst")?);
    let held = held_mib(bed, &src);
    let allocated_before = src.pages_allocated().last().copied();
    let migrate_us = now_us();
    let wait = HINT_WAIT_MS.to_string();
    let extra: &[&str] = match mode {
        Mode::FreehintHintsWait => &["--hint-wait-ms", &wait],
        Mode::FreehintPostcopy | Mode::FreehintPostcopyInsecure => &["--mode", "postcopy"],
        Mode::FreehintHybrid => &["--mode", "hybrid"],
        Mode::FreehintAgentDropCaches => &["--mode", "precopy", "--guest-drop-caches"],
        _ => &["--mode", "precopy"],
    };
    let stats = freehint_migrate(
        &bed.setup.bin_dir,
        &src_daemon.control,
        &addr,
        mode.hints(),
        extra,
    )?;
    // `freehint migrate` returns once the destination has placed the last
    // page (postcopy) or resumed (precopy): QEMU's own postcopy ends at the
    // destination's MIGRATION completed, which for a freehint destination
    // comes when the device state has loaded, before the pages.
    let returned_us = now_us();
    let mut timing = EventTiming::read(&src_events, &dst_events, migrate_us, false, EVENT_TIMEOUT);
    if stats.postcopy.switched {
        timing.dst_completed_us = Some(returned_us);
    }
    let (alive, check) = check_after(&src, &dst, Duration::from_secs(30));
    Ok(RunReport {
        mode,
        guest_mem_mib: bed.setup.mem_mib,
        guest_used_mib: used,
        held_mib: held,
        bytes_tool: stats.bytes_on_wire,
        total_time_ms: timing.total_time_ms(stats.postcopy.switched).unwrap_or(0),
        downtime_ms: timing.downtime_ms().unwrap_or(0),
        total_time_tool_ms: stats.total_time_ms,
        downtime_tool_ms: stats.downtime_ms,
        timing,
        guest_pages_allocated: allocated_during(allocated_before, &dst),
        guest_alive_after: alive,
        data_check: check,
        detail: serde_json::to_value(&stats).unwrap_or_default(),
    })
}

/// Pages allocated from `before` (the source's last count before the
/// migration) to the destination's first count.
fn allocated_during(before: Option<u64>, dst: &QemuGuest) -> Option<u64> {
    let after = dst.pages_allocated().first().copied()?;
    Some(after.saturating_sub(before?))
}

fn qmp_err(e: impl std::fmt::Display) -> DemoError {
    DemoError::Qemu(e.to_string())
}

/// Sets QEMU's migration capabilities and parameters for `mode` on one
/// side: events on, no bandwidth cap (QEMU's default is 128 MiB/s), and
/// multifd or postcopy where the mode wants them.
fn native_setup(qmp: &mut Qmp, mode: Mode) -> Result<(), DemoError> {
    let mut caps = vec![json!({"capability": "events", "state": true})];
    match mode {
        Mode::QemuMultifdFph => caps.push(json!({"capability": "multifd", "state": true})),
        Mode::QemuPostcopy => caps.push(json!({"capability": "postcopy-ram", "state": true})),
        _ => {}
    }
    qmp.execute("migrate-set-capabilities", json!({"capabilities": caps}))
        .map_err(qmp_err)?;
    let mut params = json!({"max-bandwidth": 100u64 << 30});
    if mode == Mode::QemuMultifdFph {
        params["multifd-channels"] = json!(2);
    }
    qmp.execute("migrate-set-parameters", params)
        .map_err(qmp_err)?;
    Ok(())
}

fn run_native(bed: &Testbed, mode: Mode) -> Result<RunReport, DemoError> {
    let uri = format!("tcp:{}:{}", bed.listen_host(), free_port()?);
    let src = bed.native_qemu("src", mode, false)?;
    bed.wait_ready(&src)?;
    let used = src.used_mib().unwrap_or(0);
    let dst = bed.native_qemu("dst", mode, true)?;
    let mut qmp = Qmp::connect(&bed.socket("src.qmp")).map_err(qmp_err)?;
    let mut dst_qmp = Qmp::connect(&bed.socket("dst.qmp")).map_err(qmp_err)?;
    native_setup(&mut qmp, mode)?;
    native_setup(&mut dst_qmp, mode)?;
    dst_qmp
        .execute("migrate-incoming", json!({"uri": uri}))
        .map_err(qmp_err)?;
    let t = Duration::from_secs(20);
    if !poll(t, || {
        dst_qmp
            .execute("query-migrate", json!({}))
            .is_ok_and(|i| i["status"] == "setup" || i["status"] == "active")
            || dst_qmp.status().is_ok_and(|s| s == "inmigrate")
    }) {
        return Err(bed.timeout("the destination QEMU to wait for the migration", t));
    }
    std::thread::sleep(SETTLE);
    let (src_events, dst_events) = (bed.events("src")?, bed.events("dst")?);
    let held = held_mib(bed, &src);
    let allocated_before = src.pages_allocated().last().copied();
    let migrate_us = now_us();
    qmp.execute("migrate", json!({"uri": uri}))
        .map_err(qmp_err)?;
    let postcopy = mode == Mode::QemuPostcopy;
    let mut postcopy_started = false;
    let t = Instant::now();
    let info = loop {
        let info = qmp.execute("query-migrate", json!({})).map_err(qmp_err)?;
        match info["status"].as_str().unwrap_or("") {
            "completed" => break info,
            "failed" | "cancelled" => {
                return Err(DemoError::Qemu(format!(
                    "migration {}: {}",
                    info["status"], info["error-desc"]
                )))
            }
            "active" if postcopy && !postcopy_started => {
                qmp.execute("migrate-start-postcopy", json!({}))
                    .map_err(qmp_err)?;
                postcopy_started = true;
            }
            _ if t.elapsed() > Duration::from_secs(600) => {
                return Err(bed.timeout("QEMU's migration", Duration::from_secs(600)))
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let timing = EventTiming::read(
        &src_events,
        &dst_events,
        migrate_us,
        postcopy,
        EVENT_TIMEOUT,
    );
    let (alive, check) = check_after(&src, &dst, Duration::from_secs(30));
    Ok(RunReport {
        mode,
        guest_mem_mib: bed.setup.mem_mib,
        guest_used_mib: used,
        held_mib: held,
        bytes_tool: info["ram"]["transferred"].as_u64().unwrap_or(0),
        total_time_ms: timing.total_time_ms(postcopy).unwrap_or(0),
        downtime_ms: timing.downtime_ms().unwrap_or(0),
        total_time_tool_ms: info["total-time"].as_u64().unwrap_or(0),
        downtime_tool_ms: info["downtime"].as_u64().unwrap_or(0),
        timing,
        guest_pages_allocated: allocated_during(allocated_before, &dst),
        guest_alive_after: alive,
        data_check: check,
        detail: info,
    })
}
