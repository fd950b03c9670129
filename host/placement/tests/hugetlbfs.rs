//! Real userfaultfd placement on a hugetlbfs (MFD_HUGETLB memfd, 2 MiB)
//! mapping: a fault anywhere in a huge page is reported at the huge page's
//! start, the whole huge page is placed in one step, and a placement of a
//! piece of one is refused. Needs free 2 MiB huge pages
//! (tests/scripts/setup-host.sh reserves them); without them the test says
//! so and passes only when FREEHINT_REQUIRE_HUGETLBFS is unset.

use std::sync::mpsc;
use std::time::Duration;

use freehint_placement::{MissingPlacer, Placed, PlacementError};

mod common;
use common::{map_shared, memfd};

const HUGE: u64 = 2 << 20;
const HUGE_PAGES: u64 = 2;

#[test]
fn a_fault_in_a_huge_page_is_resolved_by_placing_the_whole_huge_page() {
    let fd = memfd(
        c"fh-placement-huge",
        libc::MFD_HUGETLB | libc::MFD_HUGE_2MB,
        HUGE_PAGES * HUGE,
    );
    let base = match map_shared(&fd, HUGE_PAGES * HUGE) {
        Ok(base) => base,
        Err(e) => {
            assert!(
                std::env::var_os("FREEHINT_REQUIRE_HUGETLBFS").is_none(),
                "no 2 MiB huge pages to map: {e}"
            );
            eprintln!("skipped: no 2 MiB huge pages to map: {e}");
            return;
        }
    };
    let mut placer = MissingPlacer::in_this_process().expect("a userfaultfd (run as root)");
    placer.register(base, HUGE_PAGES * HUGE, HUGE).unwrap();

    let target = base + HUGE + 12345;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: inside the live huge page mapping.
        let v = unsafe { std::ptr::read_volatile(target as *const u8) };
        let _ = tx.send(v);
    });
    let fault = placer
        .next_fault(Duration::from_secs(5))
        .unwrap()
        .expect("the read faulted");
    assert_eq!(fault.address, base + HUGE);
    // A piece of a huge page is never placed.
    let e = placer.place(base + HUGE, &[7u8; 4096]).unwrap_err();
    assert!(matches!(e, PlacementError::Outside { .. }), "{e}");
    let content: Vec<u8> = (0..HUGE).map(|i| (i % 241) as u8).collect();
    assert_eq!(placer.place(base + HUGE, &content).unwrap(), Placed::Now);
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(5)).unwrap(),
        (12345 % 241) as u8
    );
    // SAFETY: inside the live mapping, now populated.
    let seen = unsafe { std::slice::from_raw_parts((base + HUGE) as *const u8, HUGE as usize) };
    assert_eq!(seen, &content[..]);
    assert_eq!(
        placer.place(base + HUGE, &content).unwrap(),
        Placed::AlreadyPresent
    );
}
