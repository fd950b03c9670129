//! `freehint-agent`: the guest side of freehint's free-memory reports.
//!
//! Started by the guest's init (as root, after `insmod freehint_free.ko`),
//! it runs for the guest's whole life: it waits for the host daemon on the
//! virtio-serial port `org.freehint.agent.0`, and answers
//!
//! * `Query` with `Hello` (the page size, and what a free page holds:
//!   zeros under `init_on_free=1`, the poison byte under `page_poison=1`);
//! * `Report { cmd_id, min_order }` with the module's snapshot of the free
//!   lists as `Ranges` batches, then `Done` (or `Failed` with the reason);
//! * `Prepare { cmd_id, drop_caches, compact }` (the operator's opt-in,
//!   before a migration's first report) by dropping the clean page cache
//!   and compacting memory through `/proc/sys/vm`, then `Prepared` with
//!   MemFree before and after.
//!
//! It allocates no guest memory per report beyond its range array and
//! writes none of the pages it reports. The protocol is
//! `freehint-agent-protocol`; the module's interface is
//! `guest-driver/module/freehint_free_uapi.h`.
//!
//! The arguments are parsed by hand: two paths do not pay for an argument
//! parser in a static binary that lives in every guest's memory.

#![deny(missing_docs)]

mod module;
mod port;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use freehint_agent_protocol::{Decoder, FreeContent, Hello, Message, MAX_RANGES_PER_BATCH};

use module::FreeRanges;
use port::{Port, Received};

/// The `name=` of the agent's `virtserialport`.
const PORT_NAME: &str = "org.freehint.agent.0";
/// The module's device.
const DEVICE: &str = "/dev/freehint_free";
/// Longest a preparation waits for MemFree to stop rising.
const PREPARE_SETTLE_MAX: Duration = Duration::from_secs(2);
/// Ranges the first snapshot makes room for; doubled while truncated.
const FIRST_CAPACITY: usize = 1 << 16;

const HELP: &str = "\
freehint-agent: answers the freehint host daemon's free-memory reports.

Usage: freehint-agent [--port PATH] [--device PATH]

  --port PATH     the virtio-serial port [default: the one named
                  org.freehint.agent.0, found in /sys/class/virtio-ports]
  --device PATH   the freehint_free module's device [default: /dev/freehint_free]

Runs until killed. Needs root (the module's device is CAP_SYS_ADMIN only).
QEMU side: -device virtio-serial-pci -chardev socket,id=fhagent,path=SOCK,server=on,wait=off
           -device virtserialport,chardev=fhagent,name=org.freehint.agent.0";

struct Args {
    port: Option<PathBuf>,
    device: PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        port: None,
        device: PathBuf::from(DEVICE),
    };
    let mut it = std::env::args_os().skip(1);
    while let Some(a) = it.next() {
        match a.to_str() {
            Some("--help" | "-h") => {
                println!("{HELP}");
                std::process::exit(0);
            }
            Some("--port") => {
                args.port = Some(it.next().ok_or("--port needs a path")?.into());
            }
            Some("--device") => {
                args.device = it.next().ok_or("--device needs a path")?.into();
            }
            _ => return Err(format!("unknown argument {a:?} (see --help)")),
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("freehint-agent: {e}");
            return ExitCode::from(2);
        }
    };
    let path = match &args.port {
        Some(p) => p.clone(),
        None => {
            let t = Instant::now();
            loop {
                if let Some(p) = port::find(PORT_NAME) {
                    break p;
                }
                if t.elapsed() > Duration::from_secs(10) {
                    eprintln!(
                        "freehint-agent: no virtio-serial port named {PORT_NAME} (is virtio_console loaded, and the VM started with a virtserialport of that name?)"
                    );
                    return ExitCode::FAILURE;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    let mut port = match Port::open(&path) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("freehint-agent: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    };
    let mut agent = Agent::new(args.device);
    println!("freehint-agent: ready on {}", path.display());
    agent.serve(&mut port)
}

/// MemFree, KiB.
fn mem_free_kib() -> Result<u64, String> {
    let meminfo =
        std::fs::read_to_string("/proc/meminfo").map_err(|e| format!("/proc/meminfo: {e}"))?;
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemFree:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| "/proc/meminfo has no MemFree".to_string())
}

/// Drops the clean page cache and/or compacts memory; returns the time
/// it took and MemFree (KiB) before and after.
fn prepare(drop_caches: bool, compact: bool) -> Result<(Duration, u64, u64), String> {
    let t = Instant::now();
    let before = mem_free_kib()?;
    let write = |path: &str| std::fs::write(path, "1").map_err(|e| format!("{path}: {e}"));
    if drop_caches {
        // 1: the page cache only; dirty pages stay (no sync: writing them
        // back would cost the guest I/O for memory that is not free).
        write("/proc/sys/vm/drop_caches")?;
    }
    if compact {
        write("/proc/sys/vm/compact_memory")?;
    }
    // The kernel goes on freeing for a while after the write returns
    // (measured: MemFree 64 MiB up at once, 190 MiB a few ms later): wait
    // until it stops rising, so that the first report sees the memory
    // free, and the figure says what was freed.
    let mut after = mem_free_kib()?;
    let settle = Instant::now();
    while settle.elapsed() < PREPARE_SETTLE_MAX {
        std::thread::sleep(Duration::from_millis(10));
        let now = mem_free_kib()?;
        if now <= after + 1024 {
            after = after.max(now);
            break;
        }
        after = now;
    }
    Ok((t.elapsed(), before, after))
}

/// The agent's state across host connections.
struct Agent {
    device: PathBuf,
    module: Option<FreeRanges>,
    capacity: usize,
    page_bytes: u32,
    /// Reports answered, for the first one's console line.
    reports: u64,
}

impl Agent {
    fn new(device: PathBuf) -> Self {
        // SAFETY: sysconf has no memory-safety preconditions.
        let page_bytes = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        Self {
            device,
            module: None,
            capacity: FIRST_CAPACITY,
            page_bytes: u32::try_from(page_bytes).unwrap_or(4096),
            reports: 0,
        }
    }

    /// Serves the port for ever.
    fn serve(&mut self, port: &mut Port) -> ExitCode {
        let mut buf = vec![0u8; 64 << 10];
        let mut decoder = Decoder::default();
        loop {
            match port.read(&mut buf, Duration::from_secs(3600)) {
                Ok(Received::Bytes(n)) => decoder.push(&buf[..n]),
                Ok(Received::NoHost) => {
                    // What a host left half-sent means nothing to the next.
                    decoder = Decoder::default();
                    std::thread::sleep(port::HOST_POLL);
                    continue;
                }
                Err(e) => {
                    eprintln!("freehint-agent: reading the port: {e}");
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            }
            while let Some(m) = decoder.next_message() {
                let reply = match m {
                    Ok(m) => self.answer(m, port),
                    Err(e) => {
                        eprintln!("freehint-agent: from the host: {e}");
                        decoder.resync();
                        Ok(())
                    }
                };
                if let Err(e) = reply {
                    eprintln!("freehint-agent: answering the host: {e}");
                }
            }
        }
    }

    fn module(&mut self) -> Result<&mut FreeRanges, String> {
        if self.module.is_none() {
            let m = FreeRanges::open(&self.device).map_err(|e| {
                format!(
                    "{}: {e} (is the freehint_free module loaded?)",
                    self.device.display()
                )
            })?;
            self.module = Some(m);
        }
        Ok(self.module.as_mut().expect("just opened"))
    }

    fn answer(&mut self, m: Message, port: &mut Port) -> std::io::Result<()> {
        let mut out = Vec::new();
        match m {
            Message::Query => {
                // The content flags come with any snapshot: ask for the
                // smallest (the largest order, one range).
                let free_content = match self.module().and_then(|m| {
                    m.snapshot(freehint_agent_protocol::MAX_MIN_ORDER, 1)
                        .map_err(|e| format!("{DEVICE}: {e}"))
                }) {
                    Ok(s) => s.free_content,
                    Err(e) => {
                        eprintln!("freehint-agent: {e}");
                        FreeContent::Undefined
                    }
                };
                Message::Hello(Hello {
                    page_bytes: self.page_bytes,
                    free_content,
                })
                .encode(&mut out);
                port.write_all(&out)
            }
            Message::Report { cmd_id, min_order } => self.report(cmd_id, min_order, port),
            Message::Prepare {
                cmd_id,
                drop_caches,
                compact,
            } => {
                match prepare(drop_caches, compact) {
                    Ok((took, before, after)) => Message::Prepared {
                        cmd_id,
                        took_us: took.as_micros() as u64,
                        free_pages_before: before / u64::from(self.page_bytes / 1024).max(1),
                        free_pages_after: after / u64::from(self.page_bytes / 1024).max(1),
                    },
                    Err(reason) => Message::Failed { cmd_id, reason },
                }
                .encode(&mut out);
                port.write_all(&out)
            }
            other => {
                eprintln!(
                    "freehint-agent: ignoring a {} message from the host",
                    other.kind().name()
                );
                Ok(())
            }
        }
    }

    fn report(&mut self, cmd_id: u32, min_order: u8, port: &mut Port) -> std::io::Result<()> {
        let t = Instant::now();
        let mut out = Vec::new();
        let snap = loop {
            let capacity = self.capacity;
            let snap = match self.module().and_then(|m| {
                m.snapshot(min_order, capacity)
                    .map_err(|e| format!("{DEVICE}: {e}"))
            }) {
                Ok(s) => s,
                Err(reason) => {
                    Message::Failed { cmd_id, reason }.encode(&mut out);
                    return port.write_all(&out);
                }
            };
            if snap.truncated && self.capacity < module::MAX_CAPACITY {
                self.capacity = (self.capacity * 2).min(module::MAX_CAPACITY);
                continue;
            }
            break snap;
        };
        for batch in snap.ranges.chunks(MAX_RANGES_PER_BATCH) {
            out.clear();
            Message::Ranges {
                cmd_id,
                ranges: batch.to_vec(),
            }
            .encode(&mut out);
            port.write_all(&out)?;
        }
        let took_us = t.elapsed().as_micros() as u64;
        out.clear();
        Message::Done {
            cmd_id,
            pages: snap.pages,
            ranges: snap.ranges.len() as u64,
            took_us,
            truncated: snap.truncated,
        }
        .encode(&mut out);
        port.write_all(&out)?;
        if self.reports == 0 {
            println!(
                "freehint-agent: first report: cmd_id={cmd_id} min_order={min_order} ranges={} pages={} lock_us={} took_us={took_us}",
                snap.ranges.len(),
                snap.pages,
                snap.lock.as_micros()
            );
        }
        self.reports += 1;
        Ok(())
    }
}
