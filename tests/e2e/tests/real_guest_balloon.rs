//! A REAL guest: QEMU (built by tests/qemu/build-qemu.sh, with the generic
//! vhost-user device) boots the Debian kernel from tests/guest, whose stock
//! `virtio_balloon` driver talks to our balloon backend over vhost-user.
//! The backend feeds the real engine's `HintFilter`.
//!
//! Needs `FREEHINT_QEMU` (the patched qemu-system-x86_64) and
//! `FREEHINT_GUEST_DIR` (vmlinuz + initramfs.gz); `make test` builds both
//! and sets them. Without them the test says so and passes, unless
//! `FREEHINT_REQUIRE_REAL_GUEST=1` (set by `make test` as root), where it
//! fails.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use freehint_balloon::{BalloonBackend, BalloonConfig, BalloonHandle};
use freehint_e2e::{guest_args, wait_for, QemuGuest};
use freehint_engine::empty_bitmap;
use freehint_hint_filter::{HintFilter, IdentityMappedSink};
use freehint_memory::GuestRam;
use freehint_types::HintSource;

const MEM_MIB: u64 = 512;

#[test]
fn linux_balloon_driver_hints_and_reports_through_our_backend() {
    let Some((qemu, guest)) = freehint_e2e::real_guest_env() else {
        return;
    };
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let ram_path = dir.path().join("guest.ram");
    let sock = dir.path().join("balloon.sock");
    let ram = GuestRam::open_file(&ram_path, MEM_MIB << 20).unwrap();

    // The engine's real hint filter is the sink; open an epoch as a
    // migration would.
    let filter = Arc::new(HintFilter::new(empty_bitmap(&ram)));
    filter.with_bitmap(|b| b.set_all());
    let epoch = filter
        .sync(true, |_| Ok::<(), ()>(()))
        .unwrap()
        .opened_epoch
        .unwrap();
    // The guest has less RAM than the PCI hole starts at: its
    // guest-physical addresses are its RAM-file offsets.
    let sink = Arc::new(IdentityMappedSink(filter.clone()));
    let backend = BalloonBackend::new(BalloonConfig::default(), sink).unwrap();
    let handle: BalloonHandle = backend.handle();
    let serve_sock = sock.clone();
    std::thread::spawn(move || backend.serve(&serve_sock));
    wait_for("the backend socket", Duration::from_secs(5), || {
        sock.exists()
    });

    let mut cmd = Command::new(&qemu);
    guest_args(
        &mut cmd,
        &guest,
        &ram_path,
        MEM_MIB,
        "freehint.memwork=128 freehint.check=16",
    );
    cmd.arg("-chardev")
        .arg(format!("socket,id=c0,path={}", sock.display()))
        .args([
            "-device",
            "vhost-user-device-pci,chardev=c0,virtio-id=5,num_vqs=5,config_size=16",
        ]);
    let vm = QemuGuest::spawn(cmd, None, None).expect("starting QEMU");

    wait_for(
        "the guest to boot and finish its workload",
        Duration::from_secs(180),
        || vm.said("freehint-guest: ready"),
    );
    assert!(
        vm.said("freehint-guest: balloon bound"),
        "virtio_balloon did not bind"
    );

    // Stats reach the device.
    wait_for("guest stats", Duration::from_secs(30), || {
        handle.status().guest_stats.free_bytes.is_some()
    });
    let st = handle.status();
    let free = st.guest_stats.free_bytes.unwrap();
    let total = st.guest_stats.total_bytes.unwrap();
    assert!(free > 0 && free < total && total <= MEM_MIB << 20, "{st:?}");

    // Free page reporting discards memory the guest freed (128 MiB of
    // workload among it) and the guest keeps running on it.
    wait_for("free page reporting", Duration::from_secs(60), || {
        handle.status().counters.reported_bytes >= 64 << 20
    });

    // A hint round: the driver sees the new cmd_id through the config-change
    // message QEMU forwards, reports its free 4 MiB blocks, and the engine
    // clears them from its bitmap.
    handle.start_round(epoch).unwrap();
    wait_for("hints from the guest", Duration::from_secs(60), || {
        filter.stats().hint_ranges_applied >= 8
    });
    let hs = filter.stats();
    assert_eq!(hs.hint_ranges_rejected_invalid, 0, "{hs:?}");
    assert!(hs.pages_skipped_free >= 8 * 1024, "{hs:?}");
    let c = handle.status().counters;
    eprintln!(
        "real guest: {} hint ranges ({} MiB) applied to the bitmap, {} pages cleared; {} MiB reported and discarded; guest free {} MiB of {} MiB",
        hs.hint_ranges_applied,
        hs.hinted_bytes >> 20,
        hs.pages_skipped_free,
        c.reported_bytes >> 20,
        free >> 20,
        total >> 20
    );
    handle.stop_round().unwrap();
    handle.finish().unwrap();

    // The guest is alive and its data intact after all of it.
    let beats = vm.heartbeats().len();
    wait_for("more heartbeats", Duration::from_secs(30), || {
        vm.heartbeats().len() > beats + 3
    });
    assert!(
        !vm.said("freehint-check FAIL"),
        "the guest's data region was corrupted"
    );
    assert!(vm.said("freehint-check ok"));
}
