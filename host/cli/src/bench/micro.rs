//! Micro-benchmarks without a guest: `freehint bench hints|sync`.

use std::time::Instant;

use anyhow::{bail, Result};
use freehint_dirty_log::{DirtyLog, TrackedRange, UffdWpDirtyLog};
use freehint_hint_filter::HintFilter;
use freehint_memory::GuestRam;
use freehint_types::{CmdId, RamRange};
use serde::Serialize;

#[derive(Serialize)]
struct HintsRate {
    mem_mib: u64,
    hinted_bytes: u64,
    elapsed_ms: f64,
    hinted_gib_per_s: f64,
}

pub fn hints_rate(mem_mib: u64, passes: u32) -> Result<()> {
    use freehint_hint_filter::{MigrationBitmap, RegionLayout};
    let pages = (mem_mib << 20) / 4096;
    let bm = MigrationBitmap::new(vec![RegionLayout {
        ram_start: 0,
        page_bytes: 4096,
        pages,
    }]);
    let f = HintFilter::new(bm);
    // Hints arrive as the Linux driver sends them: 4 MiB blocks, a
    // virtqueue's worth (16) per call.
    let ranges: Vec<RamRange> = (0..(mem_mib / 4))
        .map(|b| RamRange::new(b << 22, 4 << 20))
        .collect();
    let mut total = 0u64;
    let t = Instant::now();
    for _ in 0..passes {
        f.with_bitmap(|b| b.set_all());
        let epoch = f
            .sync(true, |_| Ok::<(), ()>(()))
            .expect("no merge error")
            .opened_epoch
            .unwrap_or(CmdId(2));
        for chunk in ranges.chunks(16) {
            total += f.apply_hints(epoch, chunk).pages_cleared;
        }
    }
    let secs = t.elapsed().as_secs_f64();
    if total != pages * passes as u64 {
        bail!(
            "hints cleared {total} pages, expected {}",
            pages * passes as u64
        );
    }
    let r = HintsRate {
        mem_mib,
        hinted_bytes: total * 4096,
        elapsed_ms: secs * 1000.0,
        hinted_gib_per_s: (total * 4096) as f64 / secs / (1u64 << 30) as f64,
    };
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}

#[derive(Serialize)]
struct SyncTime {
    mem_mib: u64,
    dirty_pages: u64,
    syncs: u32,
    sync_mean_us: u64,
    sync_median_us: u64,
    sync_max_us: u64,
}

pub fn sync_time(mem_mib: u64, dirty_pages: u64, syncs: u32) -> Result<()> {
    let dir = tempfile::tempdir_in("/dev/shm")?;
    let ram = GuestRam::open_file(&dir.path().join("ram"), mem_mib << 20)?;
    let r = &ram.regions()[0];
    for p in 0..r.pages() {
        // SAFETY: inside the mapping.
        unsafe { r.page_ptr(p).expect("in range").write_volatile(1) };
    }
    let mut log = UffdWpDirtyLog::attach_self(vec![TrackedRange {
        region: 0,
        vaddr_start: r.host_ptr() as u64,
        len_bytes: r.size_bytes(),
        page_bytes: 4096,
        first_page: 0,
    }])?;
    let mut times = Vec::new();
    let stride = (r.pages() / dirty_pages.max(1)).max(1);
    for i in 0..syncs as u64 {
        for k in 0..dirty_pages {
            let p = (k * stride + i) % r.pages();
            // SAFETY: inside the mapping.
            unsafe { r.page_ptr(p).expect("in range").write_volatile(2) };
        }
        let mut found = 0u64;
        let t = Instant::now();
        log.sync(&mut |run| found += run.count)?;
        times.push(t.elapsed().as_micros() as u64);
        if found != dirty_pages {
            bail!("sync found {found} written pages, expected {dirty_pages}");
        }
    }
    times.sort();
    let out = SyncTime {
        mem_mib,
        dirty_pages,
        syncs,
        sync_mean_us: times.iter().sum::<u64>() / times.len().max(1) as u64,
        sync_median_us: times[times.len() / 2],
        sync_max_us: *times.last().unwrap_or(&0),
    };
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}
