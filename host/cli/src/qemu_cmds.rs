//! `freehint vm`, `migrate`, `status`, `resume`: live migration of QEMU
//! guests.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use freehint_daemon::{
    request, ControlReply, ControlRequest, DaemonConfig, GuestPrepare, VmDaemon,
};

use crate::{OnOff, ParamArgs};

pub const VM_EXAMPLE: &str = "\
Run one daemon per QEMU, started BEFORE QEMU (QEMU connects to its socket).

Both hosts hold the same TLS directory (`freehint tls init DIR` makes a test
CA and certificates; see --tls-dir). Source host:
  freehint vm --vhost-socket /run/fh/a.vhost --qmp /run/fh/a.qmp --control /run/fh/a.ctl \
      --tls-dir /etc/freehint/tls &
  LD_PRELOAD=/usr/lib/freehint/libfreehint_preload.so qemu-system-x86_64 \\
      -object memory-backend-file,id=mem0,size=2G,mem-path=/dev/shm/a.ram,share=on \\
      -machine q35,memory-backend=mem0 -m 2G \\
      -chardev socket,id=fh0,path=/run/fh/a.vhost \\
      -device vhost-user-device-pci,chardev=fh0,virtio-id=5,num_vqs=5,config_size=16 \\
      -qmp unix:/run/fh/a.qmp,server=on,wait=off ...
(`freehint qemu-args --ram /dev/shm/a.ram --mem-mib 2048 --vhost-socket
/run/fh/a.vhost --qmp /run/fh/a.qmp` prints these QEMU options.)

Destination host (same QEMU command line plus -incoming defer, its own paths):
  freehint vm --vhost-socket /run/fh/b.vhost --qmp /run/fh/b.qmp --control /run/fh/b.ctl \\
      --incoming 0.0.0.0:4444 --tls-dir /etc/freehint/tls &
  LD_PRELOAD=... qemu-system-x86_64 ... -incoming defer

Then, on the source host:
  freehint migrate --control /run/fh/a.ctl --to desthost:4444

The daemon serves the guest's virtio_balloon driver (free page hinting and
reporting, stats) for the VM's whole life and exits when QEMU disconnects.
Its --control socket is created 0600 and answers only its own user (or
root): it checks every caller's uid (SO_PEERCRED) and refuses others.

With freehint's guest driver (guest-driver/: the freehint_free module and
freehint-agent, started in the guest), give QEMU the agent's port and the
daemon its socket; the agent reports every free page without allocating
any, and the daemon prefers it to the balloon driver:
  freehint vm ... --agent-socket /run/fh/a.agent &
  qemu-system-x86_64 ... -device virtio-serial-pci \
      -chardev socket,id=fhagent,path=/run/fh/a.agent,server=on,wait=off \
      -device virtserialport,chardev=fhagent,name=org.freehint.agent.0
(`freehint qemu-args ... --agent-socket /run/fh/a.agent` adds them.)
QEMU must be the patched build from tests/qemu (docs/QEMU.md): stock QEMU
10.0 cannot create or migrate the generic vhost-user device.";

pub const MIGRATE_EXAMPLE: &str = "\
Example:
  freehint migrate --control /run/fh/a.ctl --to desthost:4444
  freehint migrate --control /run/fh/a.ctl --to desthost:4444 --hints off --json
  freehint migrate --control /run/fh/a.ctl --to desthost:4444 --config migrate.toml
  freehint migrate --control /run/fh/a.ctl --to desthost:4444 --mode postcopy
  freehint migrate --control /run/fh/a.ctl --to desthost:4444 --guest-drop-caches
  freehint migrate --control /run/fh/a.ctl --postcopy-now   # from another terminal
  freehint migrate --control /run/fh/a.ctl --resume         # after a broken link

Modes: hybrid (the default) runs precopy rounds and switches to postcopy
when they stop converging or on --postcopy-now; postcopy moves the guest at
once and its pages follow, those it touches first; precopy never runs the
guest on the destination before all of its RAM is there. Postcopy needs a
destination QEMU started with the preload library (hybrid without one stays
precopy). If the link breaks in postcopy, the source reconnects for
--postcopy-recovery-s, then waits for --resume: the guest runs on the
destination and waits there for its pages; never resume it on the source.

With freehint's guest agent (`freehint vm --agent-socket`), the guest can
make more memory free before the first report, at a cost to it, if you
ask: --guest-drop-caches drops its clean page cache (it re-reads those
files from disk later), --guest-compact compacts its memory (CPU time in
the guest). The stats say how long that took and how much it freed
(guest_prepare_ms, guest_prepare_freed_bytes).

The migration parameters come from the flags, then --config FILE (TOML,
the same keys: `freehint config show --help`), then the defaults.

On a terminal a progress bar (stderr) shows the phase, the round, bytes
sent and left, the rate, the estimated downtime and the pages hinted free;
--json-progress prints the same figures as one JSON line per second.

On success the destination runs the guest and the source QEMU has quit. On
failure the source guest runs on, and the error says why in one line.

The handover: the destination loads the guest and says it is ready; the
source commits; only then does the destination resume it. If the link dies
right after the commit, the outcome is uncertain: both sides keep the guest
paused, the error (and `freehint status`) says so and names the action:
run `freehint resume` on the side that should run the guest, never both.

Ctrl-C (or `freehint cancel --control SOCKET`) cancels: before the commit
the source guest runs on, untouched. With --json the last line of output is
the stats with `state` (completed, failed or uncertain), `source_running`
and `destination_running`, also on failure.";

pub const RESUME_EXAMPLE: &str = "\
Examples:
  freehint resume --control /run/fh/b.ctl    # a guest a daemon holds paused
  freehint resume --qmp /run/fh/a.qmp        # a paused QEMU whose daemon is gone

Use it after `freehint vm --no-resume`, or after a handover whose outcome was
uncertain (`freehint status` says `uncertain` and names this action): resume
the guest on exactly one side. --qmp sends QEMU `cont` directly, for a source
whose daemon was killed after it stopped the guest.";

#[derive(Args, Debug)]
pub struct VmArgs {
    /// The vhost-user socket QEMU's balloon device connects to.
    #[arg(long)]
    vhost_socket: PathBuf,
    /// QEMU's QMP socket (-qmp unix:PATH,server=on,wait=off).
    #[arg(long)]
    qmp: PathBuf,
    /// Where this daemon takes `freehint migrate|status|resume` requests.
    #[arg(long)]
    control: PathBuf,
    /// Be the destination of one migration, listening on this address
    /// (QEMU must run with -incoming defer).
    #[arg(long, value_name = "ADDR")]
    incoming: Option<String>,
    /// Destination: leave the guest paused after it arrived, until
    /// `freehint resume`.
    #[arg(long, requires = "incoming")]
    no_resume: bool,
    /// Destination: allocate all guest RAM before the source connects.
    #[arg(long, requires = "incoming")]
    preallocate: bool,
    /// The chardev socket of the guest agent's virtio-serial port (QEMU:
    /// -chardev socket,id=fhagent,path=PATH,server=on,wait=off -device
    /// virtserialport,chardev=fhagent,name=org.freehint.agent.0). With it,
    /// a migration with hints asks freehint-agent in the guest for its
    /// free memory, and uses the balloon driver if the agent does not
    /// answer.
    #[arg(long, value_name = "PATH")]
    agent_socket: Option<PathBuf>,
    /// How this daemon's migration connections (in and out) are secured.
    #[command(flatten)]
    tls: crate::tls::TlsArgs,
}

#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// The source daemon's control socket.
    #[arg(long)]
    control: PathBuf,
    /// The destination daemon's --incoming address, HOST:PORT (with
    /// --resume: a new address of the destination, if it moved).
    #[arg(long, required_unless_present_any = ["postcopy_now", "resume"])]
    to: Option<String>,
    /// Do not start a migration: tell the one already running on this
    /// daemon (in `--mode hybrid`) to switch to postcopy at the end of its
    /// current round. The `freehint migrate` that started it reports how it
    /// ended.
    #[arg(long, conflicts_with_all = ["to", "json", "resume"])]
    postcopy_now: bool,
    /// Do not start a migration: tell the postcopy running on this daemon,
    /// whose link broke, to reconnect now (to --to, if given). It retries
    /// on its own for --postcopy-recovery-s first, then waits for this.
    #[arg(long, conflicts_with = "json")]
    resume: bool,
    /// Ask the guest for free-page hints and skip the pages it reports
    /// (`hints` in --config FILE).
    #[arg(long, value_enum)]
    hints: Option<OnOff>,
    /// Before the first report, have freehint-agent drop the guest's clean
    /// page cache, so that it is hinted free instead of sent. Cost: the
    /// guest reads those files from its disk again when it needs them.
    /// Needs the agent (`freehint vm --agent-socket`).
    #[arg(long)]
    guest_drop_caches: bool,
    /// Before the first report, have freehint-agent compact the guest's
    /// memory, so that free memory forms larger blocks. Cost: CPU time in
    /// the guest while it moves pages (the moved pages are sent).
    /// Needs the agent.
    #[arg(long)]
    guest_compact: bool,
    /// Print the stats as JSON instead of a summary.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    progress: crate::progress::ProgressArgs,
    #[command(flatten)]
    params: ParamArgs,
}

#[derive(Args, Debug)]
pub struct ControlArgs {
    /// The daemon's control socket.
    #[arg(long)]
    control: PathBuf,
}

#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
pub struct ResumeArgs {
    /// The control socket of the daemon that holds the guest paused.
    #[arg(long)]
    control: Option<PathBuf>,
    /// QEMU's QMP socket, when its daemon is gone.
    #[arg(long)]
    qmp: Option<PathBuf>,
}

pub fn vm(a: VmArgs) -> Result<()> {
    let tls = a.tls.resolve(if a.incoming.is_some() {
        crate::tls::Role::Receive
    } else {
        crate::tls::Role::Either
    })?;
    let incoming = match &a.incoming {
        None => None,
        Some(addr) => {
            let l = std::net::TcpListener::bind(addr)
                .with_context(|| format!("listening on {addr} for the incoming migration"))?;
            eprintln!(
                "freehint: listening on {} for the incoming migration",
                l.local_addr()?
            );
            Some(l)
        }
    };
    let state_dir = a
        .control
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let daemon = VmDaemon::new(DaemonConfig {
        vhost_socket: a.vhost_socket,
        qmp_socket: a.qmp,
        control_socket: a.control,
        incoming,
        resume: !a.no_resume,
        preallocate: a.preallocate,
        state_dir,
        agent_socket: a.agent_socket,
        tls,
    })?;
    daemon.run()?;
    eprintln!("freehint: QEMU disconnected; exiting");
    Ok(())
}

pub fn migrate(a: MigrateArgs) -> Result<()> {
    if a.resume {
        return match request(&a.control, &ControlRequest::PostcopyResume { to: a.to })? {
            ControlReply::Ok => {
                println!("the postcopy reconnects now; `freehint status` shows its phase");
                Ok(())
            }
            ControlReply::Error { message } => bail!("{message}"),
            other => bail!("unexpected answer from the daemon: {other:?}"),
        };
    }
    let Some(to) = a.to else {
        return match request(&a.control, &ControlRequest::PostcopyNow)? {
            ControlReply::Ok => {
                println!("the migration switches to postcopy at the end of its current round");
                Ok(())
            }
            ControlReply::Error { message } => bail!("{message}"),
            other => bail!("unexpected answer from the daemon: {other:?}"),
        };
    };
    let params = a.params.resolve(a.hints)?.params;
    // Ctrl-C / SIGTERM cancel the daemon's migration; its answer below
    // then says how it ended.
    let control = a.control.clone();
    crate::on_first_signal(move || {
        if let Err(e) = request(&control, &ControlRequest::Cancel) {
            crate::progress::eprint_line(format!("freehint: cancelling: {e}"));
        }
    })?;
    // The figures come from a second connection, polled until the answer.
    let poll_control = a.control.clone();
    let reporter = crate::progress::Reporter::start(&a.progress, move || {
        crate::progress::poll_daemon(&poll_control)
    });
    let guest = GuestPrepare {
        drop_caches: a.guest_drop_caches,
        compact: a.guest_compact,
    };
    let reply = request(&a.control, &ControlRequest::Migrate { to, params, guest });
    reporter.stop();
    match reply? {
        ControlReply::Migrated { stats } => crate::report(a.json, &stats, stats.summary(), None),
        ControlReply::MigrationFailed { message, stats } => {
            crate::report(a.json, &stats, "", Some(message))
        }
        ControlReply::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer from the daemon: {other:?}"),
    }
}

pub fn cancel(a: ControlArgs) -> Result<()> {
    match request(&a.control, &ControlRequest::Cancel)? {
        ControlReply::Cancelling { phase } => {
            println!("cancelling the migration (it was in phase {phase}); `freehint migrate` reports how it ended");
            Ok(())
        }
        ControlReply::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer from the daemon: {other:?}"),
    }
}

pub fn fault(control: &std::path::Path, spec: String) -> Result<()> {
    match request(control, &ControlRequest::Fault { spec })? {
        ControlReply::Ok => Ok(()),
        ControlReply::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer from the daemon: {other:?}"),
    }
}

pub fn resume(a: ResumeArgs) -> Result<()> {
    if let Some(qmp) = &a.qmp {
        let mut q = freehint_qemu::Qmp::connect(qmp)?;
        let before = q.status()?;
        if before == "running" {
            bail!("the guest already runs in the QEMU at {}", qmp.display());
        }
        if before == "inmigrate" {
            bail!(
                "the QEMU at {} never received a whole guest (it is {before}); resume the guest on the other side",
                qmp.display()
            );
        }
        q.execute("cont", serde_json::json!({}))?;
        let after = q.status()?;
        if after != "running" {
            bail!("QEMU is {after} after cont");
        }
        println!("guest resumed (it was {before})");
        return Ok(());
    }
    let control = a.control.as_ref().context("--control or --qmp")?;
    match request(control, &ControlRequest::Resume)? {
        ControlReply::Resumed => {
            println!("guest resumed");
            Ok(())
        }
        ControlReply::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer from the daemon: {other:?}"),
    }
}
