// The test frontend shared by this crate's integration tests (included
// with `include!`, so that each test binary has it as its own items): a
// guest's memory in a memfd, split virtqueues filled the way Linux 6.x
// `virtio_balloon` does, and a rust-vmm vhost-user `Frontend` connected to
// a `BalloonBackend` served on a thread of the test.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use freehint_balloon::layout::features::{self, bit};
use freehint_balloon::{BalloonBackend, BalloonConfig, BalloonHandle, RejectReason};
use freehint_types::{CmdId, GpaRange, HintOutcome, HintSink, HintSource};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{
    Frontend, FrontendReqHandler, VhostUserFrontend, VhostUserFrontendReqHandler,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MIB: u64 = 1 << 20;
const RAM_BYTES: u64 = 64 * MIB;
/// Vrings live in the last MiB of guest RAM, small buffers in the MiB below.
const VRING_BASE: u64 = RAM_BYTES - MIB;
const SMALL_BASE: u64 = RAM_BYTES - 2 * MIB;
const QSIZE: u16 = 256;
const HINT_BLOCK: u64 = 4 * MIB;
const TIMEOUT: Duration = Duration::from_secs(10);

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

const ALL_BALLOON: u64 = bit(features::STATS_VQ)
    | bit(features::DEFLATE_ON_OOM)
    | bit(features::FREE_PAGE_HINT)
    | bit(features::PAGE_POISON)
    | bit(features::REPORTING)
    | bit(features::VERSION_1)
    | bit(features::RING_EVENT_IDX)
    | bit(features::PROTOCOL_FEATURES);

// ---------------------------------------------------------------- the sink

/// Records what reaches it. While held ([`RecordingSink::hold`]), every
/// call blocks until released: the backend's worker is then "busy".
#[derive(Default)]
struct RecordingSink {
    /// Hand every call to this sink instead of recording it.
    forward: Option<Arc<dyn HintSink>>,
    hints: Mutex<Vec<(CmdId, GpaRange)>>,
    reported: Mutex<Vec<GpaRange>>,
    held: Mutex<bool>,
    released: Condvar,
    /// Calls that have started (held or not).
    entered: AtomicU64,
}

impl HintSink for RecordingSink {
    fn free_page_hints(&self, cmd_id: CmdId, ranges: &[GpaRange]) -> HintOutcome {
        self.gate();
        if let Some(sink) = &self.forward {
            return sink.free_page_hints(cmd_id, ranges);
        }
        let mut h = self.hints.lock().unwrap();
        h.extend(ranges.iter().map(|r| (cmd_id, *r)));
        HintOutcome {
            hint_ranges_applied: ranges.len() as u64,
            ..HintOutcome::default()
        }
    }

    fn reported_free(&self, ranges: &[GpaRange]) -> HintOutcome {
        self.gate();
        if let Some(sink) = &self.forward {
            return sink.reported_free(ranges);
        }
        self.reported.lock().unwrap().extend_from_slice(ranges);
        HintOutcome::default()
    }
}

impl RecordingSink {
    fn hints(&self) -> Vec<(CmdId, GpaRange)> {
        self.hints.lock().unwrap().clone()
    }
    fn reported(&self) -> Vec<GpaRange> {
        self.reported.lock().unwrap().clone()
    }

    fn gate(&self) {
        self.entered.fetch_add(1, Ordering::SeqCst);
        let mut held = self.held.lock().unwrap();
        while *held {
            held = self.released.wait(held).unwrap();
        }
    }

    /// Blocks every sink call from now until the guard is dropped.
    fn hold(&self) -> Held<'_> {
        *self.held.lock().unwrap() = true;
        Held(self)
    }

    fn wait_entered(&self, n: u64) {
        let deadline = Instant::now() + TIMEOUT;
        while self.entered.load(Ordering::SeqCst) < n {
            assert!(Instant::now() < deadline, "the sink was not called");
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Releases a held sink when dropped (also when a test fails, so that the
/// backend's worker can end).
struct Held<'a>(&'a RecordingSink);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        *self.0.held.lock().unwrap() = false;
        self.0.released.notify_all();
    }
}

/// The frontend's end of the backend request channel.
#[derive(Default)]
struct ConfigChanges(AtomicU64);

impl VhostUserFrontendReqHandler for ConfigChanges {
    fn handle_config_change(&self) -> std::io::Result<u64> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(0)
    }
}

// ------------------------------------------------------- guest memory

fn memfd(size: u64) -> File {
    // SAFETY: the name is a valid C string; the fd is owned by the File.
    let fd = unsafe { libc::memfd_create(c"freehint-balloon-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fd was just created and is owned by nobody else.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).unwrap();
    f
}

/// Whether `[start, start+len)` of the file is entirely a hole.
fn is_hole(f: &File, start: u64, len: u64) -> bool {
    // SAFETY: lseek on a valid fd.
    let hole = unsafe { libc::lseek(f.as_raw_fd(), start as i64, libc::SEEK_HOLE) };
    if hole != start as i64 {
        return false;
    }
    // SAFETY: lseek on a valid fd.
    let data = unsafe { libc::lseek(f.as_raw_fd(), start as i64, libc::SEEK_DATA) };
    data < 0 || data as u64 >= start + len
}

/// Whether `[start, start+len)` is entirely data (no hole).
fn is_data(f: &File, start: u64, len: u64) -> bool {
    // SAFETY: lseek on a valid fd.
    let data = unsafe { libc::lseek(f.as_raw_fd(), start as i64, libc::SEEK_DATA) };
    // SAFETY: lseek on a valid fd.
    let hole = unsafe { libc::lseek(f.as_raw_fd(), start as i64, libc::SEEK_HOLE) };
    data == start as i64 && hole as u64 >= start + len
}

// ------------------------------------------------------- the driver

/// One split virtqueue laid out in guest memory, filled like Linux does.
struct Vq {
    index: usize,
    desc: u64,
    avail: u64,
    used: u64,
    kick: EventFd,
    call: EventFd,
    free: Vec<u16>,
    /// The descriptors of each chain added and not yet used, by head: a
    /// used chain's descriptors are free again, as in Linux's driver.
    chains: std::collections::HashMap<u16, Vec<u16>>,
    avail_idx: u16,
    last_used: u16,
}

impl Vq {
    fn new(index: usize) -> Self {
        let base = VRING_BASE + index as u64 * 0x8000;
        Vq {
            index,
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            kick: EventFd::new(0).unwrap(),
            call: EventFd::new(0).unwrap(),
            free: (0..QSIZE).rev().collect(),
            chains: std::collections::HashMap::new(),
            avail_idx: 0,
            last_used: 0,
        }
    }

    fn write_desc(
        &self,
        mem: &GuestMemoryMmap,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let a = self.desc + 16 * u64::from(i);
        mem.write_obj(addr, GuestAddress(a)).unwrap();
        mem.write_obj(len, GuestAddress(a + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(a + 12)).unwrap();
        mem.write_obj(next, GuestAddress(a + 14)).unwrap();
    }

    fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        std::sync::atomic::fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
        std::sync::atomic::fence(Ordering::SeqCst);
    }

    /// Adds one chain of `(gpa, len, device_writable)` buffers.
    fn add(&mut self, mem: &GuestMemoryMmap, bufs: &[(u64, u32, bool)]) -> u16 {
        let ids: Vec<u16> = (0..bufs.len())
            .map(|_| self.free.pop().expect("queue full"))
            .collect();
        for (k, (addr, len, w)) in bufs.iter().enumerate() {
            let mut flags = if *w { VRING_DESC_F_WRITE } else { 0 };
            let next = if k + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT;
                ids[k + 1]
            } else {
                0
            };
            self.write_desc(mem, ids[k], *addr, *len, flags, next);
        }
        self.publish(mem, ids[0]);
        self.chains.insert(ids[0], ids.clone());
        ids[0]
    }

    /// Adds a chain whose two descriptors point at each other forever.
    fn add_loop(&mut self, mem: &GuestMemoryMmap, addr: u64) -> u16 {
        let a = self.free.pop().unwrap();
        let b = self.free.pop().unwrap();
        self.write_desc(
            mem,
            a,
            addr,
            4096,
            VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
            b,
        );
        self.write_desc(
            mem,
            b,
            addr + 4096,
            4096,
            VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
            a,
        );
        self.publish(mem, a);
        a
    }

    fn kick(&self) {
        self.kick.write(1).unwrap();
    }

    fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj::<u16>(GuestAddress(self.used + 2)).unwrap()
    }

    /// Waits until `n` more buffers are used; returns their (id, len).
    fn wait_used(&mut self, mem: &GuestMemoryMmap, n: u16) -> Vec<(u32, u32)> {
        let deadline = Instant::now() + TIMEOUT;
        while self.used_idx(mem).wrapping_sub(self.last_used) < n {
            assert!(
                Instant::now() < deadline,
                "queue {}: {} of {n} buffers used",
                self.index,
                self.used_idx(mem).wrapping_sub(self.last_used)
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        let mut out = Vec::new();
        for _ in 0..n {
            let e = self.used + 4 + 8 * u64::from(self.last_used % QSIZE);
            let id: u32 = mem.read_obj(GuestAddress(e)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(e + 4)).unwrap();
            if let Some(ids) = u16::try_from(id).ok().and_then(|h| self.chains.remove(&h)) {
                self.free.extend(ids);
            }
            out.push((id, len));
            self.last_used = self.last_used.wrapping_add(1);
        }
        out
    }

    /// Asserts that no more buffers are used within a short time.
    fn assert_no_more_used(&self, mem: &GuestMemoryMmap) {
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(self.used_idx(mem), self.last_used, "queue {}", self.index);
    }
}

/// A guest (memory + queues), a frontend, and the backend serving it.
struct Harness {
    file: File,
    mem: GuestMemoryMmap,
    host_base: u64,
    fe: Frontend,
    changes: Arc<ConfigChanges>,
    req: FrontendReqHandler<ConfigChanges>,
    vqs: Vec<Vq>,
    sink: Arc<RecordingSink>,
    handle: BalloonHandle,
    server: Option<JoinHandle<()>>,
    small_next: u64,
    path: PathBuf,
}

static SEQ: AtomicU64 = AtomicU64::new(0);

impl Harness {
    /// Starts a backend and connects a frontend; only the protocol
    /// features are negotiated (no memory, no queues yet).
    fn connect(max_queues: u64) -> Self {
        Self::connect_forwarding(max_queues, None)
    }

    /// [`Harness::connect`], with the backend's hints and reports handed
    /// to `forward` (not recorded) when given.
    fn connect_forwarding(max_queues: u64, forward: Option<Arc<dyn HintSink>>) -> Self {
        let path = std::env::temp_dir().join(format!(
            "freehint-balloon-test-{}-{}.sock",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        let sink = Arc::new(RecordingSink {
            forward,
            ..RecordingSink::default()
        });
        let backend = BalloonBackend::new(BalloonConfig::default(), sink.clone()).unwrap();
        let handle = backend.handle();
        let p = path.clone();
        let server = std::thread::spawn(move || {
            backend.serve(&p).unwrap();
        });
        let deadline = Instant::now() + TIMEOUT;
        while !path.exists() {
            assert!(Instant::now() < deadline, "backend did not listen");
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut fe = Frontend::connect(&path, max_queues).unwrap();
        fe.set_owner().unwrap();
        let offered = fe.get_features().unwrap();
        assert_eq!(offered & ALL_BALLOON, ALL_BALLOON, "offered {offered:#x}");
        assert_eq!(offered & bit(features::MUST_TELL_HOST), 0);
        let pf = fe.get_protocol_features().unwrap();
        let want = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::MQ;
        assert!(pf.contains(want), "protocol features {pf:?}");
        fe.set_protocol_features(want).unwrap();
        // Like QEMU with REPLY_ACK: every request waits for its ack, so the
        // test never runs ahead of the backend.
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        if max_queues <= 5 {
            // (GET_QUEUE_NUM would also lower the frontend's own index check,
            // which the bad-input test wants to get past.)
            assert_eq!(fe.get_queue_num().unwrap(), 5);
        }

        let changes = Arc::new(ConfigChanges::default());
        let mut req = FrontendReqHandler::new(changes.clone()).unwrap();
        req.set_reply_ack_flag(true);
        fe.set_backend_request_fd(&req.get_tx_raw_fd()).unwrap();

        let file = memfd(RAM_BYTES);
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            RAM_BYTES as usize,
            Some(FileOffset::new(file.try_clone().unwrap(), 0)),
        )])
        .unwrap();
        let host_base = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
        Harness {
            file,
            mem,
            host_base,
            fe,
            changes,
            req,
            vqs: Vec::new(),
            sink,
            handle,
            server: Some(server),
            small_next: SMALL_BASE,
            path,
        }
    }

    fn set_mem_table(&self) {
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: RAM_BYTES,
            userspace_addr: self.host_base,
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        };
        self.fe.set_mem_table(&[region]).unwrap();
    }

    fn setup_queue(&mut self, index: usize) {
        self.setup_vq(Vq::new(index), 0);
    }

    /// Starts `vq` (laid out, maybe already filled, by the test) at `base`.
    fn setup_vq(&mut self, vq: Vq, base: u16) {
        let index = vq.index;
        let cfg = VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: self.host_base + vq.desc,
            used_ring_addr: self.host_base + vq.used,
            avail_ring_addr: self.host_base + vq.avail,
            log_addr: None,
        };
        self.fe.set_vring_num(index, QSIZE).unwrap();
        self.fe.set_vring_base(index, base).unwrap();
        self.fe.set_vring_addr(index, &cfg).unwrap();
        self.fe.set_vring_call(index, &vq.call).unwrap();
        self.fe.set_vring_kick(index, &vq.kick).unwrap();
        self.fe.set_vring_enable(index, true).unwrap();
        self.vqs.push(vq);
    }

    /// Starts a stopped queue again the way QEMU does after a failed
    /// migration: size, base, addresses, a new kick fd (never kicked by the
    /// test), call, enable.
    fn restart_queue(&mut self, index: usize, base: u16) {
        let (desc, avail, used) = {
            let vq = self.vq(index);
            vq.kick = EventFd::new(0).unwrap();
            (vq.desc, vq.avail, vq.used)
        };
        let cfg = VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: self.host_base + desc,
            used_ring_addr: self.host_base + used,
            avail_ring_addr: self.host_base + avail,
            log_addr: None,
        };
        self.fe.set_vring_num(index, QSIZE).unwrap();
        self.fe.set_vring_base(index, base).unwrap();
        self.fe.set_vring_addr(index, &cfg).unwrap();
        let vq = self.vqs.iter().find(|q| q.index == index).unwrap();
        self.fe.set_vring_kick(index, &vq.kick).unwrap();
        self.fe.set_vring_call(index, &vq.call).unwrap();
        self.fe.set_vring_enable(index, true).unwrap();
    }

    /// GET_VRING_BASE for `q` while the sink holds the worker inside a
    /// pass: checks that the reply waits for that pass (and that nothing
    /// was returned used meanwhile), then releases the sink. Returns the
    /// base.
    fn get_vring_base_while_worker_busy(&mut self, q: usize, held: Held<'_>) -> u16 {
        self.sink.wait_entered(1);
        let mem = self.mem.clone();
        let used_before = self.vq(q).used_idx(&mem);
        let fe = &self.fe;
        let base = std::thread::scope(|s| {
            let t = s.spawn(move || fe.get_vring_base(q).unwrap());
            std::thread::sleep(Duration::from_millis(300));
            assert!(
                !t.is_finished(),
                "GET_VRING_BASE answered while the worker was inside a pass"
            );
            assert_eq!(
                self.vqs
                    .iter()
                    .find(|v| v.index == q)
                    .unwrap()
                    .used_idx(&mem),
                used_before
            );
            drop(held);
            t.join().unwrap()
        });
        u16::try_from(base).unwrap()
    }

    /// The whole QEMU-like start: memory, features, every queue of them.
    fn start(balloon_features: u64) -> Self {
        let mut h = Self::connect(5);
        h.start_device(balloon_features);
        h
    }

    /// What QEMU sends when it starts the device: memory, features, every
    /// queue of them.
    fn start_device(&mut self, balloon_features: u64) {
        self.set_mem_table();
        let acked = balloon_features | bit(features::VERSION_1) | bit(features::PROTOCOL_FEATURES);
        self.fe.set_features(acked).unwrap();
        let n = freehint_balloon::queue_roles(acked).len();
        for i in 0..n {
            self.setup_queue(i);
        }
    }

    /// A small buffer in guest memory holding `bytes`.
    fn small(&mut self, bytes: &[u8]) -> u64 {
        let gpa = self.small_next;
        self.small_next += (bytes.len() as u64).div_ceil(64).max(1) * 64;
        assert!(self.small_next < VRING_BASE);
        self.mem.write_slice(bytes, GuestAddress(gpa)).unwrap();
        gpa
    }

    fn vq(&mut self, index: usize) -> &mut Vq {
        self.vqs.iter_mut().find(|q| q.index == index).unwrap()
    }

    /// The driver's cmd_id out buffer (4 bytes, le32).
    fn send_cmd_id(&mut self, q: usize, cmd: u32) {
        let gpa = self.small(&cmd.to_le_bytes());
        let mem = self.mem.clone();
        self.vq(q).add(&mem, &[(gpa, 4, false)]);
    }

    /// One free block as an in buffer (contents never read by the device).
    fn send_hint(&mut self, q: usize, gpa: u64, len: u32) {
        let mem = self.mem.clone();
        self.vq(q).add(&mem, &[(gpa, len, true)]);
    }

    fn kick_and_wait(&mut self, q: usize, n: u16) -> Vec<(u32, u32)> {
        let mem = self.mem.clone();
        let vq = self.vq(q);
        vq.kick();
        vq.wait_used(&mem, n)
    }

    fn config(&mut self) -> [u32; 4] {
        let (_, buf) = self
            .fe
            .get_config(0, 16, VhostUserConfigFlags::WRITABLE, &[0u8; 16])
            .unwrap();
        let w = |i: usize| u32::from_le_bytes(buf[i..i + 4].try_into().unwrap());
        [w(0), w(4), w(8), w(12)]
    }

    /// Runs `change` (which makes the backend send a config change and wait
    /// for the frontend's reply) on another thread while this frontend
    /// handles the request, like QEMU's main loop would.
    fn config_change<E: std::fmt::Debug + Send + 'static>(
        &mut self,
        change: impl FnOnce(&BalloonHandle) -> Result<(), E> + Send + 'static,
    ) {
        let handle = self.handle.clone();
        let t = std::thread::spawn(move || change(&handle));
        self.expect_config_change();
        t.join().unwrap().unwrap();
    }

    /// Receives one backend request (must be a config change).
    fn expect_config_change(&mut self) {
        let before = self.changes.0.load(Ordering::SeqCst);
        let mut pfd = libc::pollfd {
            fd: self.req.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, TIMEOUT.as_millis() as i32) };
        assert_eq!(n, 1, "no message on the backend request channel");
        self.req.handle_request().expect("a valid backend request");
        assert_eq!(self.changes.0.load(Ordering::SeqCst), before + 1);
    }

    fn guest_write_actual(&mut self, pages: u32) {
        self.fe
            .set_config(4, VhostUserConfigFlags::WRITABLE, &pages.to_le_bytes())
            .unwrap();
    }

    fn fill(&self, gpa: u64, len: u64, byte: u8) {
        self.mem
            .write_slice(&vec![byte; len as usize], GuestAddress(gpa))
            .unwrap();
    }

    fn wait_for(&self, what: &str, f: impl Fn(&BalloonHandle) -> bool) {
        let deadline = Instant::now() + TIMEOUT;
        while !f(&self.handle) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {:?}",
                self.handle.status()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        // Closing the frontend socket ends the backend's serve().
        // SAFETY: shutdown on the frontend's socket fd, which stays open.
        unsafe { libc::shutdown(self.fe.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(s) = self.server.take() {
            let _ = s.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}
