//! The freehint migration wire protocol.
//!
//! Every frame starts with a 16-byte [`FrameHeader`]: magic, protocol
//! version, message kind, payload length. Payloads are little endian and
//! padded so that page data starts 8-byte aligned within the frame, and
//! headers stay 16-byte aligned on the stream (seed 000's wish).
//!
//! A migration uses several TCP connections, each opened with [`Hello`]
//! naming its [`ChannelRole`]:
//!
//! * one **control** channel: hello, device state, completion, the
//!   handover (`Ready` → `Commit` → `Resumed`, see [`Message`]), errors;
//! * one or more **bulk** channels: [`PageBatchHead`]s with page data,
//!   [`ZeroRun`]s and [`Message::RoundEnd`] barriers;
//! * an **urgent** channel reserved for postcopy page requests
//!   ([`Message::PageRequest`]) so that they never queue behind bulk data.
//!
//! Page data is not part of [`Message`]: a page batch's head says which
//! pages follow, and the receiver reads their bytes straight into guest
//! memory. Everything else is decoded here, with every length checked
//! against the frame before it is trusted.

#![deny(missing_docs)]

/// `"FHNT"`.
pub const MAGIC: u32 = 0x544e_4846;
/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 2;
/// Size of [`FrameHeader`] on the wire.
pub const HEADER_BYTES: usize = 16;
/// Largest payload accepted for any frame but a page batch.
pub const MAX_CONTROL_PAYLOAD_BYTES: u32 = 16 << 20;
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
/// Flag in a page batch entry: the page is all zero and no data follows.
pub const ENTRY_ZERO: u64 = 1 << 63;

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
}

impl Kind {
    fn from_u16(v: u16) -> Result<Kind, WireError> {
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

/// What a connection is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelRole {
    /// Control: hello, device state, completion.
    Control,
    /// Bulk page data, with its index among the bulk channels.
    Bulk(u8),
    /// Postcopy page requests and their answers.
    Urgent,
}

/// One region of guest RAM as both sides must agree on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionDesc {
    /// Guest-physical start.
    pub gpa_start: u64,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Page unit in bytes.
    pub page_bytes: u64,
}

/// Opens every connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Identifies one migration; all its connections carry the same id.
    pub session_id: u64,
    /// What this connection is for.
    pub role: ChannelRole,
    /// Number of bulk channels the sender opens.
    pub bulk_channels: u8,
    /// How long either side waits for the other at any step, in seconds:
    /// the source's parameter, which the destination adopts, so both sides
    /// give up after the same time.
    pub peer_timeout_s: u32,
    /// The guest RAM layout.
    pub regions: Vec<RegionDesc>,
}

/// The head of a page batch: which pages of which region follow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageBatchHead {
    /// Region index.
    pub region: u32,
    /// Page indices; an entry with [`ENTRY_ZERO`] set is a zero page with no
    /// data. Data for the other pages follows in entry order.
    pub entries: Vec<u64>,
}

impl PageBatchHead {
    /// Bytes of the head on the wire (before page data).
    pub fn head_bytes(&self) -> u64 {
        8 + 8 * self.entries.len() as u64
    }

    /// Number of pages whose data follows.
    pub fn data_pages(&self) -> u64 {
        self.entries.iter().filter(|e| *e & ENTRY_ZERO == 0).count() as u64
    }

    /// Encodes the frame header and batch head for pages of `page_bytes`.
    pub fn encode(&self, page_bytes: u64, out: &mut Vec<u8>) {
        let payload = self.head_bytes() + self.data_pages() * page_bytes;
        out.extend_from_slice(
            &FrameHeader {
                kind: Kind::PageBatch,
                payload_bytes: payload,
            }
            .encode(),
        );
        out.extend_from_slice(&self.region.to_le_bytes());
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for e in &self.entries {
            out.extend_from_slice(&e.to_le_bytes());
        }
    }

    /// Decodes the 8-byte start of a batch payload: (region, entry count).
    pub fn decode_counts(b: &[u8; 8], payload_bytes: u64) -> Result<(u32, u32), WireError> {
        let region = u32::from_le_bytes(b[0..4].try_into().expect("4 bytes"));
        let count = u32::from_le_bytes(b[4..8].try_into().expect("4 bytes"));
        if count == 0 || count > MAX_BATCH_PAGES {
            return Err(malformed(
                "page batch",
                format!("{count} entries (1..={MAX_BATCH_PAGES} allowed)"),
            ));
        }
        if 8 + 8 * count as u64 > payload_bytes {
            return Err(malformed(
                "page batch",
                format!("{count} entries do not fit in {payload_bytes} bytes"),
            ));
        }
        Ok((region, count))
    }

    /// Decodes the entries and checks that the payload length matches them
    /// exactly for pages of `page_bytes`, and every page is below `pages`.
    pub fn decode_entries(
        region: u32,
        raw: &[u8],
        payload_bytes: u64,
        page_bytes: u64,
        pages: u64,
    ) -> Result<PageBatchHead, WireError> {
        let entries: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let head = PageBatchHead { region, entries };
        let want = head.head_bytes() + head.data_pages() * page_bytes;
        if want != payload_bytes {
            return Err(malformed(
                "page batch",
                format!("payload is {payload_bytes} bytes, its entries need {want}"),
            ));
        }
        for e in &head.entries {
            let page = e & !ENTRY_ZERO;
            if page >= pages {
                return Err(malformed(
                    "page batch",
                    format!("page {page} is beyond region {region} ({pages} pages)"),
                ));
            }
        }
        Ok(head)
    }
}

/// A run of zero (or never-populated, or discarded) pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ZeroRun {
    /// Region index.
    pub region: u32,
    /// First page.
    pub first_page: u64,
    /// Number of pages.
    pub count: u64,
}

/// Every message except page data.
///
/// The handover on the control channel, after the last round:
///
/// ```text
///  source                               destination
///  Stopping (the VM is about to stop) ->
///  DeviceStateChunk* , Complete -------> all pages placed, device state loaded
///                          <------------ Ready (paused, waiting for the decision)
///  Commit (the source will never
///          resume on its own) ---------> resume the VM
///                          <------------ Resumed
/// ```
///
/// Before the source sends `Commit`, either side may give up (`Error`):
/// the source resumes its VM, the destination never resumes its copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Opens a connection.
    Hello(Hello),
    /// The receiver accepts the connection.
    HelloAck,
    /// Zero pages, sent without data.
    Zero(ZeroRun),
    /// All pages of round `round` on this bulk channel have been sent.
    RoundEnd {
        /// The round.
        round: u32,
    },
    /// The source is about to stop its VM for the final round: from here
    /// on, a source that disappears may leave its guest paused.
    Stopping,
    /// A piece of the VMM's opaque device state (at most
    /// [`MAX_CONTROL_PAYLOAD_BYTES`]); the pieces in order are the state.
    DeviceStateChunk(Vec<u8>),
    /// The source has sent everything; `rounds` rounds, the last one with
    /// the VM stopped.
    Complete {
        /// Number of rounds sent.
        rounds: u32,
        /// Total bytes of the device state chunks sent before.
        device_state_bytes: u64,
        /// The last free-page-hint cmd_id the source used: the VM's counter
        /// goes on from there on the destination (Linux ignores a cmd_id
        /// equal to the last one it saw).
        last_cmd_id: u32,
    },
    /// The destination has placed every page and loaded the device state;
    /// its VM is paused and waits for [`Message::Commit`].
    Ready,
    /// The source has decided: the destination runs the guest. The source
    /// never resumes its copy on its own after sending this.
    Commit,
    /// The destination has resumed the VM (or, if it was told to leave
    /// it paused, has taken it over).
    Resumed,
    /// The peer gives up, with a reason.
    Error(String),
    /// Postcopy: the destination needs this page now (reserved: a precopy
    /// source answers it with an error).
    PageRequest {
        /// Region index.
        region: u32,
        /// Page index.
        page: u64,
    },
}

fn malformed(what: &'static str, detail: String) -> WireError {
    WireError::Malformed { what, detail }
}

struct Reader<'a> {
    b: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.b.len() < n {
            return Err(malformed(
                self.what,
                format!("truncated: needs {n} more bytes, has {}", self.b.len()),
            ));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn finish(self) -> Result<(), WireError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(malformed(
                self.what,
                format!("{} trailing bytes", self.b.len()),
            ))
        }
    }
}

impl Message {
    /// The kind of this message.
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello(_) => Kind::Hello,
            Message::HelloAck => Kind::HelloAck,
            Message::Zero(_) => Kind::ZeroRun,
            Message::RoundEnd { .. } => Kind::RoundEnd,
            Message::Stopping => Kind::Stopping,
            Message::DeviceStateChunk(_) => Kind::DeviceStateChunk,
            Message::Complete { .. } => Kind::Complete,
            Message::Ready => Kind::Ready,
            Message::Commit => Kind::Commit,
            Message::Resumed => Kind::Resumed,
            Message::Error(_) => Kind::Error,
            Message::PageRequest { .. } => Kind::PageRequest,
        }
    }

    /// Encodes header and payload, appending to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut p = Vec::new();
        match self {
            Message::Hello(h) => {
                p.extend_from_slice(&h.session_id.to_le_bytes());
                let (role, idx) = match h.role {
                    ChannelRole::Control => (0u8, 0u8),
                    ChannelRole::Bulk(i) => (1, i),
                    ChannelRole::Urgent => (2, 0),
                };
                p.extend_from_slice(&[role, idx, h.bulk_channels, 0]);
                p.extend_from_slice(&h.peer_timeout_s.to_le_bytes());
                p.extend_from_slice(&(h.regions.len() as u32).to_le_bytes());
                p.extend_from_slice(&0u32.to_le_bytes());
                for r in &h.regions {
                    p.extend_from_slice(&r.gpa_start.to_le_bytes());
                    p.extend_from_slice(&r.size_bytes.to_le_bytes());
                    p.extend_from_slice(&r.page_bytes.to_le_bytes());
                }
            }
            Message::HelloAck
            | Message::Resumed
            | Message::Ready
            | Message::Commit
            | Message::Stopping => {}
            Message::Zero(z) => {
                p.extend_from_slice(&z.region.to_le_bytes());
                p.extend_from_slice(&0u32.to_le_bytes());
                p.extend_from_slice(&z.first_page.to_le_bytes());
                p.extend_from_slice(&z.count.to_le_bytes());
            }
            Message::RoundEnd { round } => {
                p.extend_from_slice(&round.to_le_bytes());
                p.extend_from_slice(&0u32.to_le_bytes());
            }
            Message::Complete {
                rounds,
                device_state_bytes,
                last_cmd_id,
            } => {
                p.extend_from_slice(&rounds.to_le_bytes());
                p.extend_from_slice(&last_cmd_id.to_le_bytes());
                p.extend_from_slice(&device_state_bytes.to_le_bytes());
            }
            Message::DeviceStateChunk(b) => p.extend_from_slice(b),
            Message::Error(s) => p.extend_from_slice(s.as_bytes()),
            Message::PageRequest { region, page } => {
                p.extend_from_slice(&region.to_le_bytes());
                p.extend_from_slice(&0u32.to_le_bytes());
                p.extend_from_slice(&page.to_le_bytes());
            }
        }
        out.extend_from_slice(
            &FrameHeader {
                kind: self.kind(),
                payload_bytes: p.len() as u64,
            }
            .encode(),
        );
        out.extend_from_slice(&p);
    }

    /// Decodes the payload of a frame of `kind` (anything but a page batch).
    pub fn decode(kind: Kind, payload: &[u8]) -> Result<Message, WireError> {
        let what = match kind {
            Kind::Hello => "hello",
            Kind::HelloAck => "hello ack",
            Kind::PageBatch => {
                return Err(malformed(
                    "page batch",
                    "page batches are decoded with PageBatchHead".into(),
                ))
            }
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
        };
        let mut r = Reader { b: payload, what };
        let msg = match kind {
            Kind::Hello => {
                let session_id = r.u64()?;
                let role = r.u8()?;
                let idx = r.u8()?;
                let bulk_channels = r.u8()?;
                let _pad = r.u8()?;
                let peer_timeout_s = r.u32()?;
                if !PEER_TIMEOUT_S_RANGE.contains(&peer_timeout_s) {
                    return Err(malformed(
                        what,
                        format!(
                            "peer timeout of {peer_timeout_s} s (allowed: {}..={})",
                            PEER_TIMEOUT_S_RANGE.start(),
                            PEER_TIMEOUT_S_RANGE.end()
                        ),
                    ));
                }
                let role = match role {
                    0 => ChannelRole::Control,
                    1 => ChannelRole::Bulk(idx),
                    2 => ChannelRole::Urgent,
                    other => return Err(malformed(what, format!("unknown channel role {other}"))),
                };
                let n = r.u32()?;
                let _pad = r.u32()?;
                if n == 0 || n > 256 {
                    return Err(malformed(what, format!("{n} regions (1..=256 allowed)")));
                }
                let mut regions = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    let d = RegionDesc {
                        gpa_start: r.u64()?,
                        size_bytes: r.u64()?,
                        page_bytes: r.u64()?,
                    };
                    if !d.page_bytes.is_power_of_two()
                        || d.page_bytes < 4096
                        || d.size_bytes == 0
                        || !d.size_bytes.is_multiple_of(d.page_bytes)
                    {
                        return Err(malformed(what, format!("bad region {d:?}")));
                    }
                    regions.push(d);
                }
                Message::Hello(Hello {
                    session_id,
                    role,
                    bulk_channels,
                    peer_timeout_s,
                    regions,
                })
            }
            Kind::HelloAck => Message::HelloAck,
            Kind::Resumed => Message::Resumed,
            Kind::Ready => Message::Ready,
            Kind::Commit => Message::Commit,
            Kind::Stopping => Message::Stopping,
            Kind::ZeroRun => {
                let region = r.u32()?;
                let _pad = r.u32()?;
                Message::Zero(ZeroRun {
                    region,
                    first_page: r.u64()?,
                    count: r.u64()?,
                })
            }
            Kind::RoundEnd => {
                let round = r.u32()?;
                let _pad = r.u32()?;
                Message::RoundEnd { round }
            }
            Kind::Complete => {
                let rounds = r.u32()?;
                let last_cmd_id = r.u32()?;
                let device_state_bytes = r.u64()?;
                if device_state_bytes > MAX_DEVICE_STATE_BYTES {
                    return Err(malformed(
                        what,
                        format!(
                            "{device_state_bytes} bytes of device state (at most {MAX_DEVICE_STATE_BYTES})"
                        ),
                    ));
                }
                Message::Complete {
                    rounds,
                    device_state_bytes,
                    last_cmd_id,
                }
            }
            Kind::DeviceStateChunk => Message::DeviceStateChunk(r.take(payload.len())?.to_vec()),
            Kind::Error => {
                Message::Error(String::from_utf8_lossy(r.take(payload.len())?).into_owned())
            }
            Kind::PageRequest => {
                let region = r.u32()?;
                let _pad = r.u32()?;
                Message::PageRequest {
                    region,
                    page: r.u64()?,
                }
            }
            Kind::PageBatch => unreachable!("handled above"),
        };
        r.finish()?;
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(m: Message) {
        let mut b = Vec::new();
        m.encode(&mut b);
        assert_eq!(b.len() % 8, 0, "{m:?} keeps 8-byte alignment");
        let h = FrameHeader::decode(b[..16].try_into().unwrap()).unwrap();
        assert_eq!(h.payload_bytes as usize, b.len() - 16);
        assert_eq!(Message::decode(h.kind, &b[16..]).unwrap(), m);
    }

    #[test]
    fn every_message_roundtrips() {
        roundtrip(Message::Hello(Hello {
            session_id: 7,
            role: ChannelRole::Bulk(3),
            bulk_channels: 4,
            peer_timeout_s: 30,
            regions: vec![RegionDesc {
                gpa_start: 0,
                size_bytes: 1 << 30,
                page_bytes: 4096,
            }],
        }));
        roundtrip(Message::HelloAck);
        roundtrip(Message::Zero(ZeroRun {
            region: 1,
            first_page: 5,
            count: 9,
        }));
        roundtrip(Message::RoundEnd { round: 3 });
        roundtrip(Message::DeviceStateChunk(vec![1, 2, 3, 4, 5, 6, 7, 8]));
        roundtrip(Message::Complete {
            rounds: 9,
            device_state_bytes: 20 << 20,
            last_cmd_id: 17,
        });
        roundtrip(Message::Stopping);
        roundtrip(Message::Ready);
        roundtrip(Message::Commit);
        roundtrip(Message::Resumed);
        roundtrip(Message::PageRequest {
            region: 0,
            page: 77,
        });
    }

    #[test]
    fn bad_headers_are_rejected_with_clear_errors() {
        let mut h = FrameHeader {
            kind: Kind::HelloAck,
            payload_bytes: 0,
        }
        .encode();
        h[0] = b'X';
        assert!(matches!(
            FrameHeader::decode(&h),
            Err(WireError::BadMagic(_))
        ));
        let mut h = FrameHeader {
            kind: Kind::HelloAck,
            payload_bytes: 0,
        }
        .encode();
        h[4] = 9;
        let e = FrameHeader::decode(&h).unwrap_err();
        assert_eq!(e, WireError::UnsupportedVersion { got: 9 });
        assert!(e.to_string().contains("protocol version 9"));
        let mut h = FrameHeader {
            kind: Kind::HelloAck,
            payload_bytes: 0,
        }
        .encode();
        h[6] = 99;
        assert_eq!(FrameHeader::decode(&h), Err(WireError::UnknownKind(99)));
        let h = FrameHeader {
            kind: Kind::DeviceStateChunk,
            payload_bytes: 1 << 40,
        }
        .encode();
        assert!(matches!(
            FrameHeader::decode(&h),
            Err(WireError::TooLarge { .. })
        ));
    }

    #[test]
    fn truncated_and_oversized_payloads_are_rejected() {
        let mut b = Vec::new();
        Message::Zero(ZeroRun {
            region: 0,
            first_page: 1,
            count: 2,
        })
        .encode(&mut b);
        assert!(Message::decode(Kind::ZeroRun, &b[16..b.len() - 1]).is_err());
        let mut long = b[16..].to_vec();
        long.push(0);
        assert!(Message::decode(Kind::ZeroRun, &long).is_err());
    }

    #[test]
    fn hello_timeouts_and_device_state_sizes_are_bounded() {
        let hello = |peer_timeout_s| {
            let mut b = Vec::new();
            Message::Hello(Hello {
                session_id: 1,
                role: ChannelRole::Control,
                bulk_channels: 1,
                peer_timeout_s,
                regions: vec![RegionDesc {
                    gpa_start: 0,
                    size_bytes: 1 << 20,
                    page_bytes: 4096,
                }],
            })
            .encode(&mut b);
            Message::decode(Kind::Hello, &b[16..])
        };
        assert!(hello(30).is_ok());
        let e = hello(0).unwrap_err();
        assert!(e.to_string().contains("peer timeout of 0 s"), "{e}");
        assert!(hello(100_000).is_err());
        let mut b = Vec::new();
        Message::Complete {
            rounds: 1,
            device_state_bytes: MAX_DEVICE_STATE_BYTES + 1,
            last_cmd_id: 2,
        }
        .encode(&mut b);
        let e = Message::decode(Kind::Complete, &b[16..]).unwrap_err();
        assert!(e.to_string().contains("device state"), "{e}");
    }

    #[test]
    fn batch_entries_are_checked_against_length_and_region() {
        let head = PageBatchHead {
            region: 0,
            entries: vec![1, 5 | ENTRY_ZERO, 9],
        };
        let mut b = Vec::new();
        head.encode(4096, &mut b);
        let payload = 8 + 24 + 2 * 4096;
        let (region, count) =
            PageBatchHead::decode_counts(b[16..24].try_into().unwrap(), payload).unwrap();
        assert_eq!((region, count), (0, 3));
        let raw = &b[24..24 + 24];
        assert_eq!(
            PageBatchHead::decode_entries(0, raw, payload, 4096, 10).unwrap(),
            head
        );
        // A page beyond RAM.
        assert!(PageBatchHead::decode_entries(0, raw, payload, 4096, 9).is_err());
        // A length that does not match the entries.
        assert!(PageBatchHead::decode_entries(0, raw, payload - 1, 4096, 10).is_err());
        assert!(PageBatchHead::decode_counts(&[0, 0, 0, 0, 0, 0, 0, 0], 100).is_err());
    }

    proptest! {
        /// No byte sequence makes the decoders panic.
        #[test]
        fn decoders_never_panic(kind in 1u16..16, payload in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(k) = Kind::from_u16(kind) {
                let _ = Message::decode(k, &payload);
            }
            if payload.len() >= 16 {
                let _ = FrameHeader::decode(payload[..16].try_into().unwrap());
            }
        }
    }
}
