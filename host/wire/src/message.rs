//! Every message but page data, each owning its encoding.

use crate::{
    malformed, DeviceStateEncoding, FrameHeader, Kind, PageRun, WireError, MAX_DEVICE_STATE_BYTES,
    PEER_TIMEOUT_S_RANGE,
};

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
    /// RAM address of the region's start (the RAM address space, not
    /// guest-physical: for QEMU, the offset in the RAM file).
    pub ram_start: u64,
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
    /// The source may switch to postcopy: it opens an urgent channel after
    /// the bulk ones, and the destination must be able to run the guest
    /// before all its RAM has arrived.
    pub postcopy: bool,
    /// Postcopy or nothing (the operator's `--mode postcopy`): a
    /// destination that cannot serve postcopy refuses the migration. Without
    /// it (hybrid), such a destination answers [`Message::HelloAck`] with
    /// `postcopy: false` and the migration stays precopy.
    pub postcopy_required: bool,
    /// Reconnects a postcopy whose link broke (same `session_id`): on the
    /// control channel the destination answers with the pages it still
    /// lacks (`PostcopyPending`…, `PostcopySwitch`), and the source streams
    /// those.
    pub resume: bool,
}

/// What the destination reports when postcopy has placed the last page.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PostcopyReport {
    /// Pages placed during postcopy (requested or streamed).
    pub pages_placed: u64,
    /// Faults answered by the source (page requests).
    pub faults_remote: u64,
    /// Faults resolved on the destination (pages free or zero at the
    /// switch), with no round trip.
    pub faults_local: u64,
    /// Median time from a remote fault to its wake-up, µs.
    pub fault_latency_us_p50: u64,
    /// 99th percentile of the same, µs.
    pub fault_latency_us_p99: u64,
    /// Longest of the same, µs.
    pub fault_latency_us_max: u64,
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
    HelloAck {
        /// The migration may switch to postcopy: the source asked and the
        /// destination can serve it.
        postcopy: bool,
    },
    /// Zero pages (zero content, never populated, or discarded by free
    /// page reporting), sent without data.
    Zero(PageRun),
    /// Pages every byte of which is `byte` (free pages of a guest that
    /// poisons the pages it frees), sent without data.
    Fill {
        /// The pages.
        run: PageRun,
        /// Their content, every byte.
        byte: u8,
    },
    /// All pages of round `round` on this bulk channel have been sent.
    RoundEnd {
        /// The round.
        round: u32,
    },
    /// The source is about to stop its VM for the final round: from here
    /// on, a source that disappears may leave its guest paused.
    Stopping,
    /// A piece of the VMM's opaque device state (at most
    /// [`MAX_CONTROL_PAYLOAD_BYTES`](crate::MAX_CONTROL_PAYLOAD_BYTES)); the pieces in order are the state.
    DeviceStateChunk(Vec<u8>),
    /// The source has sent everything; `rounds` rounds, the last one with
    /// the VM stopped.
    Complete {
        /// Number of rounds sent.
        rounds: u32,
        /// Bytes of the device state, decoded.
        device_state_bytes: u64,
        /// How the device state chunks sent before encode it.
        device_state_encoding: DeviceStateEncoding,
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
    /// Postcopy (urgent channel): the destination needs this page now.
    /// Pages are in the region's page unit: on hugetlbfs a whole huge page.
    PageRequest {
        /// Region index.
        region: u32,
        /// Page index.
        page: u64,
    },
    /// Postcopy, before the device state: pages that are still to come
    /// (at most [`MAX_RUNS_PER_MESSAGE`] runs a message). The destination
    /// discards any older copy of them; any page it lacks that is not
    /// listed will never come (free or zero at the switch).
    PostcopyPending(Vec<PageRun>),
    /// Postcopy: the list of pending pages is over; the guest will run on
    /// the destination before they have all arrived.
    PostcopySwitch {
        /// Pages in the list.
        pending_pages: u64,
    },
    /// Postcopy is over. From the source: every pending page has been sent
    /// (`pages_sent`). From the destination, in answer: every pending page
    /// is placed, with its figures.
    PostcopyComplete(PostcopyReport),
    /// Postcopy (a bulk channel, destination to source): how far the
    /// destination has placed what this channel carried, so that the
    /// source keeps no more than `budget_bytes` on their way to it (a
    /// fault on a page already on its way waits for everything ahead of
    /// it: see the engine's `postcopy::queue`).
    PostcopyPlaced {
        /// Guest bytes (pages × page size, zero pages included) of this
        /// channel's batches placed since the postcopy session began.
        placed_bytes: u64,
        /// Bytes the channel may have on their way beyond `placed_bytes`.
        budget_bytes: u64,
    },
}

/// Most page runs in one [`Message::PostcopyPending`] (24 bytes each).
pub const MAX_RUNS_PER_MESSAGE: usize = 1 << 16;

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
            Message::HelloAck { .. } => Kind::HelloAck,
            Message::Zero(_) => Kind::ZeroRun,
            Message::Fill { .. } => Kind::FillRun,
            Message::RoundEnd { .. } => Kind::RoundEnd,
            Message::Stopping => Kind::Stopping,
            Message::DeviceStateChunk(_) => Kind::DeviceStateChunk,
            Message::Complete { .. } => Kind::Complete,
            Message::Ready => Kind::Ready,
            Message::Commit => Kind::Commit,
            Message::Resumed => Kind::Resumed,
            Message::Error(_) => Kind::Error,
            Message::PageRequest { .. } => Kind::PageRequest,
            Message::PostcopyPending(_) => Kind::PostcopyPending,
            Message::PostcopySwitch { .. } => Kind::PostcopySwitch,
            Message::PostcopyComplete(_) => Kind::PostcopyComplete,
            Message::PostcopyPlaced { .. } => Kind::PostcopyPlaced,
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
                let flags =
                    h.postcopy as u8 | (h.postcopy_required as u8) << 1 | (h.resume as u8) << 2;
                p.extend_from_slice(&[role, idx, h.bulk_channels, flags]);
                p.extend_from_slice(&h.peer_timeout_s.to_le_bytes());
                p.extend_from_slice(&(h.regions.len() as u32).to_le_bytes());
                p.extend_from_slice(&0u32.to_le_bytes());
                for r in &h.regions {
                    p.extend_from_slice(&r.ram_start.to_le_bytes());
                    p.extend_from_slice(&r.size_bytes.to_le_bytes());
                    p.extend_from_slice(&r.page_bytes.to_le_bytes());
                }
            }
            Message::HelloAck { postcopy } => {
                // A flags byte, then 7 reserved bytes (8-byte alignment).
                p.extend_from_slice(&[*postcopy as u8, 0, 0, 0, 0, 0, 0, 0]);
            }
            Message::Resumed | Message::Ready | Message::Commit | Message::Stopping => {}
            Message::Zero(z) => {
                p.extend_from_slice(&region_u32(z.region).to_le_bytes());
                p.extend_from_slice(&0u32.to_le_bytes());
                p.extend_from_slice(&z.first_page.to_le_bytes());
                p.extend_from_slice(&z.count.to_le_bytes());
            }
            Message::Fill { run, byte } => {
                p.extend_from_slice(&region_u32(run.region).to_le_bytes());
                p.extend_from_slice(&[*byte, 0, 0, 0]);
                p.extend_from_slice(&run.first_page.to_le_bytes());
                p.extend_from_slice(&run.count.to_le_bytes());
            }
            Message::RoundEnd { round } => {
                p.extend_from_slice(&round.to_le_bytes());
                p.extend_from_slice(&0u32.to_le_bytes());
            }
            Message::Complete {
                rounds,
                device_state_bytes,
                device_state_encoding,
                last_cmd_id,
            } => {
                p.extend_from_slice(&rounds.to_le_bytes());
                p.extend_from_slice(&last_cmd_id.to_le_bytes());
                p.extend_from_slice(&device_state_bytes.to_le_bytes());
                p.extend_from_slice(&device_state_encoding.to_u32().to_le_bytes());
                p.extend_from_slice(&0u32.to_le_bytes());
            }
            Message::DeviceStateChunk(b) => p.extend_from_slice(b),
            Message::Error(s) => p.extend_from_slice(s.as_bytes()),
            Message::PageRequest { region, page } => {
                p.extend_from_slice(&region.to_le_bytes());
                p.extend_from_slice(&0u32.to_le_bytes());
                p.extend_from_slice(&page.to_le_bytes());
            }
            Message::PostcopyPending(runs) => {
                p.extend_from_slice(&(runs.len() as u32).to_le_bytes());
                p.extend_from_slice(&0u32.to_le_bytes());
                for run in runs {
                    p.extend_from_slice(&region_u32(run.region).to_le_bytes());
                    p.extend_from_slice(&0u32.to_le_bytes());
                    p.extend_from_slice(&run.first_page.to_le_bytes());
                    p.extend_from_slice(&run.count.to_le_bytes());
                }
            }
            Message::PostcopySwitch { pending_pages } => {
                p.extend_from_slice(&pending_pages.to_le_bytes());
            }
            Message::PostcopyPlaced {
                placed_bytes,
                budget_bytes,
            } => {
                p.extend_from_slice(&placed_bytes.to_le_bytes());
                p.extend_from_slice(&budget_bytes.to_le_bytes());
            }
            Message::PostcopyComplete(r) => {
                for v in [
                    r.pages_placed,
                    r.faults_remote,
                    r.faults_local,
                    r.fault_latency_us_p50,
                    r.fault_latency_us_p99,
                    r.fault_latency_us_max,
                ] {
                    p.extend_from_slice(&v.to_le_bytes());
                }
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

    /// Decodes the payload of a frame of `kind`; a page batch is not a
    /// message (see [`crate::Frame::decode`]).
    pub fn decode(kind: Kind, payload: &[u8]) -> Result<Message, WireError> {
        let what = kind.name();
        let mut r = Reader { b: payload, what };
        let msg = match kind {
            Kind::PageBatch => {
                return Err(malformed(what, "a page batch is not a message".into()));
            }
            Kind::Hello => {
                let session_id = r.u64()?;
                let role = r.u8()?;
                let idx = r.u8()?;
                let bulk_channels = r.u8()?;
                let flags = r.u8()?;
                // Bit 0: postcopy; bit 1: postcopy required and bit 2:
                // resuming a postcopy (each only with bit 0).
                if flags > 7 || (flags > 1 && flags & 1 == 0) {
                    return Err(malformed(what, format!("unknown flags {flags:#x}")));
                }
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
                        ram_start: r.u64()?,
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
                    postcopy: flags & 1 != 0,
                    postcopy_required: flags & 2 != 0,
                    resume: flags & 4 != 0,
                })
            }
            Kind::HelloAck => {
                let postcopy = match r.u8()? {
                    0 => false,
                    1 => true,
                    f => return Err(malformed(what, format!("unknown flags {f:#x}"))),
                };
                r.take(7)?;
                Message::HelloAck { postcopy }
            }
            Kind::Resumed => Message::Resumed,
            Kind::Ready => Message::Ready,
            Kind::Commit => Message::Commit,
            Kind::Stopping => Message::Stopping,
            Kind::ZeroRun => {
                let region = r.u32()? as usize;
                let _pad = r.u32()?;
                let run = PageRun::new(region, r.u64()?, r.u64()?);
                if run.count == 0 || run.end_page().is_none() {
                    return Err(malformed(what, format!("empty or wrapping run {run}")));
                }
                Message::Zero(run)
            }
            Kind::FillRun => {
                let region = r.u32()? as usize;
                let byte = r.u8()?;
                let _pad = (r.u8()?, r.u8()?, r.u8()?);
                let run = PageRun::new(region, r.u64()?, r.u64()?);
                if run.count == 0 || run.end_page().is_none() {
                    return Err(malformed(what, format!("empty or wrapping run {run}")));
                }
                Message::Fill { run, byte }
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
                let device_state_encoding = DeviceStateEncoding::from_u32(r.u32()?)?;
                let _pad = r.u32()?;
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
                    device_state_encoding,
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
            Kind::PostcopyPending => {
                let n = r.u32()? as usize;
                let _pad = r.u32()?;
                if n > MAX_RUNS_PER_MESSAGE {
                    return Err(malformed(
                        what,
                        format!("{n} runs (at most {MAX_RUNS_PER_MESSAGE})"),
                    ));
                }
                if r.b.len() != n * 24 {
                    return Err(malformed(what, format!("{n} runs in {} bytes", r.b.len())));
                }
                let mut runs = Vec::with_capacity(n);
                for _ in 0..n {
                    let region = r.u32()? as usize;
                    let _pad = r.u32()?;
                    let run = PageRun::new(region, r.u64()?, r.u64()?);
                    if run.count == 0 || run.end_page().is_none() {
                        return Err(malformed(what, format!("empty or wrapping run {run}")));
                    }
                    runs.push(run);
                }
                Message::PostcopyPending(runs)
            }
            Kind::PostcopySwitch => Message::PostcopySwitch {
                pending_pages: r.u64()?,
            },
            Kind::PostcopyPlaced => Message::PostcopyPlaced {
                placed_bytes: r.u64()?,
                budget_bytes: r.u64()?,
            },
            Kind::PostcopyComplete => Message::PostcopyComplete(PostcopyReport {
                pages_placed: r.u64()?,
                faults_remote: r.u64()?,
                faults_local: r.u64()?,
                fault_latency_us_p50: r.u64()?,
                fault_latency_us_p99: r.u64()?,
                fault_latency_us_max: r.u64()?,
            }),
        };
        r.finish()?;
        Ok(msg)
    }
}

/// A region index as the wire carries it. Regions are at most 256 (a
/// [`Hello`] with more is refused), so the index always fits.
pub(crate) fn region_u32(region: usize) -> u32 {
    u32::try_from(region).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Frame;
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
                ram_start: 0,
                size_bytes: 1 << 30,
                page_bytes: 4096,
            }],
            postcopy: true,
            postcopy_required: true,
            resume: true,
        }));
        roundtrip(Message::HelloAck { postcopy: true });
        roundtrip(Message::HelloAck { postcopy: false });
        roundtrip(Message::Zero(PageRun::new(1, 5, 9)));
        roundtrip(Message::RoundEnd { round: 3 });
        roundtrip(Message::DeviceStateChunk(vec![1, 2, 3, 4, 5, 6, 7, 8]));
        roundtrip(Message::Complete {
            rounds: 9,
            device_state_bytes: 20 << 20,
            device_state_encoding: DeviceStateEncoding::Raw,
            last_cmd_id: 17,
        });
        roundtrip(Message::Complete {
            rounds: 1,
            device_state_bytes: 5,
            device_state_encoding: DeviceStateEncoding::Zstd,
            last_cmd_id: 2,
        });
        roundtrip(Message::Stopping);
        roundtrip(Message::Ready);
        roundtrip(Message::Commit);
        roundtrip(Message::Resumed);
        roundtrip(Message::PageRequest {
            region: 0,
            page: 77,
        });
        roundtrip(Message::PostcopyPending(vec![
            PageRun::new(0, 5, 9),
            PageRun::new(1, 1 << 40, 1),
        ]));
        roundtrip(Message::PostcopyPending(Vec::new()));
        roundtrip(Message::PostcopySwitch { pending_pages: 12 });
        roundtrip(Message::Fill {
            run: PageRun::new(1, 7, 3),
            byte: 0xaa,
        });
        roundtrip(Message::PostcopyPlaced {
            placed_bytes: 1 << 40,
            budget_bytes: 600_000,
        });
        roundtrip(Message::PostcopyComplete(PostcopyReport {
            pages_placed: 1,
            faults_remote: 2,
            faults_local: 3,
            fault_latency_us_p50: 4,
            fault_latency_us_p99: 5,
            fault_latency_us_max: 6,
        }));
    }

    #[test]
    fn pending_lists_are_bounded_and_checked() {
        let mut b = Vec::new();
        Message::PostcopyPending(vec![PageRun::new(0, 1, 2)]).encode(&mut b);
        // A count that does not match the runs present.
        let mut p = b[16..].to_vec();
        p[0] = 2;
        let e = Message::decode(Kind::PostcopyPending, &p).unwrap_err();
        assert!(e.to_string().contains("2 runs in 24 bytes"), "{e}");
        // Too many runs for one message.
        let mut p = b[16..].to_vec();
        p[..4].copy_from_slice(&((MAX_RUNS_PER_MESSAGE as u32) + 1).to_le_bytes());
        let e = Message::decode(Kind::PostcopyPending, &p).unwrap_err();
        assert!(e.to_string().contains("at most"), "{e}");
        // An empty run.
        let mut b = Vec::new();
        Message::PostcopyPending(vec![PageRun::new(0, 1, 0)]).encode(&mut b);
        assert!(Message::decode(Kind::PostcopyPending, &b[16..]).is_err());
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
        Message::Zero(PageRun::new(0, 1, 2)).encode(&mut b);
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
                    ram_start: 0,
                    size_bytes: 1 << 20,
                    page_bytes: 4096,
                }],
                postcopy: false,
                postcopy_required: false,
                resume: false,
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
            device_state_encoding: DeviceStateEncoding::Raw,
            last_cmd_id: 2,
        }
        .encode(&mut b);
        let e = Message::decode(Kind::Complete, &b[16..]).unwrap_err();
        assert!(e.to_string().contains("device state"), "{e}");
    }

    proptest! {
        /// No byte sequence makes the decoders panic.
        #[test]
        fn decoders_never_panic(kind in 1u16..19, payload in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(k) = Kind::from_u16(kind) {
                let header = FrameHeader { kind: k, payload_bytes: payload.len() as u64 };
                let _ = Frame::decode(&header, &payload, |_| Some((4096, 16)));
            }
            if payload.len() >= 16 {
                let _ = FrameHeader::decode(payload[..16].try_into().unwrap());
            }
        }
    }
}
