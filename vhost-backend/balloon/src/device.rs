//! Queue processing: free-page hints, reporting, stats, inflate/deflate,
//! and config writes. Everything here treats guest input as hostile.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;

use freehint_types::{CmdId, GpaRange, HintOutcome};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryBackend,
    GuestMemoryRegion,
};

use crate::gate::RingGate;
use crate::layout::{self, features, QueueRole};
use crate::status::RejectReason;
use crate::{lock, BalloonError, Inner, Mem, State, BALLOON_PAGE_BYTES};

/// A set of disjoint half-open ranges, to refuse overlapping input.
/// Ranges that touch are kept as one, so a guest that hints contiguous
/// blocks costs one entry however many blocks it hints.
#[derive(Debug, Default)]
pub(crate) struct RangeSet {
    by_start: BTreeMap<u64, u64>,
}

/// What [`RangeSet::insert_disjoint`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Inserted {
    /// The range is in the set now.
    Yes,
    /// It overlaps a range already in the set; the set is unchanged.
    Overlaps,
    /// It would be a separate range beyond the set's limit; unchanged.
    Full,
}

impl RangeSet {
    /// Inserts `[start, end)` if it overlaps nothing already in the set,
    /// and if the set then holds at most `max_ranges` separate ranges.
    pub(crate) fn insert_disjoint(&mut self, start: u64, end: u64, max_ranges: usize) -> Inserted {
        let before = self
            .by_start
            .range(..end)
            .next_back()
            .map(|(&s, &e)| (s, e));
        if let Some((_, e)) = before {
            if e > start {
                return Inserted::Overlaps;
            }
        }
        let joins_before = before.filter(|&(_, e)| e == start).map(|(s, _)| s);
        let joins_after = self.by_start.get(&end).copied();
        if joins_before.is_none() && joins_after.is_none() && self.by_start.len() >= max_ranges {
            return Inserted::Full;
        }
        let first = joins_before.unwrap_or(start);
        let last = match joins_after {
            Some(after_end) => {
                self.by_start.remove(&end);
                after_end
            }
            None => end,
        };
        self.by_start.insert(first, last);
        Inserted::Yes
    }

    /// Separate ranges held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.by_start.len()
    }

    pub(crate) fn clear(&mut self) {
        self.by_start.clear();
    }
}

/// Most separate ranges one free-page batch keeps for its overlap check,
/// for `memory_bytes` of guest memory: one per 8 MiB, plus 1024. Linux
/// hints 4 MiB blocks, so even free memory that alternates with used
/// memory at that grain fits; a guest hinting many tiny disjoint ranges
/// (the memory this costs the host grows with every one) has the rest of
/// its batch refused and counted ([`RejectReason::BatchRangesFull`]).
pub(crate) fn max_batch_ranges(memory_bytes: u64) -> usize {
    usize::try_from(memory_bytes / (8 << 20))
        .unwrap_or(usize::MAX)
        .saturating_add(1024)
}

/// Most hints and reported ranges a pass collects before it hands them on
/// (and then goes on with its chains): bounds what a pass holds however
/// many descriptors the guest puts in its chains.
const MAX_ACTIONS_PER_DELIVERY: usize = 1 << 16;

/// An open free-page hint batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Batch {
    /// The cmd_id its hints are tagged with.
    pub(crate) tag: u32,
    /// Its cmd_id chain was queued before the id it reads was published:
    /// tagged [`crate::FENCED_HINT_CMD_ID`] (see `fence.rs`).
    pub(crate) fenced: bool,
}

/// Where a popped free-page chain was in its queue.
#[derive(Clone, Copy, Debug)]
struct Position {
    /// The queue's next-avail counter before the chain was popped.
    pos: u16,
    /// The queue size.
    size: u16,
}

/// Whether `[start, start + len)` lies entirely in guest memory.
pub(crate) fn in_memory(mem: &Mem, start: u64, len: u64) -> bool {
    let Some(end) = start.checked_add(len) else {
        return false;
    };
    let mut addr = start;
    while addr < end {
        let Some(region) = mem.find_region(GuestAddress(addr)) else {
            return false;
        };
        let region_end = region.start_addr().raw_value().saturating_add(region.len());
        addr = region_end.min(end);
    }
    true
}

/// Total guest memory in bytes.
pub(crate) fn memory_bytes(mem: &Mem) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

/// Discards `range` from the files backing guest memory.
pub(crate) fn punch_hole(mem: &Mem, range: GpaRange) -> std::io::Result<()> {
    let end = range
        .end()
        .ok_or_else(|| std::io::Error::other("range wraps"))?;
    let mut addr = range.start;
    while addr < end {
        let region = mem
            .find_region(GuestAddress(addr))
            .ok_or_else(|| std::io::Error::other(format!("{addr:#x} is outside guest memory")))?;
        let region_start = region.start_addr().raw_value();
        let chunk_end = region_start.saturating_add(region.len()).min(end);
        let fo = region.file_offset().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "guest memory region has no backing file",
            )
        })?;
        let offset = fo.start() + (addr - region_start);
        let len = chunk_end - addr;
        let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(std::io::Error::other("file offset too large"));
        };
        // SAFETY: fallocate only acts on the file descriptor, which `fo`
        // keeps open for the duration of the call; no memory is passed.
        let rc = unsafe {
            libc::fallocate(
                fo.file().as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                l,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        addr = chunk_end;
    }
    Ok(())
}

/// Applies a config write from the frontend (the guest wrote `actual` or
/// `poison_val`).
///
/// Writes are accepted before SET_FEATURES: the virtio spec lets a driver
/// write config space before DRIVER_OK, the Linux driver writes
/// `poison_val` during probe, and QEMU forwards that write at once but
/// sends SET_FEATURES only when it starts the device. Whether the poison
/// value matters is judged with the acked features when reports and
/// inflates are processed ([`poison_active`]).
pub(crate) fn set_config(inner: &Inner, offset: u32, buf: &[u8]) {
    let mut st = lock(&inner.state);
    let (actual, poison) = match st.config.written_fields(offset, buf) {
        Ok(v) => v,
        Err(e) => {
            drop(st);
            inner.reject(RejectReason::ConfigWriteOutOfRange, format_args!("{e}"));
            return;
        }
    };
    let mem_pages = lock(&inner.mem)
        .as_ref()
        .map(|m| memory_bytes(&m.memory()) / BALLOON_PAGE_BYTES);
    if let Some(pages) = mem_pages {
        if u64::from(actual) > pages {
            drop(st);
            inner.reject(
                RejectReason::ActualOutOfRange,
                format_args!("actual = {actual} pages but guest memory has {pages}"),
            );
            return;
        }
    }
    if st.config.actual != actual {
        tracing::debug!(actual, "balloon: guest reports actual");
    }
    st.config.actual = actual;
    if st.config.poison_val != poison {
        tracing::info!(
            poison_val = format_args!("{poison:#x}"),
            "balloon: guest sets poison_val"
        );
    }
    st.config.poison_val = poison;
}

/// Whether reported/inflated pages must keep a poison pattern (so they
/// cannot be discarded to zero).
fn poison_active(st: &State) -> bool {
    st.acked_features & features::bit(features::PAGE_POISON) != 0 && st.config.poison_val != 0
}

/// The descriptors of one chain, or why the chain is malformed.
fn chain_descriptors<M>(
    chain: virtio_queue::DescriptorChain<M>,
) -> Result<Vec<Descriptor>, RejectReason>
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    let descs: Vec<Descriptor> = chain.collect();
    match descs.last() {
        None => Err(RejectReason::EmptyChain),
        // The iterator stopped on a descriptor that still points onward:
        // longer than the queue, a loop, or a bad `next`.
        Some(d) if d.has_next() => Err(RejectReason::ChainTooLong),
        Some(_) => Ok(descs),
    }
}

/// Validates one descriptor as a guest range.
fn check_desc(mem: &Mem, d: &Descriptor) -> Result<GpaRange, (RejectReason, GpaRange)> {
    let range = GpaRange::new(d.addr().raw_value(), u64::from(d.len()));
    if range.len_bytes == 0 {
        return Err((RejectReason::ZeroLength, range));
    }
    if !in_memory(mem, range.start, range.len_bytes) {
        return Err((RejectReason::DescOutsideMemory, range));
    }
    Ok(range)
}

/// Reads the device-readable bytes of a chain (all its descriptors must be
/// readable and inside memory).
fn read_out(mem: &Mem, descs: &[Descriptor]) -> Result<Vec<u8>, (RejectReason, String)> {
    let mut out = Vec::new();
    for d in descs {
        if d.is_write_only() {
            return Err((
                RejectReason::WrongDirection,
                "device-writable buffer in an out-only chain".into(),
            ));
        }
        let range = check_desc(mem, d).map_err(|(r, g)| (r, format!("buffer {g}")))?;
        if out.len() as u64 + range.len_bytes > 64 * 1024 {
            return Err((
                RejectReason::ChainTooLong,
                "out buffer larger than 64 KiB".into(),
            ));
        }
        let mut buf = vec![0u8; range.len_bytes as usize];
        mem.read_slice(&mut buf, GuestAddress(range.start))
            .map_err(|e| {
                (
                    RejectReason::DescOutsideMemory,
                    format!("buffer {range}: {e}"),
                )
            })?;
        out.extend_from_slice(&buf);
    }
    Ok(out)
}

/// What processing a batch of chains decided, applied after the state lock
/// is released.
#[derive(Default)]
struct Actions {
    /// Hints in arrival order, with their batch's cmd_id.
    hints: Vec<(u32, GpaRange)>,
    /// Discarded reported ranges.
    reported: Vec<GpaRange>,
}

/// Most chains popped in one pass before they are finished (hints and
/// reports delivered, buffers returned used). Bounds both how long the
/// driver waits for its free-page buffers (it frees a block unhinted when
/// the queue is full) and how long a `GET_VRING_BASE` waits for the worker.
const CHAINS_PER_PASS: usize = 64;

/// Processes the available chains of vring `index` until the ring is empty
/// or `gate` is stopped.
///
/// The caller holds `gate` entered ([`crate::gate::RingGate::enter`]); the
/// stop flag is checked before every pop, and every chain popped is
/// finished before this returns.
pub(crate) fn process_queue(inner: &Inner, index: usize, vring: &VringRwLock, gate: &RingGate) {
    let (acked, event_idx, features_acked) = {
        let st = lock(&inner.state);
        (st.acked_features, st.event_idx, st.features_acked)
    };
    let role = if features_acked {
        layout::role_of(acked, index)
    } else {
        None
    };
    let Some(role) = role else {
        inner.reject(
            RejectReason::UnknownQueue,
            format_args!("kick on vring {index}, which no negotiated queue uses (features {acked:#x}, acked: {features_acked})"),
        );
        return;
    };
    let Some(atomic) = lock(&inner.mem).clone() else {
        inner.reject(
            RejectReason::QueueNotReady,
            format_args!(
                "kick on vring {index} ({}) before the memory table",
                role.name()
            ),
        );
        return;
    };
    let mem = atomic.memory();
    loop {
        if gate.is_stopped() {
            break;
        }
        if event_idx {
            let _ = vring.disable_notification();
        }
        let (first_pos, size, chains) = {
            let mut vs = vring.get_mut();
            let q = vs.get_queue_mut();
            if !q.is_valid(&*mem) {
                drop(vs);
                inner.reject(
                    RejectReason::QueueNotReady,
                    format_args!(
                        "kick on vring {index} ({}) whose rings are not set up inside guest memory",
                        role.name()
                    ),
                );
                return;
            }
            let (first_pos, size) = (q.next_avail(), q.size());
            let mut it = match q.iter(mem.clone()) {
                Ok(it) => it,
                Err(e) => {
                    drop(vs);
                    inner.reject(
                        RejectReason::QueueError,
                        format_args!("vring {index} ({}): {e}", role.name()),
                    );
                    return;
                }
            };
            let mut chains = Vec::new();
            // The stop flag before every pop: once a GET_VRING_BASE is on
            // its way, nothing more leaves the avail ring.
            while chains.len() < CHAINS_PER_PASS && !gate.is_stopped() {
                match it.next() {
                    Some(c) => chains.push(c),
                    None => break,
                }
            }
            (first_pos, size, chains)
        };
        let full_pass = chains.len() == CHAINS_PER_PASS;
        let mut used: Vec<u16> = Vec::with_capacity(chains.len());
        let mut actions = Actions::default();
        for (k, chain) in chains.into_iter().enumerate() {
            let head = chain.head_index();
            // k < CHAINS_PER_PASS, far below u16::MAX.
            let at = Position {
                pos: first_pos.wrapping_add(k as u16),
                size,
            };
            if role == QueueRole::FreePage {
                lock(&inner.state).fences.popped(at.pos, at.size);
            }
            let descs = match chain_descriptors(chain) {
                Ok(d) => d,
                Err(reason) => {
                    inner.reject(
                        reason,
                        format_args!(
                            "vring {index} ({}): chain at head {head} is malformed",
                            role.name()
                        ),
                    );
                    used.push(head);
                    continue;
                }
            };
            let keep = match role {
                QueueRole::FreePage => {
                    free_page_chain(inner, &mem, &descs, at, &mut actions);
                    false
                }
                QueueRole::Reporting => {
                    reporting_chain(inner, &mem, &descs, &mut actions);
                    false
                }
                QueueRole::Inflate | QueueRole::Deflate => {
                    balloon_chain(inner, &mem, &descs, role == QueueRole::Inflate);
                    false
                }
                QueueRole::Stats => stats_chain(inner, &mem, &descs, head, &mut used),
            };
            if !keep {
                used.push(head);
            }
            if actions.hints.len() + actions.reported.len() >= MAX_ACTIONS_PER_DELIVERY {
                // Handed on before their buffers are returned, as always.
                deliver(inner, std::mem::take(&mut actions));
            }
        }
        deliver(inner, actions);
        return_used(inner, vring, index, &used);
        if gate.is_stopped() {
            // Leave notifications on, as the driver expects of a ring no
            // device is working on; the next device to run it starts with
            // a pass of its own (see the proxy's SET_VRING_KICK).
            if event_idx {
                let _ = vring.enable_notification();
            }
            break;
        }
        if full_pass {
            continue;
        }
        if !event_idx {
            break;
        }
        match vring.enable_notification() {
            Ok(true) => continue,
            _ => break,
        }
    }
}

/// Hands hints and reports to the sink, without holding the state lock.
fn deliver(inner: &Inner, actions: Actions) {
    let mut hint_outcome = HintOutcome::default();
    let mut hint_bytes = 0u64;
    let hint_count = actions.hints.len() as u64;
    let mut i = 0;
    while i < actions.hints.len() {
        let cmd = actions.hints[i].0;
        let mut j = i;
        let mut ranges = Vec::new();
        while j < actions.hints.len() && actions.hints[j].0 == cmd {
            ranges.push(actions.hints[j].1);
            hint_bytes += actions.hints[j].1.len_bytes;
            j += 1;
        }
        hint_outcome.merge(inner.sink.free_page_hints(CmdId(cmd), &ranges));
        i = j;
    }
    let reported_bytes: u64 = actions.reported.iter().map(|r| r.len_bytes).sum();
    if !actions.reported.is_empty() {
        let _ = inner.sink.reported_free(&actions.reported);
    }
    let mut st = lock(&inner.state);
    let c = &mut st.counters;
    c.hint_ranges += hint_count;
    c.hint_bytes += hint_bytes;
    c.hint_ranges_applied += hint_outcome.hint_ranges_applied;
    c.hint_ranges_dropped_stale += hint_outcome.hint_ranges_dropped_stale;
    c.hint_ranges_rejected_invalid += hint_outcome.hint_ranges_rejected_invalid;
    c.hint_pages_cleared += hint_outcome.pages_cleared;
    c.reported_ranges += actions.reported.len() as u64;
    c.reported_bytes += reported_bytes;
}

/// Returns buffers to the guest and notifies it if needed.
fn return_used(inner: &Inner, vring: &VringRwLock, index: usize, heads: &[u16]) {
    if heads.is_empty() {
        return;
    }
    let mut n = 0u64;
    for &head in heads {
        match vring.add_used(head, 0) {
            Ok(()) => n += 1,
            Err(e) => inner.reject(
                RejectReason::QueueError,
                format_args!("vring {index}: cannot return head {head}: {e}"),
            ),
        }
    }
    lock(&inner.state).counters.buffers_used += n;
    if vring.needs_notification().unwrap_or(true) {
        if let Err(e) = vring.signal_used_queue() {
            tracing::warn!("balloon: vring {index}: cannot signal the guest: {e}");
        }
    }
}

/// One chain of the free-page queue: a 4-byte cmd_id (out) or hint blocks
/// (in).
fn free_page_chain(
    inner: &Inner,
    mem: &Mem,
    descs: &[Descriptor],
    at: Position,
    actions: &mut Actions,
) {
    let writable = descs.iter().filter(|d| d.is_write_only()).count();
    if writable != 0 && writable != descs.len() {
        inner.reject(
            RejectReason::WrongDirection,
            format_args!("free-page chain mixes out and in buffers"),
        );
        return;
    }
    if writable == 0 {
        // A command: exactly one out buffer of 4 bytes.
        let total: u64 = descs.iter().map(|d| u64::from(d.len())).sum();
        if descs.len() != 1 || total != 4 {
            inner.reject(
                RejectReason::CmdIdBufferSize,
                format_args!(
                    "free-page cmd_id buffer of {total} bytes in {} descriptors (want one of 4)",
                    descs.len()
                ),
            );
            return;
        }
        let bytes = match read_out(mem, descs) {
            Ok(b) => b,
            Err((reason, what)) => {
                inner.reject(reason, format_args!("free-page cmd_id {what}"));
                return;
            }
        };
        let cmd = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let mut st = lock(&inner.state);
        if CmdId(cmd).is_round() {
            // The fence: a chain queued before `cmd` was published held an
            // older id when the guest queued it (see `fence.rs`).
            let fenced = st.fences.queued_before(cmd, at.pos, at.size);
            let tag = if fenced {
                crate::FENCED_HINT_CMD_ID.0
            } else {
                cmd
            };
            st.open_batch = Some(Batch { tag, fenced });
            st.batch_ranges.clear();
            st.counters.hint_batches += 1;
            if fenced {
                st.counters.hint_batches_fenced += 1;
                tracing::info!(
                    cmd_id = cmd,
                    position = at.pos,
                    "balloon: hint batch queued before its cmd_id was published; its hints are dropped"
                );
            } else {
                tracing::debug!(
                    cmd_id = cmd,
                    current = st.config.free_page_hint_cmd_id,
                    "balloon: hint batch opened"
                );
            }
        } else {
            tracing::debug!(cmd_id = %CmdId(cmd), "balloon: hint batch closed");
            match st.open_batch {
                Some(b) if !b.fenced => {
                    st.last_closed_round = Some(b.tag);
                    if let Some((id, at)) = st.round_started {
                        if id == b.tag && st.round_report_ms.is_none_or(|(r, _)| r != id) {
                            st.round_report_ms = Some((id, at.elapsed().as_millis() as u64));
                        }
                    }
                }
                _ => {}
            }
            st.open_batch = None;
            st.batch_ranges.clear();
        }
        return;
    }
    let max_ranges = max_batch_ranges(memory_bytes(mem));
    for d in descs {
        let range = match check_desc(mem, d) {
            Ok(r) => r,
            Err((reason, r)) => {
                inner.reject(reason, format_args!("free-page hint {r}"));
                continue;
            }
        };
        let mut st = lock(&inner.state);
        let Some(Batch { tag: cmd, .. }) = st.open_batch else {
            drop(st);
            inner.reject(
                RejectReason::HintWithoutCmdId,
                format_args!("free-page hint {range} with no cmd_id batch open"),
            );
            continue;
        };
        match st.batch_ranges.insert_disjoint(
            range.start,
            range.start + range.len_bytes,
            max_ranges,
        ) {
            Inserted::Yes => {}
            Inserted::Overlaps => {
                drop(st);
                inner.reject(
                    RejectReason::OverlappingRange,
                    format_args!("free-page hint {range} overlaps an earlier hint of batch {cmd}"),
                );
                continue;
            }
            Inserted::Full => {
                drop(st);
                inner.reject(
                    RejectReason::BatchRangesFull,
                    format_args!(
                        "free-page hint {range}: batch {cmd} already holds {max_ranges} separate ranges"
                    ),
                );
                continue;
            }
        }
        actions.hints.push((cmd, range));
    }
}

/// One chain of the reporting queue: in buffers, each a free range.
fn reporting_chain(inner: &Inner, mem: &Mem, descs: &[Descriptor], actions: &mut Actions) {
    let poison = poison_active(&lock(&inner.state));
    let mut seen = RangeSet::default();
    for d in descs {
        if !d.is_write_only() {
            inner.reject(
                RejectReason::WrongDirection,
                format_args!("out buffer on the reporting queue"),
            );
            continue;
        }
        let range = match check_desc(mem, d) {
            Ok(r) => r,
            Err((reason, r)) => {
                inner.reject(reason, format_args!("reported range {r}"));
                continue;
            }
        };
        // Bounded by the chain's length.
        if seen.insert_disjoint(range.start, range.start + range.len_bytes, usize::MAX)
            != Inserted::Yes
        {
            inner.reject(
                RejectReason::OverlappingRange,
                format_args!("reported range {range} overlaps another of the same report"),
            );
            continue;
        }
        if poison {
            lock(&inner.state).counters.reported_skipped_poison += 1;
            continue;
        }
        match punch_hole(mem, range) {
            Ok(()) => actions.reported.push(range),
            Err(e) => {
                lock(&inner.state).counters.discard_errors += 1;
                tracing::warn!("balloon: cannot discard reported range {range}: {e}");
            }
        }
    }
}

/// One chain of the inflate or deflate queue: an array of le32 PFNs.
fn balloon_chain(inner: &Inner, mem: &Mem, descs: &[Descriptor], inflate: bool) {
    let what = if inflate { "inflate" } else { "deflate" };
    let bytes = match read_out(mem, descs) {
        Ok(b) => b,
        Err((reason, detail)) => {
            inner.reject(reason, format_args!("{what} {detail}"));
            return;
        }
    };
    if bytes.len() % 4 != 0 {
        inner.reject(
            RejectReason::PfnArraySize,
            format_args!("{what} PFN array of {} bytes", bytes.len()),
        );
        return;
    }
    let mut pfns = Vec::with_capacity(bytes.len() / 4);
    for c in bytes.chunks_exact(4) {
        let pfn = u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
        if !in_memory(mem, pfn * BALLOON_PAGE_BYTES, BALLOON_PAGE_BYTES) {
            inner.reject(
                RejectReason::DescOutsideMemory,
                format_args!("{what} PFN {pfn:#x} is outside guest memory"),
            );
            continue;
        }
        pfns.push(pfn);
    }
    if !inflate {
        let mut st = lock(&inner.state);
        for pfn in pfns {
            st.counters.deflated_pfns += 1;
            if !st.balloon.remove(&pfn) {
                st.counters.deflated_unknown_pfns += 1;
            }
        }
        return;
    }
    let poison = {
        let mut st = lock(&inner.state);
        for &pfn in &pfns {
            st.counters.inflated_pfns += 1;
            st.balloon.insert(pfn);
        }
        poison_active(&st)
    };
    if poison {
        return;
    }
    // Discard runs of contiguous pages.
    let mut sorted = pfns;
    sorted.sort_unstable();
    sorted.dedup();
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i + 1;
        while j < sorted.len() && sorted[j] == sorted[j - 1] + 1 {
            j += 1;
        }
        let range = GpaRange::new(
            sorted[i] * BALLOON_PAGE_BYTES,
            (j - i) as u64 * BALLOON_PAGE_BYTES,
        );
        if let Err(e) = punch_hole(mem, range) {
            lock(&inner.state).counters.discard_errors += 1;
            tracing::warn!("balloon: cannot discard inflated range {range}: {e}");
        }
        i = j;
    }
}

/// One chain of the stats queue. Returns whether the device keeps the
/// buffer (to return it when it wants fresh stats).
fn stats_chain(
    inner: &Inner,
    mem: &Mem,
    descs: &[Descriptor],
    head: u16,
    used: &mut Vec<u16>,
) -> bool {
    let bytes = match read_out(mem, descs) {
        Ok(b) => b,
        Err((reason, detail)) => {
            inner.reject(reason, format_args!("stats {detail}"));
            return false;
        }
    };
    if bytes.len() % 10 != 0 {
        inner.reject(
            RejectReason::StatsBufferSize,
            format_args!(
                "stats buffer of {} bytes is not a whole number of 10-byte entries",
                bytes.len()
            ),
        );
    }
    let mut st = lock(&inner.state);
    for e in bytes.chunks_exact(10) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        let mut v = [0u8; 8];
        v.copy_from_slice(&e[2..10]);
        st.stats.record(tag, u64::from_le_bytes(v));
    }
    st.stats.updates += 1;
    // The driver has one stats buffer; if it sent another while we hold
    // one, give the old one back.
    if let Some(old) = st.held_stats.replace(head) {
        used.push(old);
    }
    true
}

/// Returns the held stats buffer so that the guest sends fresh stats.
///
/// Not while the stats ring is stopped: the buffer then stays held (and
/// travels with [`crate::BalloonState`]); a used entry written now would
/// land after the final sync of a migration.
pub(crate) fn request_stats(inner: &Inner) -> Result<bool, BalloonError> {
    let Some(index) = layout::index_of(lock(&inner.state).acked_features, QueueRole::Stats) else {
        return Ok(false);
    };
    let Some(vring) = lock(&inner.vrings).get(index).cloned() else {
        return Ok(false);
    };
    let Some(gate) = inner.gates.get(index) else {
        return Ok(false);
    };
    let Some(_busy) = gate.enter() else {
        tracing::debug!("balloon: stats ring stopped; the stats buffer stays held");
        return Ok(false);
    };
    let Some(head) = lock(&inner.state).held_stats.take() else {
        return Ok(false);
    };
    return_used(inner, &vring, index, &[head]);
    if let (Some(log), Some(ring)) = (
        lock(&inner.vhost_log).as_ref(),
        crate::used_ring_range(&vring),
    ) {
        log.mark(ring);
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_set_refuses_overlaps() {
        let mut s = RangeSet::default();
        let mut insert = |a, b| s.insert_disjoint(a, b, usize::MAX) == Inserted::Yes;
        assert!(insert(100, 200));
        assert!(insert(200, 300));
        assert!(insert(0, 100));
        assert!(!insert(150, 160));
        assert!(!insert(50, 150));
        assert!(!insert(299, 400));
        assert!(!insert(0, 1000));
        assert!(insert(300, 301));
    }

    #[test]
    fn touching_ranges_are_one_entry_and_the_limit_counts_entries() {
        let mut s = RangeSet::default();
        // Contiguous blocks, in any order: one entry once the gaps close.
        for (a, b) in [(4, 8), (0, 4), (12, 16), (8, 12)] {
            assert_eq!(s.insert_disjoint(a, b, 2), Inserted::Yes);
        }
        assert_eq!(s.len(), 1);
        assert_eq!(s.insert_disjoint(2, 3, 1), Inserted::Overlaps);
        // A separate range beyond the limit is refused, one that touches
        // is not.
        assert_eq!(s.insert_disjoint(20, 24, 1), Inserted::Full);
        assert_eq!(s.insert_disjoint(16, 20, 1), Inserted::Yes);
        assert_eq!(s.insert_disjoint(30, 40, 2), Inserted::Yes);
        assert_eq!(s.len(), 2);
        // Filling the gap joins both sides into one.
        assert_eq!(s.insert_disjoint(20, 30, 2), Inserted::Yes);
        assert_eq!(s.len(), 1);
        assert_eq!(s.insert_disjoint(0, 40, 9), Inserted::Overlaps);
        assert_eq!(s.insert_disjoint(39, 41, 9), Inserted::Overlaps);
        assert_eq!(s.insert_disjoint(40, 41, 9), Inserted::Yes);
    }

    #[test]
    fn a_batch_keeps_one_range_per_8_mib_of_memory_plus_1024() {
        assert_eq!(max_batch_ranges(0), 1024);
        assert_eq!(max_batch_ranges(2 << 30), 256 + 1024);
        assert_eq!(
            max_batch_ranges(u64::MAX),
            (u64::MAX / (8 << 20)) as usize + 1024
        );
    }
}
