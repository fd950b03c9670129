//! Which of our memory the peer may read, and the registrations that let
//! it: memory is registered in chunks of [`CHUNK_BYTES`] (clipped to the
//! exposed range that holds them) the first time a page reference points
//! into them, and a chunk is deregistered again once the peer has read
//! every reference into it and more than [`MAX_CHUNKS`] are registered
//! (seed 003: pin only what is needed, only while it is needed).
//!
//! Chunks are small, one 2 MiB huge page, because registering pins its
//! pages, and pinning a hole of a file-backed mapping (memfd, hugetlbfs)
//! allocates it: a guest's untouched memory stays unallocated on the
//! source except within 2 MiB of a page that is sent. An adapter with
//! on-demand paging would need no pinning at all; `rdma_rxe` in the
//! guest kernel this is tested with (6.1) has none, so this does not use
//! it.

use std::collections::BTreeMap;
use std::io;
use std::ops::Range;

use crate::verbs::{Access, Mr};

/// Bytes of one registration (at most: the last chunk of a range may be
/// shorter, and a chunk never crosses a range's ends).
pub(crate) const CHUNK_BYTES: usize = 2 << 20;
/// Registrations one connection keeps before it releases those the peer
/// is done with (1 GiB pinned at most, beyond those the peer still has
/// to read).
pub(crate) const MAX_CHUNKS: usize = 512;

/// One registered chunk.
struct Chunk {
    range: Range<usize>,
    mr: Mr,
    /// The last page-reference message (by its number) that points into
    /// it: the chunk may go once the peer has read that one.
    last_segment: u32,
}

/// The exposed memory of one connection and its registrations.
#[derive(Default)]
pub(crate) struct Registry {
    exposed: Vec<Range<usize>>,
    /// By start address.
    chunks: BTreeMap<usize, Chunk>,
}

/// The chunk of `exposed` that holds `addr`: its [`CHUNK_BYTES`]-aligned
/// chunk, clipped to the exposed range `addr` is in. `None` if `addr` is
/// not exposed.
pub(crate) fn chunk_holding(exposed: &[Range<usize>], addr: usize) -> Option<Range<usize>> {
    let r = exposed.iter().find(|r| r.contains(&addr))?;
    let aligned = addr & !(CHUNK_BYTES - 1);
    Some(aligned.max(r.start)..aligned.saturating_add(CHUNK_BYTES).min(r.end))
}

/// `a` is at or after `b` in wrapping message numbers.
pub(crate) fn at_or_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) >= 0
}

impl Registry {
    /// Sets the memory page references may point into (replacing any
    /// earlier set; registrations outside it are kept until released).
    pub(crate) fn expose(&mut self, ranges: Vec<Range<usize>>) {
        self.exposed = ranges.into_iter().filter(|r| !r.is_empty()).collect();
    }

    /// `addr` is in exposed memory.
    pub(crate) fn is_exposed(&self, addr: usize) -> bool {
        self.exposed.iter().any(|r| r.contains(&addr))
    }

    /// A reference to the longest run from `addr` (at most `len` bytes,
    /// at most one registration) for page-reference message `segment`:
    /// its rkey and length. `None` if `addr` is not in exposed memory.
    ///
    /// # Safety
    /// The exposed ranges must be mapped for as long as this registry
    /// lives (the promise of `RdmaStream::expose_memory`).
    pub(crate) unsafe fn reference(
        &mut self,
        pd: *mut rdma_sys::ibv_pd,
        addr: usize,
        len: usize,
        segment: u32,
    ) -> io::Result<Option<(u32, usize)>> {
        let held = self
            .chunks
            .range(..=addr)
            .next_back()
            .filter(|(_, c)| c.range.contains(&addr))
            .map(|(&start, _)| start);
        let start = match held {
            Some(start) => start,
            None => {
                let Some(range) = chunk_holding(&self.exposed, addr) else {
                    return Ok(None);
                };
                // SAFETY: exposed memory stays mapped (our caller's
                // promise); the peer only reads it.
                let mr = unsafe {
                    Mr::register(pd, range.start as *mut u8, range.len(), Access::RemoteRead)?
                };
                let start = range.start;
                self.chunks.insert(
                    start,
                    Chunk {
                        range,
                        mr,
                        last_segment: segment,
                    },
                );
                start
            }
        };
        let Some(c) = self.chunks.get_mut(&start) else {
            return Ok(None);
        };
        c.last_segment = segment;
        Ok(Some((c.mr.rkey(), len.min(c.range.end - addr))))
    }

    /// Deregisters chunks the peer is done with (it has read message
    /// `peer_read` and every one before) while more than [`MAX_CHUNKS`]
    /// are registered, those used longest ago first.
    pub(crate) fn release(&mut self, peer_read: u32) {
        if self.chunks.len() <= MAX_CHUNKS {
            return;
        }
        let excess = self.chunks.len() - MAX_CHUNKS;
        let mut done: Vec<(u32, usize)> = self
            .chunks
            .iter()
            .filter(|(_, c)| at_or_after(peer_read, c.last_segment))
            .map(|(&start, c)| (peer_read.wrapping_sub(c.last_segment), start))
            .collect();
        // Used longest ago first.
        done.sort_unstable_by(|a, b| b.cmp(a));
        for (_, start) in done.into_iter().take(excess) {
            self.chunks.remove(&start);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_aligned_and_clipped_to_their_range() {
        let base = 0x7f00_0000_0000usize;
        let other = base + (1 << 32);
        let exposed = [
            base + (1 << 20)..base + 3 * CHUNK_BYTES + (12 << 10),
            other..other + CHUNK_BYTES / 2,
        ];
        assert_eq!(
            chunk_holding(&exposed, base + (1 << 20) + 4096),
            Some(base + (1 << 20)..base + CHUNK_BYTES)
        );
        assert_eq!(
            chunk_holding(&exposed, base + CHUNK_BYTES + 7),
            Some(base + CHUNK_BYTES..base + 2 * CHUNK_BYTES)
        );
        assert_eq!(
            chunk_holding(&exposed, base + 3 * CHUNK_BYTES + 4096),
            Some(base + 3 * CHUNK_BYTES..base + 3 * CHUNK_BYTES + (12 << 10))
        );
        assert_eq!(
            chunk_holding(&exposed, other + 8192),
            Some(other..other + CHUNK_BYTES / 2)
        );
        assert_eq!(chunk_holding(&exposed, base), None);
        assert_eq!(
            chunk_holding(&exposed, base + 3 * CHUNK_BYTES + (12 << 10)),
            None
        );
    }

    #[test]
    fn message_numbers_compare_across_the_wrap() {
        assert!(at_or_after(5, 5));
        assert!(at_or_after(6, 5));
        assert!(!at_or_after(4, 5));
        assert!(at_or_after(2, u32::MAX - 1));
        assert!(!at_or_after(u32::MAX - 1, 2));
    }
}
