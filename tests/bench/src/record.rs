//! The suite's report: one [`RunRecord`] per run (measured, failed or
//! skipped), in a [`SuiteReport`] written as JSON by `freehint-bench
//! --json OUT` and read by `freehint-bench report`.

use serde::{Deserialize, Serialize};

pub use freehint_demo::Mode;

/// An idle-heavy guest: what the guest did before it is migrated.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Profile {
    /// Booted, idle.
    Fresh,
    /// 1.4 GB written, all but 128 MiB freed (the demo's guest).
    AfterJob,
    /// 1.4 GB touched in 4 KiB pages, then every other 64 KiB unmapped:
    /// free memory mostly in blocks smaller than 4 MiB.
    Fragmented,
    /// 1 GiB of files read from a virtio-blk disk (shared storage), then
    /// idle: memory held as page cache.
    PageCache,
    /// A 64 MiB hot set rewritten at 16 MiB/s, also during the migration.
    BusyIdle,
}

impl Profile {
    /// Every profile, in report order.
    pub const ALL: [Profile; 5] = [
        Profile::Fresh,
        Profile::AfterJob,
        Profile::Fragmented,
        Profile::PageCache,
        Profile::BusyIdle,
    ];

    /// The name in reports and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Profile::Fresh => "fresh",
            Profile::AfterJob => "after-job",
            Profile::Fragmented => "fragmented",
            Profile::PageCache => "page-cache",
            Profile::BusyIdle => "busy-idle",
        }
    }
}

/// The link between the two namespaces: a veth pair shaped with `tc`.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
pub enum Link {
    /// No shaping.
    #[serde(rename = "unlimited")]
    #[value(name = "unlimited")]
    Unlimited,
    /// `tbf rate 10gbit` each way.
    #[serde(rename = "10gbit")]
    #[value(name = "10gbit")]
    Gbit10,
    /// `tbf rate 1gbit` each way.
    #[serde(rename = "1gbit")]
    #[value(name = "1gbit")]
    Gbit1,
}

impl Link {
    /// The name in reports and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Link::Unlimited => "unlimited",
            Link::Gbit10 => "10gbit",
            Link::Gbit1 => "1gbit",
        }
    }

    /// The `tc tbf` rate, `None` for no shaping.
    pub fn rate_bits_per_s(self) -> Option<u64> {
        match self {
            Link::Unlimited => None,
            Link::Gbit10 => Some(10_000_000_000),
            Link::Gbit1 => Some(1_000_000_000),
        }
    }
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunStatus {
    /// Measured (look at `alive` and `data_check` for the guest's health).
    Ok,
    /// The run failed; `reason` says why.
    Failed,
    /// Not run; `reason` says why (e.g. it does not fit in this machine's
    /// memory).
    Skipped,
}

/// One run of the suite: one object of the JSON report. Every figure is
/// measured the same way for every mode (see the field docs); the tool's
/// own figures are beside them, named `*_tool`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunRecord {
    /// The guest's profile.
    pub profile: Profile,
    /// Guest RAM.
    pub mem_mib: u64,
    /// How it was migrated.
    pub mode: Mode,
    /// The link it crossed.
    pub link: Link,
    /// Repetition number, from 1.
    pub rep: u32,
    /// Seconds the guest idled after its workload, before the migration.
    pub idle_s: u64,
    /// Measured, failed or skipped.
    pub status: RunStatus,
    /// Why the run failed or was skipped (empty when measured).
    pub reason: String,
    /// Guest RAM − MemFree (MiB) just before the migration: the memory the
    /// guest holds.
    pub held_mib: Option<u64>,
    /// Bytes that crossed the link from source to destination (the source
    /// veth's transmitted bytes, Ethernet/IP/TCP headers included).
    pub bytes_link: Option<u64>,
    /// Bytes that crossed the link the other way (acknowledgements, the
    /// destination's answers).
    pub bytes_link_reverse: Option<u64>,
    /// The tool's own byte count (freehint: `bytes_on_wire`; QEMU:
    /// `ram.transferred`).
    pub bytes_tool: Option<u64>,
    /// The migrate command → the destination's QMP `RESUME` event (postcopy:
    /// → the destination's last page placed, its `MIGRATION completed`
    /// event), in ms.
    pub total_time_ms: Option<u64>,
    /// The source's QMP `STOP` event → the destination's QMP `RESUME` event
    /// (their host timestamps), in ms.
    pub downtime_ms: Option<u64>,
    /// The tool's own total time (freehint: `total_time_ms`; QEMU:
    /// `total-time`).
    pub total_time_tool_ms: Option<u64>,
    /// The tool's own downtime (freehint: `downtime_ms`; QEMU: `downtime`).
    pub downtime_tool_ms: Option<u64>,
    /// The guest's heartbeat went on, on the destination (and the source
    /// QEMU no longer runs the guest).
    pub alive: Option<bool>,
    /// `ok` when the guest's checker verified its data region on the
    /// destination; otherwise what went wrong.
    pub data_check: Option<String>,
    /// Pages the guest allocated from its last heartbeat before the
    /// migration to its first on the destination (what the stock balloon
    /// driver's hinting allocates, and init_on_alloc zeroes).
    #[serde(default)]
    pub guest_pages_allocated: Option<u64>,
    /// The tool's own statistics (freehint's `MigrationStats`, QEMU's
    /// `query-migrate` answer), as it gave them.
    pub tool_stats: serde_json::Value,
}

impl RunRecord {
    /// A record of a run that did not produce figures.
    pub fn unmeasured(key: RunKey, status: RunStatus, reason: impl Into<String>) -> RunRecord {
        RunRecord {
            profile: key.profile,
            mem_mib: key.mem_mib,
            mode: key.mode,
            link: key.link,
            rep: key.rep,
            idle_s: key.idle_s,
            status,
            reason: reason.into(),
            held_mib: None,
            bytes_link: None,
            bytes_link_reverse: None,
            bytes_tool: None,
            total_time_ms: None,
            downtime_ms: None,
            total_time_tool_ms: None,
            downtime_tool_ms: None,
            alive: None,
            data_check: None,
            guest_pages_allocated: None,
            tool_stats: serde_json::Value::Null,
        }
    }
}

/// What identifies a run within a suite.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunKey {
    /// The guest's profile.
    pub profile: Profile,
    /// Guest RAM.
    pub mem_mib: u64,
    /// How it is migrated.
    pub mode: Mode,
    /// The link.
    pub link: Link,
    /// Repetition, from 1.
    pub rep: u32,
    /// Idle seconds before the migration.
    pub idle_s: u64,
}

impl RunKey {
    /// How progress lines and `--list` name the run:
    /// `after-job 2048 MiB freehint-hints 1gbit rep 2`.
    pub fn label(&self) -> String {
        format!(
            "{} {} MiB {} {} rep {}",
            self.profile.name(),
            self.mem_mib,
            self.mode.name(),
            self.link.name(),
            self.rep
        )
    }

    /// The run's log folder name: `after-job-2048-1gbit-freehint-hints-2`.
    pub fn dir_name(&self) -> String {
        format!(
            "{}-{}-{}-{}-{}",
            self.profile.name(),
            self.mem_mib,
            self.link.name(),
            self.mode.name(),
            self.rep
        )
    }
}

/// The whole JSON report of one `freehint-bench` invocation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SuiteReport {
    /// The command line that produced it (`freehint-bench …`).
    pub command: String,
    /// When it started (RFC 3339, UTC).
    pub started: String,
    /// This machine: CPU model, cores, kernel, RAM.
    pub machine: String,
    /// The freehint commit the binaries were built from, when the runner
    /// was told (`--built-from`; bench.sh says it). Older reports lack it.
    #[serde(default)]
    pub built_from: Option<String>,
    /// Every run, in the order they ran.
    pub runs: Vec<RunRecord>,
}
