//! How many bytes a bulk channel may hold queued during postcopy.
//!
//! A fault whose page a bulk channel has already taken waits until every
//! byte queued before that page has crossed: in the sender's socket, in
//! the network, and in the receiver's socket. With the kernel's default
//! buffers that queue reaches tens of MiB (milliseconds even on loopback),
//! so both ends bound it by time: at most the channel's measured rate
//! times twice the path's round trip plus [`QUEUE_TARGET_US`]. Twice the
//! round trip keeps the path full while the rate is measured; the target
//! is the wait a request may see beyond the round trip it pays anyway.
//!
//! The budget is held where the queue is known whole: the destination
//! knows what it has placed, the source what it has written. So on each
//! bulk channel the destination reports, after each batch it places,
//! the bytes placed so far and its budget (`Message::PostcopyPlaced`), and
//! the source takes pages only while what it has written beyond that is
//! within the budget ([`PlacedReports`]). The source also keeps its own
//! budget on what the network has not acknowledged (`SIOCOUTQ`, with the
//! rate of acknowledged bytes and the path's least round trip,
//! `tcpi_min_rtt`), which bounds the queue in its socket on a slow link.
//!
//! The destination's rate is the one it places guest bytes at *while
//! busy*: its thread's CPU time reading a batch already whole in the
//! socket and placing it (not the wait for the wire, nor for a CPU), with
//! its receive-side round trip (the least it has seen) and its own target
//! ([`PLACED_QUEUE_TARGET_US`]).
//! Measured on loopback (2 GiB, hints on): before, with the queue in the
//! destination's socket bounded only by `TCP_WINDOW_CLAMP`, 7 MiB waited
//! behind a 128 KiB clamp (the kernel does not take back a window it has
//! advertised) and faults on pages on their way took up to 20 ms;
//! bounding the socket buffer (`SO_RCVBUF`) dropped segments (a 200 ms
//! retransmission); and a rate over wall time collapses with a small
//! queue (a starved channel measures a low rate: postcopy ran 7 times
//! longer).

use std::time::Duration;

use crate::transport::Channel;
use freehint_wire::{FrameHeader, Kind, Message, HEADER_BYTES};
use tokio::io::AsyncWriteExt;

use crate::MigrateError;

/// Queue time, µs, a request may wait behind a bulk channel beyond the
/// path's round trip.
pub(crate) const QUEUE_TARGET_US: u64 = 250;
/// Queue time, µs, a request may wait behind what the destination has
/// received and not yet placed, beyond its round trip. Twice the
/// network's: each report costs the source a wake-up before it sends
/// again; measured on loopback (2 GiB, all pages pending), 250 µs halved
/// the rate of a postcopy (2.0 s instead of 1.3 s), 500 µs kept it, with
/// remote faults' p99 at 130-180 µs either way.
pub(crate) const PLACED_QUEUE_TARGET_US: u64 = 500;
/// Least budget, bytes: a channel that has just started (or stalled) may
/// still queue this much, so a fast path fills at once.
pub(crate) const MIN_QUEUE_BYTES: u64 = 128 << 10;
/// Greatest budget, bytes.
pub(crate) const MAX_QUEUE_BYTES: u64 = 32 << 20;
/// A rate is measured over at least this long.
const RATE_WINDOW: Duration = Duration::from_millis(5);

/// One channel's queue budget, from its measured rate. Time is the
/// caller's clock ([`Duration`] since any fixed start): wall time, or
/// time spent busy.
#[derive(Debug)]
pub(crate) struct QueueBudget {
    target_us: u64,
    since: Duration,
    bytes_since: u64,
    rate_bytes_per_s: u64,
}

impl QueueBudget {
    /// Starts measuring at `now`, when the channel had moved `bytes` in all.
    pub(crate) fn new(now: Duration, bytes: u64, target_us: u64) -> Self {
        Self {
            target_us,
            since: now,
            bytes_since: bytes,
            rate_bytes_per_s: 0,
        }
    }

    /// Takes the channel's running count of bytes moved, `bytes`, at
    /// `now`, and the path's round trip; returns how many bytes it may
    /// hold queued.
    pub(crate) fn limit_bytes(&mut self, now: Duration, bytes: u64, rtt_us: u32) -> u64 {
        let dt = now.saturating_sub(self.since);
        if dt >= RATE_WINDOW {
            let moved = bytes.saturating_sub(self.bytes_since) as u128;
            self.rate_bytes_per_s = (moved * 1_000_000 / dt.as_micros().max(1)) as u64;
            self.since = now;
            self.bytes_since = bytes;
        }
        let window_us = 2 * rtt_us as u128 + self.target_us as u128;
        let bytes = self.rate_bytes_per_s as u128 * window_us / 1_000_000;
        (bytes.min(MAX_QUEUE_BYTES as u128) as u64).max(MIN_QUEUE_BYTES)
    }
}

/// The source's view of one bulk channel's [`Message::PostcopyPlaced`]
/// reports.
#[derive(Debug)]
pub(crate) struct PlacedReports {
    buf: Vec<u8>,
    placed_bytes: u64,
    budget_bytes: u64,
}

/// The payload of a `PostcopyPlaced` frame.
const PLACED_PAYLOAD_BYTES: u64 = 16;

impl Default for PlacedReports {
    fn default() -> Self {
        Self {
            buf: Vec::new(),
            placed_bytes: 0,
            budget_bytes: MIN_QUEUE_BYTES,
        }
    }
}

impl PlacedReports {
    /// Whether a channel may take more pages: of the `sent_bytes` it has
    /// sent this session (in guest bytes: pages × page size, zero pages
    /// included, since placing a zero page costs about as much as placing
    /// data), what is neither placed nor still in the network (`network_bytes`,
    /// the socket's unacknowledged bytes) waits on the destination, and
    /// must be within its budget. The budget is kept within `least_bytes`
    /// (and [`MIN_QUEUE_BYTES`]; two batches: one placed while the next
    /// crosses, or a slow link idles) ..= [`MAX_QUEUE_BYTES`] whatever
    /// the peer says, so a channel always moves and never queues without
    /// bound.
    pub(crate) fn has_room(&self, sent_bytes: u64, network_bytes: u64, least_bytes: u64) -> bool {
        let least = least_bytes.clamp(MIN_QUEUE_BYTES, MAX_QUEUE_BYTES);
        let budget = self.budget_bytes.clamp(least, MAX_QUEUE_BYTES);
        sent_bytes
            .saturating_sub(network_bytes)
            .saturating_sub(self.placed_bytes)
            <= budget
    }

    /// Takes every report already received on `s`, without waiting.
    pub(crate) fn read_available(&mut self, s: &Channel, name: &str) -> Result<(), MigrateError> {
        let mut chunk = [0u8; 1024];
        loop {
            match s.try_read(&mut chunk) {
                Ok(0) => {
                    return Err(MigrateError::Disconnected(format!(
                        "{name}: the destination closed the channel during postcopy"
                    )))
                }
                Ok(n) => self.take(&chunk[..n], name)?,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(MigrateError::io(name.to_string())(e)),
            }
        }
    }

    /// Checks that `bytes` are whole reports and nothing else.
    pub(crate) fn take_all(&mut self, bytes: &[u8], name: &str) -> Result<(), MigrateError> {
        self.take(bytes, name)?;
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(MigrateError::Unexpected(format!(
                "{name}: the destination's last report of placed pages is cut short"
            )))
        }
    }

    /// Takes received bytes: whole reports are applied, a partial one
    /// waits for its end.
    fn take(&mut self, bytes: &[u8], name: &str) -> Result<(), MigrateError> {
        self.buf.extend_from_slice(bytes);
        let frame_bytes = HEADER_BYTES + PLACED_PAYLOAD_BYTES as usize;
        while self.buf.len() >= HEADER_BYTES {
            let head: &[u8; HEADER_BYTES] = self.buf[..HEADER_BYTES].try_into().expect("sized");
            let h = FrameHeader::decode(head).map_err(MigrateError::protocol(name.to_string()))?;
            if h.kind != Kind::PostcopyPlaced || h.payload_bytes != PLACED_PAYLOAD_BYTES {
                return Err(MigrateError::Unexpected(format!(
                    "{name}: the destination sent a {} frame of {} bytes on a bulk channel",
                    h.kind.name(),
                    h.payload_bytes
                )));
            }
            if self.buf.len() < frame_bytes {
                break;
            }
            let m = Message::decode(h.kind, &self.buf[HEADER_BYTES..frame_bytes])
                .map_err(MigrateError::protocol(name.to_string()))?;
            if let Message::PostcopyPlaced {
                placed_bytes,
                budget_bytes,
            } = m
            {
                if placed_bytes < self.placed_bytes {
                    return Err(MigrateError::Unexpected(format!(
                        "{name}: the destination's placed bytes went back from {} to {placed_bytes}",
                        self.placed_bytes
                    )));
                }
                self.placed_bytes = placed_bytes;
                self.budget_bytes = budget_bytes;
            }
            self.buf.drain(..frame_bytes);
        }
        Ok(())
    }
}

/// The destination's side of one bulk channel in postcopy: measures the
/// rate it places at while busy and reports what it has placed.
#[derive(Debug, Default)]
pub(crate) struct PlacedReporter {
    budget: Option<QueueBudget>,
    placed_bytes: u64,
    busy: Duration,
    /// The least receive-side round trip seen, µs (0: none yet).
    rtt_us: u32,
    out: Vec<u8>,
}

impl PlacedReporter {
    /// `bytes` more (guest bytes: pages × page size) of the channel `s`
    /// were placed, which took `busy`:
    /// tells the source, within `timeout`. A report only fails to go
    /// out on a broken link.
    pub(crate) async fn placed(
        &mut self,
        s: &mut Channel,
        bytes: u64,
        busy: Duration,
        timeout: Duration,
        name: &str,
    ) -> Result<(), MigrateError> {
        self.placed_bytes += bytes;
        self.busy += busy;
        {
            let f = s.figures();
            if f.rcv_rtt_us > 0 && (self.rtt_us == 0 || f.rcv_rtt_us < self.rtt_us) {
                self.rtt_us = f.rcv_rtt_us;
            }
        }
        let budget_bytes = self
            .budget
            .get_or_insert_with(|| QueueBudget::new(Duration::ZERO, 0, PLACED_QUEUE_TARGET_US))
            .limit_bytes(self.busy, self.placed_bytes, self.rtt_us);
        self.out.clear();
        Message::PostcopyPlaced {
            placed_bytes: self.placed_bytes,
            budget_bytes,
        }
        .encode(&mut self.out);
        let write = async {
            s.write_all(&self.out).await?;
            s.flush().await
        };
        match tokio::time::timeout(timeout, write).await {
            Ok(r) => r.map_err(MigrateError::io(format!("{name}: reporting placed pages"))),
            Err(_) => Err(MigrateError::Timeout {
                what: format!("{name}: the source to take a report of placed pages"),
                seconds: timeout.as_secs(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_budget_is_the_rate_times_twice_the_round_trip_plus_the_target() {
        let t0 = Duration::ZERO;
        let mut b = QueueBudget::new(t0, 0, QUEUE_TARGET_US);
        assert_eq!(b.limit_bytes(t0, 0, 100), MIN_QUEUE_BYTES, "no rate yet");
        // 2 GB/s over 10 ms, 50 µs round trip: 2e9 × 350 µs = 700 kB.
        assert_eq!(b.limit_bytes(t0 + 10 * MS, 20_000_000, 50), 700_000);
        assert_eq!(b.rate_bytes_per_s, 2_000_000_000);
        // Within the rate window the rate stays; a longer round trip counts.
        assert_eq!(b.limit_bytes(t0 + 11 * MS, 20_000_000, 250), 1_500_000);
        // A stalled channel keeps the least budget; a huge rate the most.
        assert_eq!(b.limit_bytes(t0 + 20 * MS, 20_000_000, 50), MIN_QUEUE_BYTES);
        assert_eq!(
            b.limit_bytes(t0 + 30 * MS, u64::MAX / 2, 50_000),
            MAX_QUEUE_BYTES
        );
    }

    #[test]
    fn a_window_limited_channel_on_a_long_path_grows_its_budget_each_step() {
        // 20 ms round trip: a channel that moves exactly its budget per
        // round trip must be allowed more next time, or it never speeds up.
        let rtt_us = 20_000u32;
        let t0 = Duration::ZERO;
        let mut b = QueueBudget::new(t0, 0, QUEUE_TARGET_US);
        let (mut t, mut moved, mut limit) = (t0, 0u64, MIN_QUEUE_BYTES);
        for _ in 0..10 {
            t += Duration::from_micros(rtt_us as u64);
            moved += limit;
            let next = b.limit_bytes(t, moved, rtt_us);
            assert!(
                next > limit || next == MAX_QUEUE_BYTES,
                "{next} after {limit}"
            );
            limit = next;
        }
        // It doubles each round trip, so ten reach the most.
        assert_eq!(limit, MAX_QUEUE_BYTES);
    }

    fn report(placed_bytes: u64, budget_bytes: u64) -> Vec<u8> {
        let mut b = Vec::new();
        Message::PostcopyPlaced {
            placed_bytes,
            budget_bytes,
        }
        .encode(&mut b);
        b
    }

    #[test]
    fn reports_in_pieces_open_room_as_they_complete() {
        let mut r = PlacedReports::default();
        assert!(
            r.has_room(MIN_QUEUE_BYTES, 0, 0),
            "room for the least budget before any report"
        );
        assert!(!r.has_room(MIN_QUEUE_BYTES + 1, 0, 0));
        assert!(r.has_room(512 << 10, 0, 512 << 10), "at least two batches");
        let mut bytes = report(1 << 20, 1 << 20);
        bytes.extend(report(3 << 20, 1 << 20));
        let (a, b) = bytes.split_at(20);
        r.take(a, "t").unwrap();
        assert!(!r.has_room(2 << 20, 0, 0), "half a report changes nothing");
        r.take(b, "t").unwrap();
        assert!(r.has_room(4 << 20, 0, 0));
        assert!(
            r.has_room(5 << 20, 1 << 20, 0),
            "what is in the network does not count"
        );
        assert!(!r.has_room((4 << 20) + 1, 0, 0));
    }

    #[test]
    fn a_peer_cannot_stall_the_channel_or_unbound_its_queue() {
        let mut r = PlacedReports::default();
        r.take(&report(0, 0), "t").unwrap();
        assert!(
            r.has_room(MIN_QUEUE_BYTES, 0, 0),
            "a zero budget still lets a batch go"
        );
        r.take(&report(0, u64::MAX), "t").unwrap();
        assert!(
            !r.has_room(MAX_QUEUE_BYTES + 1, 0, 0),
            "a huge budget is capped"
        );
        let mut back = PlacedReports::default();
        back.take(&report(10, 0), "t").unwrap();
        assert!(
            back.take(&report(5, 0), "t").is_err(),
            "placed bytes never go back"
        );
        let mut other = Vec::new();
        Message::PostcopySwitch { pending_pages: 1 }.encode(&mut other);
        assert!(PlacedReports::default().take(&other, "t").is_err());
        assert!(
            PlacedReports::default().take(&[0u8; 16], "t").is_err(),
            "bad magic"
        );
    }
}
