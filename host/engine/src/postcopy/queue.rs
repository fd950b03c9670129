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
//! * The source stops taking pages while more than the budget is
//!   unacknowledged (`SIOCOUTQ`), with the rate of acknowledged bytes and
//!   the path's least round trip (`tcpi_min_rtt`, free of queueing).
//! * The destination clamps its receive window (`TCP_WINDOW_CLAMP`) to
//!   the budget, with the rate it places bytes at and its receive-side
//!   round trip (the least it has seen: the estimate grows when the
//!   host is busy): this bounds what waits in its socket when placing
//!   pages is slower than the link (loopback, a busy host).

use std::time::{Duration, Instant};

/// Queue time, µs, a request may wait behind a bulk channel beyond the
/// path's round trip.
pub(crate) const QUEUE_TARGET_US: u64 = 250;
/// Least budget, bytes: a channel that has just started (or stalled) may
/// still queue this much, so a fast path fills at once.
pub(crate) const MIN_QUEUE_BYTES: u64 = 128 << 10;
/// Greatest budget, bytes.
pub(crate) const MAX_QUEUE_BYTES: u64 = 32 << 20;
/// A rate is measured over at least this long.
const RATE_WINDOW: Duration = Duration::from_millis(5);

/// One channel's queue budget, from its measured rate.
#[derive(Debug)]
pub(crate) struct QueueBudget {
    since: Instant,
    bytes_since: u64,
    rate_bytes_per_s: u64,
}

impl QueueBudget {
    /// Starts measuring at `now`, when the channel had moved `bytes` in all.
    pub(crate) fn new(now: Instant, bytes: u64) -> Self {
        Self {
            since: now,
            bytes_since: bytes,
            rate_bytes_per_s: 0,
        }
    }

    /// Takes the channel's running count of bytes moved, `bytes`, at
    /// `now`, and the path's round trip; returns how many bytes it may
    /// hold queued.
    pub(crate) fn limit_bytes(&mut self, now: Instant, bytes: u64, rtt_us: u32) -> u64 {
        let dt = now.saturating_duration_since(self.since);
        if dt >= RATE_WINDOW {
            let moved = bytes.saturating_sub(self.bytes_since) as u128;
            self.rate_bytes_per_s = (moved * 1_000_000 / dt.as_micros().max(1)) as u64;
            self.since = now;
            self.bytes_since = bytes;
        }
        let window_us = 2 * rtt_us as u128 + QUEUE_TARGET_US as u128;
        let bytes = self.rate_bytes_per_s as u128 * window_us / 1_000_000;
        (bytes.min(MAX_QUEUE_BYTES as u128) as u64).max(MIN_QUEUE_BYTES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_budget_is_the_rate_times_twice_the_round_trip_plus_the_target() {
        let t0 = Instant::now();
        let mut b = QueueBudget::new(t0, 0);
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
        let t0 = Instant::now();
        let mut b = QueueBudget::new(t0, 0);
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
}
