//! Postcopy and hybrid migrations of a SIMULATED VM: an incoming simulated
//! VM runs on the destination RAM while it arrives (its faults served
//! through its own userfaultfd, taken by the receiver), reads and checks
//! the pages it touches, and the two RAM images are compared page by page
//! afterwards (outside the pages free at the switch and the pages the
//! destination wrote, each checked before it was written).

use freehint_e2e::bench_sim;

/// Every pending page arrived once, every page matches, the destination's
/// own checks passed.
fn check_postcopy(v: &serde_json::Value) {
    assert_eq!(v["state"], "completed", "{v}");
    assert_eq!(v["postcopy"], true, "{v}");
    assert_eq!(v["mismatched_pages"], 0, "{v}");
    assert!(v["pages_compared"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["destination_pattern_errors"], 0, "{v}");
    assert!(
        v["destination_pages_checked"].as_u64().unwrap() > 0,
        "the destination VM checked nothing: {v}"
    );
    let pending = v["postcopy_pending_pages"].as_u64().unwrap();
    assert!(pending > 0, "{v}");
    assert_eq!(
        v["pages_requested"].as_u64().unwrap() + v["pages_streamed"].as_u64().unwrap(),
        pending,
        "each pending page crosses the wire once: {v}"
    );
    assert_eq!(v["receiver"]["postcopy_pending_pages"], pending, "{v}");
    assert!(
        v["source_running"] == false && v["destination_running"] == true,
        "{v}"
    );
}

const TWO_GIB: [&str; 6] = [
    "--mem-mib",
    "2048",
    "--used-percent",
    "20",
    "--dirty-mib-per-s",
    "64",
];

#[test]
fn postcopy_two_gib_with_hints_matches() {
    let mut args = TWO_GIB.to_vec();
    args.extend(["--mode", "postcopy", "--hints", "on"]);
    let v = bench_sim(&args).unwrap();
    check_postcopy(&v);
    // How much of the free 80% the guest reports before the switch depends
    // on the load (this runs beside other tests on two cores): 432 MB of
    // 2 GiB in a release run alone, none at all in a loaded debug run,
    // where the wait for the first report ends before it starts. Not
    // asserted here until that wait is fixed (issue 11 notes).
}

#[test]
fn postcopy_two_gib_without_hints_matches() {
    let mut args = TWO_GIB.to_vec();
    args.extend(["--mode", "postcopy", "--hints", "off"]);
    let v = bench_sim(&args).unwrap();
    check_postcopy(&v);
    assert!(v["bytes_on_wire"].as_u64().unwrap() >= 2 << 30, "{v}");
}

#[test]
fn hybrid_that_reaches_the_round_limit_switches_to_postcopy_and_matches() {
    for hints in ["on", "off"] {
        let mut args = TWO_GIB.to_vec();
        // Precopy may not converge before round 3, and round 3 is the
        // last: the switch goes to postcopy instead of a long stop.
        args.extend(["--mode", "hybrid", "--hints", hints]);
        args.extend(["--min-rounds", "3", "--max-rounds", "3"]);
        let v = bench_sim(&args).unwrap();
        check_postcopy(&v);
        // Two live rounds, then the switch round.
        assert_eq!(v["rounds"], 3, "{v}");
        if hints == "on" {
            assert!(v["bytes_on_wire"].as_u64().unwrap() < 900 << 20, "{v}");
        }
    }
}

#[test]
fn hybrid_that_converges_stays_precopy() {
    let v = bench_sim(&[
        "--mem-mib",
        "512",
        "--used-percent",
        "20",
        "--dirty-mib-per-s",
        "16",
        "--mode",
        "hybrid",
    ])
    .unwrap();
    assert_eq!(v["state"], "completed", "{v}");
    assert_eq!(v["postcopy"], false, "{v}");
    assert_eq!(v["mismatched_pages"], 0, "{v}");
}
