use serde::{Deserialize, Serialize};

use crate::Phase;

/// Everything measured about one migration. Every field name carries its
/// unit; the same names appear in the JSON, the logs and the summary.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationStats {
    /// What carried the migration's connections.
    #[serde(default)]
    pub transport: TransportKind,
    /// Bytes written to all sockets, headers included.
    pub bytes_on_wire: u64,
    /// Pages sent with their data.
    pub pages_sent: u64,
    /// Pages sent as zero records (zero content, never populated, or
    /// discarded by free page reporting), without data.
    pub pages_zero: u64,
    /// Pages sent as fill records (free pages of a guest that poisons
    /// them: every byte the poison byte), without data.
    #[serde(default)]
    pub pages_filled: u64,
    /// Pages free-page hints cleared before they were sent.
    pub pages_skipped_free: u64,
    /// Pages free page reporting discarded before they were sent.
    pub pages_skipped_reported: u64,
    /// Bytes of guest memory covered by applied hints.
    pub hinted_bytes: u64,
    /// Hint ranges dropped because their cmd_id was not the open epoch.
    pub hint_ranges_dropped_stale: u64,
    /// Hint ranges rejected as outside guest RAM, empty or wrapping.
    pub hint_ranges_rejected_invalid: u64,
    /// Time spent waiting for the guest's first free-page report before
    /// round 1 (part of `total_time_ms`).
    pub hint_wait_ms: u64,
    /// What supplied the free-page hints: `balloon` (the guest's
    /// virtio_balloon driver), `agent` (freehint's guest agent), `sim`;
    /// `null` with hints off.
    #[serde(default)]
    pub hint_source: Option<String>,
    /// How long the guest took to report its free memory the first time,
    /// from the request to the end of its report; `null` if it never ended
    /// it or the source cannot tell.
    #[serde(default)]
    pub hint_report_ms: Option<u64>,
    /// What the guest sent its hint source that broke the protocol or was
    /// out of bounds (dropped and counted; the migration went on).
    #[serde(default)]
    pub hint_guest_errors: u64,
    /// How long the guest took to prepare (`--guest-drop-caches`,
    /// `--guest-compact`, before the first report; part of
    /// `total_time_ms` of the command, not of the engine's); `null` if
    /// not asked.
    #[serde(default)]
    pub guest_prepare_ms: Option<u64>,
    /// Guest memory that preparing made free (MemFree after − before).
    #[serde(default)]
    pub guest_prepare_freed_bytes: Option<u64>,
    /// Time waited after the last live round, before stopping the VM, for
    /// the bulk sockets to deliver the bytes they still held (part of
    /// `total_time_ms`, never of the downtime: what is still in flight when
    /// the VM stops would otherwise cross the link during the downtime).
    #[serde(default)]
    pub drain_wait_ms: u64,
    /// Precopy rounds, the final stopped one included.
    pub rounds: u32,
    /// From the first connection to the destination's confirmation.
    pub total_time_ms: u64,
    /// From stopping the VM to the destination's confirmation.
    pub downtime_ms: u64,
    /// Where the downtime went, step by step.
    #[serde(default)]
    pub downtime_breakdown: DowntimeBreakdown,
    /// Bytes the final (stopped) round sent.
    pub final_round_bytes: u64,
    /// Dirty-log syncs done.
    pub syncs: u32,
    /// Longest sync (dirty log scan plus bitmap merge, under the lock).
    pub sync_max_us: u64,
    /// Mean sync time.
    pub sync_mean_us: u64,
    /// Bandwidth of the busiest round, MiB/s.
    pub peak_bandwidth_mib_per_s: f64,
    /// Size of guest RAM.
    pub guest_ram_bytes: u64,
    /// Bytes of VMM device state handed over.
    pub device_state_bytes: u64,
    /// Bytes the device state took on the wire (compressed on slow links).
    pub device_state_wire_bytes: u64,
    /// Postcopy's figures (all zero and `postcopy: false` if the
    /// migration never switched).
    #[serde(flatten)]
    pub postcopy: PostcopyStats,
    /// How the migration ended: `completed`, `failed` or `uncertain`.
    pub state: Phase,
    /// Whether the source VM runs the guest at the end.
    pub source_running: bool,
    /// Whether the destination runs the guest at the end, as far as this
    /// side knows (`null` when the outcome is uncertain).
    pub destination_running: Option<bool>,
}

/// What carries a migration's connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// Plain TCP (`--insecure`): neither encrypted nor authenticated.
    #[default]
    Tcp,
    /// TLS 1.3 with mutual x509 authentication, over TCP.
    Tls,
    /// RDMA (rdma_cm, SEND messages and RDMA READ of guest pages):
    /// neither encrypted nor authenticated.
    Rdma,
}

/// What postcopy measured, the same on either side (the source gets the
/// destination's fault figures in its `PostcopyComplete`). Flattened into
/// [`MigrationStats`] and [`crate::ReceiveStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PostcopyStats {
    /// Whether the migration switched to postcopy (the guest resumed on the
    /// destination before all its RAM had arrived).
    #[serde(rename = "postcopy")]
    pub switched: bool,
    /// Pages still to come at the switch.
    pub postcopy_pending_pages: u64,
    /// Pages sent on the urgent channel, in answer to a request (on the
    /// source: taken to be sent, a write a broken link cut short included;
    /// on the destination: placed).
    pub pages_requested: u64,
    /// Pages sent on the urgent channel after a requested one, unasked:
    /// the pages following it that were still pending (a few KiB; see
    /// `READ_AHEAD_BYTES`), counted as `pages_requested`.
    pub pages_read_ahead: u64,
    /// Pages sent on the bulk channels during postcopy (counted as
    /// `pages_requested`).
    pub pages_streamed: u64,
    /// Of the source's pages requested, read ahead or streamed, those sent
    /// again after a reconnect: the destination had not placed them when
    /// the link broke. Requested + read ahead + streamed − resent =
    /// pending.
    pub pages_resent: u64,
    /// Faults answered by the source (page requests).
    pub faults_remote: u64,
    /// Faults on pages free or zero at the switch, resolved on the
    /// destination with no round trip.
    pub faults_local: u64,
    /// Median time on the destination from a remote fault to its wake-up,
    /// µs.
    pub fault_latency_us_p50: u64,
    /// 99th percentile of the same, µs.
    pub fault_latency_us_p99: u64,
    /// Longest of the same, µs.
    pub fault_latency_us_max: u64,
    /// From the destination's resume to its last page placed (on the
    /// source: to the destination's confirmation).
    pub postcopy_ms: u64,
    /// Times the link broke during postcopy and the two sides reconnected.
    pub postcopy_reconnects: u32,
}

impl PostcopyStats {
    /// Takes the destination's fault figures.
    pub(crate) fn take_faults(&mut self, r: &freehint_wire::PostcopyReport) {
        self.faults_remote = r.faults_remote;
        self.faults_local = r.faults_local;
        self.fault_latency_us_p50 = r.fault_latency_us_p50;
        self.fault_latency_us_p99 = r.fault_latency_us_p99;
        self.fault_latency_us_max = r.fault_latency_us_max;
    }
}

/// The downtime of a migration, step by step, in the order they happen on
/// the source (each from the end of the one before). Their sum is the
/// source's `downtime_ms`, to rounding.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DowntimeBreakdown {
    /// Stopping the VM (`Vmm::stop`: QEMU's `stop`, the devices quiesced).
    pub stop_us: u64,
    /// The final dirty-log sync and round, and closing the bulk channels.
    pub final_round_us: u64,
    /// Taking the VMM's device state (`Vmm::device_state`).
    pub device_state_save_us: u64,
    /// Sending the device state and `Complete`.
    pub device_state_send_us: u64,
    /// Waiting for the destination's `Ready`: it places the last pages and
    /// loads the device state.
    pub load_us: u64,
    /// Sending `Commit` until the destination's `Resumed`: it resumes the
    /// guest.
    pub resume_us: u64,
}

impl MigrationStats {
    /// A one-line human summary.
    pub fn summary(&self) -> String {
        format!(
            "{}: {:.1} MiB of RAM, {:.1} MiB on the wire in {} ms ({} ms downtime), {} rounds; \
             {} pages sent, {} zero, {} skipped as free (hints), {} stale hints dropped",
            self.state,
            self.guest_ram_bytes as f64 / 1048576.0,
            self.bytes_on_wire as f64 / 1048576.0,
            self.total_time_ms,
            self.downtime_ms,
            self.rounds,
            self.pages_sent,
            self.pages_zero,
            self.pages_skipped_free,
            self.hint_ranges_dropped_stale
        )
    }
}
