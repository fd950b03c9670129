//! Types shared by every freehint crate.
//!
//! This crate sits at the bottom of the dependency graph. It knows nothing
//! about sockets, virtqueues or bitmaps; it names the things that cross
//! between the guest-facing side (the vhost-user balloon device, QEMU, the
//! simulated VM) and the host engine, so that each side depends on this
//! crate and not on the other:
//!
//! * Address spaces: [`GpaRange`] (guest-physical) and [`RamRange`] (the
//!   RAM being migrated: offsets in the RAM file), never mixed.
//! * [`PageRun`]: consecutive pages of one RAM region.
//! * Hint rounds: [`CmdId`] (one round, an epoch), [`HintSink`] (what the
//!   engine implements to receive hints), [`HintSource`] (what a device
//!   implements so the engine can start, stop and finish rounds).
//! * The VMM as the engine needs it: [`Vmm`] on the source,
//!   [`DestinationVmm`] on the destination, and their [`VmmError`].

#![deny(missing_docs)]

mod addr;
mod hint;
mod run;
mod vmm;

pub use addr::{GpaRange, RamRange};
pub use hint::{CmdId, HintCommand, HintOutcome, HintSink, HintSource, HintSourceError};
pub use run::{append_run, merge_runs, PageRun};
pub use vmm::{DestinationVmm, Vmm, VmmError, VmmOp};

/// An error and its chain of causes on one line, each said once:
/// `could not stop the VM: QMP stop: connection reset by peer`.
///
/// freehint's errors name what failed and keep the underlying error as
/// their `source()` instead of repeating its text, so printing just the
/// top error loses the causes; print through this instead.
///
/// # Examples
///
/// ```
/// use freehint_types::{ErrorChain, VmmError, VmmOp};
///
/// let e = VmmError::new(VmmOp::Stop, std::io::Error::other("QMP socket closed"));
/// assert_eq!(ErrorChain(&e).to_string(), "could not stop the VM: QMP socket closed");
/// ```
#[derive(Clone, Copy)]
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + Send + Sync + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut said = self.0.to_string();
        f.write_str(&said.replace('\n', " "))?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            let text = c.to_string();
            // An error that already printed its source inline (foreign
            // crates do) is not repeated.
            if !said.contains(&text) {
                write!(f, ": {}", text.replace('\n', " "))?;
                said.push_str(&text);
            }
            cause = c.source();
        }
        Ok(())
    }
}

impl std::fmt::Debug for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// The underlying cause carried by the collaborator errors ([`VmmError`],
/// [`HintSourceError`]): whatever error type the implementation has.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

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
        assert_eq!(RamRange::new(4096, 4096).end(), Some(8192));
    }

    #[test]
    fn runs_follow_only_within_a_region() {
        let a = PageRun::new(0, 10, 5);
        assert!(a.is_followed_by(&PageRun::page(0, 15)));
        assert!(!a.is_followed_by(&PageRun::page(1, 15)));
        assert!(!a.is_followed_by(&PageRun::page(0, 16)));
    }

    #[test]
    fn errors_keep_their_source() {
        use std::error::Error;
        let e = VmmError::new(VmmOp::Stop, std::io::Error::other("QMP socket closed"));
        assert_eq!(e.to_string(), "could not stop the VM");
        assert_eq!(e.source().unwrap().to_string(), "QMP socket closed");
        let e = HintSourceError::new(HintCommand::StartRound(CmdId(3)), "ring gone");
        assert_eq!(e.to_string(), "could not start free-page hint round 3");
    }
}
