//! A REAL guest with a virtio-blk disk (no migration): the patched QEMU
//! (tests/qemu/build-qemu.sh) opens an ext4 image from `make_disk_image`
//! with `cache=none,aio=io_uring`, the guest (tests/guest, `freehint.disk`)
//! mounts it and `fh-diskcheck` verifies every file pass after pass; a
//! destination QEMU started with `-incoming defer` on the same image starts
//! too (QEMU's image locking lets an incoming QEMU share it), as a
//! migration with shared storage needs.
//!
//! Needs `FREEHINT_QEMU` and `FREEHINT_GUEST_DIR` (`make test` builds both
//! and sets them); without them it says SKIPPED and passes, unless
//! `FREEHINT_REQUIRE_REAL_GUEST` is set, where it fails. About 10 s.

use std::time::Duration;

use freehint_demo::{
    make_disk_image, poll, DemoSetup, DiskAio, DiskCache, DiskConfig, QemuGuest, Testbed,
};
use freehint_qemu::Qmp;

fn disk_failures(g: &QemuGuest) -> Vec<String> {
    let lines = g.console.lock().unwrap_or_else(|e| e.into_inner());
    lines
        .iter()
        .filter(|l| l.contains("freehint-disk FAIL"))
        .cloned()
        .collect()
}

#[test]
fn guest_checks_its_disk_and_a_destination_opens_the_same_image() {
    let (Ok(qemu), Ok(guest_dir)) = (
        std::env::var("FREEHINT_QEMU"),
        std::env::var("FREEHINT_GUEST_DIR"),
    ) else {
        assert!(
            std::env::var("FREEHINT_REQUIRE_REAL_GUEST").is_err(),
            "FREEHINT_QEMU and FREEHINT_GUEST_DIR must be set (make test sets them)"
        );
        eprintln!("SKIPPED: no QEMU/guest image (run make test)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let files = make_disk_image(&image, 8, 32 << 20).unwrap();
    assert_eq!(files.len(), 8);

    let setup = DemoSetup {
        // native_qemu() runs reference_qemu: here the patched build, whose
        // io_uring support is what this checks.
        patched_qemu: qemu.clone().into(),
        reference_qemu: qemu.into(),
        guest_dir: guest_dir.into(),
        bin_dir: env!("CARGO_TARGET_TMPDIR").into(),
        log_dir: std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("real-guest-disk"),
        mem_mib: 512,
        work_mib: 0,
        keep_mib: 0,
        check_mib: 8,
        boot_timeout: Duration::from_secs(120),
        append: String::new(),
        disk: Some(DiskConfig {
            image,
            cache: DiskCache::None,
            aio: DiskAio::IoUring,
        }),
    };
    let bed = Testbed::new(&setup, "src-and-incoming").unwrap();
    let src = bed.native_qemu("src", false, None).unwrap();
    bed.wait_ready(&src).unwrap();
    assert!(
        src.said("freehint-guest: disk mounted"),
        "the guest did not mount its disk (logs in {})",
        bed.logs.display()
    );
    assert!(
        poll(Duration::from_secs(30), || src.disk_checks_ok().len() >= 2
            || !disk_failures(&src).is_empty()),
        "no disk check passed (logs in {})",
        bed.logs.display()
    );
    assert_eq!(disk_failures(&src), Vec::<String>::new());

    // A destination on the same image, waiting for a migration.
    let mut dst = bed.native_qemu("dst", false, Some("defer")).unwrap();
    let mut qmp = Qmp::connect(&bed.socket("dst.qmp")).unwrap();
    assert!(
        poll(Duration::from_secs(20), || qmp
            .status()
            .is_ok_and(|s| s == "inmigrate")),
        "the destination QEMU did not start on the shared image (logs in {})",
        bed.logs.display()
    );
    assert!(dst.running());
    // The source goes on reading its disk beside it.
    let last = *src.disk_checks_ok().last().unwrap();
    assert!(
        poll(Duration::from_secs(30), || src
            .disk_checks_ok()
            .last()
            .is_some_and(|&n| n >= last + 2)),
        "the source stopped checking its disk once the destination opened the image"
    );
    assert_eq!(disk_failures(&src), Vec::<String>::new());
}
