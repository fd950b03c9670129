//! Entry points for the fuzz targets (`tests/fuzz`), behind the `fuzzing`
//! feature: the device's handling of a guest's virtqueues, driven the way
//! a kick drives it, on rings whose every byte the fuzzer chose; and the
//! vhost-user proxy's reading and checking of a frontend's messages. Never
//! built into the product.
//!
//! The virtqueue harness negotiates every queue the device offers (inflate, deflate,
//! stats, free-page hint, reporting), maps a small anonymous guest RAM,
//! lays out one split virtqueue at its top from the input, publishes a
//! `free_page_hint_cmd_id` from the input and runs
//! the device's kick handler (`device::process_queue`) on the queue the input picks, with a
//! sink that checks every range it is handed lies inside guest RAM.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use freehint_types::{CmdId, GpaRange, HintOutcome, HintSink};
use vhost_user_backend::{VringRwLock, VringT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};

use crate::layout::features::{bit, FREE_PAGE_HINT, REPORTING, STATS_VQ, VERSION_1};
use crate::layout::MAX_QUEUES;
use crate::{lock, BalloonBackend, BalloonConfig, Mem};

/// Guest RAM of the harness.
const RAM_BYTES: u64 = 256 << 10;
/// Entries of the virtqueue.
const QUEUE_SIZE: u16 = 16;
/// The descriptor table, then the avail ring, then the used ring, in the
/// last 4 KiB of RAM; the buffers the descriptors point at below.
const DESC_TABLE: u64 = RAM_BYTES - 4096;
const AVAIL_RING: u64 = DESC_TABLE + 16 * QUEUE_SIZE as u64;
const USED_RING: u64 = RAM_BYTES - 1024;
/// Input bytes before the ring: selector (1), cmd_id (4), avail idx (2).
const PREFIX_BYTES: usize = 7;
/// Input bytes of the ring: descriptors, then the avail ring's entries.
const RING_BYTES: usize = 16 * QUEUE_SIZE as usize + 2 * QUEUE_SIZE as usize;

/// A sink that accepts everything, checks it lies in guest RAM, and
/// counts it.
#[derive(Default)]
struct CheckingSink {
    hint_ranges: AtomicU64,
    reported_ranges: AtomicU64,
}

fn check(ranges: &[GpaRange]) {
    for r in ranges {
        let end = r.start.checked_add(r.len_bytes).expect("range wraps");
        assert!(end <= RAM_BYTES, "range {r:?} outside guest RAM handed on");
    }
}

impl HintSink for CheckingSink {
    fn free_page_hints(&self, _cmd_id: CmdId, ranges: &[GpaRange]) -> HintOutcome {
        check(ranges);
        self.hint_ranges
            .fetch_add(ranges.len() as u64, Ordering::Relaxed);
        HintOutcome {
            hint_ranges_applied: ranges.len() as u64,
            ..HintOutcome::default()
        }
    }

    fn reported_free(&self, ranges: &[GpaRange]) -> HintOutcome {
        check(ranges);
        self.reported_ranges
            .fetch_add(ranges.len() as u64, Ordering::Relaxed);
        HintOutcome::default()
    }
}

/// One guest's rings: see the module's documentation. The input: a
/// selector byte (queue index modulo 5; bit 3: event index), the
/// published cmd_id (u32 LE), the avail index (u16 LE), 16 descriptors of
/// 16 bytes, 16 avail entries of 2 bytes, then the bytes of guest RAM
/// from address 0 (the buffers). Returns what reached the sink.
pub fn virtqueues(data: &[u8]) -> HandedOn {
    if data.len() < PREFIX_BYTES + RING_BYTES {
        return HandedOn::default();
    }
    let (prefix, rest) = data.split_at(PREFIX_BYTES);
    let (ring, buffers) = rest.split_at(RING_BYTES);
    let index = usize::from(prefix[0]) % MAX_QUEUES;
    let event_idx = prefix[0] & 8 != 0;
    let cmd_id = u32::from_le_bytes(prefix[1..5].try_into().expect("4 bytes"));
    let avail_idx = u16::from_le_bytes([prefix[5], prefix[6]]);

    let mem = Mem::from_ranges(&[(GuestAddress(0), RAM_BYTES as usize)]).expect("anonymous RAM");
    let buffers = &buffers[..buffers.len().min(DESC_TABLE as usize)];
    mem.write_slice(buffers, GuestAddress(0)).expect("in RAM");
    mem.write_slice(&ring[..16 * QUEUE_SIZE as usize], GuestAddress(DESC_TABLE))
        .expect("in RAM");
    // avail: flags, idx, ring[QUEUE_SIZE].
    mem.write_obj(0u16, GuestAddress(AVAIL_RING))
        .expect("in RAM");
    mem.write_obj(avail_idx, GuestAddress(AVAIL_RING + 2))
        .expect("in RAM");
    mem.write_slice(
        &ring[16 * QUEUE_SIZE as usize..],
        GuestAddress(AVAIL_RING + 4),
    )
    .expect("in RAM");
    let mem = GuestMemoryAtomic::new(mem);

    let sink = Arc::new(CheckingSink::default());
    let backend =
        BalloonBackend::new(BalloonConfig::default(), sink.clone()).expect("default config");
    let inner = backend.inner.clone();
    {
        let mut st = lock(&inner.state);
        st.acked_features = bit(VERSION_1) | bit(STATS_VQ) | bit(FREE_PAGE_HINT) | bit(REPORTING);
        st.features_acked = true;
        st.event_idx = event_idx;
        st.config.free_page_hint_cmd_id = cmd_id;
    }
    *lock(&inner.mem) = Some(mem.clone());
    let vring = VringRwLock::new(mem, QUEUE_SIZE).expect("queue size");
    vring.set_queue_size(QUEUE_SIZE);
    vring
        .set_queue_info(DESC_TABLE, AVAIL_RING, USED_RING)
        .expect("aligned ring addresses");
    vring.set_queue_event_idx(event_idx);
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    let gate = &inner.gates[index];
    if let Some(_entered) = gate.enter() {
        crate::device::process_queue(&inner, index, &vring, gate);
    }
    HandedOn {
        hint_ranges: sink.hint_ranges.load(Ordering::Relaxed),
        reported_ranges: sink.reported_ranges.load(Ordering::Relaxed),
    }
}

/// What one [`virtqueues`] run handed to the device's sink.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HandedOn {
    /// Free-page hint ranges.
    pub hint_ranges: u64,
    /// Free page reporting ranges.
    pub reported_ranges: u64,
}

/// A vhost-user frontend's byte stream (no descriptors), read, parsed and
/// checked by the proxy as it reads QEMU's; refusals are counted as the
/// proxy counts them. Returns the messages accepted.
pub fn vhost_user_messages(data: &[u8]) -> usize {
    let backend = BalloonBackend::new(BalloonConfig::default(), Arc::new(CheckingSink::default()))
        .expect("default config");
    crate::proxy::fuzz_frontend_stream(data, &backend.inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One descriptor: address, length, flags (1 next, 2 write), next.
    fn desc(addr: u64, len: u32, flags: u16) -> Vec<u8> {
        let mut d = addr.to_le_bytes().to_vec();
        d.extend_from_slice(&len.to_le_bytes());
        d.extend_from_slice(&flags.to_le_bytes());
        d.extend_from_slice(&0u16.to_le_bytes());
        d
    }

    /// The harness reaches the sink: a free-page batch as Linux queues
    /// it (its cmd_id, then a hint block) is handed on, so the fuzzer
    /// explores past the checks; and a hint outside RAM is not.
    #[test]
    fn a_well_formed_free_page_batch_reaches_the_sink() {
        let run = |hint_addr: u64| {
            let cmd_id = 5u32;
            let mut input = vec![3]; // the free-page queue
            input.extend_from_slice(&cmd_id.to_le_bytes());
            input.extend_from_slice(&2u16.to_le_bytes()); // two chains
            let mut descs = desc(0, 4, 0); // out: the cmd_id at GPA 0
            descs.extend(desc(hint_addr, 0x1000, 2)); // in: a hint block
            descs.resize(16 * QUEUE_SIZE as usize, 0);
            input.extend(descs);
            let mut avail = vec![0u8; 2 * QUEUE_SIZE as usize];
            avail[2] = 1; // the second chain starts at descriptor 1
            input.extend(avail);
            input.extend_from_slice(&cmd_id.to_le_bytes()); // GPA 0
            virtqueues(&input)
        };
        assert_eq!(run(0x10000).hint_ranges, 1);
        assert_eq!(run(RAM_BYTES).hint_ranges, 0);
    }

    #[test]
    fn a_well_formed_vhost_user_message_is_accepted() {
        // SET_FEATURES (2), version 1 flags, an 8-byte body: features the
        // device offers are accepted, others refused.
        let message = |features: u64| {
            let mut m = 2u32.to_le_bytes().to_vec();
            m.extend_from_slice(&1u32.to_le_bytes());
            m.extend_from_slice(&8u32.to_le_bytes());
            m.extend_from_slice(&features.to_le_bytes());
            m
        };
        let offered = crate::layout::features::OFFERED;
        assert_eq!(vhost_user_messages(&message(offered)), 1);
        assert_eq!(vhost_user_messages(&message(offered | 1 << 63)), 0);
        let mut two = message(offered);
        two.extend(message(0));
        assert_eq!(vhost_user_messages(&two), 2);
    }
}
