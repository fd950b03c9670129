//! freehint's RDMA transport: migration connections over rdma_cm and
//! libibverbs (through `rdma-sys`), for InfiniBand, RoCE and soft-RoCE
//! (`rdma_rxe`).
//!
//! An [`RdmaStream`] is a byte stream, like a TCP socket, so the engine
//! runs the same migration over either. Underneath, its bytes travel two
//! ways:
//!
//! * **Inline**, in SEND messages with explicit lengths (`wire`): frames,
//!   batch heads, anything that is not guest memory.
//! * **By reference**: [`RdmaStream::try_write_ref`] sends a reference
//!   (address, length, key) to a run of our guest memory instead of its
//!   bytes, and the peer pulls them with RDMA READ when its reader gets
//!   there. The source's CPU never copies a page: the destination's
//!   adapter reads it out of the source's guest RAM (seed 000).
//!
//! Memory is registered for the peer to read in 2 MiB chunks, the first
//! time a reference points into one, and released once the peer has read
//! every reference into it and a connection holds more than 512 (seed
//! 003's concern about pinning all of RAM for the whole migration; see
//! `registry`).
//! Receive buffers, credits and the order of set-up are explained in
//! `stream`; the message format in `wire`.
//!
//! There is no encryption or peer authentication on this transport:
//! RDMA fabrics are run as trusted networks (docs/SECURITY.md).

#![deny(missing_docs)]

mod cm;
mod registry;
mod stream;
mod verbs;
mod wire;

use thiserror::Error;

pub use cm::{connect, RdmaListener};
pub use stream::{DetachedRdmaStream, RdmaCut, RdmaStream};
pub use wire::WireError;

/// Why an RDMA connection could not be set up.
#[derive(Debug, Error)]
pub enum RdmaError {
    /// A library call failed.
    #[error("{step}: {source}")]
    Io {
        /// What was being done.
        step: String,
        /// The call's error.
        #[source]
        source: std::io::Error,
    },
    /// rdma_cm reported another event than the one the step waits for.
    #[error("{step}: rdma_cm reported {event} (status {status})")]
    Event {
        /// What was being done.
        step: String,
        /// The event, as librdmacm names it.
        event: String,
        /// Its status (a negative errno, or the peer's reject reason).
        status: i32,
    },
    /// No event within the time allowed.
    #[error("{step}: no answer within {seconds} s")]
    Timeout {
        /// What was being done.
        step: String,
        /// The time allowed.
        seconds: u64,
    },
    /// A connect request without freehint's hello.
    #[error("the connecting peer is not a freehint source of this version")]
    NotFreehint,
}
