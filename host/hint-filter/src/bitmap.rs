//! The migration bitmap: one bit per page (in each region's own page unit).

use bitvec::prelude::*;
use freehint_types::{PageRun, RamRange};

use crate::Cursor;

/// The shape of one region, as the bitmap sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionLayout {
    /// RAM address of the region's start.
    pub ram_start: u64,
    /// Page unit in bytes (4 KiB, or a hugetlbfs page size).
    pub page_bytes: u64,
    /// Number of pages.
    pub pages: u64,
}

/// One bit per page: set means "must be sent".
#[derive(Clone, Debug)]
pub struct MigrationBitmap {
    layouts: Vec<RegionLayout>,
    bits: Vec<BitVec<u64, Lsb0>>,
}

impl MigrationBitmap {
    /// An all-clear bitmap for these regions.
    pub fn new(layouts: Vec<RegionLayout>) -> Self {
        let bits = layouts
            .iter()
            .map(|l| bitvec![u64, Lsb0; 0; l.pages as usize])
            .collect();
        Self { layouts, bits }
    }

    /// The regions.
    pub fn layouts(&self) -> &[RegionLayout] {
        &self.layouts
    }

    /// Whether page `page` of `region` is set.
    pub fn is_set(&self, region: usize, page: u64) -> bool {
        self.bits
            .get(region)
            .and_then(|b| b.get(page as usize).map(|b| *b))
            .unwrap_or(false)
    }

    /// Sets a run (clamped to the region); returns how many were newly set.
    pub fn set_run(&mut self, run: PageRun) -> u64 {
        self.update_run(run, true)
    }

    /// Clears a run (clamped to the region); returns how many were set.
    pub fn clear_run(&mut self, run: PageRun) -> u64 {
        self.update_run(run, false)
    }

    fn update_run(&mut self, run: PageRun, value: bool) -> u64 {
        let Some(bits) = self.bits.get_mut(run.region) else {
            return 0;
        };
        let len = bits.len() as u64;
        let start = run.first_page.min(len) as usize;
        let end = run.first_page.saturating_add(run.count).min(len) as usize;
        let slice = &mut bits[start..end];
        let before = slice.count_ones() as u64;
        slice.fill(value);
        if value {
            (end - start) as u64 - before
        } else {
            before
        }
    }

    /// Sets every page.
    pub fn set_all(&mut self) {
        for b in &mut self.bits {
            b.fill(true);
        }
    }

    /// Number of set pages.
    pub fn count_set(&self) -> u64 {
        self.bits.iter().map(|b| b.count_ones() as u64).sum()
    }

    /// Appends to `out` the parts of `run` whose bits are clear.
    pub fn unset_subruns(&self, run: PageRun, out: &mut Vec<PageRun>) {
        self.subruns(run, false, out)
    }

    /// Appends to `out` the parts of `run` whose bits are set.
    pub fn set_subruns(&self, run: PageRun, out: &mut Vec<PageRun>) {
        self.subruns(run, true, out)
    }

    fn subruns(&self, run: PageRun, set: bool, out: &mut Vec<PageRun>) {
        let Some(bits) = self.bits.get(run.region) else {
            return;
        };
        let end = run
            .first_page
            .saturating_add(run.count)
            .min(bits.len() as u64);
        let mut p = run.first_page;
        while p < end {
            let slice = &bits[p as usize..end as usize];
            let found = if set {
                slice.first_one()
            } else {
                slice.first_zero()
            };
            let Some(at) = found else {
                break;
            };
            let start = p + at as u64;
            let rest = &bits[start as usize..end as usize];
            let len = if set {
                rest.first_zero()
            } else {
                rest.first_one()
            }
            .map(|n| n as u64)
            .unwrap_or(end - start);
            out.push(PageRun {
                region: run.region,
                first_page: start,
                count: len,
            });
            p = start + len;
        }
    }

    /// The whole pages inside a RAM range, as runs per region, or
    /// `None` if any byte of the range is outside guest RAM, the range is
    /// empty, or it wraps. Partial pages at the edges are left out: a hint
    /// covering only part of a page says nothing about the rest of it.
    pub fn runs_inside(&self, range: RamRange) -> Option<Vec<PageRun>> {
        let end = range.end()?;
        if range.len_bytes == 0 {
            return None;
        }
        let mut runs = Vec::new();
        let mut pos = range.start;
        while pos < end {
            let idx = self
                .layouts
                .partition_point(|l| l.ram_start + l.pages * l.page_bytes <= pos);
            let l = self.layouts.get(idx)?;
            if pos < l.ram_start {
                return None;
            }
            let region_end = l.ram_start + l.pages * l.page_bytes;
            let stop = end.min(region_end);
            let first = (pos - l.ram_start).div_ceil(l.page_bytes);
            let last = (stop - l.ram_start) / l.page_bytes;
            if last > first {
                runs.push(PageRun {
                    region: idx,
                    first_page: first,
                    count: last - first,
                });
            }
            pos = stop;
        }
        Some(runs)
    }

    /// Bytes of the set pages.
    pub fn bytes_set(&self) -> u64 {
        self.bits
            .iter()
            .zip(&self.layouts)
            .map(|(b, l)| b.count_ones() as u64 * l.page_bytes)
            .sum()
    }

    /// Takes (clears and appends to `out` as runs of consecutive pages) set
    /// pages from `cursor` on, at most `max_bytes` worth but at least one,
    /// staying within one region; moves the cursor. Returns the pages taken.
    pub fn take_set(&mut self, cursor: &mut Cursor, max_bytes: u64, out: &mut Vec<PageRun>) -> u64 {
        while cursor.region < self.bits.len() {
            let max = (max_bytes / self.layouts[cursor.region].page_bytes).max(1);
            let bits = &mut self.bits[cursor.region];
            let start = (cursor.page as usize).min(bits.len());
            let mark = out.len();
            let mut taken = 0u64;
            // Run by run, a word at a time: the switch to postcopy takes
            // every set page at once, hundreds of thousands of them, while
            // the guest is stopped.
            let mut pos = start;
            while taken < max {
                let Some(off) = bits[pos..].first_one() else {
                    break;
                };
                let first = pos + off;
                let len = bits[first..].first_zero().unwrap_or(bits.len() - first) as u64;
                let count = len.min(max - taken);
                out.push(PageRun::new(cursor.region, first as u64, count));
                taken += count;
                pos = first + count as usize;
            }
            if taken > 0 {
                for run in &out[mark..] {
                    bits[run.first_page as usize..(run.first_page + run.count) as usize]
                        .fill(false);
                }
                cursor.page = out.last().and_then(PageRun::end_page).unwrap_or(0);
                return taken;
            }
            cursor.region += 1;
            cursor.page = 0;
        }
        0
    }
}
