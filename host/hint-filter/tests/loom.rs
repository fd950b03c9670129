//! Model check of the hint/sync lock protocol with loom.
//!
//! Run with: `RUSTFLAGS="--cfg loom" cargo test -p freehint-hint-filter --test loom --release`
//!
//! One page, three threads that loom interleaves in every possible way:
//! * the guest's hint reporter: reads the published cmd_id while the page is
//!   free, then delivers a hint for the page with that cmd_id;
//! * the guest's allocator: after the reporter has looked at the page, takes
//!   it and writes it (the shrinker gives hinted pages back, so this may
//!   happen before or after the hint is delivered);
//! * the engine: a round of sending, a sync that closes the epoch and
//!   opens the next, another round.
//!
//! Then the VM stops, the engine does a final sync and sends what is left,
//! and the destination must hold the page's last version.
#![cfg(loom)]

use freehint_hint_filter::{Cursor, HintFilter, MigrationBitmap, PageRun, RegionLayout};
use freehint_types::{CmdId, RamRange};
use loom::sync::atomic::{AtomicBool, AtomicU32, Ordering::SeqCst};
use loom::sync::{Arc, Mutex};
use loom::thread;

struct World {
    filter: HintFilter,
    published_cmd: AtomicU32,
    dirty: Mutex<bool>,
    source_version: AtomicU32,
    dest_version: AtomicU32,
    hint_generated: AtomicBool,
}

impl World {
    fn sync(&self, open_next: bool) {
        let r = self
            .filter
            .sync(open_next, |bm| {
                if std::mem::take(&mut *self.dirty.lock().unwrap()) {
                    bm.set_run(PageRun {
                        region: 0,
                        first_page: 0,
                        count: 1,
                    });
                }
                Ok::<(), ()>(())
            })
            .unwrap();
        self.published_cmd
            .store(r.opened_epoch.map_or(CmdId::STOP.0, |c| c.0), SeqCst);
    }

    fn send_round(&self) {
        let mut cursor = Cursor::default();
        let mut out = Vec::new();
        while self.filter.claim(&mut cursor, 4096, &mut out) > 0 {}
        if !out.is_empty() {
            // The page is read after it was claimed; a later write is in
            // the dirty log for the next sync.
            self.dest_version
                .store(self.source_version.load(SeqCst), SeqCst);
        }
    }
}

#[test]
fn no_write_is_lost_under_any_interleaving() {
    loom::model(|| {
        let mut bm = MigrationBitmap::new(vec![RegionLayout {
            ram_start: 0,
            page_bytes: 4096,
            pages: 1,
        }]);
        bm.set_all();
        let w = Arc::new(World {
            filter: HintFilter::new(bm),
            published_cmd: AtomicU32::new(0),
            dirty: Mutex::new(false),
            source_version: AtomicU32::new(0),
            dest_version: AtomicU32::new(u32::MAX),
            hint_generated: AtomicBool::new(false),
        });
        w.sync(true);

        let reporter = {
            let w = w.clone();
            thread::spawn(move || {
                let cmd = w.published_cmd.load(SeqCst);
                w.hint_generated.store(true, SeqCst);
                if CmdId(cmd).is_round() {
                    w.filter.apply_hints(CmdId(cmd), &[RamRange::new(0, 4096)]);
                }
            })
        };
        let allocator = {
            let w = w.clone();
            thread::spawn(move || {
                while !w.hint_generated.load(SeqCst) {
                    thread::yield_now();
                }
                w.source_version.fetch_add(1, SeqCst);
                *w.dirty.lock().unwrap() = true;
            })
        };

        w.send_round();
        w.sync(true);
        w.send_round();

        reporter.join().unwrap();
        allocator.join().unwrap();
        // Switchover: the VM is stopped, final sync, last round.
        w.sync(false);
        w.send_round();
        assert_eq!(w.dest_version.load(SeqCst), w.source_version.load(SeqCst));
    });
}
