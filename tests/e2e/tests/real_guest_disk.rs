//! A REAL guest with a virtio-blk disk (an ext4 image on the host, the
//! same file for source and destination: shared storage) that reads and
//! checksums its files continuously, pass after pass (`fh-diskcheck`).
//!
//! * With `cache=none` (O_DIRECT, `aio=io_uring`) QEMU's block layer
//!   completes reads by DMA into pinned guest pages, which freehint's dirty
//!   tracking cannot see: the migration is refused up front, with an error
//!   naming the drive, and the guest runs on untouched.
//! * With `cache=writeback` the host kernel copies the data into guest RAM
//!   through QEMU's page tables, which the dirty log sees: the guest
//!   migrates while it reads, and its data and disk checks pass on the
//!   destination.

use std::time::Duration;

use freehint_demo::{
    check_after, freehint_migrate, make_disk_image, poll, DemoError, DiskAio, DiskCache,
    DiskConfig, FreehintPair, QemuGuest, Testbed,
};
use freehint_e2e::real_guest_setup;

fn disk_failures(g: &QemuGuest) -> Vec<String> {
    g.console
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|l| l.contains("freehint-disk FAIL"))
        .cloned()
        .collect()
}

/// Waits until the guest has verified its disk `n` more times.
fn disk_checks_go_on(g: &QemuGuest, n: usize) -> bool {
    let have = g.disk_checks_ok().len();
    poll(Duration::from_secs(60), || {
        g.disk_checks_ok().len() >= have + n
    })
}

#[test]
fn a_guest_reading_its_disk_migrates_or_is_refused_naming_the_drive() {
    let Some(mut s) = real_guest_setup("disk", 512, 0) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    make_disk_image(&image, 8, 32 << 20).unwrap();

    // O_DIRECT with io_uring: refused before anything happens.
    s.disk = Some(DiskConfig {
        image: image.clone(),
        cache: DiskCache::None,
        aio: DiskAio::IoUring,
    });
    {
        let bed = Testbed::new(&s, "disk-cache-none").unwrap();
        let FreehintPair {
            src,
            dst: _dst,
            src_daemon,
            dst_daemon: _dst_daemon,
            addr,
        } = bed.freehint_pair(&[]).unwrap();
        assert!(
            disk_checks_go_on(&src, 2),
            "the source never checked its disk"
        );
        let err = match freehint_migrate(&s.bin_dir, &src_daemon.control, &addr, true, &[]) {
            Err(DemoError::Migrate(msg)) => msg,
            other => panic!("an O_DIRECT drive was not refused: {other:?}"),
        };
        eprintln!("cache=none: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains("refusing to migrate")
                && err.contains("drive disk0")
                && err.contains("cache.direct"),
            "{err}"
        );
        // Untouched: it never stopped, and goes on reading its disk.
        let beats = src.heartbeats().last().copied().unwrap_or(0);
        assert!(poll(Duration::from_secs(10), || src
            .heartbeats()
            .last()
            .is_some_and(|&n| n > beats + 3)));
        assert!(disk_checks_go_on(&src, 2));
        assert!(disk_failures(&src).is_empty(), "{:?}", disk_failures(&src));
    }

    // Writeback: migrates while the guest reads and checksums its disk.
    s.disk = Some(DiskConfig {
        image,
        cache: DiskCache::Writeback,
        aio: DiskAio::Threads,
    });
    let bed = Testbed::new(&s, "disk-writeback").unwrap();
    let FreehintPair {
        src,
        dst,
        src_daemon,
        dst_daemon,
        addr,
    } = bed.freehint_pair(&[]).unwrap();
    assert!(
        disk_checks_go_on(&src, 2),
        "the source never checked its disk"
    );
    bed.settle_destination(&dst_daemon).unwrap();
    let stats = freehint_migrate(&s.bin_dir, &src_daemon.control, &addr, true, &[]).unwrap();
    let (alive, check) = check_after(&src, &dst, Duration::from_secs(30));
    assert!(alive && check == "ok", "{alive} {check} {stats:?}");
    let passes_on_source = src.disk_checks_ok().last().copied().unwrap_or(0);
    assert!(
        poll(Duration::from_secs(60), || dst
            .disk_checks_ok()
            .last()
            .is_some_and(|&n| n >= passes_on_source + 2)),
        "the disk checker did not go on on the destination (source was at pass {passes_on_source}, destination at {:?})",
        dst.disk_checks_ok().last()
    );
    assert!(disk_failures(&src).is_empty(), "{:?}", disk_failures(&src));
    assert!(disk_failures(&dst).is_empty(), "{:?}", disk_failures(&dst));
    eprintln!(
        "cache=writeback: migrated while reading the disk: {} MiB on the wire, {} ms, {} ms downtime; disk pass {} on the source, {:?} on the destination",
        stats.bytes_on_wire >> 20,
        stats.total_time_ms,
        stats.downtime_ms,
        passes_on_source,
        dst.disk_checks_ok().last()
    );
}
