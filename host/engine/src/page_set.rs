//! A set of pages per region as atomic bits, shared between tasks: the
//! pages still to cross the wire in postcopy (on both sides), the
//! destination's pages that hold data. Inserting and taking work a 64-page
//! word at a time where they can: the switch to postcopy moves hundreds of
//! thousands of pages through these sets while the guest is stopped.

use std::sync::atomic::{AtomicU64, Ordering};

use freehint_memory::GuestRam;
use freehint_types::{append_run, PageRun};

/// A set of pages per region, as atomic bits: the pages still to come (or
/// still to send). Any task may take a page; exactly one succeeds.
#[derive(Debug)]
pub(crate) struct PageSet {
    words: Vec<Vec<AtomicU64>>,
    pages: Vec<u64>,
    remaining: AtomicU64,
}

impl PageSet {
    /// An empty set shaped like `ram`'s regions.
    pub(crate) fn for_ram(ram: &GuestRam) -> Self {
        let pages: Vec<u64> = ram.regions().iter().map(|r| r.pages()).collect();
        Self::new(&pages)
    }

    /// An empty set shaped like regions of `pages` pages each.
    pub(crate) fn new(pages: &[u64]) -> Self {
        Self {
            words: pages
                .iter()
                .map(|&n| (0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
                .collect(),
            pages: pages.to_vec(),
            remaining: AtomicU64::new(0),
        }
    }

    /// Pages in `region` (0 if it does not exist).
    pub(crate) fn region_pages(&self, region: usize) -> u64 {
        self.pages.get(region).copied().unwrap_or(0)
    }

    /// Regions.
    pub(crate) fn regions(&self) -> usize {
        self.pages.len()
    }

    /// Adds `run`; `false` if it lies outside the regions.
    pub(crate) fn insert(&self, run: PageRun) -> bool {
        let Some(end) = run.end_page() else {
            return false;
        };
        if end > self.region_pages(run.region) {
            return false;
        }
        // A word at a time: the switch lists up to millions of pages, and
        // the guest waits for the list.
        let words = &self.words[run.region];
        let mut fresh = 0u64;
        for (wi, mask) in word_masks(run.first_page, end) {
            let prev = words[wi as usize].fetch_or(mask, Ordering::AcqRel);
            fresh += (mask & !prev).count_ones() as u64;
        }
        self.remaining.fetch_add(fresh, Ordering::AcqRel);
        true
    }

    /// Adds one page; `true` if it was not in the set before.
    pub(crate) fn mark(&self, region: usize, page: u64) -> bool {
        if page >= self.region_pages(region) {
            return false;
        }
        let bit = 1u64 << (page % 64);
        let fresh =
            self.words[region][(page / 64) as usize].fetch_or(bit, Ordering::AcqRel) & bit == 0;
        if fresh {
            self.remaining.fetch_add(1, Ordering::AcqRel);
        }
        fresh
    }

    /// Whether `page` of `region` is in the set.
    pub(crate) fn contains(&self, region: usize, page: u64) -> bool {
        self.words
            .get(region)
            .and_then(|w| w.get((page / 64) as usize))
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (page % 64)) != 0)
    }

    /// Takes `page` out of the set; `true` for the one caller that did.
    pub(crate) fn take(&self, region: usize, page: u64) -> bool {
        if page >= self.region_pages(region) {
            return false;
        }
        let w = &self.words[region][(page / 64) as usize];
        let bit = 1u64 << (page % 64);
        let took = w.fetch_and(!bit, Ordering::AcqRel) & bit != 0;
        if took {
            self.remaining.fetch_sub(1, Ordering::AcqRel);
        }
        took
    }

    /// Takes up to `max_pages` pages of `region` from `from` on (not past
    /// the region's end), appending them to `out` as runs; returns the
    /// pages taken and the page after the last one looked at.
    pub(crate) fn take_from(
        &self,
        region: usize,
        from: u64,
        max_pages: u64,
        out: &mut Vec<PageRun>,
    ) -> (u64, u64) {
        let end = self.region_pages(region);
        let mut taken = 0;
        let mut p = from;
        while p < end && taken < max_pages {
            let wi = (p / 64) as usize;
            let word_end = (wi as u64 + 1) * 64;
            let mut want = !0u64 << (p % 64);
            if word_end > end {
                want &= (1u64 << (end % 64)) - 1;
            }
            let word = &self.words[region][wi];
            if word.load(Ordering::Acquire) & want == 0 {
                p = word_end;
                continue;
            }
            let got = word.fetch_and(!want, Ordering::AcqRel) & want;
            let mut bits = got;
            let mut put_back = 0u64;
            p = word_end;
            while bits != 0 {
                let b = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                let page = wi as u64 * 64 + b;
                if taken == max_pages {
                    // Never take more than asked: give the rest back.
                    if put_back == 0 {
                        p = page;
                    }
                    put_back |= 1 << b;
                    continue;
                }
                taken += 1;
                append_run(out, PageRun::page(region, page));
            }
            if put_back != 0 {
                word.fetch_or(put_back, Ordering::AcqRel);
            }
            self.remaining
                .fetch_sub((got & !put_back).count_ones() as u64, Ordering::AcqRel);
        }
        (taken, p.min(end))
    }

    /// Pages in the set.
    pub(crate) fn remaining(&self) -> u64 {
        self.remaining.load(Ordering::Acquire)
    }

    /// The set as runs (a snapshot).
    pub(crate) fn runs(&self) -> Vec<PageRun> {
        let mut out: Vec<PageRun> = Vec::new();
        for (region, words) in self.words.iter().enumerate() {
            for (wi, w) in words.iter().enumerate() {
                push_runs(&mut out, region, wi as u64, w.load(Ordering::Acquire));
            }
        }
        out
    }

    /// Takes the pages of `run` that are in the set (clamped to its
    /// region), a word at a time, appending them to `out` as runs; returns
    /// how many it took.
    pub(crate) fn take_run(&self, run: PageRun, out: &mut Vec<PageRun>) -> u64 {
        let end = run
            .end_page()
            .unwrap_or(u64::MAX)
            .min(self.region_pages(run.region));
        let mut taken = 0u64;
        for (wi, mask) in word_masks(run.first_page, end) {
            let w = &self.words[run.region][wi as usize];
            if w.load(Ordering::Acquire) & mask != 0 {
                let got = w.fetch_and(!mask, Ordering::AcqRel) & mask;
                taken += got.count_ones() as u64;
                push_runs(out, run.region, wi, got);
            }
        }
        self.remaining.fetch_sub(taken, Ordering::AcqRel);
        taken
    }
}

/// The words pages `first..end` fall in, each with the mask of those pages'
/// bits in it.
fn word_masks(first: u64, end: u64) -> impl Iterator<Item = (u64, u64)> {
    let mut p = first;
    std::iter::from_fn(move || {
        if p >= end {
            return None;
        }
        let wi = p / 64;
        let last = end.min((wi + 1) * 64);
        let bits = last - p;
        let mask = if bits == 64 {
            !0
        } else {
            ((1u64 << bits) - 1) << (p % 64)
        };
        p = last;
        Some((wi, mask))
    })
}

/// Appends the pages of word `wi` of `region` whose bits are set in `bits`
/// to `out` as runs, extending its last run where they continue it.
fn push_runs(out: &mut Vec<PageRun>, region: usize, wi: u64, mut bits: u64) {
    while bits != 0 {
        let b = bits.trailing_zeros();
        let len = (bits >> b).trailing_ones();
        let page = wi * 64 + b as u64;
        append_run(out, PageRun::new(region, page, len as u64));
        if b + len >= 64 {
            break;
        }
        bits &= !(((1u64 << len) - 1) << b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_page_is_taken_once_whichever_way() {
        let p = PageSet::new(&[200, 10]);
        assert!(p.insert(PageRun::new(0, 3, 100)));
        assert!(p.insert(PageRun::new(0, 50, 10))); // overlaps: not counted twice
        assert!(p.insert(PageRun::new(1, 9, 1)));
        assert!(!p.insert(PageRun::new(1, 9, 2)));
        assert!(!p.insert(PageRun::new(2, 0, 1)));
        assert_eq!(p.remaining(), 101);
        assert!(p.take(0, 70));
        assert!(!p.take(0, 70));
        assert!(!p.take(0, 2));
        assert!(!p.take(0, 5000));
        let mut out = Vec::new();
        let (n, stop) = p.take_from(0, 60, 20, &mut out);
        assert_eq!(n, 20);
        assert_eq!(out, vec![PageRun::new(0, 60, 10), PageRun::new(0, 71, 10)]);
        assert_eq!(stop, 81);
        assert!(p.contains(0, 81));
        assert!(!p.contains(0, 80));
        assert_eq!(p.remaining(), 80);
        out.clear();
        let (n, stop) = p.take_from(0, 0, 1000, &mut out);
        assert_eq!(n, 79);
        assert_eq!(stop, 200);
        assert_eq!(p.remaining(), 1);
        assert_eq!(p.runs(), vec![PageRun::new(1, 9, 1)]);
        assert!(p.take(1, 9));
        assert_eq!(p.remaining(), 0);
        assert!(p.mark(1, 3));
        assert!(!p.mark(1, 3));
        assert!(!p.mark(1, 10));
        assert_eq!(p.remaining(), 1);
    }

    #[test]
    fn concurrent_takers_share_the_pages_exactly() {
        let p = std::sync::Arc::new(PageSet::new(&[100_000]));
        p.insert(PageRun::new(0, 0, 100_000));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let p = p.clone();
                std::thread::spawn(move || {
                    let mut mine = 0u64;
                    let mut out = Vec::new();
                    let mut at = t * 25_000;
                    loop {
                        if t % 2 == 0 && p.take(0, (at * 7) % 100_000) {
                            mine += 1;
                        }
                        out.clear();
                        let (n, stop) = p.take_from(0, at, 33, &mut out);
                        assert_eq!(n, out.iter().map(|r| r.count).sum::<u64>());
                        mine += n;
                        at = if stop >= 100_000 { 0 } else { stop };
                        if p.remaining() == 0 {
                            return mine;
                        }
                    }
                })
            })
            .collect();
        let total: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(total, 100_000);
    }

    #[test]
    fn runs_and_take_run_work_word_by_word() {
        let p = PageSet::new(&[300, 64]);
        for run in [
            PageRun::new(0, 0, 1),
            PageRun::new(0, 2, 3),
            PageRun::new(0, 60, 130),
            PageRun::new(0, 255, 45),
            PageRun::new(1, 0, 64),
        ] {
            assert!(p.insert(run));
        }
        let all = vec![
            PageRun::new(0, 0, 1),
            PageRun::new(0, 2, 3),
            PageRun::new(0, 60, 130),
            PageRun::new(0, 255, 45),
            PageRun::new(1, 0, 64),
        ];
        assert_eq!(p.runs(), all);
        let mut out = Vec::new();
        // Clamped to the region; only what is in the set.
        assert_eq!(p.take_run(PageRun::new(0, 1, 1000), &mut out), 3 + 130 + 45);
        assert_eq!(out, all[1..4]);
        assert_eq!(p.runs(), vec![all[0], all[4]]);
        out.clear();
        assert_eq!(p.take_run(PageRun::new(1, 63, 1), &mut out), 1);
        assert_eq!(out, vec![PageRun::new(1, 63, 1)]);
        assert_eq!(p.take_run(PageRun::new(1, 63, 1), &mut out), 0);
        assert_eq!(p.take_run(PageRun::new(5, 0, 1), &mut out), 0);
        assert_eq!(p.remaining(), 1 + 63);
    }
}
