//! Misbehaving peers on real TCP sockets: each gets a clear error, the
//! destination VM is never resumed on partial memory, and the source VM
//! (a SIMULATED VM process) keeps running.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use freehint_dirty_log::UffdWpDirtyLog;
use freehint_e2e::SimVm;
use freehint_engine::{
    empty_bitmap, vmm_ram_ranges, DestinationVmm, MigrateError, MigrationParams, PrecopySender,
    Receiver, VmmError,
};
use freehint_hint_filter::HintFilter;
use freehint_memory::GuestRam;
use freehint_wire::{ChannelRole, FrameHeader, Hello, Kind, Message, PageBatchHead, RegionDesc};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Test double for the destination VMM: counts resumes.
#[derive(Default)]
struct CountingVmm {
    resumed: AtomicU32,
}

impl DestinationVmm for CountingVmm {
    fn load_device_state(&self, _: &[u8]) -> Result<(), VmmError> {
        Ok(())
    }
    fn resume(&self) -> Result<(), VmmError> {
        self.resumed.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

const MEM: u64 = 16 << 20;

fn layout() -> Vec<RegionDesc> {
    vec![RegionDesc {
        gpa_start: 0,
        size_bytes: MEM,
        page_bytes: 4096,
    }]
}

fn hello(role: ChannelRole, regions: Vec<RegionDesc>) -> Vec<u8> {
    let mut b = Vec::new();
    Message::Hello(Hello {
        session_id: 42,
        role,
        bulk_channels: 1,
        regions,
    })
    .encode(&mut b);
    b
}

/// Runs a receiver and a scripted source; returns the receiver's error and
/// how often it resumed the VM.
async fn receive_from(
    script: impl FnOnce(std::net::SocketAddr) -> tokio::task::JoinHandle<()>,
) -> (MigrateError, u32) {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let ram = Arc::new(GuestRam::open_file(&dir.path().join("dst.ram"), MEM).unwrap());
    let vmm = Arc::new(CountingVmm::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let source = script(addr);
    let r = Receiver::new(ram, vmm.clone(), Duration::from_secs(5));
    let err = r
        .receive(&listener)
        .await
        .expect_err("the receiver must refuse");
    source.abort();
    (err, vmm.resumed.load(Ordering::SeqCst))
}

async fn connect_both(addr: std::net::SocketAddr) -> (TcpStream, TcpStream) {
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(&hello(ChannelRole::Control, layout()))
        .await
        .unwrap();
    let mut ack = [0u8; 16];
    c.read_exact(&mut ack).await.unwrap();
    let mut b = TcpStream::connect(addr).await.unwrap();
    b.write_all(&hello(ChannelRole::Bulk(0), layout()))
        .await
        .unwrap();
    b.read_exact(&mut ack).await.unwrap();
    (c, b)
}

#[tokio::test]
async fn garbage_instead_of_a_frame() {
    let (e, resumed) = receive_from(|addr| {
        tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
            tokio::time::sleep(Duration::from_secs(10)).await;
        })
    })
    .await;
    assert!(e.to_string().contains("bad frame magic"), "{e}");
    assert_eq!(resumed, 0);
}

#[tokio::test]
async fn wrong_protocol_version() {
    let (e, _) = receive_from(|addr| {
        tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let mut h = hello(ChannelRole::Control, layout());
            h[4] = 7;
            s.write_all(&h).await.unwrap();
            tokio::time::sleep(Duration::from_secs(10)).await;
        })
    })
    .await;
    assert!(e.to_string().contains("protocol version 7"), "{e}");
}

#[tokio::test]
async fn different_ram_layout() {
    let (e, _) = receive_from(|addr| {
        tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let other = vec![RegionDesc {
                gpa_start: 0,
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
    assert!(matches!(e, MigrateError::Layout(_)), "{e}");
}

#[tokio::test]
async fn page_beyond_ram() {
    let (e, resumed) = receive_from(|addr| {
        tokio::spawn(async move {
            let (_c, mut b) = connect_both(addr).await;
            let head = PageBatchHead {
                region: 0,
                entries: vec![MEM / 4096],
            };
            let mut f = Vec::new();
            head.encode(4096, &mut f);
            f.extend_from_slice(&[1u8; 4096]);
            b.write_all(&f).await.unwrap();
            tokio::time::sleep(Duration::from_secs(10)).await;
        })
    })
    .await;
    assert!(e.to_string().contains("beyond region"), "{e}");
    assert_eq!(resumed, 0);
}

#[tokio::test]
async fn truncated_frame_then_disconnect() {
    let (e, resumed) = receive_from(|addr| {
        tokio::spawn(async move {
            let (c, mut b) = connect_both(addr).await;
            let head = PageBatchHead {
                region: 0,
                entries: vec![1, 2],
            };
            let mut f = Vec::new();
            head.encode(4096, &mut f);
            f.extend_from_slice(&[1u8; 4096 + 100]); // 2 pages promised
            b.write_all(&f).await.unwrap();
            drop(b);
            drop(c);
        })
    })
    .await;
    let msg = e.to_string();
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
            let head = PageBatchHead {
                region: 0,
                entries: vec![1],
            };
            let mut f = Vec::new();
            head.encode(4096, &mut f);
            f.extend_from_slice(&[1u8; 4096]);
            b.write_all(&f).await.unwrap();
            drop(b);
            drop(c);
        })
    })
    .await;
    assert!(e.to_string().contains("before completing"), "{e}");
    assert_eq!(resumed, 0);
}

// ---- a misbehaving destination, with a real (simulated) source VM ----

fn sender_for(sim: &SimVm) -> PrecopySender {
    let ram = Arc::new(GuestRam::open_file(&sim.ram_path, 64 << 20).unwrap());
    let ranges = vmm_ram_ranges(sim.pid, &ram).unwrap();
    let log = UffdWpDirtyLog::attach_process(sim.pid, ranges).unwrap();
    let filter = Arc::new(HintFilter::new(empty_bitmap(&ram)));
    *sim.sink.lock().unwrap() = Some(filter.clone());
    let params = MigrationParams {
        peer_timeout_s: 5,
        bulk_channels: 1,
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
    let a = std::fs::read(&sim.ram_path).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let b = std::fs::read(&sim.ram_path).unwrap();
    assert_ne!(a, b, "the source VM is not running");
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
    assert!(e.to_string().contains("connecting to"), "{e}");
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
        ack[4] = 2;
        s.write_all(&ack).await.unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
    });
    let e = sender_for(&sim).migrate(addr).await.unwrap_err();
    assert!(e.to_string().contains("protocol version 2"), "{e}");
    assert_running(&sim);
}

/// Acks hellos, then reads bulk data; `on_complete` decides what happens
/// at the end.
async fn fake_destination(l: TcpListener, fail_at_end: bool) {
    let (mut c, _) = l.accept().await.unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let n = c.read(&mut buf).await.unwrap();
    assert!(n > 0);
    let mut ack = Vec::new();
    Message::HelloAck.encode(&mut ack);
    c.write_all(&ack).await.unwrap();
    let (mut b, _) = l.accept().await.unwrap();
    let _ = b.read(&mut buf).await.unwrap();
    b.write_all(&ack).await.unwrap();
    if !fail_at_end {
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
    let mut err = Vec::new();
    Message::Error("destination disk full".into()).encode(&mut err);
    c.write_all(&err).await.unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_disconnects_mid_round() {
    let sim = SimVm::start(64, 64);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(fake_destination(l, false));
    let e = sender_for(&sim).migrate(addr).await.unwrap_err();
    assert!(
        matches!(e, MigrateError::Io { .. } | MigrateError::Unexpected(_)),
        "{e}"
    );
    assert_running(&sim);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_fails_after_switchover_and_the_source_resumes() {
    let sim = SimVm::start(64, 64);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(fake_destination(l, true));
    let e = sender_for(&sim).migrate(addr).await.unwrap_err();
    assert!(e.to_string().contains("destination disk full"), "{e}");
    // The VM had been stopped for the final round: it must run again.
    assert!(
        sim.client.free_at_stop().is_some(),
        "the VM was never stopped"
    );
    assert_running(&sim);
}
