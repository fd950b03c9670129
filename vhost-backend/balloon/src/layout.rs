//! Feature bits and the mapping from vring index to queue role.
//!
//! The Linux driver asks for the queues inflate, deflate, stats, free_page
//! and reporting in that order, but passes a `NULL` name for the queues of
//! features that were not negotiated; `virtio_find_vqs` then skips them
//! *without consuming an index*. The vring indices are therefore compacted:
//! without `STATS_VQ` the free-page queue is index 2. [`queue_roles`] gives
//! the role of every index from the acked feature bits.

use serde::Serialize;

/// Feature bit numbers used by the balloon device.
pub mod features {
    /// `VIRTIO_BALLOON_F_MUST_TELL_HOST` (not offered by this device).
    pub const MUST_TELL_HOST: u32 = 0;
    /// `VIRTIO_BALLOON_F_STATS_VQ`: the stats queue exists.
    pub const STATS_VQ: u32 = 1;
    /// `VIRTIO_BALLOON_F_DEFLATE_ON_OOM`: the guest deflates under OOM.
    pub const DEFLATE_ON_OOM: u32 = 2;
    /// `VIRTIO_BALLOON_F_FREE_PAGE_HINT`: the free-page queue exists.
    pub const FREE_PAGE_HINT: u32 = 3;
    /// `VIRTIO_BALLOON_F_PAGE_POISON`: `poison_val` is meaningful.
    pub const PAGE_POISON: u32 = 4;
    /// `VIRTIO_BALLOON_F_REPORTING`: the free page reporting queue exists.
    pub const REPORTING: u32 = 5;
    /// vhost: the frontend may ask the backend to log its writes to guest
    /// memory (`VHOST_F_LOG_ALL`); QEMU refuses to migrate a vhost device
    /// without it. Not a virtio feature: the guest ignores the bit.
    pub const LOG_ALL: u32 = 26;
    /// `VIRTIO_RING_F_INDIRECT_DESC`.
    pub const RING_INDIRECT_DESC: u32 = 28;
    /// `VIRTIO_RING_F_EVENT_IDX`.
    pub const RING_EVENT_IDX: u32 = 29;
    /// `VHOST_USER_F_PROTOCOL_FEATURES`.
    pub const PROTOCOL_FEATURES: u32 = 30;
    /// `VIRTIO_F_VERSION_1`.
    pub const VERSION_1: u32 = 32;

    /// The feature mask of one bit number.
    pub const fn bit(n: u32) -> u64 {
        1u64 << n
    }

    /// Every feature this device offers.
    pub const OFFERED: u64 = bit(STATS_VQ)
        | bit(DEFLATE_ON_OOM)
        | bit(FREE_PAGE_HINT)
        | bit(PAGE_POISON)
        | bit(REPORTING)
        | bit(LOG_ALL)
        | bit(RING_INDIRECT_DESC)
        | bit(RING_EVENT_IDX)
        | bit(PROTOCOL_FEATURES)
        | bit(VERSION_1);
}

// The vhost-user bits in vhost's own vocabulary: the same bits.
const _: () = assert!(
    features::bit(features::LOG_ALL)
        == vhost::vhost_user::message::VhostUserVirtioFeatures::LOG_ALL.bits()
);
const _: () = assert!(
    features::bit(features::PROTOCOL_FEATURES)
        == vhost::vhost_user::message::VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
);

/// The maximum number of queues the device can have (all features acked).
pub const MAX_QUEUES: usize = 5;

/// What a vring is used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueRole {
    /// Pages the guest gives to the balloon (arrays of le32 PFNs).
    Inflate,
    /// Pages the guest takes back from the balloon (arrays of le32 PFNs).
    Deflate,
    /// The guest's memory statistics.
    Stats,
    /// Free page hints (cmd_id, blocks, STOP).
    FreePage,
    /// Free page reporting.
    Reporting,
}

impl QueueRole {
    /// A short lower-case name for logs and JSON.
    pub fn name(self) -> &'static str {
        match self {
            QueueRole::Inflate => "inflate",
            QueueRole::Deflate => "deflate",
            QueueRole::Stats => "stats",
            QueueRole::FreePage => "free_page",
            QueueRole::Reporting => "reporting",
        }
    }
}

/// The role of every vring index, in index order, for the acked features.
///
/// Inflate (0) and deflate (1) always exist; stats, free-page and reporting
/// follow, each only if its feature was acked, with no gaps.
pub fn queue_roles(acked_features: u64) -> Vec<QueueRole> {
    let has = |b: u32| acked_features & features::bit(b) != 0;
    let mut roles = vec![QueueRole::Inflate, QueueRole::Deflate];
    if has(features::STATS_VQ) {
        roles.push(QueueRole::Stats);
    }
    if has(features::FREE_PAGE_HINT) {
        roles.push(QueueRole::FreePage);
    }
    if has(features::REPORTING) {
        roles.push(QueueRole::Reporting);
    }
    roles
}

/// The role of vring `index`, or `None` if no queue has that index.
pub fn role_of(acked_features: u64, index: usize) -> Option<QueueRole> {
    queue_roles(acked_features).get(index).copied()
}

/// The vring index of `role`, or `None` if its feature was not acked.
pub fn index_of(acked_features: u64, role: QueueRole) -> Option<usize> {
    queue_roles(acked_features).iter().position(|r| *r == role)
}

#[cfg(test)]
mod tests {
    use super::features::*;
    use super::QueueRole::*;
    use super::*;

    /// Every one of the 8 combinations of the three optional queues, with
    /// the index each role must get.
    #[test]
    fn compaction_for_every_feature_combination() {
        let cases: [(u64, &[QueueRole]); 8] = [
            (0, &[Inflate, Deflate]),
            (bit(STATS_VQ), &[Inflate, Deflate, Stats]),
            (bit(FREE_PAGE_HINT), &[Inflate, Deflate, FreePage]),
            (bit(REPORTING), &[Inflate, Deflate, Reporting]),
            (
                bit(STATS_VQ) | bit(FREE_PAGE_HINT),
                &[Inflate, Deflate, Stats, FreePage],
            ),
            (
                bit(STATS_VQ) | bit(REPORTING),
                &[Inflate, Deflate, Stats, Reporting],
            ),
            (
                bit(FREE_PAGE_HINT) | bit(REPORTING),
                &[Inflate, Deflate, FreePage, Reporting],
            ),
            (
                bit(STATS_VQ) | bit(FREE_PAGE_HINT) | bit(REPORTING),
                &[Inflate, Deflate, Stats, FreePage, Reporting],
            ),
        ];
        for (acked, want) in cases {
            // Unrelated bits must not change the layout.
            let acked = acked | bit(VERSION_1) | bit(PAGE_POISON) | bit(DEFLATE_ON_OOM);
            assert_eq!(queue_roles(acked), want, "features {acked:#x}");
            for (i, role) in want.iter().enumerate() {
                assert_eq!(role_of(acked, i), Some(*role));
                assert_eq!(index_of(acked, *role), Some(i));
            }
            assert_eq!(role_of(acked, want.len()), None);
        }
        assert_eq!(index_of(bit(REPORTING), FreePage), None);
        assert_eq!(index_of(bit(FREE_PAGE_HINT), FreePage), Some(2));
        assert_eq!(index_of(bit(STATS_VQ) | bit(REPORTING), Reporting), Some(3));
    }
}
