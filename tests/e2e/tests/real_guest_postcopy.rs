//! A REAL guest migrated by freehint in postcopy: the destination QEMU
//! resumes before its RAM has arrived, the destination daemon serves its
//! faults through QEMU's own userfaultfd (the preload library's), and the
//! remaining pages stream behind. Two `freehint vm` daemons, two patched
//! QEMUs, the guest's stock virtio_balloon driver, loopback TCP.
//!
//! Needs `FREEHINT_QEMU`, `FREEHINT_GUEST_DIR` and the reference QEMU;
//! `make test` provides them (see real_guest_balloon.rs for the skip rule).

use std::path::Path;
use std::time::Duration;

use freehint_demo::{
    check_after, freehint_migrate, run_mode, FreehintPair, Mode, QemuGuest, Testbed,
};
use freehint_e2e::{
    first_different_page, one_real_guest_test_at_a_time, real_guest_setup as setup,
};

/// `freehint resume` on the destination daemon that holds the guest
/// paused, then the guest must run there with its data intact.
fn resume_destination_and_check(bin_dir: &Path, control: &Path, src: &QemuGuest, dst: &QemuGuest) {
    let out = std::process::Command::new(bin_dir.join("freehint"))
        .arg("resume")
        .arg("--control")
        .arg(control)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (alive, check) = check_after(src, dst, Duration::from_secs(30));
    assert!(alive, "no heartbeat on the destination after resume");
    assert_eq!(check, "ok");
}

/// Postcopy and hybrid with hints, beside precopy with hints (waiting for
/// the guest's report) on the same guest: in postcopy the guest runs on the destination while its pages
/// arrive; in both it arrives alive with its data; postcopy sends no more
/// than precopy.
#[test]
fn postcopy_and_hybrid_with_hints_arrive_alive_and_postcopy_sends_no_more_than_precopy() {
    let Some(mut s) = setup("postcopy-hints", 1024, 600) else {
        return;
    };
    let _alone = one_real_guest_test_at_a_time();
    s.keep_mib = 128;
    s.check_mib = 16;
    // Precopy waiting for the guest's report, as postcopy does: without the
    // wait, what precopy sends depends on when the hints come (378 and
    // 467 MB in two runs of one CI).
    let precopy = run_mode(&s, Mode::FreehintHintsWait).unwrap();
    let r = run_mode(&s, Mode::FreehintPostcopy).unwrap();
    let hybrid = run_mode(&s, Mode::FreehintHybrid).unwrap();
    for run in [&precopy, &r, &hybrid] {
        eprintln!("{}", serde_json::to_string(run).unwrap());
        assert!(
            run.guest_alive_after,
            "no heartbeat on the destination: {run:?}"
        );
        assert_eq!(run.data_check, "ok", "{run:?}");
    }
    let d = &r.detail;
    assert_eq!(d["postcopy"], true, "did not switch to postcopy: {r:?}");
    let pending = d["postcopy_pending_pages"].as_u64().unwrap();
    assert!(pending > 0, "{r:?}");
    assert_eq!(
        d["pages_requested"].as_u64().unwrap()
            + d["pages_read_ahead"].as_u64().unwrap()
            + d["pages_streamed"].as_u64().unwrap(),
        pending,
        "every pending page crosses once: {r:?}"
    );
    // QEMU loads its device state (reading virtqueue indices in guest RAM)
    // and the guest runs before its pages are all there: some faults.
    assert!(
        d["faults_remote"].as_u64().unwrap() + d["faults_local"].as_u64().unwrap() > 0,
        "{r:?}"
    );
    let (stop, resume) = (
        r.timing.src_stop_us.expect("the source's STOP event"),
        r.timing
            .dst_resume_us
            .expect("the destination's RESUME event"),
    );
    assert!(r.timing.migrate_us < stop && stop <= resume, "{r:?}");
    assert!(r.downtime_ms <= r.total_time_ms, "{r:?}");
    // Both wait for the guest's report, so neither sends a page it reported
    // free (5% for what the guest writes between the two runs).
    assert!(
        r.bytes_tool as f64 <= precopy.bytes_tool as f64 * 1.05,
        "postcopy sent {} bytes, precopy {}",
        r.bytes_tool,
        precopy.bytes_tool
    );
    // An idle guest converges: hybrid runs as precopy (its bytes are
    // precopy's, which vary with when the hints come; not compared).
    assert_eq!(hybrid.detail["postcopy"], false, "{hybrid:?}");
}

/// Postcopy without hints on a destination that stays paused: once the
/// migration returns, every page has been placed and the destination's RAM
/// equals the source's page by page; then the guest resumes and runs.
#[test]
fn in_postcopy_without_hints_destination_ram_equals_the_source_page_by_page() {
    let Some(s) = setup("postcopy-nohints", 512, 200) else {
        return;
    };
    let _alone = one_real_guest_test_at_a_time();
    let bed = Testbed::new(&s, "postcopy-nohints").unwrap();
    let FreehintPair {
        mut src,
        dst,
        src_daemon,
        dst_daemon,
        addr,
    } = bed.freehint_pair(&["--no-resume"]).unwrap();
    bed.settle_destination(&dst_daemon).unwrap();
    let stats = freehint_migrate(
        &s.bin_dir,
        &src_daemon.control,
        &addr,
        false,
        &["--mode", "postcopy"],
    )
    .unwrap();
    assert!(stats.postcopy.switched, "{stats:?}");
    assert_eq!(stats.pages_skipped_free, 0);
    assert_eq!(
        stats.postcopy.pages_requested
            + stats.postcopy.pages_read_ahead
            + stats.postcopy.pages_streamed,
        stats.postcopy.postcopy_pending_pages,
        "{stats:?}"
    );
    assert!(
        src.wait_exit(Duration::from_secs(10)),
        "the source QEMU did not quit after postcopy"
    );
    assert_eq!(
        first_different_page(&bed.ram("src"), &bed.ram("dst")),
        None,
        "guest RAM differs between source and destination"
    );
    resume_destination_and_check(&s.bin_dir, &dst_daemon.control, &src, &dst);
    eprintln!(
        "postcopy, hints off: {} pending pages ({} requested, {} streamed), {} bytes, {} ms, downtime {} ms",
        stats.postcopy.postcopy_pending_pages,
        stats.postcopy.pages_requested,
        stats.postcopy.pages_streamed,
        stats.bytes_on_wire,
        stats.total_time_ms,
        stats.downtime_ms
    );
}

/// `freehint migrate --postcopy-now` switches a running hybrid migration
/// to postcopy: without it, this one would run precopy rounds up to its
/// round limit (1000).
#[test]
fn postcopy_now_switches_a_running_hybrid_migration() {
    let Some(s) = setup("postcopy-now", 512, 200) else {
        return;
    };
    let _alone = one_real_guest_test_at_a_time();
    let bed = Testbed::new(&s, "postcopy-now").unwrap();
    let FreehintPair {
        src,
        dst,
        src_daemon,
        dst_daemon,
        addr,
    } = bed.freehint_pair(&[]).unwrap();
    bed.settle_destination(&dst_daemon).unwrap();
    let freehint = s.bin_dir.join("freehint");
    let postcopy_now = || {
        std::process::Command::new(&freehint)
            .args(["migrate", "--postcopy-now", "--control"])
            .arg(&src_daemon.control)
            .output()
            .unwrap()
    };
    // Nothing is running yet: refused, clearly.
    let out = postcopy_now();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no hybrid migration is running"), "{err}");
    let migrating = {
        let (bin_dir, control, addr) =
            (s.bin_dir.clone(), src_daemon.control.clone(), addr.clone());
        std::thread::spawn(move || {
            freehint_migrate(
                &bin_dir,
                &control,
                &addr,
                true,
                &[
                    "--mode",
                    "hybrid",
                    "--min-rounds",
                    "1000",
                    "--max-rounds",
                    "1000",
                ],
            )
        })
    };
    // The operator's word, as soon as the migration runs (before, the
    // daemon says none is running).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let out = postcopy_now();
        if out.status.success() {
            break;
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("no hybrid migration is running"), "{err}");
        assert!(std::time::Instant::now() < deadline, "{err}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let stats = migrating.join().unwrap().unwrap();
    assert!(stats.postcopy.switched, "{stats:?}");
    assert!(stats.rounds < 999, "{stats:?}");
    eprintln!("postcopy-now: switched after {} rounds", stats.rounds);
    let (alive, check) = check_after(&src, &dst, Duration::from_secs(30));
    assert!(alive, "no heartbeat on the destination");
    assert_eq!(check, "ok");
}

/// The link breaks in the middle of postcopy (fault point in the source
/// daemon: every connection shut down) and stays down for about two
/// seconds (the first four reconnects fail): the two daemons reconnect,
/// the destination says which pages it still lacks, and the migration
/// completes with the destination's RAM equal to the source's page by page;
/// the guest then runs on the destination only.
#[test]
fn a_link_cut_in_postcopy_is_reconnected_and_the_ram_arrives_whole() {
    let Some(s) = setup("postcopy-cut", 512, 200) else {
        return;
    };
    let _alone = one_real_guest_test_at_a_time();
    let bed = Testbed::new(&s, "postcopy-cut").unwrap();
    let FreehintPair {
        mut src,
        dst,
        src_daemon,
        dst_daemon,
        addr,
    } = bed.freehint_pair(&["--no-resume"]).unwrap();
    bed.settle_destination(&dst_daemon).unwrap();
    let freehint = s.bin_dir.join("freehint");
    let fault = std::process::Command::new(&freehint)
        .args(["debug", "fault", "--control"])
        .arg(&src_daemon.control)
        .arg("src.postcopy-link-cut=1*return;src.postcopy-reconnect=4*return")
        .output()
        .unwrap();
    assert!(
        fault.status.success(),
        "{}",
        String::from_utf8_lossy(&fault.stderr)
    );
    let stats = freehint_migrate(
        &s.bin_dir,
        &src_daemon.control,
        &addr,
        false,
        &["--mode", "postcopy"],
    )
    .unwrap();
    assert!(stats.postcopy.switched, "{stats:?}");
    assert!(stats.postcopy.postcopy_reconnects >= 1, "{stats:?}");
    assert!(
        src.wait_exit(Duration::from_secs(10)),
        "the source QEMU did not quit after postcopy"
    );
    assert_eq!(
        first_different_page(&bed.ram("src"), &bed.ram("dst")),
        None,
        "guest RAM differs between source and destination"
    );
    resume_destination_and_check(&s.bin_dir, &dst_daemon.control, &src, &dst);
    eprintln!(
        "postcopy with a cut link: {} reconnects, {} pending pages ({} requested, {} streamed), {} ms",
        stats.postcopy.postcopy_reconnects,
        stats.postcopy.postcopy_pending_pages,
        stats.postcopy.pages_requested,
        stats.postcopy.pages_streamed,
        stats.total_time_ms
    );
}
