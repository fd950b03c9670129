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
    // Debian's defaults: free pages hold whatever they held.
    assert!(
        console
            .iter()
            .any(|l| l.contains("freehint-free order=0") && l.contains("content=undefined")),
        "{console:?}"
    );
}

/// The module says what a free page holds as the kernel defines it: zeros
/// with `init_on_free=1`, the poison byte with `page_poison=1` (which the
/// kernel checks when it hands the page out again).
#[test]
fn the_module_says_what_free_pages_hold_under_init_on_free_and_poisoning() {
    for (option, content) in [("init_on_free=1", "zero"), ("page_poison=1", "poison")] {
        let Some(mut s) = real_guest_setup("free-content", 256, 0) else {
            return;
        };
        let _alone = one_real_guest_test_at_a_time();
        s.append = format!("freehint.freeranges {option}");
        let bed = Testbed::new(&s, &format!("free-content-{content}")).unwrap();
        let mut g = bed.native_qemu("vm", Mode::QemuNative, false).unwrap();
        bed.wait_ready(&g).unwrap();
        let console = g.console.lock().unwrap().clone();
        g.kill();
        let line = console
            .iter()
            .find(|l| l.contains("freehint-free order=0"))
            .unwrap_or_else(|| panic!("no report with {option}: {console:?}"));
        assert!(
            line.contains(&format!("content={content}")),
            "{option}: {line}"
        );
        assert!(
            !console.iter().any(|l| l.contains("corruption")),
            "{option}: {console:?}"
        );
    }
}
