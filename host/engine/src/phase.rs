//! The phases of one migration, on either side, and who runs the guest at
//! the end.
//!
//! ```text
//!  source                                 destination
//!  Setup        bitmap, first hint round  Setup        waiting for a source
//!  Precopy      rounds, VM running        Precopy      placing pages
//!  Stopped      VM stopped, final round   Stopped      the source said it stops its VM
//!  HandingOver  state + Complete sent     HandingOver  last pages placed, loading state
//!  Ready        destination is ready      Ready        state loaded, VM paused: waiting
//!  Committed    Commit sent: never        Committed    Commit received: resuming
//!               resumes on its own (only
//!               if the destination refuses)
//!  Postcopy     destination runs it; the  Postcopy     runs the guest; pages it
//!               source serves the pages                lacks are requested and
//!               it still lacks                         streamed
//!  PostcopyPaused the link broke in postcopy: PostcopyPaused the guest waits
//!               reconnecting (then waiting             on its faults; waiting
//!               for `migrate --resume`)                for the source to come back
//!  Completed    destination runs it       Completed    runs the guest (or holds it
//!                                                      paused for `freehint resume`)
//!  Failed       source runs the guest     Failed       never ran the guest
//!  Uncertain    paused; destination may   Uncertain    paused; the source may have
//!               or may not run it                      committed (or died with its
//!                                                      guest paused)
//! ```
//!
//! Every transition goes through [`PhaseWatch::enter`], which checks it
//! against [`Phase::allows`] and logs it.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// Where one migration is. See the module documentation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Preparing (source), or waiting for a source (destination).
    #[default]
    Setup,
    /// Pages move while the VM runs on the source.
    Precopy,
    /// The source VM is stopped for the final round.
    Stopped,
    /// Everything is sent; the destination loads the device state.
    HandingOver,
    /// The destination holds the whole guest, paused, and waits for the
    /// source's decision.
    Ready,
    /// The source decided that the destination runs the guest. It resumes
    /// its own copy only if the destination refuses explicitly (it gave up
    /// before acting on the commit, and never resumes its copy).
    Committed,
    /// Postcopy: the destination runs the guest while the pages it still
    /// lacks arrive. The source never resumes its copy and never exits on
    /// its own: it holds the only copy of those pages.
    Postcopy,
    /// Postcopy with the link broken: the destination's guest waits on its
    /// faults, the source reconnects (with backoff, then on the operator's
    /// `freehint migrate --resume`) and the pages still lacking follow.
    PostcopyPaused,
    /// The destination took the guest over.
    Completed,
    /// Given up before any commit: the source runs the guest (unless its
    /// VMM failed, which the error says), the destination never ran it.
    Failed,
    /// The link was lost where the other side may have committed (or died
    /// with its guest paused): this side keeps its guest paused, and the
    /// operator decides which side resumes it.
    Uncertain,
}

impl Phase {
    /// The name used in logs, JSON and `freehint status`.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Setup => "setup",
            Phase::Precopy => "precopy",
            Phase::Stopped => "stopped",
            Phase::HandingOver => "handing-over",
            Phase::Ready => "ready",
            Phase::Committed => "committed",
            Phase::Postcopy => "postcopy",
            Phase::PostcopyPaused => "postcopy-paused",
            Phase::Completed => "completed",
            Phase::Failed => "failed",
            Phase::Uncertain => "uncertain",
        }
    }

    /// Whether the migration is over.
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Completed | Phase::Failed | Phase::Uncertain)
    }

    /// Whether a migration may go from `self` to `next`.
    pub fn allows(self, next: Phase) -> bool {
        use Phase::*;
        match (self, next) {
            (Setup, Precopy) | (Precopy, Stopped) | (Stopped, HandingOver) => true,
            (Precopy, HandingOver) => true, // a destination that missed Stopping
            (HandingOver, Ready) | (Ready, Committed) | (Committed, Completed) => true,
            (Committed, Postcopy) | (Postcopy, Completed) => true,
            // A postcopy that breaks leaves the guest on the destination,
            // waiting on pages that only the source holds.
            (Postcopy | PostcopyPaused, Uncertain) => true,
            (Postcopy, PostcopyPaused) | (PostcopyPaused, Postcopy) => true,
            // Before the commit, giving up is always possible; so is losing
            // a source that had stopped its guest.
            (Setup | Precopy | Stopped | HandingOver | Ready, Failed) => true,
            // After the commit only on the destination's explicit refusal:
            // it gave up before acting on the commit and never resumes.
            (Committed, Failed) => true,
            (Stopped | HandingOver | Ready | Committed, Uncertain) => true,
            _ => false,
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Which end of a migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Side {
    /// The sender.
    Source,
    /// The receiver.
    Destination,
}

/// A snapshot of a migration's progress.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseInfo {
    /// The phase.
    pub phase: Phase,
    /// The precopy round under way or last done (0 before the first).
    pub round: u32,
}

type Hook = Box<dyn Fn(PhaseInfo) + Send + Sync>;

struct Shared {
    side: Side,
    info: Mutex<PhaseInfo>,
    hooks: Mutex<Vec<Hook>>,
}

/// The current phase of one migration, shared with whoever watches it
/// (`freehint status`, state files). Cloning gives another handle on the
/// same migration.
#[derive(Clone)]
pub struct PhaseWatch(Arc<Shared>);

impl std::fmt::Debug for PhaseWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PhaseWatch")
            .field("side", &self.0.side)
            .field("info", &self.get())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl PhaseWatch {
    /// A migration on `side`, in [`Phase::Setup`].
    pub fn new(side: Side) -> Self {
        Self(Arc::new(Shared {
            side,
            info: Mutex::new(PhaseInfo::default()),
            hooks: Mutex::new(Vec::new()),
        }))
    }

    /// The current phase and round.
    pub fn get(&self) -> PhaseInfo {
        *lock(&self.0.info)
    }

    /// Calls `hook` now and after every change (e.g. to write a state file).
    pub fn on_change(&self, hook: impl Fn(PhaseInfo) + Send + Sync + 'static) {
        hook(self.get());
        lock(&self.0.hooks).push(Box::new(hook));
    }

    /// Moves to `next`. A transition [`Phase::allows`] does not know is a
    /// bug; it is logged as an error and made anyway (the phase must say
    /// where the migration really is).
    pub(crate) fn enter(&self, next: Phase) {
        let info = {
            let mut info = lock(&self.0.info);
            if info.phase == next {
                return;
            }
            if !info.phase.allows(next) {
                tracing::error!(side = ?self.0.side, from = %info.phase, to = %next, "unexpected migration phase transition");
            }
            tracing::info!(side = ?self.0.side, from = %info.phase, to = %next, round = info.round, "migration phase");
            info.phase = next;
            *info
        };
        self.notify(info);
    }

    /// Records that round `round` started.
    pub(crate) fn set_round(&self, round: u32) {
        let info = {
            let mut info = lock(&self.0.info);
            info.round = round;
            *info
        };
        self.notify(info);
    }

    fn notify(&self, info: PhaseInfo) {
        for hook in lock(&self.0.hooks).iter() {
            hook(info);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_handover_path_is_allowed_and_resuming_after_commit_is_not() {
        use Phase::*;
        let path = [
            Setup,
            Precopy,
            Stopped,
            HandingOver,
            Ready,
            Committed,
            Completed,
        ];
        for w in path.windows(2) {
            assert!(w[0].allows(w[1]), "{} -> {}", w[0], w[1]);
        }
        // Once committed, only the destination's refusal fails back.
        assert!(Committed.allows(Failed));
        assert!(Committed.allows(Uncertain));
        assert!(!Committed.allows(Precopy));
        // Nothing leaves a final phase.
        for from in [Completed, Failed, Uncertain] {
            for to in path {
                assert!(!from.allows(to), "{from} -> {to}");
            }
        }
    }

    #[test]
    fn hooks_see_every_change() {
        let w = PhaseWatch::new(Side::Source);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        w.on_change(move |i| s.lock().unwrap().push(i.phase));
        w.enter(Phase::Precopy);
        w.enter(Phase::Precopy);
        w.enter(Phase::Failed);
        assert_eq!(
            *seen.lock().unwrap(),
            vec![Phase::Setup, Phase::Precopy, Phase::Failed]
        );
    }
}
