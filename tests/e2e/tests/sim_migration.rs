//! Whole migrations of a SIMULATED VM (separate process, real preload
//! library, real uffd-wp dirty tracking, real TCP to a receiver process),
//! checked page by page.

use freehint_e2e::bench_sim;

fn check(v: &serde_json::Value) {
    assert_eq!(v["mismatched_pages"], 0, "{v}");
    assert!(v["pages_compared"].as_u64().unwrap() > 0, "{v}");
    assert!(v["rounds"].as_u64().unwrap() >= 2, "{v}");
}

#[test]
fn one_gib_dirtying_64_mib_s_with_hints_matches_page_by_page() {
    let v = bench_sim(&[
        "--mem-mib",
        "1024",
        "--used-percent",
        "15",
        "--dirty-mib-per-s",
        "64",
        "--hints",
        "on",
    ])
    .unwrap();
    check(&v);
    assert!(
        v["pages_skipped_free"].as_u64().unwrap() > 0,
        "hints skipped nothing: {v}"
    );
    // 85% of RAM is free old data: hints must keep most of it off the wire.
    assert!(v["bytes_on_wire"].as_u64().unwrap() < 700 << 20, "{v}");
}

#[test]
fn one_gib_dirtying_64_mib_s_without_hints_matches_page_by_page() {
    let v = bench_sim(&[
        "--mem-mib",
        "1024",
        "--used-percent",
        "15",
        "--dirty-mib-per-s",
        "64",
        "--hints",
        "off",
    ])
    .unwrap();
    check(&v);
    assert_eq!(v["pages_skipped_free"], 0, "{v}");
    assert!(
        v["bytes_on_wire"].as_u64().unwrap() >= 1 << 30,
        "all of RAM holds data: {v}"
    );
}

#[test]
fn adversarial_hint_timing_over_many_rounds_loses_nothing() {
    let mut stale = 0;
    for seed in ["1", "2", "3"] {
        let v = bench_sim(&[
            "--mem-mib",
            "512",
            "--dirty-mib-per-s",
            "64",
            "--adversarial",
            "--seed",
            seed,
            "--min-rounds",
            "25",
            "--max-rounds",
            "26",
        ])
        .unwrap();
        check(&v);
        assert_eq!(v["rounds"], 26, "{v}");
        stale += v["hint_ranges_dropped_stale"].as_u64().unwrap();
    }
    assert!(stale > 0, "the adversarial guest delivered no late hints");
}

#[test]
fn fresh_guest_memory_costs_nothing_on_the_wire() {
    // Free memory never touched: holes in the RAM file, sent as zero runs
    // without being read.
    let v = bench_sim(&[
        "--mem-mib",
        "512",
        "--used-percent",
        "10",
        "--dirty-mib-per-s",
        "0",
        "--free-memory",
        "zero",
        "--hints",
        "off",
    ])
    .unwrap();
    check(&v);
    assert!(v["pages_zero"].as_u64().unwrap() >= 100_000, "{v}");
    assert!(v["bytes_on_wire"].as_u64().unwrap() < 60 << 20, "{v}");
}

#[test]
fn kept_images_are_identical_outside_free_pages() {
    let dir = tempfile::tempdir().unwrap();
    let v = bench_sim(&[
        "--mem-mib",
        "128",
        "--dirty-mib-per-s",
        "32",
        "--keep-memory",
        dir.path().to_str().unwrap(),
    ])
    .unwrap();
    check(&v);
    let src = std::fs::read(dir.path().join("source.ram")).unwrap();
    let dst = std::fs::read(dir.path().join("destination.ram")).unwrap();
    assert_eq!(src.len(), 128 << 20);
    assert_eq!(dst.len(), src.len());
    let mut free = vec![false; src.len() / 4096];
    for line in std::fs::read_to_string(dir.path().join("free-at-switchover.txt"))
        .unwrap()
        .lines()
    {
        let (s, e) = line.split_once(' ').unwrap();
        free[s.parse::<usize>().unwrap()..e.parse::<usize>().unwrap()].fill(true);
    }
    let mut compared = 0;
    for (p, is_free) in free.iter().enumerate() {
        if !is_free {
            compared += 1;
            assert!(
                src[p * 4096..(p + 1) * 4096] == dst[p * 4096..(p + 1) * 4096],
                "page {p} differs"
            );
        }
    }
    assert_eq!(compared, v["pages_compared"].as_u64().unwrap());
}

#[test]
fn bad_parameters_are_rejected_with_the_field_named() {
    let e = bench_sim(&["--mem-mib", "64", "--bulk-channels", "0"]).unwrap_err();
    assert!(e.contains("bulk_channels"), "{e}");
    let e = bench_sim(&["--mem-mib", "64", "--min-rounds", "5", "--max-rounds", "3"]).unwrap_err();
    assert!(e.contains("min_rounds"), "{e}");
}

#[test]
fn preallocated_destination_reads_pages_straight_into_place() {
    let v = bench_sim(&[
        "--mem-mib",
        "256",
        "--dirty-mib-per-s",
        "64",
        "--preallocate-destination",
        "--min-rounds",
        "4",
    ])
    .unwrap();
    check(&v);
    assert_eq!(v["rounds"], 5, "{v}");
}

#[test]
fn device_state_larger_than_one_frame_arrives_intact() {
    // 20 MiB: more than one 16 MiB control frame (a VGA card's VRAM alone
    // is 16 MiB), checked before the VM stops and sent in pieces.
    let v = bench_sim(&[
        "--mem-mib",
        "64",
        "--device-state-mib",
        "20",
        "--hints",
        "on",
    ])
    .unwrap();
    check(&v);
    assert_eq!(v["device_state_intact"], true, "{v}");
    // The 20 MiB pattern after the simulated VM's state line.
    let bytes = v["device_state_bytes"].as_u64().unwrap();
    assert!((20 << 20..(20 << 20) + 4096).contains(&bytes), "{v}");
    assert_eq!(v["state"], "completed", "{v}");
    assert_eq!(v["source_running"], false, "{v}");
    assert_eq!(v["destination_running"], true, "{v}");
}

#[test]
fn a_device_state_too_large_is_refused_before_the_vm_stops() {
    // Over the 1 GiB a migration carries: refused while the VM still runs
    // (the estimate is checked before stopping it), and nothing is lost.
    let err = bench_sim(&["--mem-mib", "64", "--device-state-mib", "1100"]).unwrap_err();
    assert!(err.contains("device state is"), "{err}");
    assert!(err.contains("the source VM runs on"), "{err}");
    assert!(!err.contains("resuming"), "the VM was stopped first: {err}");
}
