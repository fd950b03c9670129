//! Stopping a ring with nothing in flight.
//!
//! QEMU stops the device with `GET_VRING_BASE` on every ring right after
//! the VM's `stop`, and the migration engine makes its final dirty-log sync
//! right after that. Whatever the backend does to a ring after its
//! `GET_VRING_BASE` reply — a used entry, a punched hole, a hint or report
//! handed to the sink — would land after that sync and be lost to the
//! migration. So the proxy stops each ring before it forwards
//! `GET_VRING_BASE` ([`RingGate::stop`]):
//!
//! * the ring's `stopped` flag is set; the worker checks it before it pops
//!   each chain and pops nothing more once it is set;
//! * the worker holds the ring's `busy` lock (shared) for as long as it
//!   works on the ring — popping, punching holes, delivering to the sink,
//!   writing used entries, notifying the guest, marking the vhost log — and
//!   the proxy takes it exclusively once, which waits until every chain the
//!   worker had popped is finished;
//! * only then is `GET_VRING_BASE` forwarded, so the daemon's reply (the
//!   next avail index) describes a ring that nothing touches any more.
//!
//! While a ring is stopped its kicks are not processed: the chains stay in
//! the avail ring for whoever runs the device next (after a migration, the
//! destination's backend, which gets the avail position in
//! `SET_VRING_BASE`). The frontend starts the ring again with
//! `SET_VRING_KICK` ([`RingGate::start`]); see the proxy for the kick it
//! then gives the ring.
//!
//! Waiting here never depends on the frontend: the worker's work needs only
//! guest memory, the RAM file and the sink.
//!
//! A ring can also be **held** ([`RingGate::hold`]), by the host rather
//! than the frontend: the destination of a postcopy migration holds every
//! ring until the last page has arrived, because a read through this
//! process's mapping of a page still to come would allocate a zero page in
//! the RAM file and the page's content would be lost. A held ring behaves
//! like a stopped one, except that a kick that finds it held is remembered
//! ([`RingGate::release`] says so) and given again when it is released.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{RwLock, RwLockReadGuard};

/// The stop flag and in-flight lock of one ring.
#[derive(Debug, Default)]
pub(crate) struct RingGate {
    stopped: AtomicBool,
    held: AtomicBool,
    /// A kick found the ring held.
    deferred: AtomicBool,
    busy: RwLock<()>,
}

impl RingGate {
    /// Enters the ring to work on it; `None` if the ring is stopped. The
    /// ring stays entered (and [`RingGate::stop`] waits) until the guard is
    /// dropped.
    pub(crate) fn enter(&self) -> Option<RwLockReadGuard<'_, ()>> {
        let guard = self.busy.read().unwrap_or_else(|p| p.into_inner());
        // Read under the lock: once `stop` or `hold` has had the lock
        // exclusively, every later reader sees the flag set.
        if self.held.load(Ordering::SeqCst) {
            self.deferred.store(true, Ordering::SeqCst);
            return None;
        }
        (!self.stopped.load(Ordering::SeqCst)).then_some(guard)
    }

    /// Whether the ring is stopped or held. Checked before each pop by the
    /// holder of an [`RingGate::enter`] guard, which must then pop nothing
    /// more.
    pub(crate) fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst) || self.held.load(Ordering::SeqCst)
    }

    /// Holds the ring and waits until nobody works on it, as
    /// [`RingGate::stop`] does; independent of stop and start.
    pub(crate) fn hold(&self) {
        self.held.store(true, Ordering::SeqCst);
        drop(self.busy.write().unwrap_or_else(|p| p.into_inner()));
    }

    /// Ends a hold; returns whether a kick found the ring held (the caller
    /// kicks it again).
    pub(crate) fn release(&self) -> bool {
        self.held.store(false, Ordering::SeqCst);
        self.deferred.swap(false, Ordering::SeqCst)
    }

    /// Stops the ring and waits until nobody works on it: every chain popped
    /// before is finished when this returns, and nothing is popped after.
    pub(crate) fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        drop(self.busy.write().unwrap_or_else(|p| p.into_inner()));
    }

    /// Lets the ring run again; returns whether it was stopped.
    pub(crate) fn start(&self) -> bool {
        self.stopped.swap(false, Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn stop_waits_for_the_worker_and_refuses_new_entries() {
        let gate = RingGate::default();
        assert!(!gate.start(), "a new ring is not stopped");
        std::thread::scope(|s| {
            let guard = gate.enter().expect("running ring");
            let (tx, rx) = mpsc::channel();
            let gate = &gate;
            s.spawn(move || {
                gate.stop();
                tx.send(()).unwrap();
            });
            // The stopper sets the flag at once but waits for the guard.
            while !gate.is_stopped() {
                std::thread::yield_now();
            }
            assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
            drop(guard);
            rx.recv_timeout(Duration::from_secs(10)).unwrap();
        });
        assert!(gate.enter().is_none(), "stopped ring entered");
        assert!(gate.start());
        assert!(gate.enter().is_some());
    }

    #[test]
    fn a_held_ring_remembers_its_kicks_and_outlasts_a_start() {
        let gate = RingGate::default();
        assert!(!gate.release(), "no kick while nothing was held");
        gate.hold();
        assert!(gate.is_stopped());
        assert!(!gate.start(), "held is not stopped");
        assert!(gate.enter().is_none(), "held ring entered");
        assert!(gate.enter().is_none());
        assert!(gate.release(), "the kick was forgotten");
        assert!(!gate.release(), "the kick is given once");
        assert!(gate.enter().is_some());
        // Held and stopped: released, it stays stopped until started.
        gate.hold();
        gate.stop();
        assert!(!gate.release());
        assert!(gate.enter().is_none());
        assert!(gate.start());
        assert!(gate.enter().is_some());
    }
}
