//! Misbehaving peers on real TCP sockets: each gets a clear error, the
//! destination VM is never resumed on partial memory, and the source VM
//! (a SIMULATED VM process) keeps running.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use freehint_dirty_log::UffdWpDirtyLog;
use freehint_e2e::SimVm;
use freehint_engine::{
    empty_bitmap, vmm_ram_ranges, MigrateError, MigrationMode, MigrationParams, Phase,
    PrecopySender, ReceiveFailure, Receiver,
};
use freehint_hint_filter::{HintFilter, IdentityMappedSink};
use freehint_memory::GuestRam;
use freehint_types::{DestinationVmm, ErrorChain, VmmError};
use freehint_wire::{
    ChannelRole, DeviceStateEncoding, FrameHeader, Hello, Kind, Message, PageBatchHead, RegionDesc,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Test double for the destination VMM: counts resumes.
#[derive(Default)]
struct CountingVmm {
    resumed: AtomicU32,
}

impl DestinationVmm for CountingVmm {
    fn load_device_state(&self, _: &[u8], _: Duration) -> Result<(), VmmError> {
        Ok(())
    }
    fn resume(&self) -> Result<(), VmmError> {
        self.resumed.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

const MEM: u64 = 16 << 20;

/// A `HelloAck` frame: header and its flags word.
const ACK_BYTES: usize = 24;

fn layout() -> Vec<RegionDesc> {
    vec![RegionDesc {
        ram_start: 0,
        size_bytes: MEM,
        page_bytes: 4096,
    }]
}

fn hello(role: ChannelRole, regions: Vec<RegionDesc>) -> Vec<u8> {
    hello_with(role, regions, 5)
}

fn hello_with(role: ChannelRole, regions: Vec<RegionDesc>, peer_timeout_s: u32) -> Vec<u8> {
    let mut b = Vec::new();
    Message::Hello(Hello {
        session_id: 42,
        role,
        bulk_channels: 1,
        peer_timeout_s,
        regions,
        postcopy: false,
        postcopy_required: false,
        resume: false,
    })
    .encode(&mut b);
    b
}

fn frame(m: Message) -> Vec<u8> {
    let mut b = Vec::new();
    m.encode(&mut b);
    b
}

/// Runs a receiver and a scripted source; returns the receiver's failure
/// and how often it resumed the VM.
async fn receive_failure(
    script: impl FnOnce(std::net::SocketAddr) -> tokio::task::JoinHandle<()>,
) -> (ReceiveFailure, u32) {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let ram = Arc::new(GuestRam::open_file(&dir.path().join("dst.ram"), MEM).unwrap());
    let vmm = Arc::new(CountingVmm::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let source = script(addr);
    let r = Receiver::new(ram, vmm.clone(), Some(Duration::from_secs(5)));
    let failure = r
        .receive(&listener)
        .await
        .expect_err("the receiver must refuse");
    source.abort();
    (failure, vmm.resumed.load(Ordering::SeqCst))
}

/// [`receive_failure`] for cases where the receiver must simply fail:
/// returns its error and how often it resumed.
async fn receive_from(
    script: impl FnOnce(std::net::SocketAddr) -> tokio::task::JoinHandle<()>,
) -> (MigrateError, u32) {
    let (f, resumed) = receive_failure(script).await;
    assert_eq!(f.stats.state, Phase::Failed, "{f}");
    assert!(!f.stats.destination_running);
    (f.error, resumed)
}

/// Opens one channel: connects, sends `hello` and reads the receiver's ack.
async fn open_channel(addr: std::net::SocketAddr, hello: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(hello).await.unwrap();
    let mut ack = [0u8; ACK_BYTES];
    s.read_exact(&mut ack).await.unwrap();
    s
}

async fn connect_both(addr: std::net::SocketAddr) -> (TcpStream, TcpStream) {
    let c = open_channel(addr, &hello(ChannelRole::Control, layout())).await;
    let b = open_channel(addr, &hello(ChannelRole::Bulk(0), layout())).await;
    (c, b)
}

/// Sends `first` as a first connection, and returns what the receiver
/// answered (it turns such a peer away and goes on waiting for a source).
async fn turned_away(first: Vec<u8>) -> String {
    let (answer_tx, answer_rx) = tokio::sync::oneshot::channel();
    let (e, resumed) = receive_from(move |addr| {
        tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(&first).await.unwrap();
            let mut answer = Vec::new();
            let _ = s.read_to_end(&mut answer).await;
            let _ = answer_tx.send(String::from_utf8_lossy(&answer).into_owned());
            tokio::time::sleep(Duration::from_secs(10)).await;
        })
    })
    .await;
    // It waited on for a real source until its accept timeout.
    assert!(
        matches!(e, MigrateError::Timeout { .. }),
        "{}",
        ErrorChain(&e)
    );
    assert_eq!(resumed, 0);
    answer_rx.await.unwrap()
}

#[tokio::test]
async fn garbage_instead_of_a_frame_is_turned_away() {
    let answer = turned_away(b"GET / HTTP/1.1\r\n\r\n".to_vec()).await;
    assert!(answer.contains("bad frame magic"), "{answer}");
}

#[tokio::test]
async fn a_wrong_protocol_version_is_turned_away_with_its_reason() {
    let mut h = hello(ChannelRole::Control, layout());
    let other = freehint_wire::PROTOCOL_VERSION + 1;
    h[4..6].copy_from_slice(&other.to_le_bytes());
    let answer = turned_away(h).await;
    assert!(
        answer.contains(&format!("protocol version {other}")),
        "{answer}"
    );
}

#[tokio::test]
async fn a_source_announcing_255_bulk_channels_is_turned_away() {
    let mut b = Vec::new();
    Message::Hello(Hello {
        session_id: 42,
        role: ChannelRole::Control,
        bulk_channels: 255,
        peer_timeout_s: 5,
        regions: layout(),
        postcopy: false,
        postcopy_required: false,
        resume: false,
    })
    .encode(&mut b);
    let answer = turned_away(b).await;
    assert!(
        answer.contains("255 bulk channels announced, at most 16"),
        "{answer}"
    );
}

/// Connections that say nothing, before the source and between its control
/// and bulk channels, hold up neither: each hello is read on its own.
#[tokio::test]
async fn silent_connections_do_not_hold_up_the_real_source() {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let (_e, resumed) = receive_from(move |addr| {
        tokio::spawn(async move {
            let _silent = TcpStream::connect(addr).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            let t = std::time::Instant::now();
            let _c = open_channel(addr, &hello(ChannelRole::Control, layout())).await;
            let _silent_too = TcpStream::connect(addr).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _b = open_channel(addr, &hello(ChannelRole::Bulk(0), layout())).await;
            let _ = done_tx.send(t.elapsed());
            // The source then goes away: the receiver fails, as it must.
        })
    })
    .await;
    assert_eq!(resumed, 0);
    let took = done_rx.await.expect("both channels were accepted");
    assert!(
        took < Duration::from_secs(2),
        "the silent connections held the source up for {took:?}"
    );
}

#[tokio::test]
async fn different_ram_layout() {
    let (e, _) = receive_from(|addr| {
        tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let other = vec![RegionDesc {
                ram_start: 0,
                size_bytes: 2 * MEM,
                page_bytes: 4096,
            }];
            s.write_all(&hello(ChannelRole::Control, other))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_secs(10)).await;
        })
    })
    .await;
    assert!(matches!(e, MigrateError::Layout(_)), "{}", ErrorChain(&e));
}

#[tokio::test]
async fn page_beyond_ram() {
    let (e, resumed) = receive_from(|addr| {
        tokio::spawn(async move {
            let (_c, mut b) = connect_both(addr).await;
            let mut head = PageBatchHead::new(0);
            head.push_data(MEM / 4096);
            let mut f = Vec::new();
            head.encode(4096, &mut f);
            f.extend_from_slice(&[1u8; 4096]);
            b.write_all(&f).await.unwrap();
            tokio::time::sleep(Duration::from_secs(10)).await;
        })
    })
    .await;
    assert!(
        ErrorChain(&e).to_string().contains("beyond region"),
        "{}",
        ErrorChain(&e)
    );
    assert_eq!(resumed, 0);
}

#[tokio::test]
async fn truncated_frame_then_disconnect() {
    let (e, resumed) = receive_from(|addr| {
        tokio::spawn(async move {
            let (c, mut b) = connect_both(addr).await;
            let mut head = PageBatchHead::new(0);
            head.push_data(1);
            head.push_data(2);
            let mut f = Vec::new();
            head.encode(4096, &mut f);
            f.extend_from_slice(&[1u8; 4096 + 100]); // 2 pages promised
            b.write_all(&f).await.unwrap();
            drop(b);
            drop(c);
        })
    })
    .await;
    let msg = ErrorChain(&e).to_string();
    assert!(
        msg.contains("truncated") || msg.contains("disconnected"),
        "{msg}"
    );
    assert_eq!(resumed, 0);
}

#[tokio::test]
async fn source_disconnects_mid_round() {
    let (e, resumed) = receive_from(|addr| {
        tokio::spawn(async move {
            let (c, mut b) = connect_both(addr).await;
            let mut head = PageBatchHead::new(0);
            head.push_data(1);
            let mut f = Vec::new();
            head.encode(4096, &mut f);
            f.extend_from_slice(&[1u8; 4096]);
            b.write_all(&f).await.unwrap();
            drop(b);
            drop(c);
        })
    })
    .await;
    assert!(
        ErrorChain(&e).to_string().contains("before completing"),
        "{}",
        ErrorChain(&e)
    );
    assert_eq!(resumed, 0);
}

// ---- a misbehaving destination, with a real (simulated) source VM ----

fn sender_for(sim: &SimVm) -> PrecopySender {
    sender_in_mode(sim, MigrationMode::default())
}

fn sender_in_mode(sim: &SimVm, mode: MigrationMode) -> PrecopySender {
    let ram = Arc::new(GuestRam::open_file(&sim.ram_path, 64 << 20).unwrap());
    let ranges = vmm_ram_ranges(sim.pid, &ram).unwrap();
    let log = UffdWpDirtyLog::attach_process(sim.pid, ranges).unwrap();
    let filter = Arc::new(HintFilter::new(empty_bitmap(&ram)));
    *sim.sink.lock().unwrap() = Some(Arc::new(IdentityMappedSink(filter.clone())));
    let params = MigrationParams {
        peer_timeout_s: 5,
        bulk_channels: 1,
        mode,
        ..Default::default()
    };
    PrecopySender::new(
        ram,
        filter,
        Box::new(log),
        Some(sim.client.clone()),
        sim.client.clone(),
        params,
    )
    .unwrap()
}

/// The simulated guest is still running: its memory keeps changing.
fn assert_running(sim: &SimVm) {
    assert!(sim.client.running(), "the source VM was left paused");
    let a = std::fs::read(&sim.ram_path).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let b = std::fs::read(&sim.ram_path).unwrap();
    assert_ne!(a, b, "the source VM is not running");
}

/// The sender reports a failed migration with the source running and the
/// destination not.
fn assert_failed_back(stats: &freehint_engine::MigrationStats) {
    assert_eq!(stats.state, Phase::Failed, "{stats:?}");
    assert!(stats.source_running, "{stats:?}");
    assert_eq!(stats.destination_running, Some(false), "{stats:?}");
}

/// A destination that cannot run the guest before its RAM has arrived
/// (here: no VMM process at all) answers a hybrid migration without
/// postcopy, and it completes as precopy; `--mode postcopy` it refuses,
/// saying why, and the source runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_without_postcopy_keeps_hybrid_precopy_and_refuses_postcopy() {
    for mode in [MigrationMode::Hybrid, MigrationMode::Postcopy] {
        let sim = SimVm::start(64, 64);
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let ram = Arc::new(GuestRam::open_file(&dir.path().join("dst.ram"), 64 << 20).unwrap());
        let vmm = Arc::new(CountingVmm::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let receiver = Receiver::new(ram, vmm.clone(), Some(Duration::from_secs(5)));
        let (sent, received) = tokio::join!(
            sender_in_mode(&sim, mode).migrate(addr),
            receiver.receive(&listener)
        );
        match mode {
            MigrationMode::Hybrid => {
                let stats = sent.unwrap();
                assert!(!stats.postcopy.switched, "{stats:?}");
                assert!(!received.unwrap().postcopy.switched);
                assert_eq!(vmm.resumed.load(Ordering::SeqCst), 1);
            }
            _ => {
                let e = sent.unwrap_err();
                let text = ErrorChain(&e).to_string();
                assert!(
                    text.contains("postcopy refused") && text.contains("cannot run the guest"),
                    "{text}"
                );
                assert_failed_back(&e.stats);
                assert_running(&sim);
                assert!(received.is_err());
                assert_eq!(vmm.resumed.load(Ordering::SeqCst), 0);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_unreachable() {
    let sim = SimVm::start(64, 64);
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let e = sender_for(&sim).migrate(closed).await.unwrap_err();
    assert!(
        ErrorChain(&e).to_string().contains("connecting to"),
        "{}",
        ErrorChain(&e)
    );
    assert_failed_back(&e.stats);
    assert_running(&sim);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_speaks_another_version() {
    let sim = SimVm::start(64, 64);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut h = [0u8; 1024];
        let _ = s.read(&mut h).await;
        let mut ack = FrameHeader {
            kind: Kind::HelloAck,
            payload_bytes: 0,
        }
        .encode();
        ack[4] = 9;
        s.write_all(&ack).await.unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
    });
    let e = sender_for(&sim).migrate(addr).await.unwrap_err();
    assert!(
        ErrorChain(&e).to_string().contains("protocol version 9"),
        "{}",
        ErrorChain(&e)
    );
    assert_failed_back(&e.stats);
    assert_running(&sim);
}

/// What a fake destination does once the source sent `Complete`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum AtEnd {
    /// Stop reading in the middle of the first round, connections open.
    StopReading,
    /// Vanish mid-round (before `Complete`).
    VanishMidRound,
    /// Refuse with an error instead of `Ready`.
    Refuse,
    /// Say `Ready`, read the commit, then vanish without `Resumed`.
    VanishAfterReady,
}

/// Acks hellos, then reads bulk data; `at_end` decides what happens at the
/// end.
async fn fake_destination(l: TcpListener, at_end: AtEnd) {
    let (mut c, _) = l.accept().await.unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let n = c.read(&mut buf).await.unwrap();
    assert!(n > 0);
    let mut ack = Vec::new();
    Message::HelloAck { postcopy: false }.encode(&mut ack);
    c.write_all(&ack).await.unwrap();
    let (mut b, _) = l.accept().await.unwrap();
    let _ = b.read(&mut buf).await.unwrap();
    b.write_all(&ack).await.unwrap();
    if at_end == AtEnd::StopReading {
        let mut got = 0;
        while got < 1 << 20 {
            got += b.read(&mut buf).await.unwrap();
        }
        // Hold both connections open and read nothing more.
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop((b, c));
        return;
    }
    if at_end == AtEnd::VanishMidRound {
        // Take a few MiB of the first round, then vanish.
        let mut got = 0;
        while got < 4 << 20 {
            got += b.read(&mut buf).await.unwrap();
        }
        return;
    }
    tokio::spawn(async move { while b.read(&mut buf).await.map(|n| n > 0).unwrap_or(false) {} });
    // Wait for the Complete on control, then refuse.
    let mut cbuf = vec![0u8; 4096];
    let mut seen = Vec::new();
    loop {
        let n = c.read(&mut cbuf).await.unwrap();
        assert!(n > 0, "source closed control before completing");
        seen.extend_from_slice(&cbuf[..n]);
        if seen
            .windows(2)
            .any(|w| w == (Kind::Complete as u16).to_le_bytes())
            && seen.len() >= 40
        {
            break;
        }
    }
    if at_end == AtEnd::VanishAfterReady {
        c.write_all(&frame(Message::Ready)).await.unwrap();
        // Read until the commit arrives, then vanish.
        let want = (Kind::Commit as u16).to_le_bytes();
        let mut seen = Vec::new();
        while !seen.windows(2).any(|w| w == want) {
            let n = c.read(&mut cbuf).await.unwrap();
            assert!(n > 0, "source closed control instead of committing");
            seen.extend_from_slice(&cbuf[..n]);
        }
        return;
    }
    c.write_all(&frame(Message::Error("destination disk full".into())))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_disconnects_mid_round() {
    let sim = SimVm::start(64, 64);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(fake_destination(l, AtEnd::VanishMidRound));
    let e = sender_for(&sim).migrate(addr).await.unwrap_err();
    assert!(
        matches!(
            e.error,
            MigrateError::Io { .. } | MigrateError::Unexpected(_)
        ),
        "{e}"
    );
    assert_failed_back(&e.stats);
    assert_running(&sim);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_stops_reading_is_given_up_within_the_timeout() {
    let sim = SimVm::start(64, 64);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(fake_destination(l, AtEnd::StopReading));
    let t = std::time::Instant::now();
    let e = sender_for(&sim).migrate(addr).await.unwrap_err();
    assert!(
        matches!(e.error, MigrateError::Timeout { .. }),
        "{}",
        ErrorChain(&e)
    );
    // peer_timeout_s is 5: a write that cannot go on fails after it.
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    assert_failed_back(&e.stats);
    assert_running(&sim);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_fails_after_switchover_and_the_source_resumes() {
    let sim = SimVm::start(64, 64);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(fake_destination(l, AtEnd::Refuse));
    let e = sender_for(&sim).migrate(addr).await.unwrap_err();
    assert!(
        ErrorChain(&e).to_string().contains("destination disk full"),
        "{}",
        ErrorChain(&e)
    );
    // The VM had been stopped for the final round: it must run again.
    assert!(
        sim.client.free_at_stop().is_some(),
        "the VM was never stopped"
    );
    assert_failed_back(&e.stats);
    assert_running(&sim);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_lost_after_the_commit_leaves_the_source_paused_and_uncertain() {
    let sim = SimVm::start(64, 64);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(fake_destination(l, AtEnd::VanishAfterReady));
    let e = sender_for(&sim).migrate(addr).await.unwrap_err();
    assert_eq!(e.stats.state, Phase::Uncertain, "{e}");
    assert!(!e.stats.source_running);
    assert_eq!(e.stats.destination_running, None);
    assert!(
        ErrorChain(&e).to_string().contains("uncertain"),
        "{}",
        ErrorChain(&e)
    );
    // A committed source never resumes on its own.
    assert!(!sim.client.running(), "the source resumed after its commit");
    let a = std::fs::read(&sim.ram_path).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        a,
        std::fs::read(&sim.ram_path).unwrap(),
        "the source VM runs"
    );
}

// ---- the handover, seen by the destination ----

/// A scripted source that sends a whole (empty) migration up to
/// `Complete`, then reads `Ready` and runs `then` on the control channel.
/// With `stray`, a connection of another session arrives between its
/// control and bulk channels.
fn scripted_source(
    stray: bool,
    then: impl FnOnce(TcpStream) -> tokio::task::JoinHandle<()> + Send + 'static,
) -> impl FnOnce(std::net::SocketAddr) -> tokio::task::JoinHandle<()> {
    move |addr| {
        tokio::spawn(async move {
            let mut c = open_channel(addr, &hello(ChannelRole::Control, layout())).await;
            if stray {
                let mut s = TcpStream::connect(addr).await.unwrap();
                let mut h = Vec::new();
                Message::Hello(Hello {
                    session_id: 7,
                    role: ChannelRole::Bulk(0),
                    bulk_channels: 1,
                    peer_timeout_s: 5,
                    regions: layout(),
                    postcopy: false,
                    postcopy_required: false,
                    resume: false,
                })
                .encode(&mut h);
                s.write_all(&h).await.unwrap();
                let mut answer = Vec::new();
                let _ = s.read_to_end(&mut answer).await;
                assert!(
                    String::from_utf8_lossy(&answer).contains("another migration session"),
                    "the stray connection was not turned away"
                );
            }
            let mut b = open_channel(addr, &hello(ChannelRole::Bulk(0), layout())).await;
            b.write_all(&frame(Message::RoundEnd { round: 1 }))
                .await
                .unwrap();
            drop(b);
            c.write_all(&frame(Message::Stopping)).await.unwrap();
            c.write_all(&frame(Message::Complete {
                rounds: 1,
                device_state_bytes: 0,
                device_state_encoding: DeviceStateEncoding::Raw,
                last_cmd_id: 9,
            }))
            .await
            .unwrap();
            let mut ready = [0u8; 16];
            c.read_exact(&mut ready).await.unwrap();
            assert_eq!(
                FrameHeader::decode(&ready).unwrap().kind,
                Kind::Ready,
                "the destination did not say Ready"
            );
            then(c).await.unwrap();
        })
    }
}

/// [`scripted_source`] without a stray connection.
fn source_until_ready(
    then: impl FnOnce(TcpStream) -> tokio::task::JoinHandle<()> + Send + 'static,
) -> impl FnOnce(std::net::SocketAddr) -> tokio::task::JoinHandle<()> {
    scripted_source(false, then)
}

/// Commits and checks the destination's `Resumed`.
fn commit_and_expect_resumed(mut c: TcpStream) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        c.write_all(&frame(Message::Commit)).await.unwrap();
        let mut resumed = [0u8; 16];
        c.read_exact(&mut resumed).await.unwrap();
        assert_eq!(FrameHeader::decode(&resumed).unwrap().kind, Kind::Resumed);
    })
}

/// Receives from `source` into a fresh RAM file; the receiver's stats and
/// how often it resumed.
async fn receive_ok(
    source: impl FnOnce(std::net::SocketAddr) -> tokio::task::JoinHandle<()>,
) -> (freehint_engine::ReceiveStats, u32) {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let ram = Arc::new(GuestRam::open_file(&dir.path().join("dst.ram"), MEM).unwrap());
    let vmm = Arc::new(CountingVmm::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let source = source(listener.local_addr().unwrap());
    let stats = Receiver::new(ram, vmm.clone(), Some(Duration::from_secs(5)))
        .receive(&listener)
        .await
        .unwrap();
    source.await.unwrap();
    (stats, vmm.resumed.load(Ordering::SeqCst))
}

#[tokio::test]
async fn a_source_that_vanishes_after_ready_leaves_the_destination_paused_and_uncertain() {
    let (f, resumed) =
        receive_failure(source_until_ready(|c| tokio::spawn(async move { drop(c) }))).await;
    assert_eq!(f.stats.state, Phase::Uncertain, "{f}");
    assert!(f.stats.guest_complete);
    assert_eq!(f.stats.last_cmd_id, Some(9));
    assert!(f.to_string().contains("uncertain"), "{f}");
    assert_eq!(resumed, 0, "resumed without a commit");
}

#[tokio::test]
async fn a_source_that_aborts_after_ready_is_never_resumed_here() {
    let (f, resumed) = receive_failure(source_until_ready(|mut c| {
        tokio::spawn(async move {
            c.write_all(&frame(Message::Error("operator cancelled".into())))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_secs(10)).await;
        })
    }))
    .await;
    assert_eq!(f.stats.state, Phase::Failed, "{f}");
    assert!(f.to_string().contains("operator cancelled"), "{f}");
    assert_eq!(resumed, 0);
}

#[tokio::test]
async fn only_a_commit_resumes_the_destination_once() {
    let (stats, resumed) = receive_ok(source_until_ready(commit_and_expect_resumed)).await;
    assert_eq!(stats.state, Phase::Completed);
    assert!(stats.destination_running);
    assert_eq!(resumed, 1);
}

#[tokio::test]
async fn a_silent_source_is_given_up_after_its_own_timeout() {
    let t = std::time::Instant::now();
    let (e, resumed) = receive_from(|addr| {
        tokio::spawn(async move {
            let _c = open_channel(addr, &hello_with(ChannelRole::Control, layout(), 1)).await;
            let _b = open_channel(addr, &hello_with(ChannelRole::Bulk(0), layout(), 1)).await;
            // Then nothing, on any channel, with both connections open.
            tokio::time::sleep(Duration::from_secs(30)).await;
        })
    })
    .await;
    assert!(
        matches!(e, MigrateError::Timeout { .. }),
        "{}",
        ErrorChain(&e)
    );
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "the 1 s timeout the source asked for was not used"
    );
    assert_eq!(resumed, 0);
}

#[tokio::test]
async fn a_stray_connection_while_bulk_channels_connect_is_turned_away() {
    // A connection of another session arrives between the source's control
    // and bulk channels: it is turned away, and the migration goes on.
    let (stats, resumed) = receive_ok(scripted_source(true, commit_and_expect_resumed)).await;
    assert_eq!(stats.state, Phase::Completed);
    assert_eq!(resumed, 1);
}
