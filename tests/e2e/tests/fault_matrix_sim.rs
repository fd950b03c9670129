//! Every fault point (docs/FAULTS.md) × `return`, `panic` and
//! `return(kill)`, on the SIMULATED VM (`freehint bench sim` as the source,
//! the `freehint receive` it starts as the destination).
//!
//! Who runs the guest afterwards is read from the state files the simulated
//! VM and the receiver keep (`--work-dir`), so a killed process cannot hide
//! the outcome. For every case:
//!
//! * never both sides running;
//! * exactly one running, or neither and a surviving side says `uncertain`
//!   and names the operator's action;
//! * a failure (`return`, `panic`) before the source commits, or before
//!   the destination acts on the commit, leaves the source running and the
//!   destination not (the destination refuses for good, the source
//!   resumes);
//! * where the destination took over, its RAM equals the source's page by
//!   page (outside the pages free at switchover).

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use freehint_e2e::{bin_dir, compare_ram_images};

const MEM_MIB: u64 = 64;

#[derive(Debug)]
struct Case {
    point: String,
    action: &'static str,
}

#[derive(Debug)]
struct Outcome {
    source_running: bool,
    destination_phase: String,
    destination_running: bool,
    /// What the source (bench) printed as its JSON, if it survived.
    report: Option<serde_json::Value>,
    /// Everything the two processes wrote to stderr.
    stderr: String,
}

fn read_json(path: &Path) -> Option<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

fn process_alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, r)| r.trim_start().to_string()))
        .is_some_and(|r| !r.starts_with('Z') && !r.starts_with('X'))
}

/// The `FAILPOINTS` of a case. The reconnect point is passed only after a
/// broken link, so its cases cut the link first; and a reconnect that
/// always fails would wait for the operator forever, so `return` fails
/// three attempts (the link is back after about a second).
fn failpoints(case: &Case) -> String {
    if case.point == "src.postcopy-reconnect" {
        let action = if case.action == "return" {
            "3*return"
        } else {
            case.action
        };
        format!("src.postcopy-link-cut=1*return;{}={action}", case.point)
    } else {
        format!("{}={}", case.point, case.action)
    }
}

fn run(case: &Case, work: &Path) -> Outcome {
    let _ = std::fs::remove_dir_all(work);
    let mut out = Command::new(bin_dir().join("freehint"))
        .args(["bench", "sim", "--json", "--mem-mib", &MEM_MIB.to_string()])
        .args(["--used-percent", "30", "--dirty-mib-per-s", "8"])
        .args(["--min-rounds", "2", "--peer-timeout-s", "3"])
        .args(["--device-state-mib", "1", "--hint-wait-ms", "100"])
        .args(if case.point.contains("postcopy") {
            &["--mode", "postcopy"][..]
        } else {
            &[][..]
        })
        .arg("--work-dir")
        .arg(work)
        .env("FAILPOINTS", failpoints(case))
        .env("FREEHINT_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running freehint bench sim");
    // Read both pipes meanwhile: the receiver inherits them, and one that
    // waits for its source for as long as it takes (postcopy) keeps them
    // open until it is killed below.
    let drain = |mut pipe: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout_reader = drain(Box::new(out.stdout.take().expect("piped")));
    let stderr_reader = drain(Box::new(out.stderr.take().expect("piped")));
    out.wait().expect("waiting for freehint bench sim");
    // The receiver outlives a killed source; it gives up within its peer
    // timeout (3 s), unless the source died before it connected at all:
    // then it has nothing to wait for. Wait for it, and for the simulated
    // VM.
    let t = Instant::now();
    for f in ["destination.state.json", "source.state.json"] {
        let Some(pid) = read_json(&work.join(f)).and_then(|v| v["pid"].as_u64()) else {
            continue;
        };
        while process_alive(pid) && t.elapsed() < Duration::from_secs(30) {
            // A receiver still waiting for a source that never connected,
            // or for a source whose postcopy link broke (it waits for as
            // long as it takes): the source is gone, so nothing comes.
            let phase = read_json(&work.join(f)).map(|v| v["phase"].clone());
            if phase.is_some_and(|p| p == "setup" || p == "postcopy-paused") {
                // SAFETY: kill() has no memory effects; the pid is the
                // receiver this test's command started.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            !process_alive(pid),
            "{case:?}: {f}'s process {pid} still runs"
        );
    }
    let src = read_json(&work.join("source.state.json")).expect("the simulated VM's state");
    let dst = read_json(&work.join("destination.state.json"));
    let stdout = stdout_reader.join().expect("reading stdout");
    let stderr = stderr_reader.join().expect("reading stderr");
    Outcome {
        source_running: src["running"].as_bool().expect("running"),
        destination_phase: dst
            .as_ref()
            .and_then(|d| d["phase"].as_str().map(str::to_string))
            .unwrap_or_else(|| "never-started".into()),
        destination_running: dst
            .as_ref()
            .and_then(|d| d["destination_running"].as_bool())
            .unwrap_or(false),
        report: stdout
            .lines()
            .last()
            .and_then(|l| serde_json::from_str(l).ok()),
        stderr,
    }
}

/// Checks one case; returns what is wrong with it, if anything.
fn check(case: &Case, o: &Outcome, work: &Path) -> Result<(), String> {
    let fail = |why: &str| Err(format!("{} {}: {why}; {o:?}", case.point, case.action));
    if !o.stderr.contains(&case.point) {
        return fail("the fault point never fired");
    }
    if o.source_running && o.destination_running {
        return fail("the guest runs on BOTH sides");
    }
    if !o.source_running && !o.destination_running {
        // Both paused: a surviving side must say so and name the action.
        let source_says = o.report.as_ref().is_some_and(|r| r["state"] == "uncertain");
        let destination_says =
            o.destination_phase == "uncertain" || o.destination_phase == "postcopy-paused";
        if !(source_says || destination_says) {
            return fail("the guest runs nowhere and no side says the outcome is uncertain");
        }
        if !o.stderr.contains("resume it on") {
            return fail("the uncertain outcome names no operator action");
        }
    }
    // A failure (not a crash) before the source commits, or before the
    // destination acts on the commit, ends with the source running alone:
    // the destination refuses for good and the source resumes.
    let before_commit = !matches!(
        case.point.as_str(),
        "src.after-commit"
            | "src.after-resumed"
            | "dst.after-resume"
            | "src.postcopy-streaming"
            | "src.postcopy-link-cut"
            | "src.postcopy-reconnect"
    );
    let source_alone = o.source_running && !o.destination_running;
    if before_commit && case.action != "return(kill)" && !source_alone {
        return fail("a failure before the commit took effect must leave the source running alone");
    }
    if let Some(r) = &o.report {
        // The source's own account agrees with what really happened.
        if r["source_running"].as_bool() != Some(o.source_running) {
            return fail("the source's report of source_running is wrong");
        }
        if let Some(d) = r["destination_running"].as_bool() {
            if d != o.destination_running {
                return fail("the source's report of destination_running is wrong");
            }
        }
    }
    if o.destination_phase == "completed" && case.point.contains("postcopy") {
        // The destination VM ran and wrote pages while the rest arrived:
        // the run's own comparison skips those (each was checked against
        // the source's pattern before it was written).
        let Some(r) = &o.report else {
            return fail("postcopy completed but the source printed no report");
        };
        if r["mismatched_pages"] != 0
            || r["pages_compared"].as_u64().unwrap_or(0) == 0
            || r["destination_pattern_errors"] != 0
        {
            return fail("the destination took over with pages differing");
        }
    } else if o.destination_phase == "completed" {
        let (compared, mismatched) = compare_ram_images(
            &work.join("source.ram"),
            &work.join("destination.ram"),
            &work.join("free-pages.txt"),
        );
        if compared == 0 || mismatched != 0 {
            return fail(&format!(
                "destination took over with {mismatched} of {compared} pages differing"
            ));
        }
    }
    Ok(())
}

#[test]
fn every_fault_point_leaves_the_guest_on_one_side_or_says_uncertain() {
    let out = Command::new(bin_dir().join("freehint"))
        .args(["debug", "fault-points"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} (build the workspace with --features freehint/failpoints,freehint/bench, as make test does)",
        String::from_utf8_lossy(&out.stderr)
    );
    let points: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(points.len() >= 20, "{points:?}");
    let work = tempfile::tempdir_in("/dev/shm").unwrap();
    let mut failures = Vec::new();
    let mut table = Vec::new();
    // The RDMA points are passed only over RDMA: tests/scripts/rdma-in-guest.sh
    // runs them on soft-RoCE.
    for p in points
        .iter()
        .filter(|p| !p["name"].as_str().unwrap().contains("rdma"))
    {
        for action in ["return", "panic", "return(kill)"] {
            let case = Case {
                point: p["name"].as_str().unwrap().to_string(),
                action,
            };
            let dir = work.path().join(format!("{}-{}", case.point, case.action));
            let o = run(&case, &dir);
            table.push(format!(
                "{:<24} {:<13} source {:<7} destination {:<9} {}",
                case.point,
                case.action,
                if o.source_running { "runs" } else { "paused" },
                o.destination_phase,
                if o.destination_running { "runs" } else { "" },
            ));
            if let Err(e) = check(&case, &o, &dir) {
                failures.push(e);
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    eprintln!("{}", table.join("\n"));
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn ctrl_c_cancels_and_the_source_runs_on() {
    let work = tempfile::tempdir_in("/dev/shm").unwrap();
    // A slow destination, so the migration is surely under way.
    let child = Command::new(bin_dir().join("freehint"))
        .args([
            "bench",
            "sim",
            "--json",
            "--mem-mib",
            "64",
            "--hints",
            "off",
        ])
        .args(["--used-percent", "50", "--peer-timeout-s", "5"])
        .arg("--work-dir")
        .arg(work.path())
        .env("FAILPOINTS", "dst.mid-round=sleep(50)")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !read_json(&work.path().join("destination.state.json"))
        .is_some_and(|v| v["phase"] == "precopy")
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the migration never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill() has no memory effects; the pid is our child's.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cancelled"), "{stderr}");
    let report: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(report["state"], "failed", "{report}");
    assert_eq!(report["source_running"], true, "{report}");
    let src = read_json(&work.path().join("source.state.json")).unwrap();
    assert_eq!(src["running"], true, "{src}");
    let t = Instant::now();
    while read_json(&work.path().join("destination.state.json"))
        .is_some_and(|v| v["phase"] != "failed")
    {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the destination did not give up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
