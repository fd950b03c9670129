//! Types shared by every freehint crate.
//!
//! This crate sits at the bottom of the dependency graph. It knows nothing
//! about sockets, virtqueues or bitmaps; it only names the things that cross
//! between the guest-facing side (the vhost-user balloon device, the
//! simulated VM) and the host engine:
//!
//! * [`GpaRange`]: a range of guest-physical memory, in bytes.
//! * [`CmdId`]: the virtio-balloon `free_page_hint_cmd_id` that tags one
//!   hint round (epoch).
//! * [`HintSink`]: what the engine implements to receive hints and reports.
//! * [`HintSource`]: what a device implements so the engine can start, stop
//!   and finish hint rounds.

#![deny(missing_docs)]

use std::fmt;

/// A range of guest-physical memory: `len_bytes` bytes starting at
/// guest-physical address `start`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GpaRange {
    /// First guest-physical byte address of the range.
    pub start: u64,
    /// Length of the range in bytes.
    pub len_bytes: u64,
}

impl GpaRange {
    /// A range of `len_bytes` bytes starting at `start`.
    pub const fn new(start: u64, len_bytes: u64) -> Self {
        Self { start, len_bytes }
    }

    /// One past the last byte, or `None` if the range wraps the address space.
    pub fn end(&self) -> Option<u64> {
        self.start.checked_add(self.len_bytes)
    }
}

impl fmt::Display for GpaRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.end() {
            Some(end) => write!(f, "[{:#x}, {:#x})", self.start, end),
            None => write!(f, "[{:#x}, +{:#x} wraps)", self.start, self.len_bytes),
        }
    }
}

/// A virtio-balloon free-page-hint command id (`free_page_hint_cmd_id` in the
/// device config space).
///
/// The values 0 ([`CmdId::STOP`]) and 1 ([`CmdId::DONE`]) are commands; any
/// value of 2 or more names one hint round.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CmdId(pub u32);

impl CmdId {
    /// Ask the driver to stop reporting free pages.
    pub const STOP: CmdId = CmdId(0);
    /// Tell the driver it may free the blocks it holds for hinting.
    pub const DONE: CmdId = CmdId(1);
    /// The first value that names a round.
    pub const MIN_ROUND: u32 = 2;

    /// Whether this id names a hint round rather than a command.
    pub fn is_round(self) -> bool {
        self.0 >= Self::MIN_ROUND
    }

    /// The round id that follows this one, skipping the command values on
    /// wrap-around.
    pub fn next_round(self) -> CmdId {
        match self.0.checked_add(1) {
            Some(v) if v >= Self::MIN_ROUND => CmdId(v),
            _ => CmdId(Self::MIN_ROUND),
        }
    }
}

impl fmt::Display for CmdId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            CmdId::STOP => f.write_str("STOP"),
            CmdId::DONE => f.write_str("DONE"),
            CmdId(v) => write!(f, "{v}"),
        }
    }
}

/// What happened to one batch of hints handed to a [`HintSink`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HintOutcome {
    /// Ranges applied to the migration bitmap.
    pub ranges_applied: u64,
    /// Ranges dropped because their cmd_id was not the open epoch.
    pub ranges_dropped_stale: u64,
    /// Ranges rejected because they lie (partly) outside guest RAM, are empty
    /// or wrap the address space.
    pub ranges_rejected_invalid: u64,
    /// Pages that were still to be sent and were cleared by these hints.
    pub pages_cleared: u64,
}

impl HintOutcome {
    /// Adds another outcome into this one.
    pub fn merge(&mut self, other: HintOutcome) {
        self.ranges_applied += other.ranges_applied;
        self.ranges_dropped_stale += other.ranges_dropped_stale;
        self.ranges_rejected_invalid += other.ranges_rejected_invalid;
        self.pages_cleared += other.pages_cleared;
    }
}

/// The receiving end of the guest's cooperation, implemented by the host
/// engine.
///
/// A device (the vhost-user balloon backend, or the simulated VM's control
/// channel) calls these methods as buffers arrive, in arrival order. The
/// implementation must not trust the ranges: they come from the guest.
pub trait HintSink: Send + Sync {
    /// Free-page hints: the guest reported `ranges` as free while round
    /// `cmd_id` was open. Pages in them need not be migrated, unless they are
    /// written later (the dirty log catches that).
    fn free_page_hints(&self, cmd_id: CmdId, ranges: &[GpaRange]) -> HintOutcome;

    /// Free page reporting: the guest gave `ranges` back and the device has
    /// discarded them; they read as zero and must not be sent.
    fn reported_free(&self, ranges: &[GpaRange]) -> HintOutcome;
}

/// An error from a [`HintSource`]: the device could not deliver a command to
/// the guest.
#[derive(Debug, thiserror::Error)]
#[error("hint source: {0}")]
pub struct HintSourceError(pub String);

/// The commanding end of hint rounds, implemented by whatever talks to the
/// guest (the balloon device, the simulated VM).
pub trait HintSource: Send + Sync {
    /// Starts round `cmd_id`: publish it to the guest so that it reports its
    /// free pages tagged with it.
    fn start_round(&self, cmd_id: CmdId) -> Result<(), HintSourceError>;

    /// Asks the guest to stop reporting (cmd_id STOP).
    fn stop_round(&self) -> Result<(), HintSourceError>;

    /// Tells the guest that migration is over (cmd_id DONE) so that it frees
    /// the blocks it holds for hinting.
    fn finish(&self) -> Result<(), HintSourceError>;

    /// Whether the guest has finished reporting round `cmd_id` (the Linux
    /// driver closes a round with a STOP buffer once it has no more free
    /// blocks). `None` if this source cannot tell; the engine then does not
    /// wait for it.
    fn round_reported(&self, cmd_id: CmdId) -> Option<bool>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_round_skips_commands_on_wrap() {
        assert_eq!(CmdId(2).next_round(), CmdId(3));
        assert_eq!(CmdId(u32::MAX).next_round(), CmdId(2));
        assert_eq!(CmdId::STOP.next_round(), CmdId(2));
        assert!(!CmdId::DONE.is_round());
    }

    #[test]
    fn range_end_detects_wrap() {
        assert_eq!(GpaRange::new(u64::MAX, 2).end(), None);
        assert_eq!(GpaRange::new(4096, 4096).end(), Some(8192));
    }
}
