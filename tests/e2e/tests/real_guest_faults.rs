//! Faults and bad input around a REAL guest migration: each ends with one
//! clear error, and the source guest still runs (or the error says that
//! its QEMU died). See real_guest_freehint_migration.rs for the set-up.

use std::process::Command;
use std::time::Duration;

use freehint_demo::{
    check_after, free_port, freehint_migrate, poll, DemoError, FreehintPair, Testbed,
};
use freehint_e2e::{
    bin_dir, daemon_status, freehint, one_real_guest_test_at_a_time, real_guest_setup,
};

/// The error of a failed migration, checked to be one line.
fn one_line(r: Result<freehint_engine::MigrationStats, DemoError>) -> String {
    match r {
        Ok(s) => panic!("the migration succeeded: {s:?}"),
        Err(DemoError::Migrate(msg)) => {
            assert_eq!(msg.lines().count(), 1, "not one line: {msg:?}");
            assert!(msg.starts_with("freehint: "), "{msg:?}");
            msg
        }
        Err(e) => panic!("{e}"),
    }
}

fn phase(control: &std::path::Path) -> String {
    daemon_status(control)["state"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The guest's free memory as its balloon driver last reported it (each
/// `status` asks for fresh figures).
fn guest_free_mib(control: &std::path::Path) -> Option<u64> {
    daemon_status(control)["balloon"]["guest_stats"]["free_bytes"]
        .as_u64()
        .map(|b| b >> 20)
}

/// The guest's heartbeat goes on (3 more beats).
fn still_beating(g: &freehint_demo::QemuGuest) -> bool {
    let n = g.heartbeats().last().copied().unwrap_or(0);
    poll(Duration::from_secs(30), || {
        g.heartbeats().last().is_some_and(|&m| m >= n + 3)
    })
}

#[test]
fn wrong_socket_paths_are_one_clear_error() {
    let (ok, _, err) = freehint(&[
        "migrate",
        "--control",
        "/nonexistent/freehint.ctl",
        "--to",
        "127.0.0.1:4444",
    ]);
    assert!(!ok);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("/nonexistent/freehint.ctl") && err.contains("freehint vm"),
        "{err}"
    );

    // A daemon QEMU never connected to.
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let mut daemon = Command::new(bin_dir().join("freehint"))
        .args(["vm", "--vhost-socket", &p("v.sock"), "--qmp", &p("q.sock")])
        .arg("--insecure")
        .args(["--control", &p("c.sock")])
        .spawn()
        .unwrap();
    assert!(poll(Duration::from_secs(10), || dir
        .path()
        .join("v.sock")
        .exists()));
    let (ok, _, err) = freehint(&[
        "migrate",
        "--control",
        &p("c.sock"),
        "--to",
        "127.0.0.1:4444",
    ]);
    assert!(!ok);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("not connected") && err.contains(&p("v.sock")),
        "{err}"
    );
    daemon.kill().unwrap();
    daemon.wait().unwrap();
}

#[test]
fn a_guest_without_the_balloon_driver_migrates_only_without_hints() {
    let Some(mut s) = real_guest_setup("no-balloon-driver", 256, 0) else {
        return;
    };
    let _alone = one_real_guest_test_at_a_time();
    s.append = "freehint.noballoon".into();
    let bed = Testbed::new(&s, "no-balloon-driver").unwrap();
    // (Every part bound: a part left to `..` would be dropped, killed, here.)
    let FreehintPair {
        src,
        dst,
        src_daemon,
        dst_daemon: _dst_daemon,
        addr,
    } = bed.freehint_pair(&[]).unwrap();
    assert!(!src.said("balloon bound"));

    let err = one_line(freehint_migrate(
        &s.bin_dir,
        &src_daemon.control,
        &addr,
        true,
        &[],
    ));
    assert!(
        err.contains("virtio_balloon") && err.contains("hints off"),
        "{err}"
    );
    assert!(still_beating(&src), "the source guest stopped");
    assert_eq!(phase(&src_daemon.control), "failed");

    let stats = freehint_migrate(&s.bin_dir, &src_daemon.control, &addr, false, &[]).unwrap();
    let (alive, check) = check_after(&src, &dst, Duration::from_secs(30));
    assert!(alive && check == "ok", "{alive} {check} {stats:?}");
}

#[test]
fn an_unreachable_or_killed_destination_leaves_the_source_guest_running_and_a_retry_hints_again() {
    let Some(s) = real_guest_setup("bad-destination", 512, 300) else {
        return;
    };
    let _alone = one_real_guest_test_at_a_time();
    let bed = Testbed::new(&s, "bad-destination").unwrap();
    let src_daemon = bed.daemon("src", &[]).unwrap();
    let src = bed.freehint_qemu("src", &src_daemon, false).unwrap();
    bed.wait_ready(&src).unwrap();
    // The guest's free memory before any hint round (the driver holds the
    // blocks it hints until it reads DONE).
    let mut free_before = None;
    assert!(poll(Duration::from_secs(20), || {
        free_before = guest_free_mib(&src_daemon.control);
        free_before.is_some()
    }));
    let free_before = free_before.unwrap();

    // Nobody listens: the hint round has started (the sender opens it
    // before connecting), so the guest holds its hinted blocks...
    let nobody = format!("127.0.0.1:{}", free_port().unwrap());
    let err = one_line(freehint_migrate(
        &s.bin_dir,
        &src_daemon.control,
        &nobody,
        true,
        &[],
    ));
    assert!(err.contains(&nobody), "{err}");
    assert!(still_beating(&src), "the source guest stopped");
    // ... until the failed attempt sends DONE: its free memory comes back.
    let st = daemon_status(&src_daemon.control);
    assert_eq!(
        st["balloon"]["config"]["free_page_hint_cmd_id"], 1,
        "no DONE after the failed attempt: {st}"
    );
    let first_cmd_id = st["last_cmd_id"].as_u64().unwrap();
    assert!(first_cmd_id >= 2, "{st}");
    let mut free_after = 0;
    assert!(
        poll(Duration::from_secs(20), || {
            free_after = guest_free_mib(&src_daemon.control).unwrap_or(0);
            free_after + 32 >= free_before
        }),
        "the guest did not free its hinted blocks after the failed attempt: {free_before} MiB free before, {free_after} MiB after"
    );

    // The destination QEMU is killed while the migration runs.
    let addr = format!("127.0.0.1:{}", free_port().unwrap());
    let dst_daemon = bed.daemon("dst", &["--incoming", &addr]).unwrap();
    let mut dst = bed.freehint_qemu("dst", &dst_daemon, true).unwrap();
    let (bins, control, to) = (s.bin_dir.clone(), src_daemon.control.clone(), addr.clone());
    let migration = std::thread::spawn(move || freehint_migrate(&bins, &control, &to, true, &[]));
    assert!(poll(Duration::from_secs(10), || phase(&src_daemon.control)
        == "migrating"));
    dst.kill();
    let err = one_line(migration.join().unwrap());
    eprintln!("destination QEMU killed: {err}");
    assert!(still_beating(&src), "the source guest stopped");
    let checks = src.checks_ok().len();
    assert!(poll(Duration::from_secs(10), || src.checks_ok().len() > checks));
    assert!(!src.said("freehint-check FAIL"));
    drop(dst_daemon);

    // A retry to a working destination: the VM's cmd_id goes on (Linux
    // ignores one it has seen), so the guest hints again.
    let addr = format!("127.0.0.1:{}", free_port().unwrap());
    let dst_daemon = bed.daemon("dst2", &["--incoming", &addr]).unwrap();
    let dst = bed.freehint_qemu("dst2", &dst_daemon, true).unwrap();
    bed.settle_destination(&dst_daemon).unwrap();
    let stats = freehint_migrate(&s.bin_dir, &src_daemon.control, &addr, true, &[]).unwrap();
    assert!(stats.hinted_bytes > 0, "the retry got no hints: {stats:?}");
    let (alive, check) = check_after(&src, &dst, Duration::from_secs(30));
    assert!(alive && check == "ok", "{alive} {check}");
    let dst_status = daemon_status(&dst_daemon.control);
    assert!(
        dst_status["last_cmd_id"].as_u64().unwrap() > first_cmd_id,
        "the cmd_id did not go on across attempts and to the destination: {dst_status}"
    );
    eprintln!(
        "retry: {} MiB hinted, cmd_id {first_cmd_id} on the first attempt, {} at the destination",
        stats.hinted_bytes >> 20,
        dst_status["last_cmd_id"]
    );
}

#[test]
fn cancel_and_sigterm_leave_the_source_guest_running() {
    let Some(s) = real_guest_setup("cancel", 512, 300) else {
        return;
    };
    let _alone = one_real_guest_test_at_a_time();
    let bed = Testbed::new(&s, "cancel").unwrap();
    let FreehintPair {
        src,
        dst: _dst,
        src_daemon,
        dst_daemon,
        addr,
    } = bed.freehint_pair(&[]).unwrap();
    bed.settle_destination(&dst_daemon).unwrap();

    // `freehint cancel` while the migration runs (hints off: no hint wait,
    // rounds at once; the destination is slowed to make sure we are in
    // time).
    let (ok, _, err) = freehint(&[
        "debug",
        "fault",
        "--control",
        dst_daemon.control.to_str().unwrap(),
        "dst.mid-round=sleep(200)",
    ]);
    assert!(ok, "{err}");
    let (bins, control, to) = (s.bin_dir.clone(), src_daemon.control.clone(), addr.clone());
    let migration = std::thread::spawn(move || freehint_migrate(&bins, &control, &to, false, &[]));
    assert!(poll(Duration::from_secs(10), || phase(&src_daemon.control)
        == "migrating"));
    let (ok, out, err) = freehint(&["cancel", "--control", src_daemon.control.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("cancelling"), "{out}");
    let err = one_line(migration.join().unwrap());
    assert!(
        err.contains("cancelled") && err.contains("runs on"),
        "{err}"
    );
    assert!(
        still_beating(&src),
        "the source guest stopped after a cancel"
    );
    assert_eq!(phase(&src_daemon.control), "failed");
    let (ok, _, err) = freehint(&["cancel", "--control", src_daemon.control.to_str().unwrap()]);
    assert!(!ok && err.contains("no migration is running"), "{err}");

    // SIGTERM to the source's daemon mid-migration: it cancels, resumes the
    // guest, and exits. (The destination QEMU took no state: a new attempt
    // could use it; this one just ends.)
    let (bins, control, to) = (s.bin_dir.clone(), src_daemon.control.clone(), addr.clone());
    let migration = std::thread::spawn(move || freehint_migrate(&bins, &control, &to, false, &[]));
    assert!(poll(Duration::from_secs(10), || phase(&src_daemon.control)
        == "migrating"));
    let mut src_daemon = src_daemon;
    src_daemon.signal(libc::SIGTERM);
    let err = one_line(migration.join().unwrap());
    assert!(err.contains("cancelled"), "{err}");
    assert!(
        src_daemon.wait_exit(Duration::from_secs(10)),
        "the daemon did not exit on SIGTERM"
    );
    assert!(still_beating(&src), "SIGTERM left the source guest paused");
}

#[test]
fn a_source_qemu_killed_mid_migration_is_reported_as_such() {
    let Some(s) = real_guest_setup("source-killed", 512, 300) else {
        return;
    };
    let _alone = one_real_guest_test_at_a_time();
    let bed = Testbed::new(&s, "source-killed").unwrap();
    let FreehintPair {
        mut src,
        dst: _dst,
        src_daemon,
        dst_daemon: _dst_daemon,
        addr,
    } = bed.freehint_pair(&[]).unwrap();
    let (bins, control, to) = (s.bin_dir.clone(), src_daemon.control.clone(), addr.clone());
    let migration = std::thread::spawn(move || freehint_migrate(&bins, &control, &to, true, &[]));
    assert!(poll(Duration::from_secs(10), || phase(&src_daemon.control)
        == "migrating"));
    let pid = src.pid();
    src.kill();
    let err = one_line(migration.join().unwrap());
    assert!(
        err.contains("source QEMU") && err.contains(&pid.to_string()) && err.contains("exited"),
        "{err}"
    );
}
