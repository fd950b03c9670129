//! The device state that travels with the VM.
//!
//! QEMU migrates the guest's memory (rings included) and its own device
//! state, but the generic vhost-user device knows nothing of the balloon:
//! what the destination's backend must know comes from the source's backend
//! through [`BalloonState`]. On the source, after QEMU stopped the device
//! (every ring quiescent, see `gate.rs`), [`crate::BalloonHandle::export_state`];
//! on the destination, after QEMU loaded its device state and before the VM
//! resumes, [`crate::BalloonHandle::import_state`]. The frontend then starts
//! the device with `SET_VRING_BASE` at the source's avail positions; nothing
//! in that start (SET_FEATURES, SET_MEM_TABLE, SET_VRING_*) clears the
//! imported state, and neither does the first connection reset after an
//! import. A device reset (`RESET_DEVICE`) may.

use serde::{Deserialize, Serialize};

use crate::fence::CmdIdFence;
use crate::status::GuestStats;

/// The [`BalloonState::version`] this backend writes and reads.
pub const BALLOON_STATE_VERSION: u32 = 1;

/// What the destination's backend must know of the source's device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonState {
    /// Format version ([`BALLOON_STATE_VERSION`]); any other is refused.
    pub version: u32,
    /// Config `num_pages`: the host's target, in 4 KiB pages.
    pub num_pages_4k: u32,
    /// Config `actual`: the balloon size the guest reported, in 4 KiB pages.
    pub actual_pages_4k: u32,
    /// Config `poison_val`, as the guest wrote it.
    pub poison_val: u32,
    /// Config `free_page_hint_cmd_id` (the counter belongs to the VM).
    pub free_page_hint_cmd_id: u32,
    /// Descriptor head index (on the stats queue) of the stats buffer the
    /// device holds. The guest sends new stats only once it gets this
    /// buffer back: lost at migration, stats would stop for good.
    pub held_stats_head: Option<u16>,
    /// PFNs (4 KiB pages) in the balloon, ascending.
    pub inflated_pfns_4k: Vec<u64>,
    /// The guest's statistics as last reported.
    pub guest_stats: GuestStats,
    /// cmd_id fences not yet passed (avail indices of the free-page queue
    /// live in guest memory, so they carry over), oldest first.
    pub cmd_id_fences: Vec<CmdIdFence>,
}
