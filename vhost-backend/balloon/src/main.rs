//! `freehint-balloon`: the vhost-user virtio-balloon device as a standalone
//! process. Hints and reports are logged (the migration daemon embeds the
//! library instead and hands them to its engine).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use freehint_balloon::{BalloonBackend, BalloonConfig, BalloonError, DEFAULT_MAX_QUEUE_SIZE};
use freehint_types::{CmdId, ErrorChain, GpaRange, HintOutcome, HintSink};

const EXAMPLE: &str = "\
EXAMPLE
  # 1. Start the device (it serves one QEMU at a time, and waits for the next
  #    when QEMU disconnects):
  freehint-balloon --socket /tmp/balloon.sock --target-mib 0 --status-json

  # 2. Start QEMU with shared, file-backed RAM and the generic vhost-user
  #    device (virtio id 5 = balloon, 5 queues, 16-byte config):
  qemu-system-x86_64 -machine q35,accel=kvm -m 4G \\
    -object memory-backend-file,id=mem0,size=4G,mem-path=/dev/shm/vm0,share=on \\
    -machine memory-backend=mem0 \\
    -chardev socket,id=c0,path=/tmp/balloon.sock \\
    -device vhost-user-device-pci,chardev=c0,virtio-id=5,num_vqs=5,config_size=16 \\
    ...

  QEMU before 10.2 does not let users create vhost-user-device-pci, and QEMU
  10.2 renamed it vhost-user-test-device-pci; see the project's QEMU notes.
  The guest needs CONFIG_VIRTIO_BALLOON; free page hinting, reporting, stats
  and poison are negotiated by the stock driver.";

/// vhost-user virtio-balloon backend (free page hinting, free page
/// reporting, page poison, stats, inflate/deflate).
#[derive(Parser, Debug)]
#[command(version, after_help = EXAMPLE)]
struct Args {
    /// Path of the vhost-user Unix socket to listen on.
    #[arg(long)]
    socket: PathBuf,
    /// Initial balloon target in MiB (the guest inflates to this size).
    #[arg(long, default_value_t = 0)]
    target_mib: u32,
    /// Print the device status as one JSON line every --status-interval-secs
    /// and when a frontend disconnects.
    #[arg(long)]
    status_json: bool,
    /// Seconds between JSON status lines.
    #[arg(long, default_value_t = 10)]
    status_interval_secs: u64,
    /// Largest queue size accepted from the frontend (power of two).
    #[arg(long, default_value_t = DEFAULT_MAX_QUEUE_SIZE)]
    max_queue_size: u16,
}

/// A hint sink that only logs: the standalone device has no migration
/// engine to feed.
struct LogSink;

impl HintSink for LogSink {
    fn free_page_hints(&self, cmd_id: CmdId, ranges: &[GpaRange]) -> HintOutcome {
        let bytes: u64 = ranges.iter().map(|r| r.len_bytes).sum();
        tracing::info!(%cmd_id, ranges = ranges.len(), bytes, "free page hints");
        HintOutcome::default()
    }

    fn reported_free(&self, ranges: &[GpaRange]) -> HintOutcome {
        let bytes: u64 = ranges.iter().map(|r| r.len_bytes).sum();
        tracing::info!(
            ranges = ranges.len(),
            bytes,
            "free pages reported and discarded"
        );
        HintOutcome::default()
    }
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let Some(pages) = args.target_mib.checked_mul(256) else {
        eprintln!(
            "freehint-balloon: --target-mib {} is too large",
            args.target_mib
        );
        std::process::exit(2);
    };
    let config = BalloonConfig {
        initial_target_pages: pages,
        max_queue_size: args.max_queue_size,
    };
    let backend = match BalloonBackend::new(config, Arc::new(LogSink)) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("freehint-balloon: {}", ErrorChain(&e));
            std::process::exit(2);
        }
    };
    let handle = backend.handle();
    let print_status =
        move |h: &freehint_balloon::BalloonHandle| match serde_json::to_string(&h.status()) {
            Ok(s) => println!("{s}"),
            Err(e) => tracing::warn!("status: {e}"),
        };
    if args.status_json {
        let h = handle.clone();
        let every = Duration::from_secs(args.status_interval_secs.max(1));
        std::thread::spawn(move || loop {
            std::thread::sleep(every);
            print_status(&h);
        });
    }
    loop {
        tracing::info!(socket = %args.socket.display(), "waiting for a vhost-user frontend");
        if let Err(e) = backend.serve(&args.socket) {
            tracing::error!("{}", ErrorChain(&e));
            if matches!(e, BalloonError::Listen { .. }) {
                std::process::exit(1);
            }
        }
        tracing::info!("frontend disconnected");
        if args.status_json {
            print_status(&handle);
        }
    }
}
