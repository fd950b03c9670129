//! A REAL guest migrated with the hints of freehint's own guest driver:
//! the `freehint_free` module and `freehint-agent` run in the Debian
//! guest, QEMU serves the agent's virtio-serial port on a socket, and the
//! source daemon (`--agent-socket`) asks the agent instead of the balloon
//! driver for the guest's free memory.
//!
//! Needs `FREEHINT_QEMU`, `FREEHINT_GUEST_DIR` and the reference QEMU;
//! `make test` provides them (see real_guest_balloon.rs for the skip rule).

use std::time::Duration;

use freehint_demo::{
    check_after, freehint_migrate, poll, Daemon, DemoSetup, FreehintPair, QemuGuest, Testbed,
};
use freehint_e2e::{freehint, one_real_guest_test_at_a_time, real_guest_setup as setup};
use freehint_engine::MigrationStats;

/// Pages of two RAM files that differ (4 KiB pages).
fn different_pages(a: &std::path::Path, b: &std::path::Path) -> u64 {
    use std::os::unix::fs::FileExt;
    let (fa, fb) = (
        std::fs::File::open(a).unwrap(),
        std::fs::File::open(b).unwrap(),
    );
    let len = fa.metadata().unwrap().len();
    assert_eq!(len, fb.metadata().unwrap().len(), "RAM sizes differ");
    let chunk = 1 << 20;
    let (mut pa, mut pb) = (vec![0u8; chunk], vec![0u8; chunk]);
    let mut differ = 0;
    let mut at = 0;
    while at < len {
        let n = chunk.min((len - at) as usize);
        fa.read_exact_at(&mut pa[..n], at).unwrap();
        fb.read_exact_at(&mut pb[..n], at).unwrap();
        differ += pa[..n]
            .chunks(4096)
            .zip(pb[..n].chunks(4096))
            .filter(|(x, y)| x != y)
            .count() as u64;
        at += n as u64;
    }
    differ
}

/// A source guest under freehint with the agent running in it, and a
/// destination ready for it (`dst_extra`: more options of the destination
/// daemon). The testbed is returned too: it owns the RAM files and sockets.
fn agent_pair(s: &DemoSetup, name: &str, dst_extra: &[&str]) -> (Testbed, FreehintPair) {
    let mut bed = Testbed::new(s, name).unwrap();
    bed.agent = true;
    let pair = bed.freehint_pair(dst_extra).unwrap();
    assert!(
        poll(Duration::from_secs(30), || pair
            .src
            .said("freehint-agent: ready")),
        "the agent did not start in the guest (logs in {})",
        bed.logs.display()
    );
    bed.settle_destination(&pair.dst_daemon).unwrap();
    (bed, pair)
}

/// `freehint migrate` with hints on and `args`; prints the stats.
fn migrate(s: &DemoSetup, pair: &FreehintPair, args: &[&str]) -> MigrationStats {
    let stats =
        freehint_migrate(&s.bin_dir, &pair.src_daemon.control, &pair.addr, true, args).unwrap();
    eprintln!("{}", serde_json::to_string(&stats).unwrap());
    stats
}

/// Precopy that waits for the guest's first report, so that free pages are
/// never sent (hints that land after a page went out do not take it back).
const AFTER_THE_REPORT: [&str; 4] = ["--mode", "precopy", "--hint-wait-ms", "10000"];

/// Resumes the guest a `--no-resume` destination holds.
fn resume(dst_daemon: &Daemon) {
    let control = dst_daemon.control.to_str().expect("utf-8");
    let (ok, _, err) = freehint(&["resume", "--control", control]);
    assert!(ok, "{err}");
}

/// The guest runs on the destination past the source's last heartbeat, its
/// data region verified there.
fn assert_alive_with_data(src: &QemuGuest, dst: &QemuGuest) {
    let (alive, check) = check_after(src, dst, Duration::from_secs(30));
    assert!(alive, "no heartbeat on the destination");
    assert_eq!(check, "ok");
}

/// The destination guest's kernel reported no bug and no corrupted page.
fn assert_no_kernel_complaint(dst: &QemuGuest) {
    for bad in ["BUG", "corruption", "Oops"] {
        assert!(!dst.said(bad), "the destination guest says {bad:?}");
    }
}

/// The guest frees 200 MiB of written memory before the migration; the
/// agent reports it, the source skips it, and the guest runs on on the
/// destination with its data. On a `--no-resume` run the two RAM files
/// are compared: every page that differs must be one the agent's hints
/// let the source skip (a free page's content is the guest's to ignore),
/// so the pages that differ are at most the pages skipped.
#[test]
fn with_the_agent_only_pages_hinted_free_differ_and_the_guest_runs_on() {
    let Some(s) = setup("agent", 512, 200) else {
        return;
    };
    let _alone = one_real_guest_test_at_a_time();
    let (bed, pair) = agent_pair(&s, "agent", &["--no-resume"]);
    let stats = migrate(&s, &pair, &AFTER_THE_REPORT);
    let FreehintPair {
        mut src,
        dst,
        dst_daemon,
        ..
    } = pair;
    assert_eq!(stats.hint_source.as_deref(), Some("agent"), "{stats:?}");
    let report_ms = stats
        .hint_report_ms
        .expect("the agent's first report ended");
    assert!(stats.hint_wait_ms >= report_ms, "{stats:?}");
    assert_eq!(stats.hint_guest_errors, 0, "{stats:?}");
    // 200 MiB written and freed, 32 MiB of checker data kept: most of the
    // 512 MiB is free, and the freed 200 MiB never cross as page data.
    // Which path keeps them off the wire depends on timing: the agent's
    // hints, or, if the guest's free page reporting discarded the blocks
    // before the migration began (2 s after the free), holes in the RAM
    // file that go as zero runs and are never in the bitmap to be hinted.
    // The agent's hints must still have skipped pages of their own.
    let page = 4096;
    assert!(
        stats.pages_sent * page <= (512 - 200) << 20,
        "{} pages sent as data: the freed memory crossed: {stats:?}",
        stats.pages_sent
    );
    assert!(
        stats.pages_skipped_free > 0,
        "the agent's hints skipped nothing: {stats:?}"
    );
    assert!(
        src.wait_exit(Duration::from_secs(10)),
        "the source QEMU did not quit"
    );
    let differ = different_pages(&bed.ram("src"), &bed.ram("dst"));
    assert!(
        differ <= stats.pages_skipped_free,
        "{differ} pages differ, more than the {} the hints skipped",
        stats.pages_skipped_free
    );
    resume(&dst_daemon);
    assert_alive_with_data(&src, &dst);
    assert_no_kernel_complaint(&dst);
    eprintln!(
        "agent: report {report_ms} ms, {} pages skipped, {differ} pages differ; {} bytes on the wire, {} ms, downtime {} ms",
        stats.pages_skipped_free, stats.bytes_on_wire, stats.total_time_ms, stats.downtime_ms
    );
}

/// `init_on_free=1`: the guest zeroes every page it frees and, trusting
/// that, does not zero pages it allocates. The agent says so in its hello,
/// and the source sends the hinted pages as zero records instead of
/// leaving them out: on a `--no-resume` run the destination's RAM equals
/// the source's page for page, and the guest runs on.
#[test]
fn under_init_on_free_hinted_pages_arrive_as_zeros_and_ram_is_equal() {
    let Some(mut s) = setup("agent-init-on-free", 512, 200) else {
        return;
    };
    let _alone = one_real_guest_test_at_a_time();
    s.append = "init_on_free=1".into();
    let (bed, pair) = agent_pair(&s, "agent-init-on-free", &["--no-resume"]);
    let stats = migrate(&s, &pair, &AFTER_THE_REPORT);
    let FreehintPair {
        mut src,
        dst,
        dst_daemon,
        ..
    } = pair;
    assert_eq!(stats.hint_source.as_deref(), Some("agent"), "{stats:?}");
    assert!(
        stats.pages_skipped_free * 4096 >= 100 << 20,
        "the hints skipped {} pages: {stats:?}",
        stats.pages_skipped_free
    );
    assert!(
        src.wait_exit(Duration::from_secs(10)),
        "the source QEMU did not quit"
    );
    let differ = different_pages(&bed.ram("src"), &bed.ram("dst"));
    assert_eq!(differ, 0, "pages differ although free pages are zeros");
    resume(&dst_daemon);
    assert_alive_with_data(&src, &dst);
    assert_no_kernel_complaint(&dst);
}

/// `page_poison=1`: the guest fills every page it frees with 0xaa and
/// checks the pattern when it hands the page out again. The agent says so,
/// and the source sends the hinted pages as fill records of 0xaa instead
/// of leaving them out: on a `--no-resume` run the two RAM files are equal
/// page for page, and once resumed the guest's kernel finds no corrupted
/// free page.
#[test]
fn under_page_poisoning_hinted_pages_arrive_poisoned_and_ram_is_equal() {
    let Some(mut s) = setup("agent-page-poison", 512, 200) else {
        return;
    };
    let _alone = one_real_guest_test_at_a_time();
    s.append = "page_poison=1".into();
    let (bed, pair) = agent_pair(&s, "agent-page-poison", &["--no-resume"]);
    let stats = migrate(&s, &pair, &AFTER_THE_REPORT);
    let FreehintPair {
        mut src,
        dst,
        dst_daemon,
        ..
    } = pair;
    assert_eq!(stats.hint_source.as_deref(), Some("agent"), "{stats:?}");
    assert!(
        stats.pages_filled * 4096 >= 100 << 20,
        "{} pages sent as fill records: {stats:?}",
        stats.pages_filled
    );
    assert!(
        src.wait_exit(Duration::from_secs(10)),
        "the source QEMU did not quit"
    );
    let differ = different_pages(&bed.ram("src"), &bed.ram("dst"));
    assert_eq!(differ, 0, "pages differ although free pages are poisoned");
    resume(&dst_daemon);
    assert_alive_with_data(&src, &dst);
    // Memory the guest allocates after arriving is checked for its poison.
    std::thread::sleep(Duration::from_secs(2));
    assert_no_kernel_complaint(&dst);
}

/// A hostile agent, here a program on the port's socket in place of QEMU's
/// (the guest has none): it answers the hello, then meets every report
/// with garbage, ranges far outside guest RAM and a flood of ranges for
/// reports never asked for, and never says done. The migration goes on
/// without its hints, the errors are counted, and the guest arrives with
/// its data.
#[test]
fn a_hostile_agent_costs_its_hints_not_the_migration() {
    use freehint_agent_protocol::{FreeContent, Hello, Message, PfnRange};
    use std::io::{Read, Write};
    let Some(s) = setup("agent-hostile", 512, 100) else {
        return;
    };
    let _alone = one_real_guest_test_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("hostile.agent");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let reports = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen = reports.clone();
    std::thread::spawn(move || {
        let Ok((mut c, _)) = listener.accept() else {
            return;
        };
        let mut out = Vec::new();
        let mut d = freehint_agent_protocol::Decoder::default();
        let mut buf = [0u8; 4096];
        while let Ok(n) = c.read(&mut buf) {
            if n == 0 {
                return;
            }
            d.push(&buf[..n]);
            while let Some(Ok(m)) = d.next_message() {
                out.clear();
                match m {
                    Message::Query => Message::Hello(Hello {
                        page_bytes: 4096,
                        free_content: FreeContent::Undefined,
                    })
                    .encode(&mut out),
                    Message::Report { cmd_id, .. } => {
                        seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        out.extend_from_slice(b"\x00\xffnot a frame at all");
                        Message::Ranges {
                            cmd_id,
                            ranges: vec![PfnRange {
                                first_pfn: 1 << 40,
                                pages: 1 << 20,
                            }],
                        }
                        .encode(&mut out);
                        for k in 0..64u32 {
                            Message::Ranges {
                                cmd_id: cmd_id.wrapping_add(1000 + k),
                                ranges: (0..4096)
                                    .map(|i| PfnRange {
                                        first_pfn: 2 * i,
                                        pages: 1,
                                    })
                                    .collect(),
                            }
                            .encode(&mut out);
                        }
                    }
                    _ => {}
                }
                if c.write_all(&out).is_err() {
                    return;
                }
            }
        }
    });
    let mut bed = Testbed::new(&s, "agent-hostile").unwrap();
    bed.daemon_args = vec!["--agent-socket".into(), socket.display().to_string()];
    let FreehintPair {
        src,
        dst,
        src_daemon,
        dst_daemon,
        addr,
    } = bed.freehint_pair(&[]).unwrap();
    bed.settle_destination(&dst_daemon).unwrap();
    let stats = freehint_migrate(
        &s.bin_dir,
        &src_daemon.control,
        &addr,
        true,
        &["--mode", "precopy", "--hint-wait-ms", "2000"],
    )
    .unwrap();
    eprintln!("{}", serde_json::to_string(&stats).unwrap());
    assert!(reports.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    assert_eq!(stats.hint_source.as_deref(), Some("agent"), "{stats:?}");
    assert_eq!(stats.hint_report_ms, None, "it never ended a report");
    assert!(stats.hint_guest_errors >= 64 * 4096, "{stats:?}");
    assert_eq!(stats.pages_skipped_free, 0, "{stats:?}");
    // The wait for its report ended (at --hint-wait-ms at the latest).
    assert!(stats.hint_wait_ms <= 2500, "{stats:?}");
    assert_alive_with_data(&src, &dst);
}

/// `--guest-drop-caches`: a guest that read 192 MiB of files from its disk
/// holds them in its page cache. Asked to, the agent drops the clean cache
/// before the first report: the pages are hinted free and not sent, and
/// the stats say how much was freed.
#[test]
fn guest_drop_caches_frees_the_page_cache_before_the_report() {
    use freehint_demo::{make_disk_image, DiskAio, DiskCache, DiskConfig};
    let Some(mut s) = setup("agent-drop-caches", 512, 0) else {
        return;
    };
    let _alone = one_real_guest_test_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    make_disk_image(&image, 4, 192 << 20).unwrap();
    s.append = "freehint.readdisk".into();
    s.ready_lines = vec!["freehint-guest: disk read into the page cache".into()];
    s.disk = Some(DiskConfig {
        image,
        cache: DiskCache::Writeback,
        aio: DiskAio::Threads,
    });
    let (_bed, pair) = agent_pair(&s, "agent-drop-caches", &[]);
    let stats = migrate(
        &s,
        &pair,
        &[&AFTER_THE_REPORT[..], &["--guest-drop-caches"]].concat(),
    );
    assert_eq!(stats.hint_source.as_deref(), Some("agent"), "{stats:?}");
    let freed = stats.guest_prepare_freed_bytes.expect("the guest prepared");
    assert!(freed >= 150 << 20, "only {freed} bytes freed: {stats:?}");
    assert!(stats.guest_prepare_ms.is_some());
    // Without dropping them, the 192 MiB of cache alone would be sent.
    assert!(
        stats.bytes_on_wire < 192 << 20,
        "{} bytes sent: {stats:?}",
        stats.bytes_on_wire
    );
    assert_alive_with_data(&pair.src, &pair.dst);
}

/// Postcopy with the agent's hints, on a poisoning guest: the report ends
/// before the switch, the hinted pages go as fill records in the switch's
/// round, and the guest runs on the destination with its data and no
/// corrupted free page while the rest of its pages follow.
#[test]
fn postcopy_with_the_agent_on_a_poisoning_guest() {
    let Some(mut s) = setup("agent-postcopy", 512, 200) else {
        return;
    };
    let _alone = one_real_guest_test_at_a_time();
    s.append = "page_poison=1".into();
    let (_bed, pair) = agent_pair(&s, "agent-postcopy", &[]);
    let stats = migrate(&s, &pair, &["--mode", "postcopy"]);
    assert!(stats.postcopy.switched, "{stats:?}");
    assert_eq!(stats.hint_source.as_deref(), Some("agent"), "{stats:?}");
    assert!(stats.hint_report_ms.is_some(), "{stats:?}");
    assert!(stats.pages_filled > 0, "{stats:?}");
    assert_alive_with_data(&pair.src, &pair.dst);
    std::thread::sleep(Duration::from_secs(2));
    assert_no_kernel_complaint(&pair.dst);
}
