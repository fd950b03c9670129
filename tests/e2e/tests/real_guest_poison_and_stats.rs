//! A REAL guest booted with `page_poison=1` (free pages hold a pattern the
//! kernel checks when it allocates them again) migrates with hints:
//!
//! * the guest's driver writes `poison_val` while it probes, before QEMU
//!   sends the backend its features: the backend keeps it, so free page
//!   reporting does not punch poisoned pages to zero (which the guest would
//!   log as `pagealloc: memory corruption`);
//! * the poison value and the stats buffer the device holds travel to the
//!   destination's backend: neither console logs corruption, and the
//!   destination's balloon keeps receiving the guest's statistics.

use std::time::Duration;

use freehint_demo::{check_after, freehint_migrate, poll, FreehintPair, QemuGuest, Testbed};
use freehint_e2e::{daemon_status, one_real_guest_test_at_a_time, real_guest_setup};

const CORRUPTION: &str = "pagealloc: memory corruption";

/// The number of stats buffers the daemon's balloon has parsed.
fn stats_updates(control: &std::path::Path) -> u64 {
    daemon_status(control)["balloon"]["guest_stats"]["updates"]
        .as_u64()
        .unwrap_or(0)
}

fn corruption(g: &QemuGuest) -> Vec<String> {
    g.console
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|l| l.contains(CORRUPTION) || l.contains("BUG: Bad page"))
        .cloned()
        .collect()
}

#[test]
fn a_poisoning_guest_migrates_with_hints_clean_and_its_stats_go_on() {
    let Some(mut s) = real_guest_setup("poison", 512, 300) else {
        return;
    };
    let _alone = one_real_guest_test_at_a_time();
    s.keep_mib = 32;
    s.append = "page_poison=1".into();
    let bed = Testbed::new(&s, "poison").unwrap();
    let FreehintPair {
        src,
        dst,
        src_daemon,
        dst_daemon,
        addr,
    } = bed.freehint_pair(&[]).unwrap();
    // Free page reporting runs a couple of seconds after memory is freed:
    // give it time to report the workload's memory on the source.
    std::thread::sleep(Duration::from_secs(4));
    let st = daemon_status(&src_daemon.control);
    let poison = st["balloon"]["config"]["poison_val"].as_u64().unwrap();
    assert_ne!(
        poison, 0,
        "the guest's poison_val did not reach the backend: {st}"
    );
    assert!(
        poll(Duration::from_secs(10), || stats_updates(
            &src_daemon.control
        ) >= 2),
        "no stats from the source guest"
    );
    assert!(corruption(&src).is_empty(), "{:?}", corruption(&src));

    bed.settle_destination(&dst_daemon).unwrap();
    let stats = freehint_migrate(&s.bin_dir, &src_daemon.control, &addr, true, &[]).unwrap();
    assert!(stats.hinted_bytes > 0, "{stats:?}");
    let (alive, check) = check_after(&src, &dst, Duration::from_secs(30));
    assert!(alive && check == "ok", "{alive} {check}");

    // On the destination: the same poison value, and stats keep coming
    // (the held buffer came along); the guest freed its hinted blocks on
    // DONE and reports them, still poisoned.
    let dst_st = daemon_status(&dst_daemon.control);
    assert_eq!(
        dst_st["balloon"]["config"]["poison_val"].as_u64(),
        Some(poison),
        "{dst_st}"
    );
    let updates = stats_updates(&dst_daemon.control);
    assert!(
        poll(Duration::from_secs(20), || stats_updates(
            &dst_daemon.control
        ) >= updates + 2),
        "stats stopped after the migration: {}",
        daemon_status(&dst_daemon.control)
    );
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        corruption(&src).is_empty(),
        "source: {:?}",
        corruption(&src)
    );
    assert!(
        corruption(&dst).is_empty(),
        "destination: {:?}",
        corruption(&dst)
    );
    eprintln!(
        "page_poison=1: poison_val {poison:#x} carried over, {} MiB hinted, {} MiB on the wire, stats updates on the destination {} -> {}",
        stats.hinted_bytes >> 20,
        stats.bytes_on_wire >> 20,
        updates,
        stats_updates(&dst_daemon.control)
    );
}
