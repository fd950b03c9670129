use serde::{Deserialize, Serialize};

/// An invalid parameter set, with the offending field named.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {reason}")]
pub struct ParamsError {
    /// The field.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

/// How the guest's RAM moves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationMode {
    /// Rounds with the guest running, then a final round with it stopped:
    /// the destination resumes with all of its RAM.
    Precopy,
    /// The guest resumes on the destination at once (after the device
    /// state); its RAM follows: pages it faults on first, the rest
    /// streamed.
    Postcopy,
    /// Precopy rounds while they converge; if the downtime estimate stops
    /// shrinking (or the round limit is reached), a switch to postcopy
    /// instead of a long stop. The default: to a destination that cannot
    /// serve postcopy it is precopy.
    #[default]
    Hybrid,
}

impl MigrationMode {
    /// The name used on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            MigrationMode::Precopy => "precopy",
            MigrationMode::Postcopy => "postcopy",
            MigrationMode::Hybrid => "hybrid",
        }
    }

    /// Whether the migration may switch to postcopy.
    pub fn may_postcopy(self) -> bool {
        self != MigrationMode::Precopy
    }
}

/// Every knob of a migration, validated as a whole by [`Self::validate`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MigrationParams {
    /// Number of TCP connections carrying page data.
    pub bulk_channels: u8,
    /// Most bytes of page data in one batch (a huge page always goes whole).
    pub batch_bytes: u64,
    /// Switch over once the pages left are estimated to take at most this
    /// long to send with the VM stopped.
    pub downtime_target_ms: u64,
    /// Switch over after this many rounds whatever the estimate says.
    pub max_rounds: u32,
    /// Do at least this many rounds before switching over, even if the
    /// estimate allows it earlier (gives the guest's hints time; stress
    /// tests use it to force many syncs).
    pub min_rounds: u32,
    /// Ask the guest for free-page hints and skip the pages it reports.
    pub hints: bool,
    /// Seconds either side waits for the other at any step (connecting,
    /// each write of page data, each answer of the handover), and the
    /// longest the destination tolerates a silent source. The destination
    /// adopts the source's value, so both give up after the same time.
    pub peer_timeout_s: u64,
    /// With hints on, wait up to this long for the guest to finish
    /// reporting its free pages before the first round sends anything (a
    /// page sent before its hint arrives is sent for nothing). Only sources
    /// that can tell when a report is complete (the balloon) are waited for.
    /// The wait ends sooner once hints take pages off the send list slower
    /// than sending would (see the sender). The default, 0, never waits:
    /// the first round sends at once and hints apply while it runs, so hints
    /// never cost time; on a link much faster than the guest reports, a
    /// wait saves bytes.
    pub hint_wait_ms: u64,
    /// Precopy, postcopy, or precopy that switches to postcopy when it
    /// stops converging (hybrid). Postcopy needs a destination VMM that can
    /// run the guest while its RAM arrives.
    pub mode: MigrationMode,
    /// After the link breaks in postcopy, how long the source tries to
    /// reconnect (with backoff) before it waits for the operator's
    /// `freehint migrate --resume`. It never gives the guest up on its own:
    /// it holds the pages the destination still lacks.
    pub postcopy_recovery_s: u64,
}

impl Default for MigrationParams {
    fn default() -> Self {
        Self {
            bulk_channels: default_bulk_channels(),
            batch_bytes: 256 << 10,
            downtime_target_ms: 300,
            max_rounds: 30,
            min_rounds: 1,
            hints: true,
            peer_timeout_s: 30,
            hint_wait_ms: 0,
            mode: MigrationMode::default(),
            postcopy_recovery_s: 60,
        }
    }
}

/// Two, or half the CPUs if that is more, at most 4: with two channels the
/// sending and the receiving side each keep both cores of a two-core
/// machine busy (measured in docs/BENCHMARKS.md).
/// Most bulk channels a migration may use; a destination refuses a source
/// that announces more.
pub const MAX_BULK_CHANNELS: u8 = 16;

fn default_bulk_channels() -> u8 {
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    (cpus / 2).clamp(2, 4) as u8
}

impl MigrationParams {
    /// Checks every field and their combination.
    pub fn validate(&self) -> Result<(), ParamsError> {
        let err = |field, reason: &str| {
            Err(ParamsError {
                field,
                reason: reason.to_string(),
            })
        };
        if !(1..=MAX_BULK_CHANNELS).contains(&self.bulk_channels) {
            return err("bulk_channels", "must be 1..=16");
        }
        if !(4096..=64 << 20).contains(&self.batch_bytes) {
            return err("batch_bytes", "must be 4 KiB..=64 MiB");
        }
        if self.batch_bytes / 4096 > freehint_wire::MAX_BATCH_PAGES as u64 {
            return err("batch_bytes", "more than 4096 base pages per batch");
        }
        if self.max_rounds == 0 || self.max_rounds > 1000 {
            return err("max_rounds", "must be 1..=1000");
        }
        if self.min_rounds == 0 || self.min_rounds > self.max_rounds {
            return err("min_rounds", "must be 1..=max_rounds");
        }
        if self.downtime_target_ms == 0 {
            return err("downtime_target_ms", "must be positive");
        }
        if self.hint_wait_ms > 60_000 {
            return err("hint_wait_ms", "must be at most 60000");
        }
        if !(1..=86_400).contains(&self.postcopy_recovery_s) {
            return err("postcopy_recovery_s", "must be 1..=86400");
        }
        if !u32::try_from(self.peer_timeout_s)
            .is_ok_and(|t| freehint_wire::PEER_TIMEOUT_S_RANGE.contains(&t))
        {
            return err("peer_timeout_s", "must be 1..=3600");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_name_their_field() {
        MigrationParams::default().validate().unwrap();
        let bad = MigrationParams {
            bulk_channels: 0,
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().field, "bulk_channels");
        let bad = MigrationParams {
            batch_bytes: 100 << 20,
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().field, "batch_bytes");
    }
}
