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

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use freehint_e2e::{guest_args, wait_for, QemuGuest};
use freehint_qemu::{QemuDestination, QemuVmm, Qmp};
use freehint_types::{DestinationVmm, Vmm};

const MEM_MIB: u64 = 256;

fn start(guest: &Path, ram: &Path, qmp: &Path, incoming: bool) -> QemuGuest {
    let mut cmd = Command::new("qemu-system-x86_64");
    guest_args(
        &mut cmd,
        guest,
        ram,
        MEM_MIB,
        "freehint.memwork=32 freehint.check=16",
    );
    cmd.arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()));
    if incoming {
        cmd.args(["-incoming", "defer"]);
    }
    let vm = QemuGuest::spawn(cmd, None, None).expect("starting QEMU");
    wait_for("the QMP socket", Duration::from_secs(10), || qmp.exists());
    vm
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

    let src = start(guest, &src_ram, &src_qmp, false);
    wait_for("the source guest", Duration::from_secs(180), || {
        src.said("freehint-guest: ready")
    });
    wait_for("source heartbeats", Duration::from_secs(30), || {
        src.heartbeats().last().copied().unwrap_or(0) >= 5
    });
    let dst = start(guest, &dst_ram, &dst_qmp, true);

    let mut src_qmp_conn = Qmp::connect(&src_qmp).unwrap();
    let ram_id = src_qmp_conn.shared_ram_backend().unwrap().id;
    let source = QemuVmm::new(
        src_qmp_conn,
        ram_id,
        dir.path().join("src.state"),
        Duration::from_secs(60),
    )
    .unwrap();
    let dest = QemuDestination::new(
        Qmp::connect(&dst_qmp).unwrap(),
        dir.path().join("dst.state"),
    )
    .unwrap();

    source.stop().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let stopped_at = src.heartbeats().last().copied().unwrap();
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
    dest.load_device_state(&state, Duration::from_secs(60))
        .unwrap();
    dest.resume().unwrap();

    wait_for(
        "heartbeats on the destination",
        Duration::from_secs(30),
        || {
            dst.heartbeats()
                .last()
                .copied()
                .is_some_and(|n| n > stopped_at + 3)
        },
    );
    let first_on_dst = dst.heartbeats()[0];
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
        || dst.said("freehint-check ok"),
    );
    assert!(!dst.said("FAIL"));
    source.handed_over().unwrap();
}
