//! A REAL guest live-migrated by freehint, end to end: two `freehint vm`
//! daemons, two patched QEMUs (our balloon over vhost-user, dirty tracking
//! through the preload library's userfaultfd), the guest's stock
//! virtio_balloon driver hinting its free pages, `freehint migrate` over
//! loopback TCP. The same code as `make demo` (crate freehint-demo).
//!
//! Needs `FREEHINT_QEMU`, `FREEHINT_GUEST_DIR` and the reference QEMU;
//! `make test` provides them (see real_guest_balloon.rs for the skip rule).

use std::path::PathBuf;
use std::time::Duration;

use freehint_demo::{check_after, freehint_migrate, run_mode, FreehintPair, Mode, Testbed};
use freehint_e2e::{
    first_different_page, one_real_guest_test_at_a_time, real_guest_setup as setup,
};

/// With a wait for the guest's first report (`--hint-wait-ms`), so that
/// what is sent does not depend on whether the guest reports faster than
/// loopback sends: by default hints apply while the first round runs, and
/// pages sent before their hint came are not taken back (that trade, bytes
/// for time, is measured by `make bench`).
#[test]
fn with_hints_the_guest_arrives_alive_with_its_data_sending_little_more_than_it_uses() {
    // The demo's guest: 2 GiB that wrote 1.4 GB and freed all but 128 MiB.
    let Some(mut s) = setup("hints-on", 2048, 1400) else {
        return;
    };
    let _alone = one_real_guest_test_at_a_time();
    s.keep_mib = 128;
    s.check_mib = 16;
    let r = run_mode(&s, Mode::FreehintHintsWait).unwrap();
    eprintln!("{}", serde_json::to_string(&r).unwrap());
    assert!(
        r.guest_alive_after,
        "no heartbeat on the destination: {r:?}"
    );
    assert_eq!(r.data_check, "ok", "{r:?}");
    // Timed from QMP events like every mode: the source stopped, then the
    // destination resumed, within the migration.
    let (stop, resume) = (
        r.timing.src_stop_us.expect("the source's STOP event"),
        r.timing
            .dst_resume_us
            .expect("the destination's RESUME event"),
    );
    assert!(r.timing.migrate_us < stop && stop <= resume, "{r:?}");
    assert!(r.downtime_ms <= r.total_time_ms, "{r:?}");
    assert!(r.guest_used_mib > 0 && r.guest_used_mib < 2048, "{r:?}");
    let limit = r.guest_used_mib as f64 * 1.5 * 1048576.0;
    assert!(
        (r.bytes_tool as f64) <= limit,
        "{} bytes on the wire for {} MiB used (limit 1.5x): {r:?}",
        r.bytes_tool,
        r.guest_used_mib
    );
    assert!(
        r.detail["pages_skipped_free"].as_u64().unwrap() > 0,
        "{r:?}"
    );
}

#[test]
fn without_hints_destination_ram_equals_the_source_page_by_page() {
    let Some(s) = setup("hints-off", 512, 200) else {
        return;
    };
    let _alone = one_real_guest_test_at_a_time();
    let bed = Testbed::new(&s, "hints-off").unwrap();
    let FreehintPair {
        mut src,
        dst,
        src_daemon,
        dst_daemon,
        addr,
    } = bed.freehint_pair(&["--no-resume"]).unwrap();
    let stats = freehint_migrate(&s.bin_dir, &src_daemon.control, &addr, false, &[]).unwrap();
    assert_eq!(stats.pages_skipped_free, 0);
    // The source QEMU quits after handing over; its RAM file stays.
    assert!(
        src.wait_exit(Duration::from_secs(10)),
        "the source QEMU did not quit"
    );
    let (src_ram, dst_ram): (PathBuf, PathBuf) = (bed.ram("src"), bed.ram("dst"));
    assert_eq!(
        first_different_page(&src_ram, &dst_ram),
        None,
        "guest RAM differs between source and destination"
    );
    let out = std::process::Command::new(s.bin_dir.join("freehint"))
        .arg("resume")
        .arg("--control")
        .arg(&dst_daemon.control)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (alive, check) = check_after(&src, &dst, Duration::from_secs(30));
    assert!(alive, "no heartbeat on the destination after resume");
    assert_eq!(check, "ok");
    eprintln!(
        "hints off: {} pages compared equal; {} bytes on the wire, {} ms, downtime {} ms",
        std::fs::metadata(&src_ram).unwrap().len() / 4096,
        stats.bytes_on_wire,
        stats.total_time_ms,
        stats.downtime_ms
    );
}
