//! A hugetlbfs-backed guest (2 MiB pages) migrated with the source memory
//! mapped in this process: page size detected, dirty tracking of this
//! process's own mapping, each huge page sent and placed whole.
//!
//! Needs a hugetlbfs mount with free 2 MiB pages (`make test` sets one up as
//! root). Without one the test says so and passes, unless
//! `FREEHINT_REQUIRE_HUGETLBFS=1` (set in CI), where it fails.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use freehint_dirty_log::{TrackedRange, UffdWpDirtyLog};
use freehint_engine::{empty_bitmap, ImageVmm, MigrationParams, PrecopySender, Receiver};
use freehint_hint_filter::HintFilter;
use freehint_memory::{GuestRam, PageSize};
use freehint_types::{Vmm, VmmError, VmmOp};

const HUGE: u64 = 2 << 20;
const PAGES: u64 = 16;

fn hugetlbfs_mount() -> Option<std::path::PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    let m = mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 3 && f[2] == "hugetlbfs" && !f[3].contains("pagesize=1G"))?;
    let free: u64 =
        std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
            .ok()?
            .trim()
            .parse()
            .ok()?;
    (free >= 2 * PAGES).then(|| m[1].into())
}

/// The "VM": a thread in this process writing huge pages until stopped.
struct WriterVmm {
    stop: Arc<AtomicBool>,
    stopped: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
}

impl Vmm for WriterVmm {
    fn stop(&self) -> Result<(), VmmError> {
        self.stop.store(true, Ordering::SeqCst);
        while !self.stopped.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }
    fn resume(&self) -> Result<(), VmmError> {
        Err(VmmError::new(VmmOp::Resume, "this test VM does not resume"))
    }
    fn device_state(&self) -> Result<Vec<u8>, VmmError> {
        Ok(Vec::new())
    }
    fn handed_over(&self) -> Result<(), VmmError> {
        Ok(())
    }
}

#[test]
fn huge_pages_are_tracked_sent_and_placed_whole() {
    let Some(mount) = hugetlbfs_mount() else {
        assert!(
            std::env::var("FREEHINT_REQUIRE_HUGETLBFS").is_err(),
            "no hugetlbfs mount with {} free 2 MiB pages",
            2 * PAGES
        );
        eprintln!("SKIPPED: no hugetlbfs mount with free 2 MiB pages");
        return;
    };
    let dir = tempfile::tempdir_in(&mount).unwrap();
    let src = Arc::new(GuestRam::open_file(&dir.path().join("src.ram"), PAGES * HUGE).unwrap());
    let dst = Arc::new(GuestRam::open_file(&dir.path().join("dst.ram"), PAGES * HUGE).unwrap());
    let region = &src.regions()[0];
    assert_eq!(region.page_size(), PageSize::HugeTlb { bytes: HUGE });
    assert_eq!(region.pages(), PAGES);
    for p in 0..PAGES {
        // SAFETY: inside the mapping; nothing else runs yet.
        unsafe { std::ptr::write_bytes(region.page_ptr(p).unwrap(), p as u8 + 1, HUGE as usize) };
    }
    let log = UffdWpDirtyLog::attach_self(vec![TrackedRange {
        region: 0,
        vaddr_start: region.host_ptr() as u64,
        len_bytes: region.size_bytes(),
        page_bytes: HUGE,
        first_page: 0,
    }])
    .unwrap();

    let vmm = Arc::new(WriterVmm {
        stop: Arc::new(AtomicBool::new(false)),
        stopped: Arc::new(AtomicBool::new(false)),
        writes: Arc::new(AtomicU64::new(0)),
    });
    let writer = {
        let (stop, stopped, writes, src) = (
            vmm.stop.clone(),
            vmm.stopped.clone(),
            vmm.writes.clone(),
            src.clone(),
        );
        std::thread::spawn(move || {
            let r = &src.regions()[0];
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let p = (i * 7) % PAGES;
                // One byte deep inside the huge page, so a split or partial
                // copy would show.
                // SAFETY: inside the mapping.
                unsafe {
                    r.page_ptr(p)
                        .unwrap()
                        .add(HUGE as usize - 1 - (i % 4096) as usize)
                        .write_volatile(i as u8)
                };
                writes.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_micros(200));
            }
            stopped.store(true, Ordering::SeqCst);
        })
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let stats = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let recv_ram = dst.clone();
        let receiver = tokio::spawn(async move {
            Receiver::new(
                recv_ram,
                Arc::new(ImageVmm::default()),
                Some(Duration::from_secs(10)),
            )
            .receive(&listener)
            .await
        });
        let filter = Arc::new(HintFilter::new(empty_bitmap(&src)));
        let params = MigrationParams {
            min_rounds: 5,
            max_rounds: 6,
            ..Default::default()
        };
        let sender = PrecopySender::new(
            src.clone(),
            filter,
            Box::new(log),
            None,
            vmm.clone(),
            params,
        )
        .unwrap();
        let stats = sender.migrate(addr).await.unwrap();
        receiver.await.unwrap().unwrap();
        stats
    });
    writer.join().unwrap();
    assert!(vmm.writes.load(Ordering::Relaxed) > 0);
    assert_eq!(stats.rounds, 6);
    // Every round after the first resent only the huge pages written, each
    // whole: the page count is in 2 MiB units.
    assert!(
        stats.pages_sent >= PAGES && stats.pages_sent <= PAGES * 6,
        "{stats:?}"
    );
    assert!(stats.bytes_on_wire >= stats.pages_sent * HUGE, "{stats:?}");
    let d = &dst.regions()[0];
    for p in 0..PAGES {
        // SAFETY: both inside their mappings; nothing runs now.
        let (a, b) = unsafe {
            (
                std::slice::from_raw_parts(region.page_ptr(p).unwrap(), HUGE as usize),
                std::slice::from_raw_parts(d.page_ptr(p).unwrap(), HUGE as usize),
            )
        };
        assert!(a == b, "huge page {p} differs");
    }
}
