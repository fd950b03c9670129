//! freehint's guest kernel module (guest-driver/module) in a REAL Debian
//! guest: loaded by the guest's init (`freehint.freeranges`), asked once
//! for every free page and once for whole 2 MiB blocks (`fh-freeranges`),
//! and checked against the kernel's own count of free pages.

use freehint_demo::{Mode, Testbed};
use freehint_e2e::{one_real_guest_test_at_a_time, real_guest_setup};

/// One `freehint-free k=v ...` line, as numbers.
fn fields(line: &str) -> std::collections::HashMap<String, u64> {
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect()
}

#[test]
fn the_module_reports_every_free_page_as_merged_ranges_without_taking_any() {
    let Some(mut s) = real_guest_setup("free-ranges", 512, 64) else {
        return;
    };
    let _alone = one_real_guest_test_at_a_time();
    s.append = "freehint.freeranges".into();
    let bed = Testbed::new(&s, "free-ranges").unwrap();
    let mut g = bed.native_qemu("vm", Mode::QemuNative, false).unwrap();
    bed.wait_ready(&g).unwrap();
    let console = g.console.lock().unwrap().clone();
    g.kill();
    let failures: Vec<&String> = console
        .iter()
        .filter(|l| l.contains("freehint-free FAIL") || l.contains("BUG:") || l.contains("Oops"))
        .collect();
    assert!(failures.is_empty(), "{failures:?}");
    let reports: Vec<_> = console
        .iter()
        .filter(|l| l.contains("freehint-free order="))
        .map(|l| fields(l))
        .collect();
    assert_eq!(reports.len(), 2, "{console:?}");
    let (all, huge) = (&reports[0], &reports[1]);
    assert_eq!((all["order"], huge["order"]), (0, 9));
    for r in [all, huge] {
        assert_eq!(r["overlaps"], 0, "{r:?}");
        assert_eq!(r["truncated"], 0, "{r:?}");
        assert!(r["ranges"] > 0, "{r:?}");
    }
    // Every free page: the buddy allocator's count (MemFree, read just
    // before), give or take what the guest allocated or freed meanwhile.
    let (pages, memfree) = (all["pages"], all["memfree_pages"]);
    assert!(
        pages.abs_diff(memfree) * 50 <= memfree,
        "{pages} pages reported, {memfree} free: {all:?}"
    );
    // After the 64 MiB workload was freed, most of it is in whole 2 MiB
    // blocks; those reports are whole blocks only.
    assert!(huge["pages"] <= pages + pages / 50, "{huge:?} {all:?}");
    assert!(huge["pages"] >= 64 << 8, "{huge:?}");
    assert_eq!(huge["pages"] % 512, 0, "{huge:?}");
}
