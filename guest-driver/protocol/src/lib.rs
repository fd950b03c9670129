//! The protocol between the freehint host daemon and its guest agent.
//!
//! The agent runs in the guest and talks to the host over a virtio-serial
//! port (QEMU migrates the device itself). The host asks for a report of
//! the guest's free memory; the agent asks the guest's `freehint_free`
//! kernel module and answers with the free pages as PFN ranges, in
//! batches, then says it is done:
//!
//! ```text
//!  guest (agent)                         host (daemon)
//!                                    <-- Query
//!  Hello { page size, free content } -->
//!                                    <-- Report { cmd_id, min_order }
//!  Ranges { cmd_id, ranges }       -->   (as many batches as it takes)
//!  Done { cmd_id, pages, took_us }  -->
//!  (or Failed { cmd_id, reason })
//! ```
//!
//! Before the first report of a migration the host may ask the guest to
//! make more of its memory free (the operator's opt-in policies):
//!
//! ```text
//!                                    <-- Prepare { cmd_id, drop_caches, compact }
//!  Prepared { cmd_id, took_us, free before/after } -->  (or Failed)
//! ```
//!
//! Every frame is a 12-byte header (magic `FHAG`, version, kind, payload
//! length; little endian) and its payload. Both sides refuse another
//! version or an unknown kind with a clear error, and a payload above
//! [`MAX_PAYLOAD_BYTES`] before allocating anything: the host reads this
//! from a guest it does not trust. [`Decoder`] takes the bytes of the
//! stream as they come, in any pieces.
//!
//! The host opens every conversation with a `Query`: a virtio-serial port
//! keeps no record of who listened before (a new daemon, or the guest
//! arriving on another host, finds the agent mid-life), and bytes the guest
//! wrote while no host was connected may be lost or cut, so the host finds
//! the start of the next frame with [`Decoder::resync`] after an error.

#![deny(missing_docs)]

/// `FHAG`, little endian.
pub const MAGIC: u32 = u32::from_le_bytes(*b"FHAG");
/// The protocol version this build speaks.
pub const VERSION: u16 = 1;
/// Bytes of a frame header.
pub const HEADER_BYTES: usize = 12;
/// Most ranges in one [`Message::Ranges`] batch (16 bytes each).
pub const MAX_RANGES_PER_BATCH: usize = 4096;
/// Largest payload of any frame: a full batch of ranges.
pub const MAX_PAYLOAD_BYTES: usize = 8 + 16 * MAX_RANGES_PER_BATCH;
/// Largest `min_order` a [`Message::Report`] may ask for (the guest's
/// buddy allocator has orders 0..=10).
pub const MAX_MIN_ORDER: u8 = 10;
/// Longest reason a [`Message::Failed`] carries, bytes.
pub const MAX_REASON_BYTES: usize = 512;

/// `reason` cut to at most [`MAX_REASON_BYTES`], at a character boundary.
fn cut_reason(reason: &str) -> &str {
    let mut end = reason.len().min(MAX_REASON_BYTES);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// What a protocol violation is.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    /// The frame does not start with [`MAGIC`].
    #[error("bad frame magic {0:#010x} (not a freehint agent)")]
    BadMagic(u32),
    /// The peer speaks another version.
    #[error("the peer speaks agent protocol version {got}, this build speaks {VERSION}")]
    UnsupportedVersion {
        /// The peer's version.
        got: u16,
    },
    /// A kind this version does not know.
    #[error("unknown frame kind {0}")]
    UnknownKind(u16),
    /// A payload above [`MAX_PAYLOAD_BYTES`].
    #[error("a {kind} frame of {bytes} bytes (at most {MAX_PAYLOAD_BYTES})")]
    TooLarge {
        /// The frame's kind.
        kind: &'static str,
        /// Its announced payload length.
        bytes: usize,
    },
    /// A payload that does not decode.
    #[error("malformed {kind} frame: {why}")]
    Malformed {
        /// The frame's kind.
        kind: &'static str,
        /// What is wrong with it.
        why: String,
    },
}

/// What a free page holds in the guest, as the guest's kernel defines it:
/// the host may send a free page it does not send as this content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FreeContent {
    /// Nothing defined: a free page may hold anything.
    Undefined,
    /// Zeros (`init_on_free=1`).
    Zero,
    /// Every byte is this pattern (page poisoning).
    Pattern(u8),
}

/// The agent's first message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The guest's page size, bytes (a power of two, 4 KiB..=64 KiB).
    pub page_bytes: u32,
    /// What a free page holds.
    pub free_content: FreeContent,
}

/// `pages` pages from guest page frame `first_pfn` on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PfnRange {
    /// First page frame number.
    pub first_pfn: u64,
    /// Pages, at least one.
    pub pages: u64,
}

/// Every message of the protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Host → guest: say [`Message::Hello`] (the host's first message).
    Query,
    /// Guest → host, the answer to a query: what the guest is.
    Hello(Hello),
    /// Host → guest: report the free memory, orders ≥ `min_order`.
    Report {
        /// The host's number for this report; every answer carries it.
        cmd_id: u32,
        /// Smallest buddy order to report (0: every free page).
        min_order: u8,
    },
    /// Guest → host: some of the free ranges of report `cmd_id`.
    Ranges {
        /// The report these belong to.
        cmd_id: u32,
        /// At most [`MAX_RANGES_PER_BATCH`].
        ranges: Vec<PfnRange>,
    },
    /// Guest → host: report `cmd_id` is complete.
    Done {
        /// The report.
        cmd_id: u32,
        /// Pages in all its ranges.
        pages: u64,
        /// Ranges in all its batches.
        ranges: u64,
        /// How long the guest took, µs.
        took_us: u64,
        /// The guest had more free ranges than it could gather.
        truncated: bool,
    },
    /// Guest → host: report (or preparation) `cmd_id` could not be made
    /// (no module…).
    Failed {
        /// The report or preparation.
        cmd_id: u32,
        /// Why, for the host's log.
        reason: String,
    },
    /// Host → guest: make memory free before the first report.
    Prepare {
        /// The host's number for this request; the answer carries it.
        cmd_id: u32,
        /// Drop the clean page cache (`vm.drop_caches=1`).
        drop_caches: bool,
        /// Compact memory (`vm.compact_memory=1`), so that free memory
        /// forms large blocks.
        compact: bool,
    },
    /// Guest → host: preparation `cmd_id` is done.
    Prepared {
        /// The preparation.
        cmd_id: u32,
        /// How long it took, µs.
        took_us: u64,
        /// The guest's free pages (MemFree) before it.
        free_pages_before: u64,
        /// And after it.
        free_pages_after: u64,
    },
}

/// Frame kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// [`Message::Hello`].
    Hello = 1,
    /// [`Message::Report`].
    Report = 2,
    /// [`Message::Ranges`].
    Ranges = 3,
    /// [`Message::Done`].
    Done = 4,
    /// [`Message::Failed`].
    Failed = 5,
    /// [`Message::Query`].
    Query = 6,
    /// [`Message::Prepare`].
    Prepare = 7,
    /// [`Message::Prepared`].
    Prepared = 8,
}

impl Kind {
    /// The kind of the raw value `v`.
    pub fn from_u16(v: u16) -> Result<Kind, ProtocolError> {
        Ok(match v {
            1 => Kind::Hello,
            2 => Kind::Report,
            3 => Kind::Ranges,
            4 => Kind::Done,
            5 => Kind::Failed,
            6 => Kind::Query,
            7 => Kind::Prepare,
            8 => Kind::Prepared,
            other => return Err(ProtocolError::UnknownKind(other)),
        })
    }

    /// What the kind is called in errors.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Hello => "hello",
            Kind::Report => "report",
            Kind::Ranges => "ranges",
            Kind::Done => "done",
            Kind::Failed => "failed",
            Kind::Query => "query",
            Kind::Prepare => "prepare",
            Kind::Prepared => "prepared",
        }
    }
}

impl Message {
    /// The message's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello(_) => Kind::Hello,
            Message::Report { .. } => Kind::Report,
            Message::Ranges { .. } => Kind::Ranges,
            Message::Done { .. } => Kind::Done,
            Message::Failed { .. } => Kind::Failed,
            Message::Query => Kind::Query,
            Message::Prepare { .. } => Kind::Prepare,
            Message::Prepared { .. } => Kind::Prepared,
        }
    }

    /// Appends the whole frame (header and payload) to `out`. A batch of
    /// more than [`MAX_RANGES_PER_BATCH`] ranges or a longer reason is cut
    /// to fit: split batches before encoding them.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut p = Vec::new();
        match self {
            Message::Query => {}
            Message::Prepare {
                cmd_id,
                drop_caches,
                compact,
            } => {
                p.extend_from_slice(&cmd_id.to_le_bytes());
                p.extend_from_slice(&[u8::from(*drop_caches), u8::from(*compact), 0, 0]);
            }
            Message::Prepared {
                cmd_id,
                took_us,
                free_pages_before,
                free_pages_after,
            } => {
                p.extend_from_slice(&cmd_id.to_le_bytes());
                p.extend_from_slice(&[0; 4]);
                p.extend_from_slice(&took_us.to_le_bytes());
                p.extend_from_slice(&free_pages_before.to_le_bytes());
                p.extend_from_slice(&free_pages_after.to_le_bytes());
            }
            Message::Hello(h) => {
                p.extend_from_slice(&h.page_bytes.to_le_bytes());
                let (kind, pattern) = match h.free_content {
                    FreeContent::Undefined => (0u8, 0u8),
                    FreeContent::Zero => (1, 0),
                    FreeContent::Pattern(b) => (2, b),
                };
                p.extend_from_slice(&[kind, pattern, 0, 0]);
            }
            Message::Report { cmd_id, min_order } => {
                p.extend_from_slice(&cmd_id.to_le_bytes());
                p.extend_from_slice(&[*min_order, 0, 0, 0]);
            }
            Message::Ranges { cmd_id, ranges } => {
                let n = ranges.len().min(MAX_RANGES_PER_BATCH);
                p.extend_from_slice(&cmd_id.to_le_bytes());
                p.extend_from_slice(&(n as u32).to_le_bytes());
                for r in &ranges[..n] {
                    p.extend_from_slice(&r.first_pfn.to_le_bytes());
                    p.extend_from_slice(&r.pages.to_le_bytes());
                }
            }
            Message::Done {
                cmd_id,
                pages,
                ranges,
                took_us,
                truncated,
            } => {
                p.extend_from_slice(&cmd_id.to_le_bytes());
                p.extend_from_slice(&u32::from(*truncated).to_le_bytes());
                p.extend_from_slice(&pages.to_le_bytes());
                p.extend_from_slice(&ranges.to_le_bytes());
                p.extend_from_slice(&took_us.to_le_bytes());
            }
            Message::Failed { cmd_id, reason } => {
                p.extend_from_slice(&cmd_id.to_le_bytes());
                p.extend_from_slice(cut_reason(reason).as_bytes());
            }
        }
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(self.kind() as u16).to_le_bytes());
        out.extend_from_slice(&(p.len() as u32).to_le_bytes());
        out.extend_from_slice(&p);
    }

    /// Decodes the payload of a frame of `kind`.
    pub fn decode(kind: Kind, payload: &[u8]) -> Result<Message, ProtocolError> {
        let name = kind.name();
        let malformed = |why: String| ProtocolError::Malformed { kind: name, why };
        let exact = |n: usize| {
            if payload.len() == n {
                Ok(())
            } else {
                Err(malformed(format!(
                    "{} bytes of payload, expected {n}",
                    payload.len()
                )))
            }
        };
        let u32_at = |at: usize| u32::from_le_bytes(payload[at..at + 4].try_into().expect("4"));
        let u64_at = |at: usize| u64::from_le_bytes(payload[at..at + 8].try_into().expect("8"));
        let flag = |b: u8, what: &str| match b {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(malformed(format!("{what} flag {other}"))),
        };
        Ok(match kind {
            Kind::Query => {
                exact(0)?;
                Message::Query
            }
            Kind::Prepare => {
                exact(8)?;
                Message::Prepare {
                    cmd_id: u32_at(0),
                    drop_caches: flag(payload[4], "drop_caches")?,
                    compact: flag(payload[5], "compact")?,
                }
            }
            Kind::Prepared => {
                exact(32)?;
                Message::Prepared {
                    cmd_id: u32_at(0),
                    took_us: u64_at(8),
                    free_pages_before: u64_at(16),
                    free_pages_after: u64_at(24),
                }
            }
            Kind::Hello => {
                exact(8)?;
                let page_bytes = u32_at(0);
                if !page_bytes.is_power_of_two() || !(4096..=65536).contains(&page_bytes) {
                    return Err(malformed(format!("page size {page_bytes}")));
                }
                let free_content = match (payload[4], payload[5]) {
                    (0, _) => FreeContent::Undefined,
                    (1, _) => FreeContent::Zero,
                    (2, b) => FreeContent::Pattern(b),
                    (other, _) => return Err(malformed(format!("free content kind {other}"))),
                };
                Message::Hello(Hello {
                    page_bytes,
                    free_content,
                })
            }
            Kind::Report => {
                exact(8)?;
                let min_order = payload[4];
                if min_order > MAX_MIN_ORDER {
                    return Err(malformed(format!(
                        "min_order {min_order} (at most {MAX_MIN_ORDER})"
                    )));
                }
                Message::Report {
                    cmd_id: u32_at(0),
                    min_order,
                }
            }
            Kind::Ranges => {
                if payload.len() < 8 {
                    return Err(malformed(format!("{} bytes of payload", payload.len())));
                }
                let n = u32_at(4) as usize;
                if n > MAX_RANGES_PER_BATCH {
                    return Err(malformed(format!(
                        "{n} ranges (at most {MAX_RANGES_PER_BATCH})"
                    )));
                }
                exact(8 + 16 * n)?;
                let mut ranges = Vec::with_capacity(n);
                for i in 0..n {
                    let r = PfnRange {
                        first_pfn: u64_at(8 + 16 * i),
                        pages: u64_at(16 + 16 * i),
                    };
                    if r.pages == 0 || r.first_pfn.checked_add(r.pages).is_none() {
                        return Err(malformed(format!(
                            "range {i}: {} pages from {}",
                            r.pages, r.first_pfn
                        )));
                    }
                    ranges.push(r);
                }
                Message::Ranges {
                    cmd_id: u32_at(0),
                    ranges,
                }
            }
            Kind::Done => {
                exact(32)?;
                let truncated = match u32_at(4) {
                    0 => false,
                    1 => true,
                    other => return Err(malformed(format!("truncated flag {other}"))),
                };
                Message::Done {
                    cmd_id: u32_at(0),
                    truncated,
                    pages: u64_at(8),
                    ranges: u64_at(16),
                    took_us: u64_at(24),
                }
            }
            Kind::Failed => {
                if payload.len() < 4 || payload.len() > 4 + MAX_REASON_BYTES {
                    return Err(malformed(format!("{} bytes of payload", payload.len())));
                }
                // Invalid UTF-8 becomes U+FFFD, 3 bytes for each bad
                // byte: cut again, so a reason is never longer than the
                // limit (and encodes to itself).
                let reason = String::from_utf8_lossy(&payload[4..]);
                Message::Failed {
                    cmd_id: u32_at(0),
                    reason: cut_reason(&reason).to_string(),
                }
            }
        })
    }
}

/// Decodes a stream of frames from bytes that arrive in any pieces. It
/// holds what it was given until a frame is whole: a caller that pushes
/// each read (of bounded size) and then takes every whole message holds
/// at most one frame and one read.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    /// Adds bytes received from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole message, `None` until one is whole. After an error
    /// the stream is out of step: the caller drops it (or starts a new
    /// decoder once the peer has started again).
    pub fn next_message(&mut self) -> Option<Result<Message, ProtocolError>> {
        if self.buf.len() < HEADER_BYTES {
            return None;
        }
        let magic = u32::from_le_bytes(self.buf[0..4].try_into().expect("4"));
        if magic != MAGIC {
            return Some(Err(ProtocolError::BadMagic(magic)));
        }
        let version = u16::from_le_bytes([self.buf[4], self.buf[5]]);
        if version != VERSION {
            return Some(Err(ProtocolError::UnsupportedVersion { got: version }));
        }
        let kind = match Kind::from_u16(u16::from_le_bytes([self.buf[6], self.buf[7]])) {
            Ok(k) => k,
            Err(e) => return Some(Err(e)),
        };
        let len = u32::from_le_bytes(self.buf[8..12].try_into().expect("4")) as usize;
        if len > MAX_PAYLOAD_BYTES {
            return Some(Err(ProtocolError::TooLarge {
                kind: kind.name(),
                bytes: len,
            }));
        }
        if self.buf.len() < HEADER_BYTES + len {
            return None;
        }
        let m = Message::decode(kind, &self.buf[HEADER_BYTES..HEADER_BYTES + len]);
        self.buf.drain(..HEADER_BYTES + len);
        Some(m)
    }

    /// After an error: drops the bytes held up to the next place a frame
    /// could start (the next [`MAGIC`] after the first byte), so that
    /// decoding goes on from there. Returns the bytes dropped.
    pub fn resync(&mut self) -> usize {
        let magic = MAGIC.to_le_bytes();
        let skip = (1..self.buf.len())
            .find(|&i| {
                let n = (self.buf.len() - i).min(4);
                self.buf[i..i + n] == magic[..n]
            })
            .unwrap_or(self.buf.len());
        self.buf.drain(..skip);
        skip
    }

    /// Bytes held that do not make a whole frame yet.
    pub fn pending_bytes(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn all_kinds() -> Vec<Message> {
        vec![
            Message::Query,
            Message::Prepare {
                cmd_id: 3,
                drop_caches: true,
                compact: false,
            },
            Message::Prepared {
                cmd_id: 3,
                took_us: 1200,
                free_pages_before: 10,
                free_pages_after: 90_000,
            },
            Message::Hello(Hello {
                page_bytes: 4096,
                free_content: FreeContent::Pattern(0xaa),
            }),
            Message::Hello(Hello {
                page_bytes: 65536,
                free_content: FreeContent::Zero,
            }),
            Message::Report {
                cmd_id: 7,
                min_order: 0,
            },
            Message::Ranges {
                cmd_id: 7,
                ranges: vec![
                    PfnRange {
                        first_pfn: 0x100,
                        pages: 512,
                    },
                    PfnRange {
                        first_pfn: 1 << 40,
                        pages: 1,
                    },
                ],
            },
            Message::Done {
                cmd_id: 7,
                pages: 513,
                ranges: 2,
                took_us: 430,
                truncated: true,
            },
            Message::Failed {
                cmd_id: 7,
                reason: "no /dev/freehint_free".into(),
            },
        ]
    }

    #[test]
    fn every_kind_survives_the_trip_in_one_byte_pieces() {
        let mut bytes = Vec::new();
        for m in all_kinds() {
            m.encode(&mut bytes);
        }
        let mut d = Decoder::default();
        let mut got = Vec::new();
        for b in bytes {
            d.push(&[b]);
            while let Some(m) = d.next_message() {
                got.push(m.unwrap());
            }
        }
        assert_eq!(got, all_kinds());
        assert_eq!(d.pending_bytes(), 0);
    }

    #[test]
    fn a_stranger_another_version_and_a_huge_frame_are_refused_before_allocating() {
        let mut d = Decoder::default();
        d.push(b"GET / HTTP/1.1\r\n");
        assert!(matches!(
            d.next_message(),
            Some(Err(ProtocolError::BadMagic(_)))
        ));

        let mut frame = Vec::new();
        Message::Report {
            cmd_id: 1,
            min_order: 0,
        }
        .encode(&mut frame);
        frame[4] = 2;
        let mut d = Decoder::default();
        d.push(&frame);
        let e = d.next_message().unwrap().unwrap_err();
        assert!(e.to_string().contains("version 2"), "{e}");

        let mut d = Decoder::default();
        let mut head = Vec::new();
        head.extend_from_slice(&MAGIC.to_le_bytes());
        head.extend_from_slice(&VERSION.to_le_bytes());
        head.extend_from_slice(&(Kind::Ranges as u16).to_le_bytes());
        head.extend_from_slice(&u32::MAX.to_le_bytes());
        d.push(&head);
        assert!(matches!(
            d.next_message(),
            Some(Err(ProtocolError::TooLarge { .. }))
        ));
    }

    #[test]
    fn after_garbage_resync_finds_the_next_frame() {
        let mut bytes = b"\x00garbage FHA".to_vec();
        Message::Query.encode(&mut bytes);
        Message::Report {
            cmd_id: 9,
            min_order: 0,
        }
        .encode(&mut bytes);
        let mut d = Decoder::default();
        d.push(&bytes);
        let mut got = Vec::new();
        let mut errors = 0;
        while let Some(m) = d.next_message() {
            match m {
                Ok(m) => got.push(m),
                Err(_) => {
                    errors += 1;
                    assert!(d.resync() > 0, "resync makes progress");
                }
            }
        }
        assert!(errors >= 1);
        assert_eq!(
            got,
            vec![
                Message::Query,
                Message::Report {
                    cmd_id: 9,
                    min_order: 0
                }
            ]
        );
        assert_eq!(d.pending_bytes(), 0);
    }

    /// Found by the `agent_protocol` fuzz target: a reason of invalid
    /// UTF-8 decoded to a string three times the limit, which encoding
    /// then cut.
    #[test]
    fn a_reason_of_invalid_utf8_stays_within_the_limit_and_round_trips() {
        let mut frame = Vec::new();
        frame.extend_from_slice(&MAGIC.to_le_bytes());
        frame.extend_from_slice(&VERSION.to_le_bytes());
        frame.extend_from_slice(&(Kind::Failed as u16).to_le_bytes());
        frame.extend_from_slice(&((4 + MAX_REASON_BYTES) as u32).to_le_bytes());
        frame.extend_from_slice(&7u32.to_le_bytes());
        frame.extend(std::iter::repeat_n(0xff, MAX_REASON_BYTES));
        let mut d = Decoder::default();
        d.push(&frame);
        let m = d.next_message().unwrap().unwrap();
        let Message::Failed { cmd_id: 7, reason } = &m else {
            panic!("{m:?}");
        };
        assert!(reason.len() <= MAX_REASON_BYTES, "{} bytes", reason.len());
        let mut again = Vec::new();
        m.encode(&mut again);
        let mut d = Decoder::default();
        d.push(&again);
        assert_eq!(d.next_message(), Some(Ok(m)));
    }

    #[test]
    fn ranges_that_wrap_are_empty_or_too_many_are_malformed() {
        for ranges in [
            vec![PfnRange {
                first_pfn: u64::MAX,
                pages: 2,
            }],
            vec![PfnRange {
                first_pfn: 5,
                pages: 0,
            }],
        ] {
            let mut b = Vec::new();
            Message::Ranges { cmd_id: 1, ranges }.encode(&mut b);
            let mut d = Decoder::default();
            d.push(&b);
            assert!(d.next_message().unwrap().is_err());
        }
        let mut b = Vec::new();
        Message::Ranges {
            cmd_id: 1,
            ranges: vec![
                PfnRange {
                    first_pfn: 0,
                    pages: 1
                };
                MAX_RANGES_PER_BATCH + 1
            ],
        }
        .encode(&mut b);
        let mut d = Decoder::default();
        d.push(&b);
        match d.next_message().unwrap().unwrap() {
            Message::Ranges { ranges, .. } => assert_eq!(ranges.len(), MAX_RANGES_PER_BATCH),
            other => panic!("{other:?}"),
        }
    }

    proptest! {
        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let mut d = Decoder::default();
            d.push(&bytes);
            while let Some(Ok(_)) = d.next_message() {}
        }

        #[test]
        fn payload_decoders_never_panic(kind in 1u16..9, payload in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Message::decode(Kind::from_u16(kind).unwrap(), &payload);
        }
    }
}
