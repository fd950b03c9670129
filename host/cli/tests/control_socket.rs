//! The daemon's control socket is its user's only: created 0600, and every
//! request's peer checked (`SO_PEERCRED`) against the daemon's uid, so that
//! a socket made world-writable still refuses another user, with a clear
//! error on both sides.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn status(control: &Path, as_nobody: bool) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_freehint"));
    cmd.arg("status")
        .arg("--control")
        .arg(control)
        .arg("--json");
    if as_nobody {
        cmd.uid(65534).gid(65534);
    }
    cmd.output().unwrap()
}

#[test]
fn the_control_socket_is_0600_and_refuses_other_users() {
    let dir = tempfile::tempdir().unwrap();
    // Others may reach the socket's directory; the socket itself decides.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let control = dir.path().join("vm.ctl");
    let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();
    let _daemon = Daemon(
        Command::new(env!("CARGO_BIN_EXE_freehint"))
            .arg("vm")
            .arg("--insecure")
            .arg("--vhost-socket")
            .arg(dir.path().join("vm.vhost"))
            .arg("--qmp")
            .arg(dir.path().join("vm.qmp"))
            .arg("--control")
            .arg(&control)
            .env("FREEHINT_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let t = Instant::now();
    while !dir.path().join("vm.vhost").exists() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the daemon did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mode = std::fs::metadata(&control).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the control socket's mode is {mode:o}");
    let own = status(&control, false);
    assert!(
        own.status.success(),
        "{}",
        String::from_utf8_lossy(&own.stderr)
    );
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: cannot try another user; skipping that part");
        return;
    }
    // Another user cannot even connect to the 0600 socket.
    let other = status(&control, true);
    let err = String::from_utf8_lossy(&other.stderr);
    assert!(!other.status.success(), "{err}");
    assert!(err.contains("ermission denied"), "{err}");
    // Made world-writable, the socket still refuses them: the daemon checks
    // the peer's uid, and says why.
    std::fs::set_permissions(&control, std::fs::Permissions::from_mode(0o666)).unwrap();
    let other = status(&control, true);
    let err = String::from_utf8_lossy(&other.stderr);
    assert!(!other.status.success(), "{err}");
    assert!(
        err.contains("refused") && err.contains("uid 65534"),
        "{err}"
    );
    let log = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap();
    assert!(log.contains("control request refused"), "{log}");
}
