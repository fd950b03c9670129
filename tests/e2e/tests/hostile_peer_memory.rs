//! A hostile peer against a real `freehint receive` process, with its
//! memory measured: the destination's anonymous memory (`RssAnon` of
//! /proc/PID/status, sampled every 2 ms) must stay under a stated bound
//! whatever the peer announces or sends.
//!
//! The destination runs with `--insecure`, so that the peer's frames
//! themselves reach it: with TLS (the default) the handshake turns a
//! stranger away before any frame, and these are the bounds an
//! authenticated but broken or hostile source meets.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use freehint_dirty_log::UffdWpDirtyLog;
use freehint_e2e::{bin_dir, wait_for, SimVm};
use freehint_engine::{
    empty_bitmap, vmm_ram_ranges, MigrationMode, MigrationParams, Phase, PrecopySender,
};
use freehint_hint_filter::HintFilter;
use freehint_memory::GuestRam;
use freehint_wire::{
    ChannelRole, FrameHeader, Hello, Kind, Message, PageBatchHead, RegionDesc,
    MAX_CONTROL_PAYLOAD_BYTES,
};

const MEM_MIB: u64 = 64;

/// The bound on the destination's anonymous memory in these tests: the
/// runtime and its buffers (about 10 MiB), plus what 16 bulk channels may
/// each hold at once (a 4 MiB piece of a page batch, its head, a read
/// buffer), with room to spare; not the 1 GiB that 64 connections
/// announcing 16 MiB frames, or 16 channels of 16 MiB batches, would
/// have cost before the bounds.
const RSS_ANON_BOUND_MIB: u64 = 112;

/// The largest `RssAnon` of a process, sampled until dropped.
struct RssSampler {
    peak_kib: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let (peak_kib, stop) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let (peak, done) = (peak_kib.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let path = format!("/proc/{pid}/status");
            while !done.load(Ordering::Relaxed) {
                let Ok(status) = std::fs::read_to_string(&path) else {
                    return;
                };
                let kib = status
                    .lines()
                    .find_map(|l| l.strip_prefix("RssAnon:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                    .unwrap_or(0);
                peak.fetch_max(kib, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        Self {
            peak_kib,
            stop,
            thread: Some(thread),
        }
    }

    /// The peak so far, in MiB.
    fn peak_mib(&self) -> u64 {
        self.peak_kib.load(Ordering::Relaxed) / 1024
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A `freehint receive --insecure` process; its address, stdout and log.
fn start_receiver(dir: &Path) -> (Child, SocketAddr, BufReader<ChildStdout>) {
    let mut receiver = Command::new(bin_dir().join("freehint"))
        .args(["receive", "--listen", "127.0.0.1:0", "--json", "--insecure"])
        .args([
            "--mem-mib",
            &MEM_MIB.to_string(),
            "--accept-timeout-s",
            "60",
        ])
        .arg("--ram")
        .arg(dir.join("dst.ram"))
        .env("FREEHINT_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("receive.log")).unwrap())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(receiver.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("receiver said {line:?}"))
        .parse()
        .unwrap();
    (receiver, addr, out)
}

fn layout() -> Vec<RegionDesc> {
    vec![RegionDesc {
        ram_start: 0,
        size_bytes: MEM_MIB << 20,
        page_bytes: 4096,
    }]
}

fn hello(role: ChannelRole, bulk_channels: u8) -> Vec<u8> {
    let mut b = Vec::new();
    Message::Hello(Hello {
        session_id: 99,
        role,
        bulk_channels,
        peer_timeout_s: 20,
        regions: layout(),
        postcopy: false,
        postcopy_required: false,
        resume: false,
    })
    .encode(&mut b);
    b
}

/// A frame header announcing a hello of `payload_bytes`.
fn hello_header(payload_bytes: u64) -> [u8; 16] {
    FrameHeader {
        kind: Kind::Hello,
        payload_bytes,
    }
    .encode()
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("receive.log")).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announced_frames_and_idle_connections_hold_no_memory_and_the_real_source_migrates() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let (mut receiver, addr, mut out) = start_receiver(dir.path());
    let rss = RssSampler::start(receiver.id());

    // 64 connections, each announcing the largest control frame there is,
    // then silent: they are refused at the header.
    let announced: Vec<TcpStream> = (0..64)
        .map(|_| {
            let mut s = connect(addr);
            s.write_all(&hello_header(MAX_CONTROL_PAYLOAD_BYTES as u64))
                .unwrap();
            s
        })
        .collect();
    wait_for(
        "64 oversized hellos refused",
        Duration::from_secs(20),
        || log(dir.path()).matches("where at most").count() >= 64,
    );
    drop(announced);

    // 64 slow hellos, half sent, and 100 connections that say nothing:
    // at most 64 wait at once, each holding what it has sent.
    let mut idle: Vec<TcpStream> = (0..64)
        .map(|_| {
            let mut s = connect(addr);
            s.write_all(&hello_header(60 << 10)).unwrap();
            s.write_all(&[0u8; 30 << 10]).unwrap();
            s
        })
        .collect();
    idle.extend((0..100).map(|_| connect(addr)));
    wait_for(
        "connections over the limit closed",
        Duration::from_secs(20),
        || log(dir.path()).matches("already wait to say hello").count() >= 100,
    );
    drop(idle);

    // A source announcing 255 bulk channels is told why it is turned away
    // (once the closed slow hellos have left the destination's 64 places:
    // until then a new connection is closed unanswered).
    let mut answer = String::new();
    for _ in 0..100 {
        let mut greedy = connect(addr);
        greedy.write_all(&hello(ChannelRole::Control, 255)).unwrap();
        let mut bytes = Vec::new();
        let _ = greedy.read_to_end(&mut bytes);
        answer = String::from_utf8_lossy(&bytes).into_owned();
        if !answer.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(answer.contains("bulk channels"), "{answer:?}");
    assert!(
        receiver.try_wait().unwrap().is_none(),
        "the destination gave up: {}",
        log(dir.path())
    );

    // The real source: the migration completes, page by page equal.
    let sim = SimVm::start(MEM_MIB, 32);
    let ram = Arc::new(GuestRam::open_file(&sim.ram_path, MEM_MIB << 20).unwrap());
    let log_dirty =
        UffdWpDirtyLog::attach_process(sim.pid, vmm_ram_ranges(sim.pid, &ram).unwrap()).unwrap();
    let filter = Arc::new(HintFilter::new(empty_bitmap(&ram)));
    let params = MigrationParams {
        peer_timeout_s: 10,
        mode: MigrationMode::Precopy,
        ..Default::default()
    };
    let sender = PrecopySender::new(
        ram,
        filter,
        Box::new(log_dirty),
        None,
        sim.client.clone(),
        params,
    )
    .unwrap();
    let stats = sender.migrate(addr).await.unwrap();
    assert_eq!(stats.state, Phase::Completed, "{stats:?}");
    let peak = rss.peak_mib();
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert!(receiver.wait().unwrap().success(), "{}", log(dir.path()));
    drop(rss);
    let (src, dst) = (
        std::fs::read(&sim.ram_path).unwrap(),
        std::fs::read(dir.path().join("dst.ram")).unwrap(),
    );
    let differ = src
        .chunks(4096)
        .zip(dst.chunks(4096))
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(differ, 0, "pages differ after the hostile peers");
    eprintln!("destination's peak anonymous memory: {peak} MiB");
    assert!(
        peak <= RSS_ANON_BOUND_MIB,
        "the destination held {peak} MiB of anonymous memory (bound {RSS_ANON_BOUND_MIB} MiB)"
    );
}

#[test]
fn sixteen_channels_of_the_largest_batches_stay_bounded_and_a_vanishing_source_is_a_clear_error() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let (mut receiver, addr, _out) = start_receiver(dir.path());
    let rss = RssSampler::start(receiver.id());
    const CHANNELS: u8 = 16;
    let open = |role| {
        let mut s = connect(addr);
        s.write_all(&hello(role, CHANNELS)).unwrap();
        let mut ack = [0u8; 24];
        s.read_exact(&mut ack).unwrap();
        s
    };
    let control = open(ChannelRole::Control);
    let bulk: Vec<TcpStream> = (0..CHANNELS).map(|i| open(ChannelRole::Bulk(i))).collect();
    // Every channel at once: a batch of the most pages a batch may hold
    // (4096 pages, 16 MiB), each channel from its own start, wrapping
    // around RAM.
    let pages = (MEM_MIB << 20) / 4096;
    std::thread::scope(|scope| {
        for (i, mut b) in bulk.iter().enumerate() {
            scope.spawn(move || {
                let first = (i as u64 * 4096) % pages;
                let mut head = PageBatchHead::new(0);
                head.push_data(first);
                for _ in 1..4096 {
                    head.push_data((first + head.pages()) % pages);
                }
                let mut f = Vec::new();
                head.encode(4096, &mut f);
                f.resize(f.len() + 4096 * 4096, i as u8 + 1);
                let _ = b.write_all(&f);
            });
        }
    });
    // Then the source vanishes.
    drop(bulk);
    drop(control);
    let status = receiver.wait().unwrap();
    let peak = rss.peak_mib();
    drop(rss);
    let text = log(dir.path());
    assert!(!status.success(), "the destination succeeded: {text}");
    assert!(
        text.contains("disconnected") || text.contains("closed"),
        "no clear error: {text}"
    );
    eprintln!("destination's peak anonymous memory: {peak} MiB");
    assert!(
        peak <= RSS_ANON_BOUND_MIB,
        "the destination held {peak} MiB of anonymous memory (bound {RSS_ANON_BOUND_MIB} MiB)"
    );
}
