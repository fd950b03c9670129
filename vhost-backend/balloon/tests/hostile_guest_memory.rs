//! A hostile guest against the balloon device and the hint filter behind
//! it, as the daemon runs them, with this process's anonymous memory
//! (`RssAnon`, sampled every 2 ms) held to a stated bound: half a million
//! tiny disjoint hints in one batch that never ends, then a million free
//! page reports of the same pages in a loop. This test binary holds only
//! this test, so the process's memory is the device's, the filter's and
//! the test frontend's.
#![allow(dead_code)]

include!("support/harness.rs");

use freehint_hint_filter::{HintFilter, IdentityMappedSink, MigrationBitmap, RegionLayout};
use freehint_types::PageRun;

/// What the device and the filter may add to this process's anonymous
/// memory, whatever the guest sends: for this 64 MiB guest they need a few
/// KiB (1032 batch ranges, a 2 KiB bitmap, at most 8192 reported runs);
/// the rest is allocator slack.
const BOUND_MIB: u64 = 16;

fn rss_anon_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Samples `rss_anon_kib` until dropped; keeps the peak.
struct Sampler {
    peak_kib: Arc<AtomicU64>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Sampler {
    fn start() -> Self {
        let peak_kib = Arc::new(AtomicU64::new(rss_anon_kib()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (peak, done) = (peak_kib.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(rss_anon_kib(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        Self {
            peak_kib,
            stop,
            thread: Some(thread),
        }
    }

    fn peak_kib(&self) -> u64 {
        self.peak_kib.load(Ordering::Relaxed)
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn a_hostile_guest_cannot_grow_the_device_or_the_filter() {
    let pages = RAM_BYTES / 4096;
    let mut bitmap = MigrationBitmap::new(vec![RegionLayout {
        ram_start: 0,
        page_bytes: 4096,
        pages,
    }]);
    bitmap.set_run(PageRun {
        region: 0,
        first_page: 0,
        count: pages,
    });
    let filter = Arc::new(HintFilter::new(bitmap));
    let epoch = filter
        .sync(true, |_| Ok::<(), ()>(()))
        .unwrap()
        .opened_epoch
        .unwrap();
    let mut h = Harness::connect_forwarding(5, Some(Arc::new(IdentityMappedSink(filter.clone()))));
    h.start_device(ALL_BALLOON);
    let (fp, rep) = (3, 4);
    // Guest pages the test may hint and report: below the test's own
    // buffers and rings (the last 2 MiB).
    let usable_pages = SMALL_BASE / 4096;
    let every_other = |k: u64| (2 * k % usable_pages) * 4096;

    let baseline_kib = rss_anon_kib();
    let sampler = Sampler::start();

    // One batch that never ends: 2000 chains of 250 tiny disjoint hints.
    h.config_change(move |b| b.start_round(epoch));
    h.send_cmd_id(fp, epoch.0);
    h.kick_and_wait(fp, 1);
    let per_chain = 250u64;
    for c in 0..2000u64 {
        let bufs: Vec<(u64, u32, bool)> = (0..per_chain)
            .map(|k| (every_other(c * per_chain + k), 4096, true))
            .collect();
        let mem = h.mem.clone();
        h.vq(fp).add(&mem, &bufs);
        h.kick_and_wait(fp, 1);
    }
    let refused = h.handle.rejected(RejectReason::BatchRangesFull);
    assert!(
        refused > 0,
        "no hint was refused: the batch was not bounded"
    );

    // Free page reports of the same pages, in a loop: 4000 chains of 250.
    for c in 0..4000u64 {
        let bufs: Vec<(u64, u32, bool)> = (0..per_chain)
            .map(|k| (every_other((c * per_chain + k) % 4096), 4096, true))
            .collect();
        let mem = h.mem.clone();
        h.vq(rep).add(&mem, &bufs);
        h.kick_and_wait(rep, 1);
    }
    let reported = h.handle.status().counters.reported_ranges;
    assert_eq!(reported, 4000 * per_chain, "reports were lost");
    let peak_kib = sampler.peak_kib();
    drop(sampler);

    let grown_mib = peak_kib.saturating_sub(baseline_kib) / 1024;
    eprintln!(
        "anonymous memory: {} KiB before, peak {peak_kib} KiB; {refused} hints refused, {reported} ranges reported",
        baseline_kib
    );
    assert!(
        grown_mib <= BOUND_MIB,
        "a hostile guest grew this process by {grown_mib} MiB (bound {BOUND_MIB} MiB)"
    );

    // The filter kept what matters: the 4096 reported pages (and the
    // hinted ones, which read as zeros) become zero records at the next
    // sync, as at most one run per two pages.
    let sync = filter.sync(true, |_| Ok::<(), ()>(())).unwrap();
    let zero_pages: u64 = sync.discarded.iter().map(|r| r.count).sum();
    assert!(
        sync.discarded.len() as u64 <= usable_pages / 2 && zero_pages >= 4096,
        "{} zero runs of {zero_pages} pages",
        sync.discarded.len()
    );
}
