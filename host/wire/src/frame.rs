//! Frames: the 16-byte header every frame starts with, and the one entry
//! point that decodes a whole frame.

use crate::{
    Message, PageBatchHead, WireError, HEADER_BYTES, MAGIC, MAX_BATCH_PAYLOAD_BYTES,
    MAX_CONTROL_PAYLOAD_BYTES, PROTOCOL_VERSION,
};

/// Message kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// [`Message::Hello`].
    Hello = 1,
    /// [`Message::HelloAck`].
    HelloAck = 2,
    /// A page batch: [`PageBatchHead`] then page data.
    PageBatch = 3,
    /// [`Message::Zero`].
    ZeroRun = 4,
    /// [`Message::RoundEnd`].
    RoundEnd = 5,
    /// [`Message::DeviceStateChunk`].
    DeviceStateChunk = 6,
    /// [`Message::Complete`].
    Complete = 7,
    /// [`Message::Resumed`].
    Resumed = 8,
    /// [`Message::Error`].
    Error = 9,
    /// [`Message::PageRequest`].
    PageRequest = 10,
    /// [`Message::Ready`].
    Ready = 11,
    /// [`Message::Commit`].
    Commit = 12,
    /// [`Message::Stopping`].
    Stopping = 13,
    /// [`Message::PostcopyPending`].
    PostcopyPending = 14,
    /// [`Message::PostcopySwitch`].
    PostcopySwitch = 15,
    /// [`Message::PostcopyComplete`].
    PostcopyComplete = 16,
    /// [`Message::PostcopyPlaced`].
    PostcopyPlaced = 17,
    /// [`Message::Fill`].
    FillRun = 18,
}

impl Kind {
    /// What the kind is called in errors.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Hello => "hello",
            Kind::HelloAck => "hello ack",
            Kind::PageBatch => "page batch",
            Kind::ZeroRun => "zero run",
            Kind::RoundEnd => "round end",
            Kind::DeviceStateChunk => "device state",
            Kind::Complete => "complete",
            Kind::Ready => "ready",
            Kind::Commit => "commit",
            Kind::Stopping => "stopping",
            Kind::Resumed => "resumed",
            Kind::Error => "error",
            Kind::PageRequest => "page request",
            Kind::PostcopyPending => "postcopy pending",
            Kind::PostcopySwitch => "postcopy switch",
            Kind::PostcopyComplete => "postcopy complete",
            Kind::PostcopyPlaced => "postcopy placed",
            Kind::FillRun => "fill run",
        }
    }

    pub(crate) fn from_u16(v: u16) -> Result<Kind, WireError> {
        Ok(match v {
            1 => Kind::Hello,
            2 => Kind::HelloAck,
            3 => Kind::PageBatch,
            4 => Kind::ZeroRun,
            5 => Kind::RoundEnd,
            6 => Kind::DeviceStateChunk,
            7 => Kind::Complete,
            8 => Kind::Resumed,
            9 => Kind::Error,
            10 => Kind::PageRequest,
            11 => Kind::Ready,
            12 => Kind::Commit,
            13 => Kind::Stopping,
            14 => Kind::PostcopyPending,
            15 => Kind::PostcopySwitch,
            16 => Kind::PostcopyComplete,
            17 => Kind::PostcopyPlaced,
            18 => Kind::FillRun,
            other => return Err(WireError::UnknownKind(other)),
        })
    }
}

/// The 16-byte frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Message kind.
    pub kind: Kind,
    /// Payload length in bytes (after the header).
    pub payload_bytes: u64,
}

impl FrameHeader {
    /// Encodes the header: magic, version, kind, then the payload length
    /// as a little-endian u64.
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        b[6..8].copy_from_slice(&(self.kind as u16).to_le_bytes());
        b[8..16].copy_from_slice(&self.payload_bytes.to_le_bytes());
        b
    }

    /// Decodes and validates a header.
    pub fn decode(b: &[u8; HEADER_BYTES]) -> Result<FrameHeader, WireError> {
        let magic = u32::from_le_bytes(b[0..4].try_into().expect("4 bytes"));
        if magic != MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != PROTOCOL_VERSION {
            return Err(WireError::UnsupportedVersion { got: version });
        }
        let kind = Kind::from_u16(u16::from_le_bytes([b[6], b[7]]))?;
        let payload_bytes = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
        let max = match kind {
            Kind::PageBatch => MAX_BATCH_PAYLOAD_BYTES,
            _ => MAX_CONTROL_PAYLOAD_BYTES as u64,
        };
        if payload_bytes > max {
            return Err(WireError::TooLarge {
                kind: kind as u16,
                len: payload_bytes,
                max,
            });
        }
        Ok(FrameHeader {
            kind,
            payload_bytes,
        })
    }
}

/// A whole frame as a reader meets it: a message, or the head of a page
/// batch whose page data still follows on the stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Any frame but a page batch.
    Message(Message),
    /// A page batch's head; [`PageBatchHead::data_bytes`] of page data
    /// follow it.
    PageBatch(PageBatchHead),
}

impl Frame {
    /// Decodes the payload of a frame announced by `header`: every frame
    /// goes through here. `payload` is the whole payload, except for a page
    /// batch, where it is the batch head only (the data is read by the
    /// caller, straight into guest memory); `region_pages` gives the
    /// geometry of a region, `(page_bytes, pages)`, or `None` if it does
    /// not exist, to check a batch against.
    pub fn decode(
        header: &FrameHeader,
        payload: &[u8],
        region_pages: impl Fn(usize) -> Option<(u64, u64)>,
    ) -> Result<Frame, WireError> {
        match header.kind {
            Kind::PageBatch => PageBatchHead::decode(payload, header.payload_bytes, region_pages)
                .map(Frame::PageBatch),
            kind => Message::decode(kind, payload).map(Frame::Message),
        }
    }
}
