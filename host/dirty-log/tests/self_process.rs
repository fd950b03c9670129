//! Dirty tracking of memory mapped in this process, with the real kernel
//! mechanism (async uffd-wp + PAGEMAP_SCAN).

use freehint_dirty_log::{DirtyLog, PageRun, TrackedRange, UffdWpDirtyLog};
use freehint_memory::GuestRam;

fn collect(log: &mut UffdWpDirtyLog) -> Vec<PageRun> {
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
        vec![PageRun {
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

#[test]
fn other_processes_mapping_a_file_are_found() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let path = dir.path().join("ram");
    std::fs::write(&path, vec![0u8; 4096]).unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    let me = std::process::id() as i32;
    assert!(freehint_dirty_log::processes_mapping(meta.dev(), meta.ino(), &[]).is_empty());
    // Another process maps it: python's mmap, held open until we kill it.
    let mut child = std::process::Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import mmap,sys,time; f=open({:?},'r+b'); m=mmap.mmap(f.fileno(),4096); print('mapped',flush=True); time.sleep(60)",
            path.display().to_string()
        ))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let found = freehint_dirty_log::processes_mapping(meta.dev(), meta.ino(), &[me]);
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].pid, child.id() as i32);
}
