//! Rejection reasons, counters and the serialisable status snapshot.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::config::ConfigSpace;
use crate::layout::QueueRole;

macro_rules! reasons {
    ($($(#[$doc:meta])* $variant:ident => $name:literal,)*) => {
        /// Why a piece of input from the guest or the frontend was rejected.
        ///
        /// Every rejection is logged with `tracing::warn!` and counted per
        /// reason; the counters appear in [`BalloonStatus::rejected`].
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum RejectReason {
            $($(#[$doc])* $variant,)*
        }

        impl RejectReason {
            /// Every reason, in counter order.
            pub const ALL: &'static [RejectReason] = &[$(RejectReason::$variant,)*];

            /// The snake_case name used in logs and JSON.
            pub fn name(self) -> &'static str {
                match self {
                    $(RejectReason::$variant => $name,)*
                }
            }
        }
    };
}

reasons! {
    /// A buffer (descriptor) lies partly or wholly outside guest memory.
    DescOutsideMemory => "desc_outside_memory",
    /// A buffer or range of length zero.
    ZeroLength => "zero_length",
    /// A range overlaps another range of the same batch or report.
    OverlappingRange => "overlapping_range",
    /// A descriptor chain that does not end: longer than the queue, looping,
    /// or with a `next` index outside the table.
    ChainTooLong => "chain_too_long",
    /// A chain that yields no descriptor at all.
    EmptyChain => "empty_chain",
    /// A free-page command (out) buffer whose size is not 4 bytes.
    CmdIdBufferSize => "cmd_id_buffer_size",
    /// A chain with buffers in the wrong direction for its queue.
    WrongDirection => "wrong_direction",
    /// A free-page hint that arrived with no cmd_id batch open.
    HintWithoutCmdId => "hint_without_cmd_id",
    /// A PFN array whose size is not a multiple of 4 bytes.
    PfnArraySize => "pfn_array_size",
    /// A stats buffer whose size is not a multiple of 10 bytes.
    StatsBufferSize => "stats_buffer_size",
    /// A queue was kicked before it was usable (no memory table, no ring
    /// addresses, or ring addresses outside memory).
    QueueNotReady => "queue_not_ready",
    /// A kick on a vring index that no negotiated queue uses.
    UnknownQueue => "unknown_queue",
    /// The virtqueue itself is corrupt (avail index, ring read errors).
    QueueError => "queue_error",
    /// A config write outside the 16-byte config space, or of length 0.
    ConfigWriteOutOfRange => "config_write_out_of_range",
    /// A config write of `actual` larger than guest memory.
    ActualOutOfRange => "actual_out_of_range",
    /// A vring message naming a queue index the device does not have.
    VringIndexOutOfRange => "vring_index_out_of_range",
    /// SET_VRING_ADDR before any memory table.
    VringAddrBeforeMemTable => "vring_addr_before_mem_table",
    /// SET_VRING_NUM with 0, a size above the maximum or not a power of 2.
    BadQueueSize => "bad_queue_size",
    /// SET_FEATURES with bits the device does not offer.
    UnsupportedFeatures => "unsupported_features",
    /// SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES acked.
    VringEnableWithoutProtocolFeatures => "vring_enable_without_protocol_features",
    /// A frontend message that is malformed (size, missing fd).
    MalformedMessage => "malformed_message",
    /// A free-page hint that would make its batch hold more separate
    /// ranges than the device keeps for one batch (one per 8 MiB of guest
    /// memory, plus 1024).
    BatchRangesFull => "batch_ranges_full",
}

/// Counters of rejected input, one per [`RejectReason`].
#[derive(Debug, Default)]
pub struct RejectCounters {
    counts: [AtomicU64; 22],
}

impl RejectCounters {
    /// Adds one to the counter of `reason`.
    pub fn bump(&self, reason: RejectReason) {
        self.counts[Self::slot(reason)].fetch_add(1, Ordering::Relaxed);
    }

    /// The counter of `reason`.
    pub fn get(&self, reason: RejectReason) -> u64 {
        self.counts[Self::slot(reason)].load(Ordering::Relaxed)
    }

    /// All non-zero counters by reason name.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        RejectReason::ALL
            .iter()
            .filter_map(|r| {
                let v = self.get(*r);
                (v != 0).then(|| (r.name().to_string(), v))
            })
            .collect()
    }

    fn slot(reason: RejectReason) -> usize {
        RejectReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0)
    }
}

/// The guest's memory statistics as last reported on the stats queue.
///
/// Field names follow the `VIRTIO_BALLOON_S_*` tags; memory amounts are in
/// bytes as the driver reports them, event counts are plain counts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestStats {
    /// Tag 0: bytes swapped in.
    pub swap_in_bytes: Option<u64>,
    /// Tag 1: bytes swapped out.
    pub swap_out_bytes: Option<u64>,
    /// Tag 2: major page faults.
    pub major_faults: Option<u64>,
    /// Tag 3: minor page faults.
    pub minor_faults: Option<u64>,
    /// Tag 4: free memory.
    pub free_bytes: Option<u64>,
    /// Tag 5: total memory.
    pub total_bytes: Option<u64>,
    /// Tag 6: available memory.
    pub available_bytes: Option<u64>,
    /// Tag 7: disk caches.
    pub caches_bytes: Option<u64>,
    /// Tag 8: successful hugetlb allocations.
    pub hugetlb_allocations: Option<u64>,
    /// Tag 9: failed hugetlb allocations.
    pub hugetlb_failures: Option<u64>,
    /// Every tag seen, including the ones above and tags unknown to us.
    pub by_tag: BTreeMap<u16, u64>,
    /// How many stats buffers were parsed.
    pub updates: u64,
}

impl GuestStats {
    /// Records one `(tag, value)` entry.
    pub fn record(&mut self, tag: u16, val: u64) {
        let slot = match tag {
            0 => Some(&mut self.swap_in_bytes),
            1 => Some(&mut self.swap_out_bytes),
            2 => Some(&mut self.major_faults),
            3 => Some(&mut self.minor_faults),
            4 => Some(&mut self.free_bytes),
            5 => Some(&mut self.total_bytes),
            6 => Some(&mut self.available_bytes),
            7 => Some(&mut self.caches_bytes),
            8 => Some(&mut self.hugetlb_allocations),
            9 => Some(&mut self.hugetlb_failures),
            _ => None,
        };
        if let Some(s) = slot {
            *s = Some(val);
        }
        self.by_tag.insert(tag, val);
    }
}

/// Counters of what the device did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DeviceCounters {
    /// Free-page hint ranges handed to the hint sink.
    pub hint_ranges: u64,
    /// Bytes in those ranges.
    pub hint_bytes: u64,
    /// Hint ranges the sink applied.
    pub hint_ranges_applied: u64,
    /// Hint ranges the sink dropped as stale (wrong cmd_id).
    pub hint_ranges_dropped_stale: u64,
    /// Hint ranges the sink rejected as invalid.
    pub hint_ranges_rejected_invalid: u64,
    /// Pages the sink cleared from the migration bitmap.
    pub hint_pages_cleared: u64,
    /// cmd_id batches opened by the guest.
    pub hint_batches: u64,
    /// Of those, batches whose cmd_id chain was queued before the id it
    /// read was published (the driver rewrote the buffer in place); their
    /// hints go to the sink tagged `FENCED_HINT_CMD_ID` and are dropped.
    pub hint_batches_fenced: u64,
    /// Reported (free page reporting) ranges discarded and handed to the sink.
    pub reported_ranges: u64,
    /// Bytes in those ranges.
    pub reported_bytes: u64,
    /// Reported ranges not discarded because a non-zero poison value is set.
    pub reported_skipped_poison: u64,
    /// Failed `fallocate(PUNCH_HOLE)` calls (range kept, not reported).
    pub discard_errors: u64,
    /// Pages inflated (PFNs received on the inflate queue).
    pub inflated_pfns: u64,
    /// Pages deflated (PFNs received on the deflate queue).
    pub deflated_pfns: u64,
    /// Deflated PFNs that were not in the balloon.
    pub deflated_unknown_pfns: u64,
    /// Config-change messages sent to the frontend.
    pub config_changes_sent: u64,
    /// Config changes that could not be sent (no backend channel, I/O error).
    pub config_changes_failed: u64,
    /// Buffers returned to the guest (used).
    pub buffers_used: u64,
}

/// A snapshot of the device, for the in-process API and `--status-json`.
#[derive(Clone, Debug, Serialize)]
pub struct BalloonStatus {
    /// Features acked by the frontend (0 before SET_FEATURES).
    pub acked_features: u64,
    /// The role of each vring index for the acked features.
    pub queues: Vec<QueueRole>,
    /// The config space as the guest sees it.
    pub config: ConfigSpace,
    /// Pages currently in the balloon (inflated minus deflated).
    pub balloon_pages: u64,
    /// Whether a backend request channel (for config changes) is set up.
    pub backend_channel: bool,
    /// Whether a memory table has been received.
    pub memory_table: bool,
    /// The guest's statistics.
    pub guest_stats: GuestStats,
    /// What the device did.
    pub counters: DeviceCounters,
    /// Rejected input by reason (only non-zero reasons).
    pub rejected: BTreeMap<String, u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_array_covers_every_reason() {
        let c = RejectCounters::default();
        assert_eq!(RejectReason::ALL.len(), c.counts.len());
        for (i, r) in RejectReason::ALL.iter().enumerate() {
            for _ in 0..=i {
                c.bump(*r);
            }
        }
        for (i, r) in RejectReason::ALL.iter().enumerate() {
            assert_eq!(c.get(*r), i as u64 + 1, "{}", r.name());
        }
        assert_eq!(c.snapshot().len(), RejectReason::ALL.len());
    }
}
