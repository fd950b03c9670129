//! Fault points: named places in a migration where a test makes it fail.
//!
//! Compiled in only with the `failpoints` feature (the test, demo and
//! benchmark builds enable it; a plain release build has none). Each point
//! is one [`fail`](https://docs.rs/fail) point, configured with the
//! `FAILPOINTS` environment variable (`name=action;name=action`) or at run
//! time ([`configure`]). Actions:
//!
//! * `return`: the migration fails at that point with an error;
//! * `panic`: the thread panics there;
//! * `return(kill)`: the process kills itself (`SIGKILL`) there, as a crash
//!   or an operator's `kill -9` would;
//! * everything else `fail` knows (`sleep(ms)`, `pause`, `N*action`, …).
//!
//! `docs/FAULTS.md` lists every point; a test checks that it does.

use crate::phase::Side;
use crate::MigrateError;

/// One fault point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultPoint {
    /// Its name, as `FAILPOINTS` spells it.
    pub name: &'static str,
    /// The side whose process evaluates it.
    pub side: Side,
    /// Whether it lies in the handover (from stopping the VM on).
    pub handover: bool,
    /// Where exactly it is.
    pub place: &'static str,
}

const fn point(name: &'static str, side: Side, handover: bool, place: &'static str) -> FaultPoint {
    FaultPoint {
        name,
        side,
        handover,
        place,
    }
}

/// Every fault point, in the order a migration passes them.
pub const POINTS: &[FaultPoint] = &[
    point(
        "src.setup",
        Side::Source,
        false,
        "before the migration bitmap is built",
    ),
    point(
        "src.connected",
        Side::Source,
        false,
        "all channels open, before round 1",
    ),
    point(
        "src.round-start",
        Side::Source,
        false,
        "at the start of every live round",
    ),
    point(
        "src.mid-round",
        Side::Source,
        false,
        "a bulk channel, after its first batch of a round",
    ),
    point(
        "src.before-sync",
        Side::Source,
        false,
        "a live round sent, before the dirty-log sync",
    ),
    point(
        "src.before-stop",
        Side::Source,
        true,
        "converged, before the VM is stopped",
    ),
    point(
        "src.after-stop",
        Side::Source,
        true,
        "VM stopped, before the final sync",
    ),
    point(
        "src.after-final-round",
        Side::Source,
        true,
        "final round sent, before the device state is taken",
    ),
    point(
        "src.after-complete",
        Side::Source,
        true,
        "device state and Complete sent, before Ready arrives",
    ),
    point(
        "src.after-ready",
        Side::Source,
        true,
        "Ready received, before Commit is sent",
    ),
    point(
        "src.after-commit",
        Side::Source,
        true,
        "Commit sent, before Resumed arrives",
    ),
    point(
        "src.after-resumed",
        Side::Source,
        true,
        "Resumed received, before the source VMM is released",
    ),
    point(
        "dst.accepted",
        Side::Destination,
        false,
        "all channels accepted, before any page",
    ),
    point(
        "dst.mid-round",
        Side::Destination,
        false,
        "a bulk channel, after placing a batch",
    ),
    point(
        "dst.after-complete",
        Side::Destination,
        true,
        "Complete received, before the bulk channels are drained",
    ),
    point(
        "dst.before-load",
        Side::Destination,
        true,
        "every page placed, before the device state is loaded",
    ),
    point(
        "dst.after-load",
        Side::Destination,
        true,
        "device state loaded, before Ready is sent",
    ),
    point(
        "dst.after-ready",
        Side::Destination,
        true,
        "Ready sent, before Commit arrives",
    ),
    point(
        "dst.after-commit",
        Side::Destination,
        true,
        "Commit received, before the VM is resumed",
    ),
    point(
        "dst.after-resume",
        Side::Destination,
        true,
        "VM resumed, before Resumed is sent",
    ),
    // Postcopy (`--mode postcopy`; precopy never passes them).
    point(
        "dst.postcopy-started",
        Side::Destination,
        false,
        "postcopy: RAM registered for faults, before the device state is loaded",
    ),
    point(
        "src.postcopy-streaming",
        Side::Source,
        false,
        "postcopy, first session: a bulk channel, after its first batch of pending pages",
    ),
    point(
        "src.postcopy-link-cut",
        Side::Source,
        false,
        "postcopy, first session: a bulk channel after its second batch; `return` cuts every connection, as a broken link does",
    ),
    point(
        "src.postcopy-reconnect",
        Side::Source,
        false,
        "postcopy: each attempt to reconnect after a broken link; `return` fails the attempt, as a link still down does",
    ),
    // RDMA (`rdma://`, the `rdma` feature; TCP never passes it).
    point(
        "src.rdma-wrong-rkey",
        Side::Source,
        false,
        "every page reference an RDMA source sends; `return` sends it with a memory key the source never registered",
    ),
];

/// Whether this build has fault points.
pub fn compiled_in() -> bool {
    cfg!(feature = "failpoints")
}

/// Configures fault points from a `name=action;name=action` list (the
/// `FAILPOINTS` syntax). Names must be in [`POINTS`].
pub fn configure(spec: &str) -> Result<(), String> {
    for item in spec.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, actions) = item
            .split_once('=')
            .ok_or_else(|| format!("fault point spec {item:?} is not NAME=ACTION"))?;
        let name = name.trim();
        if !POINTS.iter().any(|p| p.name == name) {
            return Err(format!(
                "unknown fault point {name:?} (see docs/FAULTS.md or `freehint debug fault-points`)"
            ));
        }
        set(name, actions.trim())?;
    }
    Ok(())
}

/// Configures the points named in the `FAILPOINTS` environment variable.
pub fn configure_from_env() -> Result<(), String> {
    match std::env::var("FAILPOINTS") {
        Ok(spec) => configure(&spec),
        Err(_) => Ok(()),
    }
}

#[cfg(feature = "failpoints")]
fn set(name: &str, actions: &str) -> Result<(), String> {
    fail::cfg(name, actions).map_err(|e| format!("fault point {name}: {e}"))
}

#[cfg(not(feature = "failpoints"))]
fn set(name: &str, _actions: &str) -> Result<(), String> {
    Err(format!(
        "fault point {name}: this build has no fault points (build with the `failpoints` feature)"
    ))
}

/// Evaluates fault point `name`: `Err` if it is set to `return`.
#[cfg(feature = "failpoints")]
pub(crate) fn hit(name: &'static str) -> Result<(), MigrateError> {
    debug_assert!(
        POINTS.iter().any(|p| p.name == name),
        "fault point {name} is not in POINTS"
    );
    fail::fail_point!(name, |arg: Option<String>| {
        tracing::warn!(point = name, action = ?arg, "fault point fired");
        if arg.as_deref() == Some("kill") {
            // SAFETY: kill() and getpid() have no memory effects here.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
        Err(MigrateError::FaultInjected(name))
    });
    Ok(())
}

/// Evaluates fault point `name` (this build has none: always `Ok`).
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) fn hit(_name: &'static str) -> Result<(), MigrateError> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_prefixed_by_their_side() {
        for (i, p) in POINTS.iter().enumerate() {
            assert!(
                POINTS[i + 1..].iter().all(|q| q.name != p.name),
                "{}",
                p.name
            );
            let prefix = match p.side {
                Side::Source => "src.",
                Side::Destination => "dst.",
            };
            assert!(p.name.starts_with(prefix), "{}", p.name);
        }
    }

    #[test]
    fn docs_list_every_point() {
        let doc = include_str!("../../../docs/FAULTS.md");
        for p in POINTS {
            assert!(
                doc.contains(&format!("`{}`", p.name)),
                "docs/FAULTS.md does not list {}",
                p.name
            );
        }
    }

    #[test]
    fn unknown_points_and_bad_specs_are_refused() {
        assert!(configure("src.nowhere=return")
            .unwrap_err()
            .contains("unknown fault point"));
        assert!(configure("src.setup").unwrap_err().contains("NAME=ACTION"));
        assert!(configure("").is_ok());
    }
}
