//! Dirty tracking of memory mapped in this process, with the real kernel
//! mechanism (async uffd-wp + PAGEMAP_SCAN).

use freehint_dirty_log::{DirtyLog, DirtyRun, TrackedRange, UffdWpDirtyLog};
use freehint_memory::GuestRam;

fn collect(log: &mut UffdWpDirtyLog) -> Vec<DirtyRun> {
    let mut v = Vec::new();
    log.sync(&mut |r| v.push(r)).unwrap();
    v
}

#[test]
fn exactly_the_written_pages_come_back_and_are_rearmed() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let pages = 1024u64;
    let ram = GuestRam::open_file(&dir.path().join("ram"), pages * 4096).unwrap();
    let region = &ram.regions()[0];
    // Populate half the pages before tracking starts: both populated and
    // never-populated pages must be tracked.
    for p in 0..pages / 2 {
        // SAFETY: page p is inside the mapping.
        unsafe { region.page_ptr(p).unwrap().write_volatile(1) };
    }
    let mut log = UffdWpDirtyLog::attach_self(vec![TrackedRange {
        region: 0,
        vaddr_start: region.host_ptr() as u64,
        len_bytes: region.size_bytes(),
        page_bytes: 4096,
        first_page: 0,
    }])
    .unwrap();
    assert!(collect(&mut log).is_empty(), "nothing written yet");

    for p in [3u64, 4, 700, 1023] {
        // SAFETY: inside the mapping.
        unsafe { region.page_ptr(p).unwrap().add(100).write_volatile(7) };
    }
    let runs = collect(&mut log);
    let mut got: Vec<u64> = runs
        .iter()
        .flat_map(|r| r.first_page..r.first_page + r.count)
        .collect();
    got.sort();
    assert_eq!(got, vec![3, 4, 700, 1023]);
    assert!(collect(&mut log).is_empty(), "re-armed by the scan");

    // SAFETY: inside the mapping.
    unsafe { region.page_ptr(4).unwrap().write_volatile(9) };
    assert_eq!(
        collect(&mut log),
        vec![DirtyRun {
            region: 0,
            first_page: 4,
            count: 1
        }]
    );
}

#[test]
fn unaligned_ranges_are_rejected() {
    let err = UffdWpDirtyLog::attach_self(vec![TrackedRange {
        region: 0,
        vaddr_start: 4096 + 1,
        len_bytes: 4096,
        page_bytes: 4096,
        first_page: 0,
    }])
    .unwrap_err();
    assert!(err.to_string().contains("not aligned"), "{err}");
}
