//! The QEMU side of switchover with a REAL guest: `QemuVmm` stops the source
//! QEMU and takes its device state through QEMU's own migration (file URI,
//! `x-ignore-shared`, so no RAM in it); `QemuDestination` loads it into a
//! QEMU started with `-incoming defer` and resumes it. The guest's heartbeat
//! goes on from where it stopped and its data checker keeps passing.
//!
//! RAM is copied between the two RAM files by this test with a plain file
//! copy while both VMs are stopped: this test is about the device-state
//! handover; moving RAM live is the engine's job and has its own tests.
//!
//! Needs `FREEHINT_GUEST_DIR` and the reference QEMU on PATH (`make test`
//! provides both); see real_guest_balloon.rs for the skip rule.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use freehint_engine::{DestinationVmm, Vmm};
use freehint_qemu::{QemuDestination, QemuVmm, Qmp};

const MEM_MIB: u64 = 256;

struct Qemu(Child);
impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn last_heartbeat(lines: &Mutex<Vec<String>>) -> Option<u64> {
    lines.lock().unwrap().iter().rev().find_map(|l| {
        l.split("freehint-heartbeat ")
            .nth(1)
            .and_then(|n| n.trim().parse().ok())
    })
}

fn start(guest: &Path, ram: &Path, qmp: &Path, incoming: bool) -> (Qemu, Arc<Mutex<Vec<String>>>) {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-L",
        "/usr/share/seabios",
        "-L",
        "/usr/share/qemu",
        "-L",
        "/usr/lib/ipxe/qemu",
    ])
    .args([
        "-machine",
        "q35",
        "-m",
        &format!("{MEM_MIB}M"),
        "-nographic",
        "-nodefaults",
        "-serial",
        "stdio",
    ])
    .arg("-object")
    .arg(format!(
        "memory-backend-file,id=mem0,size={MEM_MIB}M,mem-path={},share=on",
        ram.display()
    ))
    .args(["-machine", "memory-backend=mem0"])
    .arg("-kernel")
    .arg(guest.join("vmlinuz"))
    .arg("-initrd")
    .arg(guest.join("initramfs.gz"))
    .args([
        "-append",
        "console=ttyS0 quiet freehint.memwork=32 freehint.check=16",
    ])
    .arg("-qmp")
    .arg(format!("unix:{},server=on,wait=off", qmp.display()))
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    if incoming {
        cmd.args(["-incoming", "defer"]);
    }
    let mut child = cmd.spawn().expect("starting qemu-system-x86_64");
    let out = child.stdout.take().unwrap();
    let lines = Arc::new(Mutex::new(Vec::new()));
    {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(l);
            }
        });
    }
    wait_for("the QMP socket", Duration::from_secs(10), || qmp.exists());
    (Qemu(child), lines)
}

#[test]
fn guest_resumes_on_the_destination_with_its_heartbeat_and_data() {
    let Ok(guest) = std::env::var("FREEHINT_GUEST_DIR") else {
        assert!(
            std::env::var("FREEHINT_REQUIRE_REAL_GUEST").is_err(),
            "FREEHINT_GUEST_DIR must be set (make test sets it)"
        );
        eprintln!("SKIPPED: no guest image (run make test)");
        return;
    };
    let guest = Path::new(&guest);
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let (src_ram, dst_ram) = (dir.path().join("src.ram"), dir.path().join("dst.ram"));
    let (src_qmp, dst_qmp) = (dir.path().join("src.qmp"), dir.path().join("dst.qmp"));

    let (_src, src_console) = start(guest, &src_ram, &src_qmp, false);
    wait_for("the source guest", Duration::from_secs(180), || {
        src_console
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("freehint-guest: ready"))
    });
    wait_for("source heartbeats", Duration::from_secs(30), || {
        last_heartbeat(&src_console).unwrap_or(0) >= 5
    });
    let (_dst, dst_console) = start(guest, &dst_ram, &dst_qmp, true);

    let source = QemuVmm::new(
        Qmp::connect(&src_qmp).unwrap(),
        dir.path().join("src.state"),
    )
    .unwrap();
    let dest = QemuDestination::new(
        Qmp::connect(&dst_qmp).unwrap(),
        dir.path().join("dst.state"),
    )
    .unwrap();

    source.stop().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let stopped_at = last_heartbeat(&src_console).unwrap();
    // RAM: a plain copy while both VMs are stopped (see the module docs).
    {
        let mut from = std::fs::File::open(&src_ram).unwrap();
        let mut to = std::fs::OpenOptions::new()
            .write(true)
            .open(&dst_ram)
            .unwrap();
        std::io::copy(&mut from, &mut to).unwrap();
    }
    let state = source.device_state().unwrap();
    assert!(!state.is_empty());
    assert!(
        (state.len() as u64) < 4 << 20,
        "device state is {} bytes: RAM leaked into it (x-ignore-shared not in effect?)",
        state.len()
    );
    dest.load_device_state(&state).unwrap();
    dest.resume().unwrap();

    wait_for(
        "heartbeats on the destination",
        Duration::from_secs(30),
        || last_heartbeat(&dst_console).is_some_and(|n| n > stopped_at + 3),
    );
    let first_on_dst = dst_console
        .lock()
        .unwrap()
        .iter()
        .find_map(|l| {
            l.split("freehint-heartbeat ")
                .nth(1)
                .and_then(|n| n.trim().parse::<u64>().ok())
        })
        .unwrap();
    assert!(
        first_on_dst > stopped_at.saturating_sub(2),
        "the destination guest restarted instead of resuming"
    );
    eprintln!(
        "real guest switchover: device state {} bytes; heartbeat stopped at {stopped_at} on the source, went on at {first_on_dst} on the destination",
        state.len()
    );
    wait_for(
        "the data check on the destination",
        Duration::from_secs(30),
        || {
            dst_console
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains("freehint-check ok"))
        },
    );
    assert!(!dst_console
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("FAIL")));
    source.handed_over().unwrap();
}
