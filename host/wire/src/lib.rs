//! The freehint migration wire protocol.
//!
//! Every frame starts with a 16-byte [`FrameHeader`]: magic, protocol
//! version, message kind, payload length. Payloads are little endian and
//! padded so that page data starts 8-byte aligned within the frame, and
//! headers stay 16-byte aligned on the stream.
//!
//! A migration uses several TCP connections, each opened with [`Hello`]
//! naming its [`ChannelRole`]:
//!
//! * one **control** channel: hello, device state, completion, the
//!   handover (`Ready` → `Commit` → `Resumed`, see [`Message`]), errors;
//! * one or more **bulk** channels: [`PageBatchHead`]s with page data,
//!   zero runs ([`Message::Zero`]) and [`Message::RoundEnd`] barriers;
//! * an **urgent** channel reserved for postcopy page requests
//!   ([`Message::PageRequest`]) so that they never queue behind bulk data.
//!
//! Page data is not part of [`Message`]: a page batch's head lists typed
//! [`BatchEntry`]s (runs of data pages, runs of zero pages), and the
//! receiver reads the data straight into guest memory. Every frame is
//! decoded through [`Frame::decode`] (or, for the head of a page batch, the
//! staged [`PageBatchHead`] decoders the reader of a socket needs), with
//! every length checked against the frame before it is trusted. Each type
//! owns its encoding; no caller sees a flag bit.

#![deny(missing_docs)]

mod batch;
mod device_state;
mod frame;
mod message;

pub use batch::{BatchEntry, PageBatchHead, BATCH_PREFIX_BYTES, MAX_ENTRY_PAGES};
pub use device_state::DeviceStateEncoding;
pub use frame::{Frame, FrameHeader, Kind};
pub use freehint_types::PageRun;
pub use message::{ChannelRole, Hello, Message, PostcopyReport, RegionDesc, MAX_RUNS_PER_MESSAGE};

/// `"FHNT"`.
pub const MAGIC: u32 = 0x544e_4846;
/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 8;
/// Size of [`FrameHeader`] on the wire.
pub const HEADER_BYTES: usize = 16;
/// Largest payload accepted for any frame but a page batch.
pub const MAX_CONTROL_PAYLOAD_BYTES: u32 = 16 << 20;
/// Largest payload of a connection's first frame, its hello (room for
/// over 3000 RAM regions): a destination waiting for its source holds at
/// most this much for each connection that has not yet said hello.
pub const MAX_HELLO_PAYLOAD_BYTES: u32 = 64 << 10;
/// Largest device state a migration carries (in chunks of at most
/// [`MAX_CONTROL_PAYLOAD_BYTES`]). Real devices fit: a VGA card's VRAM is
/// 16 MiB, a virtio-gpu or QXL card's up to a few hundred MiB.
pub const MAX_DEVICE_STATE_BYTES: u64 = 1 << 30;
/// Bounds of the peer timeout a source may ask for, in seconds.
pub const PEER_TIMEOUT_S_RANGE: std::ops::RangeInclusive<u32> = 1..=3600;
/// Largest number of pages in one batch.
pub const MAX_BATCH_PAGES: u32 = 4096;
/// Largest page-batch payload accepted: one 1 GiB hugetlbfs page plus its
/// head (smaller pages go up to [`MAX_BATCH_PAGES`] a batch).
pub const MAX_BATCH_PAYLOAD_BYTES: u64 = (1 << 30) + (1 << 20);

/// Errors decoding frames.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// The frame does not start with the freehint magic.
    #[error("bad frame magic {0:#010x} (peer is not a freehint migration endpoint)")]
    BadMagic(u32),
    /// The peer speaks another protocol version.
    #[error("peer speaks protocol version {got}, this build speaks {PROTOCOL_VERSION}")]
    UnsupportedVersion {
        /// The peer's version.
        got: u16,
    },
    /// Unknown message kind.
    #[error("unknown message kind {0}")]
    UnknownKind(u16),
    /// A payload larger than allowed for its kind.
    #[error("frame of kind {kind} claims {len} payload bytes, more than the {max} allowed")]
    TooLarge {
        /// Kind.
        kind: u16,
        /// Claimed length.
        len: u64,
        /// Limit.
        max: u64,
    },
    /// The payload is shorter or longer than its contents say.
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// Which message.
        what: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// Reserved header bits are set.
    #[error("reserved header field is {0:#x}, expected 0")]
    Reserved(u32),
}

pub(crate) fn malformed(what: &'static str, detail: String) -> WireError {
    WireError::Malformed { what, detail }
}
