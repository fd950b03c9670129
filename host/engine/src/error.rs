use std::io;

use freehint_wire::WireError;

use freehint_types::{ErrorChain, HintSourceError, VmmError};

/// Why a migration step failed. Where that leaves the guest is in the
/// [`MigrationFailure`] / [`ReceiveFailure`] that carries it.
///
/// A variant that wraps another error names what was being done and keeps
/// the error as its `source()`, without repeating its text: print it with
/// [`ErrorChain`] to see every cause once.
///
/// [`ReceiveFailure`]: crate::ReceiveFailure
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// A socket operation failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        source: io::Error,
    },
    /// The peer sent something that is not valid protocol.
    #[error("{context}")]
    Protocol {
        /// Where.
        context: String,
        /// What was wrong.
        source: WireError,
    },
    /// TLS could not be set up, or the peer failed its checks (or we
    /// failed the peer's).
    #[error("{context}")]
    Tls {
        /// Which connection.
        context: String,
        /// What went wrong.
        source: crate::transport::TlsError,
    },
    /// The peer sent a valid message at the wrong time.
    #[error("{0}")]
    Unexpected(String),
    /// The peer closed the connection (or went away mid-frame).
    #[error("{0}")]
    Disconnected(String),
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
    #[error("dirty log")]
    DirtyLog(#[from] freehint_dirty_log::DirtyLogError),
    /// Guest RAM access failed.
    #[error("guest RAM")]
    Memory(#[from] freehint_memory::MemoryError),
    /// The VMM failed to stop, hand over or resume.
    #[error(transparent)]
    Vmm(#[from] VmmError),
    /// The guest's device could not start or stop a hint round.
    #[error(transparent)]
    HintSource(#[from] HintSourceError),
    /// The migration failed, and resuming the source VM after it failed
    /// too (`source`).
    #[error("{}; and after that", ErrorChain(&**failure))]
    ResumeFailed {
        /// Why the migration failed.
        failure: Box<MigrateError>,
        /// Why the source VM could not be resumed.
        source: VmmError,
    },
    /// The parameters are invalid.
    #[error("invalid migration parameters")]
    Params(#[from] crate::params::ParamsError),
    /// The operator cancelled the migration (or the process got SIGINT or
    /// SIGTERM).
    #[error("cancelled")]
    Cancelled,
    /// A bug: a thread panicked.
    #[error("internal error: {0}")]
    Panic(String),
    /// A test made the migration fail at this fault point.
    #[error("fault injected at {0}")]
    FaultInjected(&'static str),
    /// Postcopy page placement through the destination VMM's userfaultfd
    /// failed.
    #[error("postcopy placement")]
    Placement(#[from] freehint_placement::PlacementError),
    /// The destination cannot take a postcopy migration, or postcopy broke
    /// one of its rules.
    #[error("postcopy: {0}")]
    Postcopy(String),
    /// The VMM's device state does not fit in a migration.
    #[error(
        "the VMM's device state is {bytes} bytes, more than the {max_bytes} a migration carries"
    )]
    DeviceStateTooLarge {
        /// Its size (or the estimate taken before stopping the VM).
        bytes: u64,
        /// The limit.
        max_bytes: u64,
    },
}

/// A migration the sender did not complete, and where it left the guest
/// (`stats.state`, `stats.source_running`, `stats.destination_running`).
#[derive(Debug)]
pub struct MigrationFailure {
    /// What went wrong.
    pub error: MigrateError,
    /// What was measured, and the outcome: [`Phase::Failed`] (the source
    /// runs the guest unless resuming it failed) or [`Phase::Uncertain`].
    ///
    /// [`Phase::Failed`]: crate::Phase::Failed
    /// [`Phase::Uncertain`]: crate::Phase::Uncertain
    pub stats: crate::MigrationStats,
}

impl std::fmt::Display for MigrationFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.stats.state {
            crate::Phase::Uncertain => write!(
                f,
                "{}; outcome uncertain: the source VM stays paused after its commit, and the destination may or may not have resumed the guest; resume it on exactly one side (the destination if it runs the guest)",
                ErrorChain(&self.error)
            ),
            _ if !self.stats.source_running => write!(
                f,
                "{}; the source VM is not running (resuming it failed)",
                ErrorChain(&self.error)
            ),
            _ => write!(f, "{}; the source VM runs on", ErrorChain(&self.error)),
        }
    }
}

impl std::error::Error for MigrationFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// Runs a migration step to its end; a panic in it becomes an error, to be
/// handled by the same rules as any other.
pub(crate) async fn caught<T>(
    step: impl std::future::Future<Output = Result<T, MigrateError>>,
) -> Result<T, MigrateError> {
    use futures_util::FutureExt;
    std::panic::AssertUnwindSafe(step)
        .catch_unwind()
        .await
        .unwrap_or_else(|p| Err(MigrateError::Panic(panic_text(&*p))))
}

/// Like [`caught`], but `cancel` ends the step early with
/// [`MigrateError::Cancelled`] (the step is dropped at its next await).
pub(crate) async fn cancellable<T>(
    cancel: &tokio_util::sync::CancellationToken,
    step: impl std::future::Future<Output = Result<T, MigrateError>>,
) -> Result<T, MigrateError> {
    tokio::select! {
        biased;
        _ = cancel.cancelled() => Err(MigrateError::Cancelled),
        r = caught(step) => r,
    }
}

/// The text of a caught panic.
pub(crate) fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a thread panicked".into())
}

impl MigrateError {
    /// Whether this says the peer went silent or away, rather than that it
    /// said or did something wrong.
    pub fn is_link_loss(&self) -> bool {
        matches!(
            self,
            MigrateError::Io { .. } | MigrateError::Timeout { .. } | MigrateError::Disconnected(_)
        )
    }

    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> MigrateError {
        let context = context.into();
        move |source| MigrateError::Io { context, source }
    }

    pub(crate) fn protocol(context: impl Into<String>) -> impl FnOnce(WireError) -> MigrateError {
        let context = context.into();
        move |source| MigrateError::Protocol { context, source }
    }
}
