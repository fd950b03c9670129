//! Faults and bad input around a REAL guest migration: each ends with one
//! clear error, and the source guest still runs (or the error says that
//! its QEMU died). See real_guest_freehint_migration.rs for the set-up.

use std::process::Command;
use std::time::Duration;

use freehint_demo::{
    check_after, free_port, freehint_migrate, poll, DemoError, FreehintPair, Testbed,
};
use freehint_e2e::{bin_dir, real_guest_setup};

/// `freehint ARGS`: (success, stdout, stderr).
fn freehint(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin_dir().join("freehint"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

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
    let (ok, out, err) = freehint(&["status", "--control", control.to_str().unwrap()]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["phase"].as_str().unwrap().to_string()
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
fn an_unreachable_or_killed_destination_leaves_the_source_guest_running() {
    let Some(s) = real_guest_setup("bad-destination", 512, 300) else {
        return;
    };
    let bed = Testbed::new(&s, "bad-destination").unwrap();
    let src_daemon = bed.daemon("src", &[]).unwrap();
    let src = bed.freehint_qemu("src", &src_daemon, false).unwrap();
    bed.wait_ready(&src).unwrap();

    // Nobody listens.
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
}

#[test]
fn a_source_qemu_killed_mid_migration_is_reported_as_such() {
    let Some(s) = real_guest_setup("source-killed", 512, 300) else {
        return;
    };
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
