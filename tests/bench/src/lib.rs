//! The benchmark suite for idle-heavy guests (`freehint-bench`).
//!
//! It migrates REAL QEMU/Linux guests (tests/guest) of several
//! [profiles](record::Profile) and RAM sizes with every
//! [mode](record::Mode), freehint's and QEMU's own, between two network
//! namespaces joined by a veth pair shaped with `tc` ([`link`]), and
//! measures every mode the same way: downtime from the source's QMP `STOP`
//! event to the destination's `RESUME` event, total time from the migrate
//! command to that `RESUME`, bytes from the link's interface counters.
//! [`report`] turns the JSON of one or more suites into
//! `docs/BENCHMARKS.md` with tables and plots.

#![deny(missing_docs)]

pub mod host;
pub mod link;
pub mod profile;
pub mod record;
pub mod report;
pub mod suite;
