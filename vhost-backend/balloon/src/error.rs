//! The errors of the balloon backend.
//!
//! Each error keeps the error it comes from as its
//! [`source`](std::error::Error::source), and its own message does not
//! repeat that source: printed with its chain (`: ` between causes), every
//! cause appears once. Fixed sets of reasons (an invalid config, an invalid
//! device state) are typed and part of the message: they are what is
//! wrong, not an underlying error.

use std::path::PathBuf;

use crate::backend_req::BackendReqError;

/// Errors of the balloon backend.
#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    /// The vhost-user socket could not be bound.
    #[error("cannot listen on {}", socket.display())]
    Listen {
        /// The socket path.
        socket: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Another socket or thread operation failed.
    #[error("cannot {what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The vhost-user daemon failed.
    #[error("vhost-user daemon failed")]
    Daemon(#[source] VhostDaemonError),
    /// The configuration is invalid.
    #[error("invalid balloon config: {0}")]
    InvalidConfig(BalloonConfigError),
    /// A config change could not reach the frontend.
    #[error("config change not delivered")]
    ConfigChange(#[source] BackendReqError),
    /// A cmd_id that does not name a round was given to `start_round`.
    #[error("cmd_id {0} does not name a round (must be >= 2)")]
    NotARound(u32),
    /// A device state of a version this backend cannot read.
    #[error(
        "balloon device state version {found} is not supported (this backend reads version {supported})"
    )]
    StateVersion {
        /// The version of the state given.
        found: u32,
        /// The version this backend reads.
        supported: u32,
    },
    /// A device state that cannot be applied to this device.
    #[error("invalid balloon device state: {0}")]
    InvalidState(BalloonStateError),
}

/// Why a [`BalloonConfig`](crate::BalloonConfig) is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BalloonConfigError {
    /// `max_queue_size` is 0 or not a power of two.
    #[error("max_queue_size {0} is not a power of two")]
    MaxQueueSize(u16),
}

/// Why a [`BalloonState`](crate::BalloonState) cannot be imported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BalloonStateError {
    /// The held stats head is outside the largest queue the device accepts.
    #[error("stats head {head} outside a queue of at most {max_queue_size} entries")]
    StatsHeadOutOfRange {
        /// The head given.
        head: u16,
        /// The device's largest queue size.
        max_queue_size: u16,
    },
    /// An inflated PFN does not fit the 32-bit PFNs of the balloon queues.
    #[error("inflated PFN {0:#x} is not a 32-bit PFN")]
    PfnNot32Bit(u64),
    /// More cmd_id fences than the device keeps.
    #[error("{count} cmd_id fences (at most {max})")]
    TooManyFences {
        /// The fences given.
        count: usize,
        /// [`MAX_FENCES`](crate::MAX_FENCES).
        max: usize,
    },
    /// A cmd_id fence for an id that is not a hint round.
    #[error("cmd_id fence for {0}, not a round")]
    FenceNotARound(u32),
    /// `actual` is larger than guest memory.
    #[error("actual = {actual_pages} pages but guest memory has {memory_pages}")]
    ActualBeyondMemory {
        /// The state's `actual`, in 4 KiB pages.
        actual_pages: u32,
        /// Guest memory, in 4 KiB pages.
        memory_pages: u64,
    },
    /// An inflated PFN is outside guest memory.
    #[error("inflated PFN {0:#x} is outside guest memory")]
    PfnOutsideMemory(u64),
}

/// What the `VhostUserDaemon` failed at: `vhost_user_backend::Error`,
/// variant for variant.
///
/// vhost-user-backend 0.24's error implements neither `std::error::Error`
/// nor `Sync` (one variant holds a panic payload), so it cannot be a
/// source as it is; this keeps each of its causes, typed, as one.
#[derive(Debug, thiserror::Error)]
pub enum VhostDaemonError {
    /// The vhost-user handler could not be created.
    #[error("cannot create the vhost-user handler")]
    NewHandler(#[source] vhost_user_backend::VhostUserHandlerError),
    /// The backend listener could not be created.
    #[error("cannot create the backend listener")]
    BackendListener(#[source] vhost::vhost_user::Error),
    /// The backend request handler could not be created.
    #[error("cannot create the backend request handler")]
    BackendReqHandler(#[source] vhost::vhost_user::Error),
    /// The vhost-user listener could not be created.
    #[error("cannot create the vhost-user listener")]
    Listener(#[source] vhost::vhost_user::Error),
    /// The daemon thread could not be started.
    #[error("cannot start the daemon thread")]
    StartThread(#[source] std::io::Error),
    /// The daemon thread panicked.
    #[error("the daemon thread panicked: {message}")]
    ThreadPanicked {
        /// The panic message, if it was a string.
        message: String,
    },
    /// A frontend request could not be handled (the connection is dropped).
    #[error("cannot handle a frontend request")]
    HandleRequest(#[source] vhost::vhost_user::Error),
}

impl From<vhost_user_backend::Error> for VhostDaemonError {
    fn from(e: vhost_user_backend::Error) -> Self {
        use vhost_user_backend::Error as E;
        match e {
            E::NewVhostUserHandler(e) => Self::NewHandler(e),
            E::CreateBackendListener(e) => Self::BackendListener(e),
            E::CreateBackendReqHandler(e) => Self::BackendReqHandler(e),
            E::CreateVhostUserListener(e) => Self::Listener(e),
            E::StartDaemon(e) => Self::StartThread(e),
            E::WaitDaemon(payload) => Self::ThreadPanicked {
                message: payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(not a string)".into()),
            },
            E::HandleRequest(e) => Self::HandleRequest(e),
        }
    }
}

impl From<vhost_user_backend::Error> for BalloonError {
    fn from(e: vhost_user_backend::Error) -> Self {
        BalloonError::Daemon(e.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use freehint_types::{ErrorChain, HintCommand, HintSourceError};

    fn assert_send_sync<T: Send + Sync + 'static>() {}

    #[test]
    fn errors_cross_threads() {
        assert_send_sync::<BalloonError>();
    }

    #[test]
    fn each_cause_is_printed_once() {
        let e = BalloonError::ConfigChange(BackendReqError::Send {
            request: vhost::vhost_user::message::BackendReq::CONFIG_CHANGE_MSG,
            source: std::io::Error::from_raw_os_error(libc::EPIPE),
        });
        let chain = ErrorChain(&e).to_string();
        assert!(
            chain.starts_with(
                "config change not delivered: cannot send CONFIG_CHANGE_MSG to the frontend: "
            ),
            "{chain}"
        );
        assert_eq!(chain.matches("CONFIG_CHANGE_MSG").count(), 1, "{chain}");
        let e = HintSourceError::new(HintCommand::StopRound, e);
        assert_eq!(
            ErrorChain(&e).to_string(),
            format!("could not stop the free-page hint round: {chain}")
        );

        let e: BalloonError =
            vhost_user_backend::Error::HandleRequest(vhost::vhost_user::Error::InvalidMessage)
                .into();
        assert_eq!(
            ErrorChain(&e).to_string(),
            format!(
                "vhost-user daemon failed: cannot handle a frontend request: {}",
                vhost::vhost_user::Error::InvalidMessage
            )
        );

        let e = BalloonError::InvalidConfig(BalloonConfigError::MaxQueueSize(3));
        assert_eq!(
            ErrorChain(&e).to_string(),
            "invalid balloon config: max_queue_size 3 is not a power of two"
        );
    }
}
