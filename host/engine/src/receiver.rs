//! The receiving side: accepts one migration and places its pages.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use freehint_memory::GuestRam;
use freehint_wire::{ChannelRole, Hello, Kind, Message, PageBatchHead, ZeroRun, ENTRY_ZERO};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Barrier;
use tokio::task::JoinSet;

use crate::io::{expect_message, read_exact, read_header, write_message};
use crate::{region_descs, DestinationVmm, MigrateError};

/// What the receiver measured.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReceiveStats {
    /// Bytes read from all sockets.
    pub bytes_received: u64,
    /// Pages written with data from the source.
    pub pages_placed: u64,
    /// Pages the source declared zero.
    pub pages_zero: u64,
    /// Rounds received, the final one included.
    pub rounds: u32,
    /// From the first connection to resuming the VM.
    pub total_time_ms: u64,
}

/// Pages of the destination's RAM that hold data (so that a zero record for
/// them must clear them), one bit per page, shared by the bulk channels.
struct WrittenMap {
    words: Vec<Vec<AtomicU64>>,
}

impl WrittenMap {
    fn new(ram: &GuestRam) -> Result<Self, MigrateError> {
        let mut words = Vec::new();
        for r in ram.regions() {
            let w: Vec<AtomicU64> = (0..r.pages().div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect();
            for range in r.data_page_ranges()? {
                for p in range {
                    w[(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::Relaxed);
                }
            }
            words.push(w);
        }
        Ok(Self { words })
    }

    fn mark(&self, region: usize, page: u64) {
        self.words[region][(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Relaxed);
    }

    /// Clears the mark and says whether it was set.
    fn take(&self, region: usize, page: u64) -> bool {
        let bit = 1u64 << (page % 64);
        self.words[region][(page / 64) as usize].fetch_and(!bit, Ordering::Relaxed) & bit != 0
    }
}

/// Accepts one migration into `ram`.
pub struct Receiver {
    ram: Arc<GuestRam>,
    vmm: Arc<dyn DestinationVmm>,
    timeout: Duration,
    preallocate: bool,
    written: Option<Arc<WrittenMap>>,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver").finish_non_exhaustive()
    }
}

struct BulkCtx {
    /// Read page data straight into the mapping (its pages are populated,
    /// so this costs no faults); otherwise read into a buffer and `pwrite`.
    direct: bool,
    ram: Arc<GuestRam>,
    written: Arc<WrittenMap>,
    barrier: Arc<Barrier>,
    bytes: Arc<AtomicU64>,
    pages_placed: Arc<AtomicU64>,
    pages_zero: Arc<AtomicU64>,
}

impl Receiver {
    /// A receiver that places pages into `ram` and hands the VM to `vmm`.
    /// `timeout` bounds every wait for the source.
    pub fn new(ram: Arc<GuestRam>, vmm: Arc<dyn DestinationVmm>, timeout: Duration) -> Self {
        Self {
            ram,
            vmm,
            timeout,
            preallocate: false,
            written: None,
        }
    }

    /// Allocate all of the destination's RAM before the source connects
    /// (like QEMU's `-mem-prealloc`), so that placing pages costs no
    /// allocation during the migration.
    pub fn preallocate(mut self, yes: bool) -> Self {
        self.preallocate = yes;
        self
    }

    /// Surveys the destination RAM and preallocates it if asked to, before
    /// any source connects; [`Self::receive`] does it itself otherwise.
    pub fn prepare(&mut self) -> Result<(), MigrateError> {
        self.written = Some(Self::survey(&self.ram, self.preallocate)?);
        Ok(())
    }

    /// Which pages hold data before anything arrives (a zero record for
    /// them must clear them); taken before preallocation, which only adds
    /// zero pages.
    fn survey(ram: &GuestRam, preallocate: bool) -> Result<Arc<WrittenMap>, MigrateError> {
        let written = Arc::new(WrittenMap::new(ram)?);
        if preallocate {
            for r in ram.regions() {
                r.preallocate()?;
            }
        }
        Ok(written)
    }

    /// Accepts connections on `listener` until one migration has completed
    /// (or failed). The VM is resumed only if every page arrived.
    pub async fn receive(&self, listener: &TcpListener) -> Result<ReceiveStats, MigrateError> {
        let written = match &self.written {
            Some(w) => w.clone(),
            None => Self::survey(&self.ram, self.preallocate)?,
        };
        let started = Instant::now();
        let local = region_descs(&self.ram);
        // The control channel comes first, then the bulk channels it
        // announces, all with the same session id.
        let (mut control, hello) = self.accept(listener, None, &local).await?;
        let n = hello.bulk_channels as usize;
        if n == 0 {
            return Err(MigrateError::Unexpected(
                "source announced zero bulk channels".into(),
            ));
        }
        let mut bulk: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
        while bulk.iter().any(|b| b.is_none()) {
            let (s, h) = self
                .accept(listener, Some(hello.session_id), &local)
                .await?;
            match h.role {
                ChannelRole::Bulk(i) if (i as usize) < n && bulk[i as usize].is_none() => {
                    bulk[i as usize] = Some(s)
                }
                role => {
                    return Err(MigrateError::Unexpected(format!(
                        "unexpected {role:?} connection while waiting for bulk channels"
                    )))
                }
            }
        }
        let ctx = BulkCtx {
            direct: self.preallocate,
            ram: self.ram.clone(),
            written,
            barrier: Arc::new(Barrier::new(n)),
            bytes: Arc::new(AtomicU64::new(0)),
            pages_placed: Arc::new(AtomicU64::new(0)),
            pages_zero: Arc::new(AtomicU64::new(0)),
        };
        let mut tasks = JoinSet::new();
        for (i, s) in bulk.into_iter().enumerate() {
            let s = s.expect("filled above");
            tasks.spawn(receive_bulk(
                i,
                BufReader::with_capacity(256 << 10, s),
                BulkCtx {
                    direct: ctx.direct,
                    ram: ctx.ram.clone(),
                    written: ctx.written.clone(),
                    barrier: ctx.barrier.clone(),
                    bytes: ctx.bytes.clone(),
                    pages_placed: ctx.pages_placed.clone(),
                    pages_zero: ctx.pages_zero.clone(),
                },
            ));
        }
        let result = self.finish(&mut control, &mut tasks, &ctx, started).await;
        if let Err(e) = &result {
            tasks.abort_all();
            let _ = write_message(&mut control, &Message::Error(e.to_string()), "control").await;
        }
        result
    }

    async fn finish(
        &self,
        control: &mut TcpStream,
        tasks: &mut JoinSet<Result<u32, MigrateError>>,
        ctx: &BulkCtx,
        started: Instant,
    ) -> Result<ReceiveStats, MigrateError> {
        // Control messages arrive only at the end; meanwhile any bulk
        // channel failing ends the migration.
        let mut device_state = None;
        let rounds = loop {
            tokio::select! {
                msg = crate::io::read_message(control, "control channel") => {
                    match msg? {
                        Some(Message::DeviceState(s)) => device_state = Some(s),
                        Some(Message::Complete { rounds }) => break rounds,
                        Some(Message::Error(e)) => return Err(MigrateError::Peer(e)),
                        Some(other) => return Err(MigrateError::Unexpected(format!(
                            "control channel: unexpected {:?}", other.kind()))),
                        None => return Err(MigrateError::Unexpected(
                            "source disconnected before completing the migration".into())),
                    }
                }
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    // A channel ended before completion: fine if it ended
                    // cleanly (the source closes bulk channels before it
                    // sends Complete), fatal otherwise.
                    flatten(done)?;
                }
            }
        };
        let mut last_rounds = Vec::new();
        while let Some(done) = tokio::time::timeout(self.timeout, tasks.join_next())
            .await
            .map_err(|_| MigrateError::Timeout {
                what: "bulk channels to finish".into(),
                seconds: self.timeout.as_secs(),
            })?
        {
            last_rounds.push(flatten(done)?);
        }
        if last_rounds.iter().any(|&r| r != rounds) {
            return Err(MigrateError::Unexpected(format!(
                "source completed after {rounds} rounds but a bulk channel ended at round {:?}",
                last_rounds
            )));
        }
        self.vmm
            .load_device_state(&device_state.unwrap_or_default())?;
        self.vmm.resume()?;
        write_message(control, &Message::Resumed, "control channel").await?;
        Ok(ReceiveStats {
            bytes_received: ctx.bytes.load(Ordering::Relaxed),
            pages_placed: ctx.pages_placed.load(Ordering::Relaxed),
            pages_zero: ctx.pages_zero.load(Ordering::Relaxed),
            rounds,
            total_time_ms: started.elapsed().as_millis() as u64,
        })
    }

    async fn accept(
        &self,
        listener: &TcpListener,
        session: Option<u64>,
        local: &[freehint_wire::RegionDesc],
    ) -> Result<(TcpStream, Hello), MigrateError> {
        let what = if session.is_none() {
            "the source to connect"
        } else {
            "the source's bulk channels"
        };
        let (mut s, peer) = tokio::time::timeout(self.timeout, listener.accept())
            .await
            .map_err(|_| MigrateError::Timeout {
                what: what.into(),
                seconds: self.timeout.as_secs(),
            })?
            .map_err(MigrateError::io("accepting a connection"))?;
        crate::tune_socket(&s).map_err(MigrateError::io("socket option"))?;
        let ctx = format!("hello from {peer}");
        let hello = match expect_message(&mut s, &ctx, self.timeout).await? {
            Message::Hello(h) => h,
            other => {
                return Err(MigrateError::Unexpected(format!(
                    "{ctx}: expected hello, got {:?}",
                    other.kind()
                )))
            }
        };
        if let Some(id) = session {
            if hello.session_id != id {
                return Err(MigrateError::Unexpected(
                    reject(
                        &mut s,
                        format!("{ctx}: connection from another migration session"),
                    )
                    .await,
                ));
            }
        } else if hello.role != ChannelRole::Control {
            return Err(MigrateError::Unexpected(
                reject(
                    &mut s,
                    format!("{ctx}: first connection must be the control channel"),
                )
                .await,
            ));
        }
        if hello.regions != local {
            return Err(MigrateError::Layout(
                reject(
                    &mut s,
                    format!(
                        "source has {:?}, destination has {:?}",
                        hello.regions, local
                    ),
                )
                .await,
            ));
        }
        write_message(&mut s, &Message::HelloAck, &ctx).await?;
        Ok((s, hello))
    }
}

/// Tells the peer why it is turned away; returns the reason.
async fn reject(s: &mut TcpStream, why: String) -> String {
    let _ = write_message(s, &Message::Error(why.clone()), "rejecting a connection").await;
    why
}

fn flatten(
    r: Result<Result<u32, MigrateError>, tokio::task::JoinError>,
) -> Result<u32, MigrateError> {
    r.map_err(|e| MigrateError::Unexpected(format!("bulk channel task failed: {e}")))?
}

/// Receives one bulk channel until the source closes it; returns the last
/// round it completed.
async fn receive_bulk<R: AsyncRead + Unpin>(
    index: usize,
    mut r: R,
    ctx: BulkCtx,
) -> Result<u32, MigrateError> {
    let name = format!("bulk channel {index}");
    let mut round = 0u32;
    let mut entries_raw = Vec::new();
    let mut data: Vec<u8> = Vec::new();
    loop {
        let Some(h) = read_header(&mut r, &name).await? else {
            return Ok(round);
        };
        ctx.bytes.fetch_add(16 + h.payload_bytes, Ordering::Relaxed);
        match h.kind {
            Kind::PageBatch => {
                let mut counts = [0u8; 8];
                read_exact(&mut r, &mut counts, &name).await?;
                let (region_idx, count) = PageBatchHead::decode_counts(&counts, h.payload_bytes)
                    .map_err(MigrateError::protocol(name.clone()))?;
                let region = ctx.ram.regions().get(region_idx as usize).ok_or_else(|| {
                    MigrateError::Unexpected(format!(
                        "{name}: page batch for region {region_idx}, which does not exist"
                    ))
                })?;
                entries_raw.resize(count as usize * 8, 0);
                read_exact(&mut r, &mut entries_raw, &name).await?;
                let head = PageBatchHead::decode_entries(
                    region_idx,
                    &entries_raw,
                    h.payload_bytes,
                    region.page_bytes(),
                    region.pages(),
                )
                .map_err(MigrateError::protocol(name.clone()))?;
                let page_bytes = region.page_bytes() as usize;
                if !ctx.direct {
                    data.resize(head.data_pages() as usize * page_bytes, 0);
                    read_exact(&mut r, &mut data, &name).await?;
                }
                // Place runs of consecutive pages with one write each.
                let mut at = 0usize;
                let mut k = 0;
                let entries = &head.entries;
                while k < entries.len() {
                    let e = entries[k];
                    let page = e & !ENTRY_ZERO;
                    if e & ENTRY_ZERO != 0 {
                        if ctx.written.take(region_idx as usize, page) {
                            region.punch_hole(page..page + 1)?;
                        }
                        ctx.pages_zero.fetch_add(1, Ordering::Relaxed);
                        k += 1;
                        continue;
                    }
                    let mut run = 1;
                    while k + run < entries.len() && entries[k + run] == page + run as u64 {
                        run += 1;
                    }
                    if ctx.direct {
                        let ptr = region.page_ptr(page).expect("checked by decode_entries");
                        // SAFETY: pages page..page+run lie inside the
                        // mapping (decode_entries checked every entry, and
                        // the run is consecutive entries). The destination
                        // VM is not running, and within a round no other
                        // channel touches these pages (each page is sent at
                        // most once a round; rounds end with a barrier).
                        let dst = unsafe { std::slice::from_raw_parts_mut(ptr, run * page_bytes) };
                        read_exact(&mut r, dst, &name).await?;
                    } else {
                        region.write_pages(page, &data[at..at + run * page_bytes])?;
                    }
                    for p in page..page + run as u64 {
                        ctx.written.mark(region_idx as usize, p);
                    }
                    ctx.pages_placed.fetch_add(run as u64, Ordering::Relaxed);
                    at += run * page_bytes;
                    k += run;
                }
            }
            Kind::ZeroRun => {
                let mut payload = vec![0u8; h.payload_bytes as usize];
                read_exact(&mut r, &mut payload, &name).await?;
                let Message::Zero(z) = Message::decode(h.kind, &payload)
                    .map_err(MigrateError::protocol(name.clone()))?
                else {
                    unreachable!("a zero-run frame decodes to Message::Zero")
                };
                place_zero_run(&ctx, z, &name)?;
            }
            Kind::RoundEnd => {
                let mut payload = vec![0u8; h.payload_bytes as usize];
                read_exact(&mut r, &mut payload, &name).await?;
                let Message::RoundEnd { round: got } = Message::decode(h.kind, &payload)
                    .map_err(MigrateError::protocol(name.clone()))?
                else {
                    unreachable!("a round-end frame decodes to Message::RoundEnd")
                };
                if got != round + 1 {
                    return Err(MigrateError::Unexpected(format!(
                        "{name}: round {got} ended, expected round {}",
                        round + 1
                    )));
                }
                round = got;
                // No channel starts placing round r+1 before every channel
                // has placed round r: a page resent in r+1 on another
                // channel must not be overwritten by its older copy.
                ctx.barrier.wait().await;
            }
            other => {
                return Err(MigrateError::Unexpected(format!(
                    "{name}: unexpected {other:?} frame on a bulk channel"
                )))
            }
        }
    }
}

fn place_zero_run(ctx: &BulkCtx, z: ZeroRun, name: &str) -> Result<(), MigrateError> {
    let region = ctx.ram.regions().get(z.region as usize).ok_or_else(|| {
        MigrateError::Unexpected(format!(
            "{name}: zero run for region {} which does not exist",
            z.region
        ))
    })?;
    let end = z
        .first_page
        .checked_add(z.count)
        .filter(|&e| e <= region.pages() && z.count > 0);
    let Some(end) = end else {
        return Err(MigrateError::Unexpected(format!(
            "{name}: zero run {}+{} is beyond region {} ({} pages)",
            z.first_page,
            z.count,
            z.region,
            region.pages()
        )));
    };
    let mut p = z.first_page;
    while p < end {
        if !ctx.written.take(z.region as usize, p) {
            p += 1;
            continue;
        }
        // Gather the run of written pages and discard it from the file.
        let start = p;
        p += 1;
        while p < end && ctx.written.take(z.region as usize, p) {
            p += 1;
        }
        region.punch_hole(start..p)?;
    }
    ctx.pages_zero.fetch_add(z.count, Ordering::Relaxed);
    Ok(())
}
