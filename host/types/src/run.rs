//! [`PageRun`]: consecutive pages of one RAM region.

use std::fmt;

/// `count` consecutive pages of RAM region `region`, starting at page
/// `first_page` of that region (pages are the region's own size: 4 KiB, or
/// the huge page size of a hugetlbfs region).
///
/// The one currency for pages between the dirty log, the migration bitmap,
/// the sender and the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageRun {
    /// Index of the RAM region.
    pub region: usize,
    /// First page, counted from the region's start.
    pub first_page: u64,
    /// Number of pages.
    pub count: u64,
}

impl PageRun {
    /// `count` pages of `region` from `first_page`.
    pub const fn new(region: usize, first_page: u64, count: u64) -> Self {
        Self {
            region,
            first_page,
            count,
        }
    }

    /// One page.
    pub const fn page(region: usize, page: u64) -> Self {
        Self::new(region, page, 1)
    }

    /// One past the last page, or `None` on overflow.
    pub fn end_page(&self) -> Option<u64> {
        self.first_page.checked_add(self.count)
    }

    /// Whether `other` starts in the same region right after this run ends.
    pub fn is_followed_by(&self, other: &PageRun) -> bool {
        self.region == other.region && self.end_page() == Some(other.first_page)
    }
}

/// Appends `run` to `runs`, extending the last run if `run` continues it.
pub fn append_run(runs: &mut Vec<PageRun>, run: PageRun) {
    match runs.last_mut() {
        Some(last) if last.is_followed_by(&run) => last.count += run.count,
        _ => runs.push(run),
    }
}

/// Sorts `runs` and joins the ones that overlap or touch, so the same pages
/// are described by the fewest runs. Runs whose end overflows are kept as
/// they are.
pub fn merge_runs(runs: &mut Vec<PageRun>) {
    runs.sort_unstable();
    let mut merged: Vec<PageRun> = Vec::with_capacity(runs.len());
    for r in runs.drain(..) {
        if let Some(last) = merged.last_mut() {
            if let (Some(last_end), Some(end)) = (last.end_page(), r.end_page()) {
                if last.region == r.region && r.first_page <= last_end {
                    last.count = last_end.max(end) - last.first_page;
                    continue;
                }
            }
        }
        merged.push(r);
    }
    *runs = merged;
}

impl fmt::Display for PageRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "region {} pages {}+{}",
            self.region, self.first_page, self.count
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appending_extends_the_last_run_only_where_it_continues() {
        let mut runs = Vec::new();
        append_run(&mut runs, PageRun::new(0, 4, 2));
        append_run(&mut runs, PageRun::page(0, 6));
        append_run(&mut runs, PageRun::page(1, 7));
        append_run(&mut runs, PageRun::page(1, 9));
        assert_eq!(
            runs,
            vec![
                PageRun::new(0, 4, 3),
                PageRun::page(1, 7),
                PageRun::page(1, 9)
            ]
        );
    }

    #[test]
    fn merging_joins_touching_and_overlapping_runs_per_region() {
        let mut runs = vec![
            PageRun::new(0, 10, 5),
            PageRun::new(1, 0, 2),
            PageRun::new(0, 0, 10),
            PageRun::new(0, 12, 1),
            PageRun::new(0, 20, 1),
            PageRun::new(1, 2, 2),
            PageRun::new(0, u64::MAX - 1, 5),
        ];
        merge_runs(&mut runs);
        assert_eq!(
            runs,
            vec![
                PageRun::new(0, 0, 15),
                PageRun::new(0, 20, 1),
                PageRun::new(0, u64::MAX - 1, 5),
                PageRun::new(1, 0, 4),
            ]
        );
        let mut none = Vec::new();
        merge_runs(&mut none);
        assert!(none.is_empty());
    }
}
