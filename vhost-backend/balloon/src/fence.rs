//! The cmd_id fence: tag a hint batch with the cmd_id its buffer held when
//! the guest queued it, not when the backend reads it.
//!
//! The Linux driver keeps its cmd_id out buffer in one place
//! (`vb->cmd_id_active`) and, when a new round starts, rewrites it in place
//! and queues it again. A cmd_id chain the guest queued for round k but the
//! backend processes only after the host published k+1 (the worker was
//! busy, or the ring was stopped for a migration) can therefore read k+1:
//! its blocks, found free during round k, would be taken for hints of round
//! k+1.
//!
//! The rule. When the host publishes a round id v, the backend records the
//! free-page queue's avail index `a_v` (the driver's `avail->idx`, read with
//! Acquire) *before* the guest can see v. Every popped chain has a position
//! `p`: the queue's next-avail counter before it was popped. A chain with
//! `p` before `a_v` was made available before v was published, so the guest
//! cannot have written v into it when it queued it. A cmd_id chain reading
//! v at such a position is *fenced*: its batch stays open (for the overlap
//! checks and so that STOP closes it) but its hints are tagged
//! [`FENCED_HINT_CMD_ID`], which never names an open epoch, so the engine
//! drops them; it is counted in `hint_batches_fenced`, and its STOP does not
//! mark round v as reported.
//!
//! Positions are u16 and wrap. At publication at most a queue's worth of
//! chains (`size`) are available and not popped, so "p before a_v" is
//! `a_v - p` (wrapping) in `1..=size`. A fence is retired as soon as a chain
//! at or past `a_v` is popped, long before the counter could wrap back into
//! that window. Only the most recent [`MAX_FENCES`] publications are kept;
//! a re-published id keeps its first (earliest) fence.

use std::collections::VecDeque;

use freehint_types::CmdId;
use serde::{Deserialize, Serialize};

/// The cmd_id fenced hints are tagged with: STOP is never a hint round, so
/// no engine epoch matches it and the hints are dropped as stale.
pub const FENCED_HINT_CMD_ID: CmdId = CmdId::STOP;

/// Publications remembered (more than the rounds a batch can lag behind).
pub const MAX_FENCES: usize = 16;

/// One published round id and the free-page queue's avail index when it was
/// published.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CmdIdFence {
    /// The round id published (≥ 2).
    pub cmd_id: u32,
    /// The driver's `avail->idx` of the free-page queue at publication.
    pub avail_idx: u16,
}

/// The recent publications, oldest first.
#[derive(Debug, Default)]
pub(crate) struct Fences {
    recent: VecDeque<(CmdIdFence, bool)>,
}

/// Whether position `pos` comes before avail index `avail_idx` on a queue of
/// `size` entries.
fn before(avail_idx: u16, pos: u16, size: u16) -> bool {
    let d = avail_idx.wrapping_sub(pos);
    d >= 1 && d <= size
}

impl Fences {
    /// Records the publication of `fence.cmd_id` (kept if already known).
    pub(crate) fn published(&mut self, fence: CmdIdFence) {
        if self.recent.iter().any(|(f, _)| f.cmd_id == fence.cmd_id) {
            return;
        }
        if self.recent.len() == MAX_FENCES {
            self.recent.pop_front();
        }
        self.recent.push_back((fence, false));
    }

    /// The chain at `pos` of a queue of `size` entries was popped: fences it
    /// has reached are retired.
    pub(crate) fn popped(&mut self, pos: u16, size: u16) {
        for (f, passed) in &mut self.recent {
            if !*passed && !before(f.avail_idx, pos, size) {
                *passed = true;
            }
        }
    }

    /// Whether a cmd_id chain at `pos` reading `cmd_id` was queued before
    /// `cmd_id` was published (it must not be tagged with it).
    pub(crate) fn queued_before(&self, cmd_id: u32, pos: u16, size: u16) -> bool {
        self.recent
            .iter()
            .any(|(f, passed)| !passed && f.cmd_id == cmd_id && before(f.avail_idx, pos, size))
    }

    /// The fences not retired, oldest first.
    pub(crate) fn pending(&self) -> Vec<CmdIdFence> {
        self.recent
            .iter()
            .filter(|(_, passed)| !passed)
            .map(|(f, _)| *f)
            .collect()
    }

    pub(crate) fn clear(&mut self) {
        self.recent.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fence(cmd_id: u32, avail_idx: u16) -> CmdIdFence {
        CmdIdFence { cmd_id, avail_idx }
    }

    #[test]
    fn chains_queued_before_publication_are_fenced_until_the_ring_reaches_it() {
        let mut f = Fences::default();
        f.published(fence(5, 10));
        // Positions 7..10 were available before 5 was published.
        for pos in 7..10 {
            f.popped(pos, 256);
            assert!(f.queued_before(5, pos, 256), "pos {pos}");
            assert!(!f.queued_before(6, pos, 256), "another id");
        }
        f.popped(10, 256);
        assert!(!f.queued_before(5, 10, 256));
        assert!(f.pending().is_empty(), "retired");
        // Retired for good: once the counter wraps round to the old window
        // nothing is fenced by it.
        assert!(!f.queued_before(5, 9, 256));
    }

    #[test]
    fn positions_wrap() {
        let mut f = Fences::default();
        f.published(fence(3, 2));
        for pos in [65530u16, 65535, 0, 1] {
            f.popped(pos, 16);
            assert!(f.queued_before(3, pos, 16), "pos {pos}");
        }
        f.popped(2, 16);
        assert!(!f.queued_before(3, 2, 16));
    }

    #[test]
    fn a_jump_past_the_window_retires_and_the_first_publication_wins() {
        let mut f = Fences::default();
        f.published(fence(4, 100));
        f.published(fence(4, 200));
        assert_eq!(f.pending(), vec![fence(4, 100)]);
        // SET_VRING_BASE far away (guest reset, another device).
        f.popped(5000, 256);
        assert!(f.pending().is_empty());
        for i in 0..(MAX_FENCES as u32 + 3) {
            f.published(fence(10 + i, 0));
        }
        assert_eq!(f.pending().len(), MAX_FENCES);
        assert_eq!(f.pending()[0].cmd_id, 13);
    }
}
