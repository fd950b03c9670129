//! Page batches: a head of typed entries, then the data of the data pages.
//!
//! On the wire the payload is `region: u32, entries: u32`, then one u64 per
//! entry, then the data of every [`BatchEntry::Data`] page in entry order.
//! An entry packs a run: bits 0..48 the first page, bits 48..63 the run
//! length minus one, bit 63 set for a run of zero pages (no data follows).
//! The packing is private to this module: callers build and read
//! [`BatchEntry`]s.

use crate::message::region_u32;
use crate::{malformed, FrameHeader, Kind, PageRun, WireError, MAX_BATCH_PAGES};

const ZERO_FLAG: u64 = 1 << 63;
const COUNT_SHIFT: u32 = 48;
const PAGE_MASK: u64 = (1 << COUNT_SHIFT) - 1;
/// Bytes of the fixed start of a batch payload (region, entry count).
pub const BATCH_PREFIX_BYTES: usize = 8;
/// Bytes of one encoded entry.
const ENTRY_BYTES: u64 = 8;

/// Most pages one [`BatchEntry`] covers.
pub const MAX_ENTRY_PAGES: u64 = 1 << 15;

/// One entry of a page batch: a run of pages of the batch's region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchEntry {
    /// `count` pages from `first_page`, whose data follows in order.
    Data {
        /// First page of the run.
        first_page: u64,
        /// Pages in the run.
        count: u64,
    },
    /// `count` pages from `first_page` that are all zero; no data follows.
    Zero {
        /// First page of the run.
        first_page: u64,
        /// Pages in the run.
        count: u64,
    },
}

impl BatchEntry {
    /// The pages of this entry in `region`.
    pub fn run(&self, region: usize) -> PageRun {
        match *self {
            BatchEntry::Data { first_page, count } | BatchEntry::Zero { first_page, count } => {
                PageRun::new(region, first_page, count)
            }
        }
    }

    /// Pages in the entry.
    pub fn pages(&self) -> u64 {
        match *self {
            BatchEntry::Data { count, .. } | BatchEntry::Zero { count, .. } => count,
        }
    }

    /// Pages whose data follows the head.
    pub fn data_pages(&self) -> u64 {
        match *self {
            BatchEntry::Data { count, .. } => count,
            BatchEntry::Zero { .. } => 0,
        }
    }

    fn encode(&self) -> u64 {
        let (first_page, count, flag) = match *self {
            BatchEntry::Data { first_page, count } => (first_page, count, 0),
            BatchEntry::Zero { first_page, count } => (first_page, count, ZERO_FLAG),
        };
        debug_assert!(first_page <= PAGE_MASK && (1..=MAX_ENTRY_PAGES).contains(&count));
        flag | ((count - 1) << COUNT_SHIFT) | first_page
    }

    fn decode(raw: u64) -> BatchEntry {
        let first_page = raw & PAGE_MASK;
        let count = ((raw & !ZERO_FLAG) >> COUNT_SHIFT) + 1;
        if raw & ZERO_FLAG != 0 {
            BatchEntry::Zero { first_page, count }
        } else {
            BatchEntry::Data { first_page, count }
        }
    }
}

/// The head of a page batch: which pages of which region follow.
///
/// # Examples
///
/// ```
/// use freehint_wire::{BatchEntry, PageBatchHead};
///
/// let mut head = PageBatchHead::new(0);
/// for page in [7, 8, 9] {
///     head.push_data(page);
/// }
/// head.push_zero(10);
/// assert_eq!(
///     head.entries(),
///     [
///         BatchEntry::Data { first_page: 7, count: 3 },
///         BatchEntry::Zero { first_page: 10, count: 1 },
///     ]
/// );
/// assert_eq!(head.data_bytes(4096), 3 * 4096);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageBatchHead {
    region: usize,
    entries: Vec<BatchEntry>,
}

impl PageBatchHead {
    /// An empty batch of pages of `region`.
    pub fn new(region: usize) -> Self {
        Self {
            region,
            entries: Vec::new(),
        }
    }

    /// Empties the batch and makes it one of `region` (keeps the
    /// allocation: a sender reuses one head for every batch).
    pub fn reset(&mut self, region: usize) {
        self.region = region;
        self.entries.clear();
    }

    /// The region whose pages the batch carries.
    pub fn region(&self) -> usize {
        self.region
    }

    /// The entries, in order.
    pub fn entries(&self) -> &[BatchEntry] {
        &self.entries
    }

    /// Appends page `page`, whose data will follow; extends the last entry
    /// if it is the data run just before it.
    pub fn push_data(&mut self, page: u64) {
        match self.entries.last_mut() {
            Some(BatchEntry::Data { first_page, count })
                if *first_page + *count == page && *count < MAX_ENTRY_PAGES =>
            {
                *count += 1
            }
            _ => self.entries.push(BatchEntry::Data {
                first_page: page,
                count: 1,
            }),
        }
    }

    /// Appends page `page` as a zero page; extends the last entry if it is
    /// the zero run just before it.
    pub fn push_zero(&mut self, page: u64) {
        match self.entries.last_mut() {
            Some(BatchEntry::Zero { first_page, count })
                if *first_page + *count == page && *count < MAX_ENTRY_PAGES =>
            {
                *count += 1
            }
            _ => self.entries.push(BatchEntry::Zero {
                first_page: page,
                count: 1,
            }),
        }
    }

    /// Pages in the batch.
    pub fn pages(&self) -> u64 {
        self.entries.iter().map(BatchEntry::pages).sum()
    }

    /// Pages whose data follows the head.
    pub fn data_pages(&self) -> u64 {
        self.entries.iter().map(BatchEntry::data_pages).sum()
    }

    /// Bytes of page data that follow the head, for pages of `page_bytes`.
    pub fn data_bytes(&self, page_bytes: u64) -> u64 {
        self.data_pages() * page_bytes
    }

    /// Bytes of the head on the wire (after the frame header, before the
    /// page data).
    pub fn head_bytes(&self) -> u64 {
        BATCH_PREFIX_BYTES as u64 + ENTRY_BYTES * self.entries.len() as u64
    }

    /// Appends the frame header and the batch head for pages of
    /// `page_bytes` to `out`; the caller sends the page data after it.
    pub fn encode(&self, page_bytes: u64, out: &mut Vec<u8>) {
        let payload_bytes = self.head_bytes() + self.data_bytes(page_bytes);
        out.extend_from_slice(
            &FrameHeader {
                kind: Kind::PageBatch,
                payload_bytes,
            }
            .encode(),
        );
        out.extend_from_slice(&region_u32(self.region).to_le_bytes());
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for e in &self.entries {
            out.extend_from_slice(&e.encode().to_le_bytes());
        }
    }

    /// Bytes of the head to read after the frame header, given its first
    /// [`BATCH_PREFIX_BYTES`]: the prefix plus the entries. A reader of a socket
    /// reads the prefix, then the rest, then hands the whole head to
    /// [`crate::Frame::decode`].
    pub fn head_bytes_from_prefix(
        prefix: &[u8; BATCH_PREFIX_BYTES],
        payload_bytes: u64,
    ) -> Result<usize, WireError> {
        let entries = u32::from_le_bytes(prefix[4..8].try_into().expect("4 bytes"));
        if entries == 0 || entries > MAX_BATCH_PAGES {
            return Err(malformed(
                "page batch",
                format!("{entries} entries (1..={MAX_BATCH_PAGES} allowed)"),
            ));
        }
        let head_bytes = BATCH_PREFIX_BYTES as u64 + ENTRY_BYTES * entries as u64;
        if head_bytes > payload_bytes {
            return Err(malformed(
                "page batch",
                format!("{entries} entries do not fit in {payload_bytes} bytes"),
            ));
        }
        Ok(head_bytes as usize)
    }

    /// Decodes a whole head (prefix and entries) of a batch whose payload
    /// is `payload_bytes` long, checking every entry against its region's
    /// geometry `(page_bytes, pages)` from `region_pages`, and the payload
    /// length against the entries.
    pub(crate) fn decode(
        head: &[u8],
        payload_bytes: u64,
        region_pages: impl Fn(usize) -> Option<(u64, u64)>,
    ) -> Result<PageBatchHead, WireError> {
        let bad = |detail: String| malformed("page batch", detail);
        let prefix: &[u8; BATCH_PREFIX_BYTES] = head
            .get(..BATCH_PREFIX_BYTES)
            .and_then(|p| p.try_into().ok())
            .ok_or_else(|| bad(format!("head of {} bytes is truncated", head.len())))?;
        let want = Self::head_bytes_from_prefix(prefix, payload_bytes)?;
        if head.len() != want {
            return Err(bad(format!(
                "head is {} bytes, its entry count says {want}",
                head.len()
            )));
        }
        let region = u32::from_le_bytes(prefix[0..4].try_into().expect("4 bytes")) as usize;
        let (page_bytes, pages) =
            region_pages(region).ok_or_else(|| bad(format!("region {region} does not exist")))?;
        let entries: Vec<BatchEntry> = head[BATCH_PREFIX_BYTES..]
            .chunks_exact(ENTRY_BYTES as usize)
            .map(|c| BatchEntry::decode(u64::from_le_bytes(c.try_into().expect("8 bytes"))))
            .collect();
        let mut total = 0u64;
        for e in &entries {
            let run = e.run(region);
            if run.end_page().is_none_or(|end| end > pages) {
                return Err(bad(format!(
                    "{run} is beyond region {region} ({pages} pages)"
                )));
            }
            total += run.count;
        }
        if total > MAX_BATCH_PAGES as u64 {
            return Err(bad(format!(
                "{total} pages (at most {MAX_BATCH_PAGES} a batch)"
            )));
        }
        let batch = PageBatchHead { region, entries };
        let want = batch.head_bytes() + batch.data_bytes(page_bytes);
        if want != payload_bytes {
            return Err(bad(format!(
                "payload is {payload_bytes} bytes, its entries need {want}"
            )));
        }
        Ok(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Frame, FrameHeader};

    fn decode(bytes: &[u8], pages: u64) -> Result<PageBatchHead, WireError> {
        let header = FrameHeader::decode(bytes[..16].try_into().unwrap()).unwrap();
        let prefix = bytes[16..24].try_into().unwrap();
        let head_bytes = PageBatchHead::head_bytes_from_prefix(prefix, header.payload_bytes)?;
        match Frame::decode(&header, &bytes[16..16 + head_bytes], |r| {
            (r == 0).then_some((4096, pages))
        })? {
            Frame::PageBatch(b) => Ok(b),
            Frame::Message(m) => panic!("a batch decoded as {m:?}"),
        }
    }

    #[test]
    fn runs_roundtrip_and_merge_only_when_consecutive() {
        let mut head = PageBatchHead::new(0);
        for p in [1, 2, 3] {
            head.push_data(p);
        }
        head.push_zero(4);
        head.push_zero(5);
        head.push_data(9);
        head.push_zero(10);
        assert_eq!(head.entries().len(), 4);
        assert_eq!((head.pages(), head.data_pages()), (7, 4));
        let mut b = Vec::new();
        head.encode(4096, &mut b);
        b.resize(b.len() + 4 * 4096, 0);
        assert_eq!(decode(&b, 11).unwrap(), head);
    }

    #[test]
    fn a_run_stops_growing_at_the_entry_limit() {
        let mut head = PageBatchHead::new(0);
        for p in 0..MAX_ENTRY_PAGES + 1 {
            head.push_zero(p);
        }
        assert_eq!(
            head.entries(),
            [
                BatchEntry::Zero {
                    first_page: 0,
                    count: MAX_ENTRY_PAGES
                },
                BatchEntry::Zero {
                    first_page: MAX_ENTRY_PAGES,
                    count: 1
                }
            ]
        );
        assert_eq!(
            BatchEntry::decode(head.entries()[0].encode()),
            head.entries()[0]
        );
    }

    #[test]
    fn entries_are_checked_against_length_region_and_limits() {
        let mut head = PageBatchHead::new(0);
        head.push_data(1);
        head.push_zero(5);
        head.push_data(9);
        let mut b = Vec::new();
        head.encode(4096, &mut b);
        b.resize(b.len() + 2 * 4096, 0);
        assert_eq!(decode(&b, 10).unwrap(), head);
        // A page beyond the region.
        let e = decode(&b, 9).unwrap_err();
        assert!(e.to_string().contains("beyond region 0"), "{e}");
        // A length that does not match the entries.
        let mut short = b.clone();
        let len = u64::from_le_bytes(short[8..16].try_into().unwrap()) - 1;
        short[8..16].copy_from_slice(&len.to_le_bytes());
        let e = decode(&short, 10).unwrap_err();
        assert!(e.to_string().contains("its entries need"), "{e}");
        // A region that does not exist.
        let mut other = b.clone();
        other[16] = 3;
        let e = decode(&other, 10).unwrap_err();
        assert!(e.to_string().contains("region 3 does not exist"), "{e}");
        // No entries.
        assert!(PageBatchHead::head_bytes_from_prefix(&[0; 8], 100).is_err());
        // One entry claiming more pages than a batch may hold.
        let mut big = PageBatchHead::new(0);
        for p in 0..MAX_BATCH_PAGES as u64 + 1 {
            big.push_zero(p);
        }
        let mut b = Vec::new();
        big.encode(4096, &mut b);
        let e = decode(&b, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("at most 4096 a batch"), "{e}");
    }
}
