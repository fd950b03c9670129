#![cfg(not(loom))]
//! Behaviour of the hint filter: epochs, bounds, reporting.

use freehint_hint_filter::{Cursor, HintFilter, MigrationBitmap, PageRun, RegionLayout};
use freehint_types::{CmdId, RamRange};
use proptest::prelude::*;

const MIB: u64 = 1 << 20;

fn two_regions() -> HintFilter {
    // 16 MiB of 4 KiB pages at 0, a hole, then 8 MiB of 2 MiB pages at 1 GiB.
    let mut bm = MigrationBitmap::new(vec![
        RegionLayout {
            ram_start: 0,
            page_bytes: 4096,
            pages: 4096,
        },
        RegionLayout {
            ram_start: 1 << 30,
            page_bytes: 2 * MIB,
            pages: 4,
        },
    ]);
    bm.set_all();
    HintFilter::new(bm)
}

fn no_merge(_: &mut MigrationBitmap) -> Result<(), ()> {
    Ok(())
}

#[test]
fn hints_apply_only_in_their_own_epoch() {
    let f = two_regions();
    let total = f.pages_to_send();
    let hint = [RamRange::new(0, 4 * MIB)];
    // No epoch open yet: dropped.
    assert_eq!(f.apply_hints(CmdId(2), &hint).hint_ranges_dropped_stale, 1);
    let r = f.sync(true, no_merge).unwrap();
    let epoch = r.opened_epoch.unwrap();
    assert!(epoch.is_round());
    let out = f.apply_hints(epoch, &hint);
    assert_eq!(out.pages_cleared, 1024);
    assert_eq!(f.pages_to_send(), total - 1024);
    // The next sync closes it: the same cmd_id is now stale.
    let r2 = f.sync(true, no_merge).unwrap();
    assert_eq!(r2.closed_epoch, Some(epoch));
    assert_ne!(r2.opened_epoch, Some(epoch));
    assert_eq!(
        f.apply_hints(epoch, &[RamRange::new(4 * MIB, 4 * MIB)])
            .hint_ranges_dropped_stale,
        1
    );
    assert_eq!(f.pages_to_send(), total - 1024);
    // A final sync opens nothing: every hint is stale.
    let r3 = f.sync(false, no_merge).unwrap();
    assert_eq!(r3.opened_epoch, None);
    assert_eq!(
        f.apply_hints(r2.opened_epoch.unwrap(), &hint)
            .hint_ranges_dropped_stale,
        1
    );
    assert_eq!(f.stats().hint_ranges_dropped_stale, 3);
}

#[test]
fn hints_outside_ram_are_rejected_and_never_applied() {
    let f = two_regions();
    let epoch = f.sync(true, no_merge).unwrap().opened_epoch.unwrap();
    let before = f.pages_to_send();
    for bad in [
        RamRange::new(16 * MIB - 4096, 8192), // runs off the end of region 0
        RamRange::new(512 * MIB, 4096),       // in the hole
        RamRange::new((1 << 30) + 8 * MIB, 1), // past region 1
        RamRange::new(u64::MAX - 10, 100),    // wraps
        RamRange::new(4096, 0),               // empty
    ] {
        let out = f.apply_hints(epoch, &[bad]);
        assert_eq!(out.hint_ranges_rejected_invalid, 1, "{bad}");
        assert_eq!(out.pages_cleared, 0, "{bad}");
    }
    assert_eq!(f.pages_to_send(), before);
    assert_eq!(f.stats().hint_ranges_rejected_invalid, 5);
}

#[test]
fn partial_pages_are_not_cleared_and_huge_pages_clear_whole() {
    let f = two_regions();
    let epoch = f.sync(true, no_merge).unwrap().opened_epoch.unwrap();
    // 1.5 pages starting mid-page: no whole page inside.
    assert_eq!(
        f.apply_hints(epoch, &[RamRange::new(2048, 4096)])
            .pages_cleared,
        0
    );
    // 3 MiB from the start of the huge region: one whole 2 MiB page.
    assert_eq!(
        f.apply_hints(epoch, &[RamRange::new(1 << 30, 3 * MIB)])
            .pages_cleared,
        1
    );
}

#[test]
fn reported_pages_become_zero_records_unless_written_again() {
    let f = two_regions();
    f.sync(true, no_merge).unwrap();
    assert_eq!(
        f.apply_reported(&[RamRange::new(0, 64 * 4096)])
            .pages_cleared,
        64
    );
    // Pages 10..12 are written after the report: the dirty log sets them.
    let r = f
        .sync(true, |bm| {
            bm.set_run(PageRun {
                region: 0,
                first_page: 10,
                count: 2,
            });
            Ok::<(), ()>(())
        })
        .unwrap();
    assert_eq!(
        r.discarded,
        vec![
            PageRun {
                region: 0,
                first_page: 0,
                count: 10
            },
            PageRun {
                region: 0,
                first_page: 12,
                count: 52
            },
        ]
    );
}

/// A guest with init_on_free: hinted pages still to be sent become zero
/// records after the next sync (unless written since); pages already sent
/// are not sent again; a stale hint does nothing.
#[test]
fn zeroed_hints_turn_pages_still_to_send_into_zero_records() {
    let f = two_regions();
    let run = |first_page, count| PageRun {
        region: 0,
        first_page,
        count,
    };
    let epoch = f.sync(true, no_merge).unwrap().opened_epoch.unwrap();
    // Pages 0..8 were sent already (claimed).
    let mut cursor = Cursor::default();
    let mut claimed = Vec::new();
    f.claim(&mut cursor, 8 * 4096, &mut claimed);
    assert_eq!(claimed, vec![run(0, 8)]);
    let stale = CmdId(epoch.0 + 1);
    assert_eq!(
        f.apply_filled_hints(stale, &[RamRange::new(0, 64 * 4096)], 0)
            .hint_ranges_dropped_stale,
        1
    );
    let out = f.apply_filled_hints(epoch, &[RamRange::new(0, 64 * 4096)], 0);
    assert_eq!((out.hint_ranges_applied, out.pages_cleared), (1, 56));
    assert_eq!(f.stats().pages_skipped_free, 56);
    // Pages 20..22 are written after the hint.
    let r = f
        .sync(true, |bm| {
            bm.set_run(run(20, 2));
            Ok::<(), ()>(())
        })
        .unwrap();
    assert_eq!(r.discarded, vec![run(8, 12), run(22, 42)]);
    assert!(r.filled.is_empty());
    // They are to be sent, with their data; the rest of 0..64 is not.
    let mut cursor = Cursor::default();
    let mut claimed = Vec::new();
    f.claim(&mut cursor, 2 * 4096, &mut claimed);
    assert_eq!(claimed, vec![run(20, 2)]);
    // The default sink (one that cannot send zero records) drops them.
    struct Plain;
    impl freehint_types::HintSink for Plain {
        fn free_page_hints(&self, _: CmdId, _: &[GpaRange]) -> HintOutcome {
            HintOutcome::default()
        }
        fn reported_free(&self, _: &[GpaRange]) -> HintOutcome {
            HintOutcome::default()
        }
    }
    use freehint_types::{GpaRange, HintOutcome, HintSink};
    let out = Plain.filled_free_page_hints(epoch, &[GpaRange::new(0, 4096)], 0);
    assert_eq!(out.hint_ranges_dropped_stale, 1);
}

/// A poisoning guest: the same, as fill records with its byte.
#[test]
fn poisoned_hints_turn_pages_still_to_send_into_fill_records() {
    let f = two_regions();
    let run = |first_page, count| PageRun {
        region: 0,
        first_page,
        count,
    };
    let epoch = f.sync(true, no_merge).unwrap().opened_epoch.unwrap();
    let out = f.apply_filled_hints(epoch, &[RamRange::new(4 * 4096, 8 * 4096)], 0xaa);
    assert_eq!(out.pages_cleared, 8);
    let r = f
        .sync(true, |bm| {
            bm.set_run(run(6, 1));
            Ok::<(), ()>(())
        })
        .unwrap();
    assert!(r.discarded.is_empty());
    assert_eq!(r.filled, vec![(run(4, 2), 0xaa), (run(7, 5), 0xaa)]);
}

#[test]
fn claims_walk_regions_in_order_and_clear() {
    let f = two_regions();
    f.with_bitmap(|bm| {
        bm.clear_run(PageRun {
            region: 0,
            first_page: 0,
            count: 4096,
        });
        bm.set_run(PageRun {
            region: 0,
            first_page: 4094,
            count: 2,
        });
    });
    let mut c = Cursor::default();
    let mut out = Vec::new();
    // Three 4 KiB pages' worth: huge pages go one at a time.
    assert_eq!(f.claim(&mut c, 3 * 4096, &mut out), 2);
    for _ in 0..4 {
        assert_eq!(f.claim(&mut c, 3 * 4096, &mut out), 1);
    }
    assert_eq!(f.claim(&mut c, 3 * 4096, &mut out), 0);
    assert_eq!(
        out,
        vec![
            PageRun::new(0, 4094, 2),
            PageRun::page(1, 0),
            PageRun::page(1, 1),
            PageRun::page(1, 2),
            PageRun::page(1, 3)
        ]
    );
    assert_eq!(f.pages_to_send(), 0);
}

#[test]
fn a_claim_yields_runs_of_consecutive_pages() {
    let f = two_regions();
    f.with_bitmap(|bm| {
        bm.clear_run(PageRun::new(0, 0, 4096));
        for run in [
            PageRun::new(0, 10, 3),
            PageRun::page(0, 20),
            PageRun::new(0, 22, 5),
        ] {
            bm.set_run(run);
        }
    });
    let mut c = Cursor::default();
    let mut out = Vec::new();
    // Room for 8 pages: the third run is cut after 4 of its pages.
    assert_eq!(f.claim(&mut c, 8 * 4096, &mut out), 8);
    assert_eq!(
        out,
        vec![
            PageRun::new(0, 10, 3),
            PageRun::page(0, 20),
            PageRun::new(0, 22, 4)
        ]
    );
    assert_eq!(c.page, 26, "the cursor stops after the last page taken");
    out.clear();
    assert_eq!(f.claim(&mut c, 8 * 4096, &mut out), 1);
    assert_eq!(out, vec![PageRun::page(0, 26)]);
}

proptest! {
    /// Whatever hints arrive, with whatever cmd_ids: a page set by the last
    /// sync stays set unless a hint of the open epoch covered it, and a
    /// hint never touches pages outside its range.
    #[test]
    fn hints_clear_exactly_their_pages(
        hints in proptest::collection::vec((0u64..5, 0u64..20 * MIB, 1u64..3 * MIB), 0..20),
    ) {
        let f = two_regions();
        let epoch = f.sync(true, no_merge).unwrap().opened_epoch.unwrap();
        let mut expect = vec![true; 4096];
        for (id_off, start, len) in hints {
            let id = CmdId(epoch.0 + id_off as u32 - 2);
            let r = RamRange::new(start, len);
            let out = f.apply_hints(id, &[r]);
            let valid = start + len <= 16 * MIB;
            if id == epoch && valid {
                for p in start.div_ceil(4096)..(start + len) / 4096 {
                    expect[p as usize] = false;
                }
            } else {
                prop_assert_eq!(out.pages_cleared, 0);
            }
        }
        f.with_bitmap(|bm| {
            for (p, e) in expect.iter().enumerate() {
                assert_eq!(bm.is_set(0, p as u64), *e, "page {p}");
            }
        });
    }
}

#[test]
fn epochs_go_on_after_the_vms_last_cmd_id() {
    // A second attempt (or the destination) starts after the VM's last id:
    // Linux ignores an id equal to the last it saw, and hints of the first
    // attempt still queued never match an epoch of the second.
    let f = HintFilter::after(bitmap(64), CmdId(7));
    let r = f.sync(true, |_| Ok::<(), ()>(())).unwrap();
    assert_eq!(r.opened_epoch, Some(CmdId(8)));
    assert_eq!(f.last_cmd_id(), CmdId(8));
    f.with_bitmap(|b| {
        b.set_run(PageRun {
            region: 0,
            first_page: 0,
            count: 64,
        });
    });
    let stale = f.apply_hints(CmdId(3), &[RamRange::new(0, 4096)]);
    assert_eq!(stale.hint_ranges_dropped_stale, 1);
    assert_eq!(f.pages_to_send(), 64);
}

#[test]
fn the_final_sync_freezes_the_bitmap() {
    let f = HintFilter::new(bitmap(64));
    let open = f
        .sync(true, |_| Ok::<(), ()>(()))
        .unwrap()
        .opened_epoch
        .unwrap();
    f.with_bitmap(|b| {
        b.set_run(PageRun {
            region: 0,
            first_page: 0,
            count: 64,
        });
    });
    let r = f.final_sync(|_| Ok::<(), ()>(())).unwrap();
    assert_eq!(r.closed_epoch, Some(open));
    assert_eq!(r.opened_epoch, None);
    // Nothing but claims changes the bitmap now: a late hint is stale, a
    // late report is refused and counted, and no epoch opens again.
    assert_eq!(
        f.apply_hints(open, &[RamRange::new(0, 8192)])
            .hint_ranges_dropped_stale,
        1
    );
    assert_eq!(
        f.apply_reported(&[RamRange::new(8192, 8192)]).pages_cleared,
        0
    );
    assert_eq!(f.stats().reports_after_final_sync, 1);
    assert_eq!(f.pages_to_send(), 64);
    assert_eq!(
        f.sync(true, |_| Ok::<(), ()>(())).unwrap().opened_epoch,
        None
    );
}

#[test]
fn a_guest_reporting_in_a_loop_does_not_grow_what_the_filter_holds() {
    let f = two_regions();
    f.sync(true, no_merge).unwrap();
    // The same two pages, and every other page of the first 64, reported
    // over and over within one round.
    for i in 0..200_000u64 {
        let page = if i % 2 == 0 { 3 } else { 2 * ((i / 2) % 32) };
        f.apply_reported(&[RamRange::new(page * 4096, 4096)]);
    }
    let r = f.sync(true, no_merge).unwrap();
    assert!(
        r.discarded.len() <= 4096,
        "{} zero runs held for 33 distinct pages",
        r.discarded.len()
    );
    let mut pages: Vec<u64> = r
        .discarded
        .iter()
        .flat_map(|run| run.first_page..run.first_page + run.count)
        .collect();
    pages.sort_unstable();
    pages.dedup();
    let mut expected: Vec<u64> = (0..32).map(|i| 2 * i).chain([3]).collect();
    expected.sort_unstable();
    assert_eq!(pages, expected, "the zero records are for other pages");
}

/// One region of `pages` 4 KiB pages, nothing to send yet.
fn bitmap(pages: u64) -> MigrationBitmap {
    MigrationBitmap::new(vec![RegionLayout {
        ram_start: 0,
        page_bytes: 4096,
        pages,
    }])
}

proptest! {
    /// Claims of any size, until the walk ends, take every set page once,
    /// in order, as maximal runs within each claim, never more than the
    /// claim's size, and leave the bitmap empty.
    #[test]
    fn claims_take_every_set_page_once_in_order(
        set in proptest::collection::vec((0u64..4200, 1u64..300), 0..40),
        claim_pages in 1u64..2000,
    ) {
        let mut bm = MigrationBitmap::new(vec![
            RegionLayout { ram_start: 0, page_bytes: 4096, pages: 4200 },
            RegionLayout { ram_start: 1 << 30, page_bytes: 4096, pages: 100 },
        ]);
        let mut want = std::collections::BTreeSet::new();
        for (i, &(first, count)) in set.iter().enumerate() {
            let region = i % 2;
            bm.set_run(PageRun::new(region, first, count));
            let pages = if region == 0 { 4200 } else { 100 };
            for p in first..(first + count).min(pages) {
                want.insert((region, p));
            }
        }
        let f = HintFilter::new(bm);
        let mut cursor = Cursor::default();
        let mut got = Vec::new();
        loop {
            let mut out = Vec::new();
            let n = f.claim(&mut cursor, claim_pages * 4096, &mut out);
            if n == 0 {
                prop_assert!(out.is_empty());
                break;
            }
            prop_assert!(n <= claim_pages);
            prop_assert_eq!(n, out.iter().map(|r| r.count).sum::<u64>());
            for w in out.windows(2) {
                prop_assert_eq!(w[0].region, w[1].region);
                // Maximal: two runs of one claim never touch.
                prop_assert!(w[0].first_page + w[0].count < w[1].first_page);
            }
            for r in &out {
                prop_assert!(r.count > 0);
                got.extend((r.first_page..r.first_page + r.count).map(|p| (r.region, p)));
            }
        }
        prop_assert!(got.windows(2).all(|w| w[0] < w[1]), "claimed in order, once each");
        let got: std::collections::BTreeSet<_> = got.into_iter().collect();
        prop_assert_eq!(got, want);
        prop_assert_eq!(f.pages_to_send(), 0);
    }
}
