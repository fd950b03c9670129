//! What each [`Profile`] asks of the test guest (tests/guest/init.sh's
//! `freehint.*` kernel options and the programs in guest-driver/programs),
//! and the memory it touches on the host.

use std::path::Path;

use freehint_demo::{DemoSetup, DiskAio, DiskCache, DiskConfig};

use crate::record::{Mode, Profile};

/// The `page-cache` profile's files: 1 GiB in all.
pub const PAGE_CACHE_BYTES: u64 = 1 << 30;
/// … in this many files.
pub const PAGE_CACHE_FILES: usize = 16;

impl Profile {
    /// Sets up the guest of `setup` for this profile; `disk_image` is the
    /// suite's shared disk (made with [`PAGE_CACHE_BYTES`] of files), which
    /// the `page-cache` profile needs.
    pub fn configure(self, setup: &mut DemoSetup, disk_image: Option<&Path>) {
        setup.work_mib = 0;
        setup.keep_mib = 0;
        setup.append.clear();
        setup.disk = None;
        setup.ready_lines.clear();
        match self {
            Profile::Fresh => {}
            Profile::AfterJob => {
                setup.work_mib = 1400;
                setup.keep_mib = 128;
            }
            Profile::Fragmented => setup.append = "freehint.fragment=1400".into(),
            Profile::PageCache => {
                setup.append = "freehint.readdisk".into();
                setup.ready_lines = vec!["freehint-guest: disk read into the page cache".into()];
                setup.disk = disk_image.map(|image| DiskConfig {
                    image: image.to_path_buf(),
                    // Through the host's page cache: freehint tracks a
                    // drive's DMA into guest memory only without O_DIRECT.
                    cache: DiskCache::Writeback,
                    aio: DiskAio::Threads,
                });
            }
            Profile::BusyIdle => {
                setup.append = "freehint.hotset=64 freehint.hotrate=16".into();
                setup.ready_lines = vec!["freehint-hotset ready".into()];
            }
        }
    }

    /// MiB the guest's workload touches.
    pub fn touched_mib(self) -> u64 {
        match self {
            Profile::Fresh => 0,
            Profile::AfterJob | Profile::Fragmented => 1400,
            Profile::PageCache => PAGE_CACHE_BYTES >> 20,
            Profile::BusyIdle => 64,
        }
    }

    /// A generous estimate of the host memory (MiB) a run of this profile
    /// with `mode` at `mem_mib` uses at its peak, source and destination
    /// together. A guest that hints its free pages with Debian's kernel
    /// (`init_on_alloc=1`) zeroes every free page to hint it, so its source
    /// RAM is all allocated.
    pub fn host_mib_estimate(self, mode: Mode, mem_mib: u64) -> u64 {
        // The guest kernel, its page structures, QEMU itself.
        let base = 300 + mem_mib / 64;
        let side = base + self.touched_mib();
        let src = if mode.hints() { mem_mib + base } else { side };
        src + side
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hinting_run_counts_all_of_the_source_ram() {
        let hinting = Profile::Fresh.host_mib_estimate(Mode::FreehintHints, 16384);
        let plain = Profile::Fresh.host_mib_estimate(Mode::QemuNative, 16384);
        assert!(hinting > 16384 && plain < 2048, "{hinting} {plain}");
    }
}
