//! Real userfaultfd placement on a shmem (memfd) mapping of this process:
//! a thread that touches a missing page waits until it is placed, sees
//! exactly the placed content, and a page written through another mapping
//! of the same file (as the precopy rounds write) never faults.

use std::os::fd::OwnedFd;
use std::sync::mpsc;
use std::time::Duration;

use freehint_placement::{Fault, MissingPlacer, Placed, PlacementError};

mod common;
use common::{map_shared, memfd};

const PAGE: u64 = 4096;
const PAGES: u64 = 64;

/// Two shared mappings of one memfd: `guest` (registered) and `alias`.
struct Shmem {
    _fd: OwnedFd,
    guest: u64,
    alias: u64,
}

fn shmem() -> Shmem {
    let fd = memfd(c"fh-placement-test", 0, PAGES * PAGE);
    let map = |fd| map_shared(fd, PAGES * PAGE).expect("mapping the memfd");
    let (guest, alias) = (map(&fd), map(&fd));
    Shmem {
        _fd: fd,
        guest,
        alias,
    }
}

/// Reads one byte at `addr` on another thread; its value arrives on the
/// channel once the read completes.
fn read_on_thread(addr: u64) -> mpsc::Receiver<u8> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: `addr` is inside a live mapping of the test's memfd.
        let v = unsafe { std::ptr::read_volatile(addr as *const u8) };
        let _ = tx.send(v);
    });
    rx
}

fn placer(s: &Shmem) -> MissingPlacer {
    let mut p = MissingPlacer::in_this_process().expect("a userfaultfd (run as root)");
    p.register(s.guest, PAGES * PAGE, PAGE).unwrap();
    p
}

#[test]
fn a_missing_page_waits_for_its_placement_and_shows_exactly_its_content() {
    let s = shmem();
    let p = placer(&s);
    let page = s.guest + 3 * PAGE;
    let got = read_on_thread(page + 17);
    let fault = p
        .next_fault(Duration::from_secs(5))
        .unwrap()
        .expect("the read faulted");
    assert_eq!(
        fault,
        Fault {
            address: page,
            write: false
        }
    );
    assert!(
        got.recv_timeout(Duration::from_millis(100)).is_err(),
        "the read went on before the page was placed"
    );
    let content: Vec<u8> = (0..PAGE).map(|i| (i % 251) as u8).collect();
    assert_eq!(p.place(page, &content).unwrap(), Placed::Now);
    assert_eq!(got.recv_timeout(Duration::from_secs(5)).unwrap(), 17);
    // Placed once: a second placement changes nothing.
    assert_eq!(
        p.place(page, &[0xEE; PAGE as usize]).unwrap(),
        Placed::AlreadyPresent
    );
    // SAFETY: inside the live alias mapping.
    let seen =
        unsafe { std::slice::from_raw_parts((s.alias + 3 * PAGE) as *const u8, PAGE as usize) };
    assert_eq!(seen, &content[..]);
}

#[test]
fn a_page_written_through_another_mapping_never_faults() {
    let s = shmem();
    let p = placer(&s);
    // SAFETY: inside the live alias mapping.
    unsafe { std::ptr::write_volatile((s.alias + 5 * PAGE + 1) as *mut u8, 0x5A) };
    let got = read_on_thread(s.guest + 5 * PAGE + 1);
    assert_eq!(got.recv_timeout(Duration::from_secs(5)).unwrap(), 0x5A);
    assert_eq!(p.next_fault(Duration::from_millis(50)).unwrap(), None);
    assert_eq!(
        p.place(s.guest + 5 * PAGE, &[1; PAGE as usize]).unwrap(),
        Placed::AlreadyPresent
    );
}

#[test]
fn a_zero_placement_resolves_a_fault_with_zeroes() {
    let s = shmem();
    let p = placer(&s);
    let got = read_on_thread(s.guest + 9 * PAGE + 100);
    let fault = p
        .next_fault(Duration::from_secs(5))
        .unwrap()
        .expect("faulted");
    assert_eq!(fault.address, s.guest + 9 * PAGE);
    assert_eq!(p.place_zero(fault.address, PAGE).unwrap(), Placed::Now);
    assert_eq!(got.recv_timeout(Duration::from_secs(5)).unwrap(), 0);
}

#[test]
fn placements_outside_the_registered_pages_are_refused() {
    let s = shmem();
    let p = placer(&s);
    for (addr, len) in [
        (s.guest + 1, PAGE),
        (s.guest, PAGE - 1),
        (s.guest + PAGES * PAGE, PAGE),
        (s.guest + (PAGES - 1) * PAGE, 2 * PAGE),
        (s.guest, 0),
    ] {
        let e = p.place_zero(addr, len).unwrap_err();
        assert!(matches!(e, PlacementError::Outside { .. }), "{e}");
    }
}

#[test]
fn ranges_that_are_not_whole_pages_are_refused() {
    let s = shmem();
    let mut p = MissingPlacer::in_this_process().expect("a userfaultfd (run as root)");
    for (start, len, page) in [
        (s.guest, PAGES * PAGE, 0),
        (s.guest, PAGES * PAGE, 3000),
        (s.guest + 1, PAGE, PAGE),
        (s.guest, PAGE + 1, PAGE),
        (s.guest, 0, PAGE),
    ] {
        let e = p.register(start, len, page).unwrap_err();
        assert!(matches!(e, PlacementError::Unaligned { .. }), "{e}");
    }
}

#[test]
fn a_run_is_placed_in_one_call_and_stops_at_a_page_already_present() {
    let s = shmem();
    let p = placer(&s);
    // Page 12 is present (written through the alias); 10..=11 are not.
    // SAFETY: inside the live alias mapping.
    unsafe { std::ptr::write_volatile((s.alias + 12 * PAGE) as *mut u8, 0x33) };
    let waiting = read_on_thread(s.guest + 11 * PAGE + 5);
    p.next_fault(Duration::from_secs(5))
        .unwrap()
        .expect("the read faulted");
    let content: Vec<u8> = (0..4 * PAGE).map(|i| (i / PAGE + 1) as u8).collect();
    assert_eq!(
        p.place(s.guest + 10 * PAGE, &content).unwrap(),
        Placed::AlreadyPresent,
        "page 12 was present"
    );
    assert_eq!(waiting.recv_timeout(Duration::from_secs(5)).unwrap(), 2);
    // SAFETY: inside the live alias mapping.
    let seen = |page: u64| unsafe { std::ptr::read_volatile((s.alias + page * PAGE) as *const u8) };
    assert_eq!((seen(10), seen(11), seen(12), seen(13)), (1, 2, 0x33, 0));
    // A whole run of missing pages: placed in one call.
    let run: Vec<u8> = (0..3 * PAGE).map(|i| (i / PAGE + 7) as u8).collect();
    assert_eq!(p.place(s.guest + 20 * PAGE, &run).unwrap(), Placed::Now);
    assert_eq!((seen(20), seen(21), seen(22)), (7, 8, 9));
}
