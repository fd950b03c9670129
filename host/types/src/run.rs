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

impl fmt::Display for PageRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "region {} pages {}+{}",
            self.region, self.first_page, self.count
        )
    }
}
