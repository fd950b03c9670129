//! A REAL guest migrated with the hints of freehint's own guest driver:
//! the `freehint_free` module and `freehint-agent` run in the Debian
//! guest, QEMU serves the agent's virtio-serial port on a socket, and the
//! source daemon (`--agent-socket`) asks the agent instead of the balloon
//! driver for the guest's free memory.
//!
//! Needs `FREEHINT_QEMU`, `FREEHINT_GUEST_DIR` and the reference QEMU;
//! `make test` provides them (see real_guest_balloon.rs for the skip rule).

use std::time::Duration;

use freehint_demo::{check_after, freehint_migrate, poll, FreehintPair, Testbed};
use freehint_e2e::{one_real_guest_test_at_a_time, real_guest_setup as setup};

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
    let mut bed = Testbed::new(&s, "agent").unwrap();
    bed.agent = true;
    let FreehintPair {
        mut src,
        dst,
        src_daemon,
        dst_daemon,
        addr,
    } = bed.freehint_pair(&["--no-resume"]).unwrap();
    assert!(
        poll(Duration::from_secs(30), || src
            .said("freehint-agent: ready")),
        "the agent did not start in the guest (logs in {})",
        bed.logs.display()
    );
    bed.settle_destination(&dst_daemon).unwrap();
    // Wait for the report, so that free pages are never sent (hints that
    // land after a page went out do not take it back).
    let stats = freehint_migrate(
        &s.bin_dir,
        &src_daemon.control,
        &addr,
        true,
        &["--mode", "precopy", "--hint-wait-ms", "10000"],
    )
    .unwrap();
    eprintln!("{}", serde_json::to_string(&stats).unwrap());
    assert_eq!(stats.hint_source.as_deref(), Some("agent"), "{stats:?}");
    let report_ms = stats
        .hint_report_ms
        .expect("the agent's first report ended");
    assert!(stats.hint_wait_ms >= report_ms, "{stats:?}");
    assert_eq!(stats.hint_guest_errors, 0, "{stats:?}");
    // 200 MiB written and freed, 32 MiB of checker data kept: most of the
    // 512 MiB is free.
    let page = 4096;
    assert!(
        stats.pages_skipped_free * page >= 200 << 20,
        "only {} pages skipped: {stats:?}",
        stats.pages_skipped_free
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
    let out = std::process::Command::new(s.bin_dir.join("freehint"))
        .arg("resume")
        .arg("--control")
        .arg(&dst_daemon.control)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (alive, check) = check_after(&src, &dst, Duration::from_secs(30));
    assert!(alive, "no heartbeat on the destination after resume");
    assert_eq!(check, "ok");
    for bad in ["BUG", "corruption", "Oops"] {
        assert!(!dst.said(bad), "the destination guest says {bad:?}");
    }
    eprintln!(
        "agent: report {report_ms} ms, {} pages skipped, {differ} pages differ; {} bytes on the wire, {} ms, downtime {} ms",
        stats.pages_skipped_free, stats.bytes_on_wire, stats.total_time_ms, stats.downtime_ms
    );
}
