//! The freehint host engine.
//!
//! * [`PrecopySender`] walks the [`HintFilter`]'s migration bitmap in
//!   rounds, sends pages over several TCP channels, syncs the
//!   [`DirtyLog`] between rounds (opening a new hint epoch each time), and
//!   switches over through a [`Vmm`] when the bandwidth estimate says the
//!   rest fits in the downtime target.
//! * The collaborators it drives are traits of the bottom crate,
//!   `freehint-types`: [`Vmm`] and [`DestinationVmm`] (QEMU, the simulated
//!   VM, a bare image: [`ImageVmm`]), [`HintSource`] and [`HintSink`] (the
//!   balloon device).
//! * [`Receiver`] accepts one migration, places pages in the destination's
//!   guest RAM, and resumes the guest only once the source commits.
//! * [`Phase`] / [`PhaseWatch`]: where a migration is, on either side; the
//!   handover in which exactly one side may run the guest.
//! * [`fault`]: named fault points for tests (`failpoints` feature).
//! * [`MigrationParams`] is the one validated parameter set;
//!   [`MigrationStats`] the one stats struct, with units in every field.
//!
//! [`HintFilter`]: freehint_hint_filter::HintFilter
//! [`Vmm`]: freehint_types::Vmm
//! [`DestinationVmm`]: freehint_types::DestinationVmm
//! [`HintSource`]: freehint_types::HintSource
//! [`HintSink`]: freehint_types::HintSink
//! [`DirtyLog`]: freehint_dirty_log::DirtyLog

#![deny(missing_docs)]

mod error;
pub mod fault;
mod io;
mod page_set;
mod params;
mod phase;
mod postcopy;
mod progress;
mod receiver;
mod sender;
mod stats;
mod transport;
mod vmm;

pub use error::{MigrateError, MigrationFailure};
/// Listens for sources over RDMA ([`Listener::Rdma`]).
#[cfg(feature = "rdma")]
pub use freehint_rdma::RdmaListener;
pub use params::{MigrationMode, MigrationParams, ParamsError};
pub use phase::{Phase, PhaseInfo, PhaseWatch, Side};
pub use postcopy::PostcopyResume;
pub use progress::{Progress, ProgressWatch};
pub use receiver::{ReceiveFailure, ReceiveStats, Receiver};
pub use sender::PrecopySender;
pub use stats::{DowntimeBreakdown, MigrationStats, PostcopyStats, TransportKind};
pub use tokio_util::sync::CancellationToken;
pub use transport::tls::{self, TlsConfig, TlsError};
pub use transport::{Endpoint, Listener, Scheme};
pub use vmm::ImageVmm;

use freehint_dirty_log::{find_mappings, TrackedRange};
use freehint_hint_filter::{MigrationBitmap, RegionLayout};
use freehint_memory::GuestRam;
use freehint_wire::RegionDesc;

/// The wire description of a guest RAM layout.
pub fn region_descs(ram: &GuestRam) -> Vec<RegionDesc> {
    ram.regions()
        .iter()
        .map(|r| RegionDesc {
            ram_start: r.ram_start(),
            size_bytes: r.size_bytes(),
            page_bytes: r.page_bytes(),
        })
        .collect()
}

/// The VMM's mappings of `ram`'s files (from `/proc/PID/maps`) as ranges
/// for the dirty log, each tagged with its region and first page.
pub fn vmm_ram_ranges(pid: i32, ram: &GuestRam) -> Result<Vec<TrackedRange>, MigrateError> {
    let mut ranges = Vec::new();
    for (idx, region) in ram.regions().iter().enumerate() {
        let path = region.path().ok_or_else(|| {
            MigrateError::Unexpected(format!(
                "RAM region {idx} has no file path, so it cannot be found in process {pid}"
            ))
        })?;
        let page = region.page_bytes();
        let (lo, hi) = (
            region.file_offset_bytes(),
            region.file_offset_bytes() + region.size_bytes(),
        );
        for m in find_mappings(pid, path)? {
            let start = m.file_offset.max(lo);
            let end = (m.file_offset + (m.end - m.start)).min(hi);
            if start >= end {
                continue;
            }
            ranges.push(TrackedRange {
                region: idx,
                vaddr_start: m.start + (start - m.file_offset),
                len_bytes: end - start,
                page_bytes: page,
                first_page: (start - lo) / page,
            });
        }
    }
    if ranges.is_empty() {
        return Err(MigrateError::Unexpected(format!(
            "process {pid} does not map its RAM file; is it the VMM, and is the file its memory backend?"
        )));
    }
    Ok(ranges)
}

/// Socket buffer size for migration connections: large enough that a
/// sender never waits on a receiver that is busy placing the last batch.
pub(crate) const SOCKET_BUFFER_BYTES: usize = 8 << 20;

/// Sets the options every migration connection uses: no Nagle delay, large
/// buffers, TCP keepalive (a peer whose host vanished is noticed even on an
/// idle channel) and a user timeout of `peer_timeout` (data the peer does
/// not acknowledge for that long fails the connection).
pub(crate) fn tune_socket(
    s: &tokio::net::TcpStream,
    peer_timeout: std::time::Duration,
) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let sock = socket2::SockRef::from(s);
    sock.set_send_buffer_size(SOCKET_BUFFER_BYTES)?;
    sock.set_recv_buffer_size(SOCKET_BUFFER_BYTES)?;
    let idle = (peer_timeout / 3).max(std::time::Duration::from_secs(1));
    sock.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(idle)
            .with_interval(std::time::Duration::from_secs(1))
            .with_retries(3),
    )?;
    sock.set_tcp_user_timeout(Some(peer_timeout))?;
    Ok(())
}

/// The DiffServ code point of postcopy's urgent channel: Expedited
/// Forwarding (RFC 3246), the class networks queue apart from and ahead of
/// bulk traffic. Its page requests and their answers are small and each
/// one stalls a guest vCPU, so a link that honours the mark never queues
/// them behind the bulk stream.
pub const URGENT_DSCP: u8 = 46;

/// Linux's queueing priority for the urgent channel's packets
/// (`TC_PRIO_INTERACTIVE`): the first band of the host's own qdiscs
/// (`pfifo_fast`, `prio`); a value below 7 needs no privilege.
const URGENT_SOCKET_PRIORITY: u32 = 6;

/// Marks a connection as postcopy's urgent channel: DSCP [`URGENT_DSCP`] in
/// every packet it sends, and the host's interactive queueing priority.
/// Marking is a hint to the network; a host that refuses it (a policy, a
/// socket family without the option) only logs why.
pub(crate) fn mark_urgent(s: &tokio::net::TcpStream) {
    let sock = socket2::SockRef::from(s);
    let tos = u32::from(URGENT_DSCP) << 2;
    let marked = match s.local_addr() {
        Ok(std::net::SocketAddr::V6(_)) => sock.set_tclass_v6(tos),
        _ => sock.set_tos(tos),
    }
    .and_then(|()| set_socket_priority(s, URGENT_SOCKET_PRIORITY));
    if let Err(e) = marked {
        tracing::warn!("could not mark the urgent channel for low-delay queueing: {e}");
    }
}

/// `SO_PRIORITY` (socket2 has no setter for it).
fn set_socket_priority(s: &tokio::net::TcpStream, priority: u32) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let value = priority as libc::c_int;
    // SAFETY: the descriptor is the stream's own, open for the call; the
    // option value is a c_int on our stack, passed with its size, which the
    // kernel only reads.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PRIORITY,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// An empty migration bitmap shaped like `ram`.
pub fn empty_bitmap(ram: &GuestRam) -> MigrationBitmap {
    MigrationBitmap::new(
        ram.regions()
            .iter()
            .map(|r| RegionLayout {
                ram_start: r.ram_start(),
                page_bytes: r.page_bytes(),
                pages: r.pages(),
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_urgent_channel_carries_dscp_ef_and_the_interactive_priority() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let plain = socket2::SockRef::from(&client);
        assert_eq!(plain.tos().unwrap(), 0, "unmarked before");
        mark_urgent(&client);
        assert_eq!(plain.tos().unwrap(), 0xb8, "DSCP 46 in the TOS byte");
        let mut priority: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: the descriptor is the stream's own; the kernel writes at
        // most `len` bytes into `priority`, a c_int on our stack.
        let rc = unsafe {
            libc::getsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&client),
                libc::SOL_SOCKET,
                libc::SO_PRIORITY,
                (&mut priority as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0);
        assert_eq!(priority, URGENT_SOCKET_PRIORITY as libc::c_int);
    }
}
