//! `freehint-bench report` on fixtures: the suite's tables, medians, goal
//! verdicts and plots, the micro benchmarks' sections, and clear errors.

use std::path::{Path, PathBuf};
use std::process::Command;

use freehint_bench::record::{Link, Mode, Profile, RunKey, RunRecord, RunStatus, SuiteReport};
use freehint_bench::report::write_report;

const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A results folder holding the fixture suite, and where the report goes.
struct Setup {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    out: PathBuf,
    plots: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("bench");
        std::fs::create_dir(&dir).unwrap();
        let out = tmp.path().join("docs/BENCHMARKS.md");
        let plots = tmp.path().join("docs/bench");
        Setup {
            _tmp: tmp,
            dir,
            out,
            plots,
        }
    }

    fn with_fixture(self) -> Setup {
        std::fs::copy(
            fixture("suite-fixture.json"),
            self.dir.join("suite-fixture.json"),
        )
        .unwrap();
        self
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.dir.join(name), text).unwrap();
    }

    fn report(&self) -> String {
        write_report(&self.dir, &self.out, &self.plots).unwrap();
        std::fs::read_to_string(&self.out).unwrap()
    }
}

#[track_caller]
fn assert_has(md: &str, line: &str) {
    assert!(md.contains(line), "the report lacks {line:?}; it is:\n{md}");
}

#[test]
fn fixture_suite_tables_medians_and_runs() {
    let s = Setup::new().with_fixture();
    let md = s.report();
    // The header says where the suite ran and how figures are measured.
    assert_has(
        &md,
        "The real-guest suites ran on: 2 cores (Test CPU), 24 GiB, Linux 6.1-test.",
    );
    assert_has(
        &md,
        "the source's QMP `STOP` event → the destination's QMP `RESUME` event",
    );
    // The command, verbatim, in a code block.
    assert_has(
        &md,
        "```\nfreehint-bench --profiles fresh --mem-mib 2048,16384 --modes freehint-hints,freehint-nohints,qemu-native --link 1gbit --repeat 3 --json target/bench/suite-fixture.json\n```",
    );
    // Medians over the measured runs only; a failed run counted apart.
    assert_has(&md, "### fresh, 2048 MiB, 1gbit, idle 30 s");
    assert_has(
        &md,
        "| freehint-hints | 3 of 3 | 310 | 320 | 315 | 1000 | 8 | yes | ok |",
    );
    assert_has(
        &md,
        "| freehint-nohints | 2 of 3 (1 failed) | 300 | 2061 | 2051 | 2100 | 16 | yes | ok |",
    );
    // An even count's median is the mean of the middle two.
    assert_has(
        &md,
        "| qemu-native | 2 of 2 | 305.5 | 2105 | 2095 | 3100 | 42 | yes | ok |",
    );
    assert_has(
        &md,
        "| freehint-hints | 2 of 2 | 405 | 505 | 500 | 1225 | 12.5 | yes | **rep 2: page 0x1234 differs** |",
    );
    assert_has(
        &md,
        "| qemu-native | 0 of 1 (1 skipped) | – | – | – | – | – | – | – |",
    );
    // The appendix lists every run with the reasons.
    assert_has(&md, "## Appendix: every run of suite-fixture.json");
    assert_has(
        &md,
        "| 10 | fresh | 16384 | 1gbit | 30 | qemu-native | 1 | skipped | – | – | – | – | – | – | – | – | – | – | does not fit in this machine's memory (needs 2 × 16384 MiB) |",
    );
    assert_has(
        &md,
        "| **failed** | – | – | – | – | – | – | – | – | – | – | destination QEMU exited with status 1 |",
    );
    // No micro benchmark results: their sections say so.
    assert_has(
        &md,
        "## Hints on vs off: 4 GiB, 15% used, 16 MiB/s dirtied\n\nNot run:",
    );
    assert_has(&md, "## Dirty-log sync\n\nNot run:");
    assert!(!md.contains("Real guest: the demo"));
}

#[test]
fn fixture_suite_goal_verdicts() {
    let md = Setup::new().with_fixture().report();
    assert_has(
        &md,
        "| 1. freehint sends ≤ 1.1× held memory | **not met** |",
    );
    assert_has(
        &md,
        "| 2. freehint-hints' total time at 16384 MiB ≤ 1.3× at 2048 MiB | met |",
    );
    assert_has(
        &md,
        "| 3. on 1gbit, freehint-hints' total time below QEMU's best | met |",
    );
    assert_has(
        &md,
        "| 4. freehint's downtime ≤ 10 ms on fresh and after-job | **not met** |",
    );
    assert_has(&md, "| 5. hints never cost: freehint-hints' total time ≤ 1.05× freehint-nohints' at 2048 MiB | met |");
    // 1: 320 / 310 MiB is within 1.1×; 505 / 405 is not.
    assert_has(
        &md,
        "| fresh | 2048 | 1gbit | 30 | 310 | 320 | 1.03× | met | suite-fixture.json |",
    );
    assert_has(
        &md,
        "| fresh | 16384 | 1gbit | 30 | 405 | 505 | 1.25× | **not met** | suite-fixture.json |",
    );
    // 2: 1225 / 1000 ms; QEMU skipped at 16 GiB, so no ratio.
    assert_has(
        &md,
        "| fresh | 1gbit | 30 | 1000 | 1225 | 1.23× | met | – | suite-fixture.json |",
    );
    // 3: below QEMU's best at 2 GiB; QEMU not measured at 16 GiB.
    assert_has(
        &md,
        "| fresh | 2048 | 30 | 1000 | qemu-native | 3100 | met | suite-fixture.json |",
    );
    assert_has(
        &md,
        "| fresh | 16384 | 30 | 1225 | – | – | not measured | suite-fixture.json |",
    );
    // 4: the breakdown's medians in the file's order; a run without one.
    assert_has(
        &md,
        "| fresh | 2048 | 1gbit | 30 | freehint-hints | 8 | met | suite-fixture.json |",
    );
    assert_has(
        &md,
        "- freehint-nohints, fresh, 2048 MiB, 1gbit, idle 30 s: `stop_ms` 1, `final_round_ms` 10, `device_state_save_ms` 2, `transfer_ms` 1, `load_ms` 1, `resume_ms` 1 (medians of 2 runs).",
    );
    assert_has(
        &md,
        "- freehint-hints, fresh, 16384 MiB, 1gbit, idle 30 s: the breakdown is not recorded.",
    );
    // 5: 1000 / 2100 ms.
    assert_has(
        &md,
        "| fresh | 1gbit | 30 | 1000 | 2100 | 0.48× | met | suite-fixture.json |",
    );
}

#[test]
fn fixture_suite_plots_are_pngs_linked_relative_to_the_report() {
    let s = Setup::new().with_fixture();
    let md = s.report();
    for name in [
        "suite-fixture-fresh-modes.png",
        "suite-fixture-fresh-sizes.png",
        "suite-fixture-bytes-vs-held.png",
    ] {
        assert_has(&md, &format!("](bench/{name})"));
        let bytes = std::fs::read(s.plots.join(name)).unwrap();
        assert!(bytes.len() > 1000, "{name} is {} bytes", bytes.len());
        assert_eq!(bytes[..8], PNG_SIGNATURE, "{name} is no PNG");
    }
}

fn measured(profile: Profile, mem_mib: u64, mode: Mode, rep: u32, total_ms: u64) -> RunRecord {
    let mut r = RunRecord::unmeasured(
        RunKey {
            profile,
            mem_mib,
            mode,
            link: Link::Gbit1,
            rep,
            idle_s: 30,
        },
        RunStatus::Ok,
        "",
    );
    r.held_mib = Some(200);
    r.bytes_link = Some(210 << 20);
    r.total_time_ms = Some(total_ms);
    r.downtime_ms = Some(5);
    r.alive = Some(true);
    r.data_check = Some("ok".into());
    r
}

#[test]
fn fault_latency_is_judged_on_the_unshaped_link_and_shown_for_shaped_ones() {
    let s = Setup::new();
    let postcopy = |link: Link, rep: u32, p50: u64, p99: u64| {
        let mut r = measured(Profile::AfterJob, 2048, Mode::FreehintPostcopy, rep, 1200);
        r.link = link;
        r.tool_stats = serde_json::json!({
            "faults_remote": 120,
            "fault_latency_us_p50": p50,
            "fault_latency_us_p99": p99,
            "fault_latency_us_max": p99 + 100,
        });
        r
    };
    let suite = SuiteReport {
        command: "freehint-bench --modes freehint-postcopy --json target/bench/suite-5.json".into(),
        started: "2026-11-24T08:00:00Z".into(),
        machine: "test machine".into(),
        built_from: Some("abc1234".into()),
        runs: vec![
            postcopy(Link::Unlimited, 1, 70, 400),
            postcopy(Link::Unlimited, 2, 90, 700),
            postcopy(Link::Unlimited, 3, 80, 500),
            postcopy(Link::Gbit1, 1, 520, 5500),
        ],
    };
    s.write("suite-5.json", &serde_json::to_string(&suite).unwrap());
    let md = s.report();
    assert_has(
        &md,
        "Started 2026-11-24T08:00:00Z on test machine, freehint built from abc1234.",
    );
    assert_has(
        &md,
        "| 8. postcopy's remote faults: p50 ≤ 100 µs, p99 ≤ 1000 µs | met |",
    );
    assert_has(
        &md,
        "| after-job | 2048 | unlimited | 30 | 120 | 80 | 500 | 600 | met | suite-5.json |",
    );
    assert_has(
        &md,
        "| after-job | 2048 | 1gbit | 30 | 120 | 520 | 5500 | 5600 | not judged (shaped link) | suite-5.json |",
    );

    // An unshaped row whose median is over the target fails the goal.
    let mut slow = suite;
    for r in slow.runs.iter_mut().filter(|r| r.link == Link::Unlimited) {
        r.tool_stats["fault_latency_us_p99"] = serde_json::json!(1500);
    }
    s.write("suite-5.json", &serde_json::to_string(&slow).unwrap());
    assert_has(
        &s.report(),
        "| 8. postcopy's remote faults: p50 ≤ 100 µs, p99 ≤ 1000 µs | **not met** |",
    );
}

#[test]
fn tls_cost_is_judged_against_plain_tcp_on_the_unshaped_link() {
    let s = Setup::new();
    let run = |mode: Mode, rep: u32, total_ms: u64| {
        let mut r = measured(Profile::AfterJob, 2048, mode, rep, total_ms);
        r.link = Link::Unlimited;
        let transport = if mode == Mode::FreehintHints {
            "tls"
        } else {
            "tcp"
        };
        r.tool_stats = serde_json::json!({ "transport": transport });
        r
    };
    let suite = |tls_ms: u64| {
        SuiteReport {
        command: "freehint-bench --modes freehint-hints,freehint-hints-insecure --json target/bench/suite-7.json"
            .into(),
        started: "2026-11-24T08:00:00Z".into(),
        machine: "test machine".into(),
        built_from: Some("abc1234".into()),
        runs: (1..=3)
            .flat_map(|rep| {
                [
                    run(Mode::FreehintHints, rep, tls_ms),
                    run(Mode::FreehintHintsInsecure, rep, 1000),
                ]
            })
            .collect(),
    }
    };
    s.write(
        "suite-7.json",
        &serde_json::to_string(&suite(1100)).unwrap(),
    );
    // An older suite's freehint-hints ran over plain TCP (its stats have no
    // transport): it must not count as TLS.
    let mut older = suite(5000);
    older.runs.retain(|r| r.mode == Mode::FreehintHints);
    for r in &mut older.runs {
        r.tool_stats = serde_json::json!({});
    }
    s.write("suite-1.json", &serde_json::to_string(&older).unwrap());
    let md = s.report();
    assert_has(
        &md,
        "| 11. TLS costs ≤ 1.15× plain TCP in bytes and time | met |",
    );
    assert_has(
        &md,
        "| after-job | 2048 | unlimited | 30 | 210 | 210 | 1.00× | 1100 | 1000 | 1.10× | met | suite-7.json |",
    );
    // The suite says what carried each freehint mode.
    assert_has(
        &md,
        "freehint's connections: freehint-hints TLS; freehint-hints-insecure plain TCP.",
    );
    // 20% slower over TLS fails the goal.
    s.write(
        "suite-7.json",
        &serde_json::to_string(&suite(1200)).unwrap(),
    );
    assert_has(
        &s.report(),
        "| 11. TLS costs ≤ 1.15× plain TCP in bytes and time | **not met** |",
    );
}

#[test]
fn suites_in_file_name_order_with_goals_over_all_of_them() {
    let s = Setup::new().with_fixture();
    let other = SuiteReport {
        command: "freehint-bench --profiles after-job,fresh --json target/bench/suite-a.json"
            .into(),
        started: "2026-11-22T08:00:00Z".into(),
        machine: "another machine".into(),
        built_from: None,
        runs: vec![
            measured(Profile::AfterJob, 2048, Mode::FreehintHints, 1, 1000),
            measured(Profile::AfterJob, 16384, Mode::FreehintHints, 1, 1400),
            measured(Profile::Fresh, 2048, Mode::FreehintHints, 1, 1100),
        ],
    };
    s.write("suite-a.json", &serde_json::to_string(&other).unwrap());
    // Not a suite: ignored.
    s.write("real-demo.json", "[]");
    let md = s.report();
    let a = md.find("## Suite: suite-a.json").unwrap();
    let f = md.find("## Suite: suite-fixture.json").unwrap();
    assert!(a < f);
    assert_has(
        &md,
        "- another machine\n- 2 cores (Test CPU), 24 GiB, Linux 6.1-test\n",
    );
    // after-job is judged from suite-a alone: 1400 / 1000 ms > 1.3×.
    assert_has(
        &md,
        "| after-job | 1gbit | 30 | 1000 | 1400 | 1.40× | **not met** | – | suite-a.json |",
    );
    // fresh at 2 GiB pools both files: 900, 1000, 1100, 1500 ms → 1050.
    assert_has(
        &md,
        "| fresh | 2048 | 30 | 1050 | qemu-native | 3100 | met | suite-a.json, suite-fixture.json |",
    );
    assert!(s.plots.join("suite-a-after-job-sizes.png").exists());
    assert_has(&md, "fresh: one RAM size only, so no plot against RAM.");
}

#[test]
fn bad_suite_json_is_one_line_naming_the_file() {
    let s = Setup::new();
    s.write("suite-bad.json", "{\"command\": \"x\",");
    let e = write_report(&s.dir, &s.out, &s.plots).unwrap_err();
    let text = format!("{e:#}");
    assert!(text.contains("suite-bad.json"), "{text}");
    assert!(!text.contains('\n'), "{text}");

    let s = Setup::new();
    s.write(
        "suite-wrong.json",
        r#"{"command":"c","started":"s","machine":"m","runs":[{"profile":"nope"}]}"#,
    );
    let e = format!("{:#}", write_report(&s.dir, &s.out, &s.plots).unwrap_err());
    assert!(e.contains("suite-wrong.json") && e.contains("nope"), "{e}");

    let e = write_report(&s.dir.join("absent"), &s.out, &s.plots).unwrap_err();
    assert!(format!("{e:#}").contains("absent"));
}

/// The micro benchmarks' results as `tests/scripts/bench.sh` writes them,
/// with the figures of an earlier report.
fn write_micro_results(s: &Setup) {
    let fh = "./target/release/freehint";
    let sim = "bench sim --mem-mib 4096 --used-percent 15 --dirty-mib-per-s 16 --json";
    // (prealloc, hints) → per rep: (MiB on wire, total ms, downtime ms).
    type Reps = [(u64, u64, u64); 3];
    let runs: [(&str, &str, Reps); 4] = [
        ("", "on", [(643, 3143, 125), (619, 592, 11), (619, 585, 14)]),
        (
            "",
            "off",
            [(4136, 13337, 204), (4122, 7571, 143), (4125, 8826, 173)],
        ),
        (
            "prealloc-",
            "on",
            [(618, 340, 7), (618, 337, 5), (618, 446, 7)],
        ),
        (
            "prealloc-",
            "off",
            [(4109, 2212, 11), (4110, 2398, 7), (4110, 2350, 9)],
        ),
    ];
    for (pre, h, reps) in runs {
        for (i, (mib, total, down)) in reps.into_iter().enumerate() {
            let name = format!("sim4g-{pre}hints-{h}-{}", i + 1);
            let json = serde_json::json!({
                "bytes_on_wire": (mib << 20) + 12345,
                "total_time_ms": total,
                "downtime_ms": down,
                "rounds": 2,
                "pages_sent": 158128,
                "pages_skipped_free": if h == "on" { 890880 } else { 0 },
                "hint_ranges_dropped_stale": 0,
                "mismatched_pages": 0,
                "syncs": 14,
                "sync_mean_us": 812,
                "sync_max_us": 2045,
            });
            // The command logs before its JSON line.
            s.write(
                &format!("{name}.json"),
                &format!("freehint: migrating\nfreehint: done\n{json}\n"),
            );
            let extra = if pre.is_empty() {
                ""
            } else {
                " --preallocate-destination"
            };
            s.write(
                &format!("{name}.cmd"),
                &format!("{fh} {sim} --hints {h}{extra}\n"),
            );
        }
    }
    let pairs = [
        (1738.0, 1315.0),
        (1611.0, 1839.0),
        (1665.0, 1392.0),
        (1916.0, 2068.0),
        (1260.0, 1830.0),
    ];
    for (n, (iperf, freehint)) in pairs.into_iter().enumerate() {
        let n = n + 1;
        let iperf_json = serde_json::json!({
            "start": {},
            "end": {"sum_received": {"bits_per_second": iperf * 8.0 * 1048576.0}}
        });
        s.write(
            &format!("iperf3-{n}.json"),
            &serde_json::to_string_pretty(&iperf_json).unwrap(),
        );
        s.write(
            &format!("iperf3-{n}.cmd"),
            "iperf3 -c 127.0.0.1 -p 5301 -t 3 -J\n",
        );
        let t = serde_json::json!({"peak_bandwidth_mib_per_s": freehint, "total_time_ms": 3192});
        s.write(&format!("transfer-2-{n}.json"), &t.to_string());
        s.write(
            &format!("transfer-2-{n}.cmd"),
            &format!("{fh} bench sim --mem-mib 4096 --bulk-channels 2 --json\n"),
        );
    }
    s.write(
        "transfer-1-1.json",
        r#"{"peak_bandwidth_mib_per_s": 1730.4, "total_time_ms": 2500}"#,
    );
    s.write(
        "transfer-1-1.cmd",
        &format!("{fh} bench sim --mem-mib 4096 --bulk-channels 1 --json"),
    );
    s.write("hints.json", r#"{"hinted_gib_per_s": 97.3}"#);
    s.write("hints.cmd", &format!("{fh} bench hints --mem-mib 4096"));
    s.write(
        "sync.json",
        r#"{"dirty_pages": 16384, "syncs": 50, "sync_median_us": 1234, "sync_mean_us": 1300, "sync_max_us": 5200}"#,
    );
    s.write("sync.cmd", &format!("{fh} bench sync --mem-mib 4096"));
}

#[test]
fn micro_sections_keep_their_tables_targets_and_verdicts() {
    let s = Setup::new();
    write_micro_results(&s);
    let md = s.report();
    assert_has(&md, "No real-guest suite was run");
    assert!(!s.plots.exists(), "no suite, so no plots folder");
    assert_has(
        &md,
        "| destination allocates on arrival | on | 1 | 643 | 3143 | 125 | 2 | 158128 | 890880 | 0 | 0 |",
    );
    assert_has(
        &md,
        "    freehint bench sim --mem-mib 4096 --used-percent 15 --dirty-mib-per-s 16 --json --hints off --preallocate-destination\n",
    );
    assert_has(
        &md,
        "| bytes on wire ≤ 20% (on arrival) | 619 MiB | 4125 MiB | 15.0% | met |",
    );
    assert_has(
        &md,
        "| total time ≤ 30% (on arrival) | 592 ms | 8826 ms | 6.7% | met |",
    );
    assert_has(
        &md,
        "| total time ≤ 30% (preallocated) | 340 ms | 2350 ms | 14.5% | met |",
    );
    assert_has(&md, "| 1 | 1738 | 1315 | 76% | 3192 |");
    assert_has(
        &md,
        "Median share: **108%** (target ≥ 80%: met); 4 of 5 pairs at or above 80%.",
    );
    assert_has(
        &md,
        "With one bulk channel the same round ran at 1730 MiB/s",
    );
    assert_has(
        &md,
        "**97 GiB/s** of hinted guest memory (target ≥ 50 GiB/s: met)",
    );
    assert_has(
        &md,
        "median **1.23 ms**, mean 1.30 ms, max 5.20 ms (target ≤ 5 ms: **not met**)",
    );
    assert_has(&md, "| sim4g-prealloc-hints-off-1 | 14 | 812 | 2045 |");
}

#[test]
fn partial_micro_results_name_the_missing_file() {
    let s = Setup::new();
    write_micro_results(&s);
    std::fs::remove_file(s.dir.join("iperf3-3.json")).unwrap();
    let e = format!("{:#}", write_report(&s.dir, &s.out, &s.plots).unwrap_err());
    assert!(e.contains("iperf3-3.json") && e.contains("missing"), "{e}");
}

#[test]
fn missing_font_names_the_package() {
    let s = Setup::new().with_fixture();
    let out = Command::new(env!("CARGO_BIN_EXE_freehint-bench"))
        .arg("report")
        .arg("--dir")
        .arg(&s.dir)
        .arg("--out")
        .arg(&s.out)
        .arg("--plots-dir")
        .arg(&s.plots)
        .env("FREEHINT_BENCH_FONT", "/nonexistent/font.ttf")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("fonts-dejavu-core") && stderr.contains("/nonexistent/font.ttf"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}
