//! The messages of an RDMA connection. Every SEND carries one message in
//! one receive buffer, its length explicit in its header (seed 003: a
//! receiver never guesses where data ends, and never reads a byte the
//! sender did not say it wrote).
//!
//! ```text
//! byte 0      version (1)
//! byte 1      kind: 1 data, 2 page references, 3 control, 4 close
//! bytes 2-3   credits: receive buffers the sender reposted since its
//!             previous message (u16, little endian)
//! bytes 4-7   segments read: page-reference messages the sender has
//!             finished reading, counted from the start (u32, wrapping)
//! bytes 8-11  payload bytes that follow the header (u32)
//! bytes 12-15 zero
//! ```
//!
//! A data message's payload is stream bytes. A page-reference message's
//! payload is a list of 16-byte references to memory of its sender, each
//! `remote address: u64, bytes: u32, rkey: u32`: the receiver fetches
//! those bytes with RDMA READ, and they are stream bytes just as if they
//! had come inline. A control message carries only its header's credits
//! and count; a close message says no stream bytes follow.

use thiserror::Error;

/// Bytes of one message, header included: the size of every receive
/// buffer.
pub(crate) const MESSAGE_BYTES: usize = 64 << 10;
/// Bytes of a header.
pub(crate) const HEADER_BYTES: usize = 16;
/// Bytes of one page reference.
pub(crate) const PAGE_REF_BYTES: usize = 16;
/// Most page references one message holds.
pub(crate) const MAX_PAGE_REFS: usize = (MESSAGE_BYTES - HEADER_BYTES) / PAGE_REF_BYTES;
/// Most stream bytes one data message holds.
pub(crate) const MAX_DATA_BYTES: usize = MESSAGE_BYTES - HEADER_BYTES;
/// The version this build speaks.
pub(crate) const VERSION: u8 = 1;

/// What a message carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Stream bytes, inline.
    Data,
    /// References to stream bytes in the sender's memory.
    Pages,
    /// Only the header's credits and count.
    Control,
    /// The end of the sender's stream.
    Close,
}

impl Kind {
    fn code(self) -> u8 {
        match self {
            Kind::Data => 1,
            Kind::Pages => 2,
            Kind::Control => 3,
            Kind::Close => 4,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => Kind::Data,
            2 => Kind::Pages,
            3 => Kind::Control,
            4 => Kind::Close,
            _ => return None,
        })
    }
}

/// A message's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    /// What follows.
    pub(crate) kind: Kind,
    /// Receive buffers its sender reposted since its previous message.
    pub(crate) credits: u16,
    /// Page-reference messages its sender has finished reading, from the
    /// start, wrapping.
    pub(crate) segments_read: u32,
    /// Payload bytes after the header.
    pub(crate) payload_bytes: u32,
}

/// One run of the sender's memory that the receiver reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PageRef {
    /// Its address in the sender's address space.
    pub(crate) remote_addr: u64,
    /// Its length.
    pub(crate) bytes: u32,
    /// The key of the sender's registration that holds it.
    pub(crate) rkey: u32,
}

/// Why a received message was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum WireError {
    /// Fewer bytes than a header.
    #[error("an RDMA message of {0} bytes is shorter than its header")]
    Short(usize),
    /// Another version of the protocol.
    #[error("the peer speaks RDMA message version {0}, this build {VERSION}")]
    Version(u8),
    /// An unknown kind.
    #[error("unknown RDMA message kind {0}")]
    Kind(u8),
    /// The header's length disagrees with what arrived, or with the kind.
    #[error("an RDMA message says {said} payload bytes for a {kind} message of {arrived} bytes")]
    Length {
        /// The kind, by name.
        kind: &'static str,
        /// Payload bytes the header says.
        said: u32,
        /// Bytes that arrived, header included.
        arrived: usize,
    },
    /// A page reference of no bytes.
    #[error("an RDMA page reference of 0 bytes")]
    EmptyRef,
}

impl Header {
    /// Writes the header into the first [`HEADER_BYTES`] of `out`.
    pub(crate) fn encode(&self, out: &mut [u8]) {
        out[0] = VERSION;
        out[1] = self.kind.code();
        out[2..4].copy_from_slice(&self.credits.to_le_bytes());
        out[4..8].copy_from_slice(&self.segments_read.to_le_bytes());
        out[8..12].copy_from_slice(&self.payload_bytes.to_le_bytes());
        out[12..16].fill(0);
    }

    /// The header of the message `arrived` (the bytes its completion
    /// said), checked against its length and kind; with its payload.
    pub(crate) fn decode(arrived: &[u8]) -> Result<(Header, &[u8]), WireError> {
        if arrived.len() < HEADER_BYTES {
            return Err(WireError::Short(arrived.len()));
        }
        if arrived[0] != VERSION {
            return Err(WireError::Version(arrived[0]));
        }
        let kind = Kind::from_code(arrived[1]).ok_or(WireError::Kind(arrived[1]))?;
        let u32_at = |i: usize| u32::from_le_bytes(arrived[i..i + 4].try_into().unwrap_or([0; 4]));
        let header = Header {
            kind,
            credits: u16::from_le_bytes([arrived[2], arrived[3]]),
            segments_read: u32_at(4),
            payload_bytes: u32_at(8),
        };
        let payload_len = header.payload_bytes as usize;
        let fits = payload_len == arrived.len() - HEADER_BYTES;
        let shape_ok = match kind {
            Kind::Data => payload_len > 0,
            Kind::Pages => payload_len > 0 && payload_len.is_multiple_of(PAGE_REF_BYTES),
            Kind::Control | Kind::Close => payload_len == 0,
        };
        if !fits || !shape_ok {
            return Err(WireError::Length {
                kind: kind.name(),
                said: header.payload_bytes,
                arrived: arrived.len(),
            });
        }
        let payload = &arrived[HEADER_BYTES..];
        if kind == Kind::Pages && page_refs(payload).any(|r| r.bytes == 0) {
            return Err(WireError::EmptyRef);
        }
        Ok((header, payload))
    }
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Data => "data",
            Kind::Pages => "page-reference",
            Kind::Control => "control",
            Kind::Close => "close",
        }
    }
}

impl PageRef {
    /// Writes the reference into the first [`PAGE_REF_BYTES`] of `out`.
    pub(crate) fn encode(&self, out: &mut [u8]) {
        out[0..8].copy_from_slice(&self.remote_addr.to_le_bytes());
        out[8..12].copy_from_slice(&self.bytes.to_le_bytes());
        out[12..16].copy_from_slice(&self.rkey.to_le_bytes());
    }

    fn decode(b: &[u8]) -> PageRef {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[0..8]);
        let mut n = [0u8; 4];
        n.copy_from_slice(&b[8..12]);
        let mut k = [0u8; 4];
        k.copy_from_slice(&b[12..16]);
        PageRef {
            remote_addr: u64::from_le_bytes(a),
            bytes: u32::from_le_bytes(n),
            rkey: u32::from_le_bytes(k),
        }
    }
}

/// The references of a page-reference message's payload (checked by
/// [`Header::decode`]: a whole number of them).
pub(crate) fn page_refs(payload: &[u8]) -> impl Iterator<Item = PageRef> + '_ {
    payload.chunks_exact(PAGE_REF_BYTES).map(PageRef::decode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn message(h: Header, payload: &[u8]) -> Vec<u8> {
        let mut m = vec![0u8; HEADER_BYTES + payload.len()];
        h.encode(&mut m);
        m[HEADER_BYTES..].copy_from_slice(payload);
        m
    }

    #[test]
    fn headers_and_references_round_trip() {
        let r = PageRef {
            remote_addr: 0x7f00_1234_5000,
            bytes: 2 << 20,
            rkey: 0xdead_beef,
        };
        let mut p = [0u8; PAGE_REF_BYTES];
        r.encode(&mut p);
        let h = Header {
            kind: Kind::Pages,
            credits: 7,
            segments_read: u32::MAX,
            payload_bytes: PAGE_REF_BYTES as u32,
        };
        let m = message(h, &p);
        let (got, payload) = Header::decode(&m).unwrap();
        assert_eq!(got, h);
        assert_eq!(page_refs(payload).collect::<Vec<_>>(), vec![r]);
    }

    #[test]
    fn malformed_messages_are_refused_with_the_reason() {
        let h = |kind, payload_bytes| Header {
            kind,
            credits: 0,
            segments_read: 0,
            payload_bytes,
        };
        assert_eq!(Header::decode(&[1; 5]), Err(WireError::Short(5)));
        let mut m = message(h(Kind::Control, 0), &[]);
        m[0] = 9;
        assert_eq!(Header::decode(&m), Err(WireError::Version(9)));
        let mut m = message(h(Kind::Control, 0), &[]);
        m[1] = 0;
        assert_eq!(Header::decode(&m), Err(WireError::Kind(0)));
        // Says more than arrived, or less.
        let m = message(h(Kind::Data, 100), &[0; 10]);
        assert!(matches!(
            Header::decode(&m),
            Err(WireError::Length { said: 100, .. })
        ));
        let m = message(h(Kind::Data, 5), &[0; 10]);
        assert!(matches!(
            Header::decode(&m),
            Err(WireError::Length { said: 5, .. })
        ));
        // Empty data, a control message with a payload, half a reference.
        assert!(Header::decode(&message(h(Kind::Data, 0), &[])).is_err());
        assert!(Header::decode(&message(h(Kind::Control, 3), &[0; 3])).is_err());
        assert!(Header::decode(&message(h(Kind::Pages, 8), &[0; 8])).is_err());
        // A reference of no bytes.
        let m = message(h(Kind::Pages, 16), &[0; 16]);
        assert_eq!(Header::decode(&m), Err(WireError::EmptyRef));
    }

    proptest! {
        /// Whatever arrives, decoding answers without panicking, and a
        /// message it accepts has exactly the payload its header says.
        #[test]
        fn any_bytes_decode_or_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok((h, payload)) = Header::decode(&bytes) {
                prop_assert_eq!(payload.len(), h.payload_bytes as usize);
                prop_assert_eq!(bytes.len(), HEADER_BYTES + payload.len());
            }
        }
    }
}
