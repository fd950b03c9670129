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
        v["pages_requested"].as_u64().unwrap()
            + v["pages_read_ahead"].as_u64().unwrap()
            + v["pages_streamed"].as_u64().unwrap(),
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
    // Pure postcopy waits for the guest's report (the simulated VM cannot
    // say when it ends: while its hints pay): the 80% it frees is not sent.
    assert!(v["pages_skipped_free"].as_u64().unwrap() > 0, "{v}");
    assert!(v["bytes_on_wire"].as_u64().unwrap() < 1 << 30, "{v}");
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

/// Every page arrived (some maybe twice: pages on their way when the link
/// broke are sent again), every page matches, the destination's own checks
/// passed, and the two sides reconnected at least once.
fn check_recovered(v: &serde_json::Value) {
    assert_eq!(v["state"], "completed", "{v}");
    assert_eq!(v["postcopy"], true, "{v}");
    assert_eq!(v["mismatched_pages"], 0, "{v}");
    assert!(v["pages_compared"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["destination_pattern_errors"], 0, "{v}");
    assert!(v["postcopy_reconnects"].as_u64().unwrap() >= 1, "{v}");
    assert!(
        v["receiver"]["postcopy_reconnects"].as_u64().unwrap() >= 1,
        "{v}"
    );
    // The source counts what it sent, pages sent again after the break
    // included; the destination what it placed, each page once.
    let pending = v["postcopy_pending_pages"].as_u64().unwrap();
    let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap();
    assert_eq!(
        n(v, "pages_requested") + n(v, "pages_read_ahead") + n(v, "pages_streamed")
            - n(v, "pages_resent"),
        pending,
        "{v}"
    );
    let r = &v["receiver"];
    assert_eq!(
        n(r, "pages_requested") + n(r, "pages_read_ahead") + n(r, "pages_streamed"),
        pending,
        "{v}"
    );
    assert!(
        v["source_running"] == false && v["destination_running"] == true,
        "the guest must run on exactly one side: {v}"
    );
}

/// The link is cut in the middle of postcopy (fault point: every
/// connection shut down) and stays down for about two seconds (the first
/// four reconnects fail); the source reconnects, the destination says which
/// pages it still lacks, and the migration completes with every page.
#[test]
fn a_link_cut_mid_postcopy_is_reconnected_and_every_page_arrives() {
    for hints in ["on", "off"] {
        let mut args = TWO_GIB.to_vec();
        args.extend(["--mode", "postcopy", "--hints", hints]);
        let out = std::process::Command::new(freehint_e2e::bin_dir().join("freehint"))
            .args(["bench", "sim", "--json"])
            .args(&args)
            .env(
                "FAILPOINTS",
                "src.postcopy-link-cut=1*return;src.postcopy-reconnect=4*return",
            )
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}\n{stdout}");
        assert!(stderr.contains("the link is cut"), "{stderr}");
        let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        check_recovered(&v);
    }
}

/// The same with the connections killed from outside (`ss -K`, as a
/// middlebox or a NIC reset would) while the pages stream.
#[test]
fn connections_killed_from_outside_mid_postcopy_are_reconnected() {
    let work = tempfile::tempdir_in("/dev/shm").unwrap();
    let mut args = TWO_GIB.to_vec();
    args.extend(["--mode", "postcopy", "--hints", "off"]);
    let child = std::process::Command::new(freehint_e2e::bin_dir().join("freehint"))
        .args(["bench", "sim", "--json"])
        .args(&args)
        .arg("--work-dir")
        .arg(work.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for postcopy on the destination, then kill every connection to
    // its port.
    let state = work.path().join("destination.state.json");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let pid = loop {
        assert!(std::time::Instant::now() < deadline, "no postcopy started");
        if let Some(v) = std::fs::read_to_string(&state)
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        {
            if v["phase"] == "postcopy" {
                break v["pid"].as_u64().unwrap();
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    let port = listening_port(pid).expect("the receiver's port");
    let filter = format!("( sport = :{port} or dport = :{port} )");
    let ss = std::process::Command::new("ss")
        .args(["-K", "-t", "state", "established"])
        .arg(&filter)
        .output()
        .unwrap();
    assert!(
        ss.status.success(),
        "{}",
        String::from_utf8_lossy(&ss.stderr)
    );
    let killed = String::from_utf8_lossy(&ss.stdout).lines().count();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}\n{stdout}");
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    eprintln!("ss -K killed {killed} sockets; {v}");
    assert!(killed > 1, "ss -K found no connection to kill");
    check_recovered(&v);
}

/// The TCP port process `pid` listens on (`ss -tlnp`).
fn listening_port(pid: u64) -> Option<u16> {
    let out = std::process::Command::new("ss")
        .args(["-t", "-l", "-n", "-p"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains(&format!("pid={pid},")))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
}

/// The hugetlbfs mount to use and a guard that gives back the huge pages
/// reserved for the test, or `None` (saying why: the test is skipped) when
/// there is none or not enough pages can be had; with
/// `FREEHINT_REQUIRE_HUGETLBFS` set, that fails the test instead.
fn huge_pages(needed: u64) -> Option<(std::path::PathBuf, HugePagesGuard)> {
    match try_huge_pages(needed) {
        Ok(x) => Some(x),
        Err(why) if std::env::var_os("FREEHINT_REQUIRE_HUGETLBFS").is_some() => {
            panic!("FREEHINT_REQUIRE_HUGETLBFS is set but: {why}")
        }
        Err(why) => {
            eprintln!("skipped: {why}");
            None
        }
    }
}

fn try_huge_pages(needed: u64) -> Result<(std::path::PathBuf, HugePagesGuard), String> {
    let mounts = std::fs::read_to_string("/proc/mounts").map_err(|e| e.to_string())?;
    let mount = mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 3 && f[2] == "hugetlbfs" && f[3].contains("pagesize=2M"))
        .map(|f| std::path::PathBuf::from(f[1]))
        .ok_or("no hugetlbfs mount")?;
    let nr = "/proc/sys/vm/nr_hugepages";
    let serial = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let before = read(nr)?;
    let guard = HugePagesGuard {
        nr_before: before,
        _serial: serial,
    };
    let free = read(FREE_2M)?;
    if free < needed {
        // Ask the kernel for the missing pages (root); given back after.
        let _ = std::fs::write(nr, (before + needed - free).to_string());
    }
    let free = read(FREE_2M)?;
    if free < needed {
        return Err(format!("{free} free 2 MiB pages, {needed} needed"));
    }
    Ok((mount, guard))
}

const FREE_2M: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages";

/// One test at a time changes the host's huge page pool.
static POOL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn read(p: &str) -> Result<u64, String> {
    std::fs::read_to_string(p)
        .map_err(|e| format!("{p}: {e}"))?
        .trim()
        .parse()
        .map_err(|e| format!("{p}: {e}"))
}

/// Sets `nr_hugepages` back when dropped; holds the pool meanwhile.
struct HugePagesGuard {
    nr_before: u64,
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl Drop for HugePagesGuard {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/vm/nr_hugepages", self.nr_before.to_string());
    }
}

/// A destination whose hugetlbfs pool runs dry in the middle of postcopy
/// waits (the guest runs there; giving up would lose it) and completes
/// once the pool is grown, with every page intact. The kernel reports a
/// dry pool to UFFDIO_COPY as EEXIST, not ENOMEM: taken for a page already
/// present, this ended the migration with the guest lost.
#[test]
fn a_destination_short_of_huge_pages_waits_and_completes_when_they_come() {
    // 256 MiB: 128 huge pages a side. The source gets all of its own; the
    // destination 40, less than the 78 pages pending at the switch.
    let Some((mount, _guard)) = huge_pages(128 + 40) else {
        return;
    };
    // Shrink the pool to exactly that, and grow it 5 s into the run.
    let nr = "/proc/sys/vm/nr_hugepages";
    let total = read(nr).unwrap();
    let spare = read(FREE_2M).unwrap() - (128 + 40);
    std::fs::write(nr, (total - spare).to_string()).unwrap();
    assert_eq!(read(FREE_2M).unwrap(), 128 + 40, "could not size the pool");
    let grow = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(5));
        std::fs::write(nr, (total - spare + 128).to_string()).unwrap();
    });
    let dir = mount.to_str().unwrap();
    let v = bench_sim(&[
        "--mem-mib",
        "256",
        "--used-percent",
        "60",
        "--dirty-mib-per-s",
        "64",
        "--mode",
        "postcopy",
        "--ram-dir",
        dir,
    ])
    .unwrap();
    grow.join().unwrap();
    check_postcopy(&v);
    assert!(
        v["postcopy_ms"].as_u64().unwrap() >= 4000,
        "the pool never ran dry, so nothing waited: {v}"
    );
}

/// Postcopy and hybrid with both RAM files on hugetlbfs (2 MiB pages): every
/// pending page is a huge page and arrives whole, once; the images match.
#[test]
fn on_hugetlbfs_postcopy_and_hybrid_place_whole_huge_pages_and_match() {
    // Source and destination RAM, with room to spare.
    let Some((mount, _guard)) = huge_pages(2 * 1024 + 16) else {
        return;
    };
    let dir = mount.to_str().unwrap();
    for (mode, hints) in [("postcopy", "on"), ("postcopy", "off"), ("hybrid", "on")] {
        let mut args = TWO_GIB.to_vec();
        args.extend(["--mode", mode, "--hints", hints, "--ram-dir", dir]);
        if mode == "hybrid" {
            args.extend(["--min-rounds", "3", "--max-rounds", "3"]);
        }
        let v = bench_sim(&args).unwrap();
        assert_eq!(v["state"], "completed", "{v}");
        assert_eq!(v["postcopy"], true, "{v}");
        assert_eq!(v["mismatched_pages"], 0, "{v}");
        assert!(v["pages_compared"].as_u64().unwrap() > 0, "{v}");
        assert_eq!(v["destination_pattern_errors"], 0, "{v}");
        // Pending pages count 2 MiB pages (2 GiB has 1024 of them), and
        // each crossed once, whole: there is no smaller unit to place.
        let pending = v["postcopy_pending_pages"].as_u64().unwrap();
        assert!(pending > 0 && pending <= 1024, "{v}");
        assert_eq!(
            v["pages_requested"].as_u64().unwrap()
                + v["pages_read_ahead"].as_u64().unwrap()
                + v["pages_streamed"].as_u64().unwrap(),
            pending,
            "{v}"
        );
    }
}

/// On 1 GiB huge pages (where the host can still find two free gigabytes
/// of contiguous memory): postcopy places the whole gigabyte page with one
/// UFFDIO_COPY, once, and the images match. The test mounts its own
/// hugetlbfs with `pagesize=1G` and gives the pages back after.
#[test]
fn on_one_gib_pages_postcopy_places_each_page_whole_and_matches() {
    let _serial = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let nr = "/sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages";
    let free = "/sys/kernel/mm/hugepages/hugepages-1048576kB/free_hugepages";
    let Ok(before) = read(nr) else {
        eprintln!("skipped: this host has no 1 GiB huge pages");
        return;
    };
    let _restore = OnDrop(move || {
        let _ = std::fs::write(nr, before.to_string());
    });
    let have = read(free).unwrap_or(0);
    if have < 2 {
        let _ = std::fs::write(nr, (before + 2 - have).to_string());
    }
    if read(free).unwrap_or(0) < 2 {
        eprintln!("skipped: the kernel found no 2 GiB of contiguous memory for two 1 GiB pages");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "hugetlbfs", "-o", "pagesize=1G", "none"])
        .arg(dir.path())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: cannot mount hugetlbfs with 1 GiB pages");
        return;
    }
    let path = dir.path().to_path_buf();
    let _unmount = OnDrop(move || {
        let _ = std::process::Command::new("umount").arg(&path).status();
    });
    let v = bench_sim(&[
        "--mem-mib",
        "1024",
        "--used-percent",
        "20",
        "--dirty-mib-per-s",
        "64",
        "--mode",
        "postcopy",
        "--ram-dir",
        dir.path().to_str().unwrap(),
    ])
    .unwrap();
    check_postcopy(&v);
    // One 1 GiB page: pending, sent once, whole.
    assert_eq!(v["postcopy_pending_pages"], 1, "{v}");
}

/// Runs a closure when dropped.
struct OnDrop<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}
