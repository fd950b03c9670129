use std::io;

use freehint_wire::WireError;

use crate::vmm::VmmError;

/// Why a migration failed. The source VM is running again when the sender
/// returns one of these (unless the VMM itself failed, which the error says).
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// A socket operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        source: io::Error,
    },
    /// The peer sent something that is not valid protocol.
    #[error("{context}: {source}")]
    Protocol {
        /// Where.
        context: String,
        /// What was wrong.
        source: WireError,
    },
    /// The peer sent a valid message at the wrong time.
    #[error("{0}")]
    Unexpected(String),
    /// The peer reported an error and gave up.
    #[error("peer gave up: {0}")]
    Peer(String),
    /// The two sides disagree on the guest RAM layout.
    #[error("guest RAM layout differs: {0}")]
    Layout(String),
    /// Timed out waiting for the peer.
    #[error("timed out after {seconds} s waiting for {what}")]
    Timeout {
        /// What.
        what: String,
        /// How long.
        seconds: u64,
    },
    /// Dirty tracking failed.
    #[error("dirty log: {0}")]
    DirtyLog(#[from] freehint_dirty_log::DirtyLogError),
    /// Guest RAM access failed.
    #[error("guest RAM: {0}")]
    Memory(#[from] freehint_memory::MemoryError),
    /// The VMM failed to stop, hand over or resume.
    #[error("VMM: {0}")]
    Vmm(#[from] VmmError),
    /// The parameters are invalid.
    #[error("parameters: {0}")]
    Params(#[from] crate::params::ParamsError),
}

impl MigrateError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> MigrateError {
        let context = context.into();
        move |source| MigrateError::Io { context, source }
    }

    pub(crate) fn protocol(context: impl Into<String>) -> impl FnOnce(WireError) -> MigrateError {
        let context = context.into();
        move |source| MigrateError::Protocol { context, source }
    }
}
