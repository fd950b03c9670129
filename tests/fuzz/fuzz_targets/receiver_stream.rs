//! A source's byte streams as a destination's `Receiver` reads them, on
//! live loopback connections: a control channel and one bulk channel,
//! each opened with a valid hello (so the fuzzer starts past the
//! handshake), then carrying whatever the input says. The first two bytes
//! of the input say how much of the rest goes to the control channel.
//!
//! The receiver must not panic, must end (libFuzzer's `-timeout` catches
//! a hang), and must resume the guest only after a migration it reports
//! as completed.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use freehint_engine::{ImageVmm, Receiver};
use freehint_memory::GuestRam;
use freehint_wire::{ChannelRole, Hello, Message, RegionDesc};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Guest RAM: 16 MiB of 4 KiB pages, one file for every run.
const MEM_BYTES: u64 = 16 << 20;

struct Fixture {
    runtime: tokio::runtime::Runtime,
    ram: Arc<GuestRam>,
    _dir: tempfile::TempDir,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir_in("/dev/shm").expect("a directory in /dev/shm");
        let ram = GuestRam::open_file(&dir.path().join("ram"), MEM_BYTES).expect("guest RAM");
        Fixture {
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime"),
            ram: Arc::new(ram),
            _dir: dir,
        }
    })
}

fn hello(role: ChannelRole) -> Vec<u8> {
    let mut b = Vec::new();
    Message::Hello(Hello {
        session_id: 1,
        role,
        bulk_channels: 1,
        peer_timeout_s: 1,
        regions: vec![RegionDesc {
            ram_start: 0,
            size_bytes: MEM_BYTES,
            page_bytes: 4096,
        }],
        postcopy: false,
        postcopy_required: false,
        resume: false,
    })
    .encode(&mut b);
    b
}

/// Bytes of a `HelloAck` frame: header and its flags word.
const ACK_BYTES: usize = 24;

/// Opens a connection to `addr` and says `hello` on it.
async fn open(addr: std::net::SocketAddr, hello: Vec<u8>) -> Option<TcpStream> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    s.write_all(&hello).await.ok()?;
    Some(s)
}

/// Writes `bytes`, ends our side, and reads whatever the receiver says
/// until it closes.
async fn send(s: Option<TcpStream>, bytes: Vec<u8>) {
    let Some(mut s) = s else {
        return;
    };
    let _ = s.write_all(&bytes).await;
    let _ = s.shutdown().await;
    let mut sink = [0u8; 4096];
    while let Ok(n) = s.read(&mut sink).await {
        if n == 0 {
            break;
        }
    }
}

/// The source: the control channel (once the receiver acknowledged its
/// hello, so the bulk channel is never taken for the first connection),
/// then the bulk channel, then both channels' bytes.
async fn source(addr: std::net::SocketAddr, control: Vec<u8>, bulk: Vec<u8>) {
    let mut c = open(addr, hello(ChannelRole::Control)).await;
    if let Some(s) = c.as_mut() {
        let mut ack = [0u8; ACK_BYTES];
        if s.read_exact(&mut ack).await.is_err() {
            return;
        }
    }
    let b = open(addr, hello(ChannelRole::Bulk(0))).await;
    tokio::join!(send(c, control), send(b, bulk));
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let f = fixture();
    let split = (u16::from_le_bytes([data[0], data[1]]) as usize).min(data.len() - 2);
    let (control, bulk) = data[2..].split_at(split);
    let (control, bulk) = (control.to_vec(), bulk.to_vec());
    f.runtime.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
        let addr = listener.local_addr().expect("its address");
        let vmm = Arc::new(ImageVmm::default());
        let receiver = Receiver::new(f.ram.clone(), vmm.clone(), Some(Duration::from_secs(2)));
        let (received, _) = tokio::join!(
            tokio::time::timeout(Duration::from_secs(10), receiver.receive(&listener)),
            source(addr, control, bulk)
        );
        let received = received.expect("the receiver ended within 10 s");
        assert!(
            !vmm.running() || received.is_ok(),
            "the guest was resumed by a migration that failed: {:?}",
            received.err().map(|f| f.to_string())
        );
    });
});
