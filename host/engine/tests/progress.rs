//! The sender's live progress over a real loopback migration: the figures
//! move while it runs, never go backwards, and end on the stats.

use std::sync::Arc;
use std::time::Duration;

use freehint_dirty_log::{DirtyLog, DirtyLogError};
use freehint_engine::{
    empty_bitmap, ImageVmm, MigrationParams, Phase, PrecopySender, Progress, Receiver,
};
use freehint_hint_filter::HintFilter;
use freehint_memory::GuestRam;
use freehint_types::{PageRun, Vmm, VmmError};

const MEM: u64 = 64 << 20;

/// A guest that rewrites its first 256 pages between every two syncs.
struct Rewrites;

impl DirtyLog for Rewrites {
    fn sync(&mut self, sink: &mut dyn FnMut(PageRun)) -> Result<(), DirtyLogError> {
        sink(PageRun::new(0, 0, 256));
        Ok(())
    }
}

/// A source VM that is only its RAM file.
struct Source;

impl Vmm for Source {
    fn stop(&self) -> Result<(), VmmError> {
        Ok(())
    }
    fn resume(&self) -> Result<(), VmmError> {
        Ok(())
    }
    fn device_state(&self) -> Result<Vec<u8>, VmmError> {
        Ok(vec![7; 1000])
    }
    fn handed_over(&self) -> Result<(), VmmError> {
        Ok(())
    }
}

#[test]
fn progress_follows_a_loopback_migration_and_ends_on_its_stats() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let src_path = dir.path().join("src.ram");
    // 48 MiB of data, the rest a hole.
    std::fs::write(&src_path, vec![0x5a; 48 << 20]).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&src_path)
        .and_then(|f| f.set_len(MEM))
        .unwrap();
    let src = Arc::new(GuestRam::open_file(&src_path, MEM).unwrap());
    let dst = Arc::new(GuestRam::open_file(&dir.path().join("dst.ram"), MEM).unwrap());

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let receiver = Receiver::new(dst, Arc::new(ImageVmm::default()), None);
    let received = rt.spawn(async move { receiver.receive(&listener).await.is_ok() });

    let params = MigrationParams {
        hints: false,
        min_rounds: 3,
        max_rounds: 5,
        ..Default::default()
    };
    let filter = Arc::new(HintFilter::new(empty_bitmap(&src)));
    let sender = PrecopySender::new(
        src,
        filter,
        Box::new(Rewrites),
        None,
        Arc::new(Source),
        params,
    )
    .unwrap();
    let watch = sender.progress_watch();
    let sampler = {
        let watch = watch.clone();
        std::thread::spawn(move || {
            let mut samples: Vec<Progress> = Vec::new();
            loop {
                let p = watch.get();
                let done = p.phase.is_final();
                samples.push(p);
                if done {
                    return samples;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };
    let stats = rt.block_on(sender.migrate(addr)).expect("migration");
    assert!(rt.block_on(received).unwrap(), "the receiver failed");
    let samples = sampler.join().unwrap();

    for w in samples.windows(2) {
        assert!(
            w[1].bytes_sent >= w[0].bytes_sent,
            "bytes_sent went back: {:?} then {:?}",
            w[0],
            w[1]
        );
    }
    assert!(
        samples
            .iter()
            .any(|p| p.phase == Phase::Precopy && p.bytes_sent > 0 && p.bytes_left > 0),
        "no sample saw the precopy under way"
    );
    let last = watch.get();
    assert_eq!(last.phase, Phase::Completed);
    assert_eq!(last.round, stats.rounds);
    assert_eq!(last.bytes_sent, stats.bytes_on_wire);
    assert_eq!(last.bytes_left, 0);
    assert_eq!(last.elapsed_ms, stats.total_time_ms);
    assert_eq!(last.estimated_downtime_ms, stats.downtime_ms);
    assert_eq!(last.guest_ram_bytes, MEM);
}
