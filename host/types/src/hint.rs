//! Hint rounds: the guest's cooperation, from both ends.

use std::fmt;

use crate::{BoxError, GpaRange};

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
    ///
    /// Every dirty-log sync opens a new round, so that a hint the guest
    /// computed before a write can be told apart from one computed after it
    /// (the epoch rule, docs/ARCHITECTURE.md "Hints and the dirty log").
    ///
    /// # Examples
    ///
    /// ```
    /// use freehint_types::CmdId;
    ///
    /// assert_eq!(CmdId(7).next_round(), CmdId(8));
    /// // 0 (STOP) and 1 (DONE) are commands, never rounds.
    /// assert_eq!(CmdId(u32::MAX).next_round(), CmdId(CmdId::MIN_ROUND));
    /// assert!(CmdId(u32::MAX).next_round().is_round());
    /// ```
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
    pub hint_ranges_applied: u64,
    /// Ranges dropped because their cmd_id was not the open epoch.
    pub hint_ranges_dropped_stale: u64,
    /// Ranges rejected because they lie (partly) outside guest RAM, are empty
    /// or wrap the address space.
    pub hint_ranges_rejected_invalid: u64,
    /// Pages that were still to be sent and were cleared by these hints.
    pub pages_cleared: u64,
}

impl HintOutcome {
    /// Adds another outcome into this one.
    pub fn merge(&mut self, other: HintOutcome) {
        self.hint_ranges_applied += other.hint_ranges_applied;
        self.hint_ranges_dropped_stale += other.hint_ranges_dropped_stale;
        self.hint_ranges_rejected_invalid += other.hint_ranges_rejected_invalid;
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

    /// Free-page hints from a guest whose free pages hold a defined
    /// content it relies on: every byte is `byte` (0 under
    /// `init_on_free=1`; the poison byte under `page_poison=1`, which the
    /// kernel checks when it hands a page out again). The pages need not
    /// be sent with their data, but must read so on the destination. A
    /// sink that cannot promise that drops them all, as this default does
    /// (counted as stale: the migration sends the pages).
    fn filled_free_page_hints(
        &self,
        _cmd_id: CmdId,
        ranges: &[GpaRange],
        _byte: u8,
    ) -> HintOutcome {
        HintOutcome {
            hint_ranges_dropped_stale: ranges.len() as u64,
            ..HintOutcome::default()
        }
    }
}

/// A command of a [`HintSource`] to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HintCommand {
    /// [`HintSource::start_round`].
    StartRound(CmdId),
    /// [`HintSource::stop_round`].
    StopRound,
    /// [`HintSource::finish`].
    Finish,
}

impl fmt::Display for HintCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HintCommand::StartRound(id) => write!(f, "start free-page hint round {id}"),
            HintCommand::StopRound => f.write_str("stop the free-page hint round"),
            HintCommand::Finish => f.write_str("tell the guest that migration is done"),
        }
    }
}

/// An error from a [`HintSource`]: the device could not deliver `command`
/// to the guest, for the reason in `source`.
#[derive(Debug, thiserror::Error)]
#[error("could not {command}")]
pub struct HintSourceError {
    /// What the device was asked to do.
    pub command: HintCommand,
    /// Why it could not.
    #[source]
    pub source: BoxError,
}

impl HintSourceError {
    /// `command` failed because of `source`.
    pub fn new(command: HintCommand, source: impl Into<BoxError>) -> Self {
        Self {
            command,
            source: source.into(),
        }
    }
}

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

    /// What this source is called in stats and logs (`balloon`, `agent`,
    /// `sim`).
    fn name(&self) -> &'static str;

    /// How long the guest took to report round `cmd_id`, from
    /// [`Self::start_round`] to the end of its report, once it has ended;
    /// `None` if it has not or this source cannot tell.
    fn report_ms(&self, _cmd_id: CmdId) -> Option<u64> {
        None
    }

    /// How many things the guest sent that broke this source's protocol
    /// or were out of bounds (each was dropped), so far.
    fn guest_errors(&self) -> u64 {
        0
    }
}
