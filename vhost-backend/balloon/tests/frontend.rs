//! The balloon backend driven by a real vhost-user frontend (rust-vmm
//! `vhost::vhost_user::Frontend`) over a real Unix socket, with guest memory
//! in a shared memfd and a test driver that fills split virtqueues the way
//! Linux 6.x `virtio_balloon` does.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use freehint_balloon::layout::features::{self, bit};
use freehint_balloon::{
    BalloonBackend, BalloonConfig, BalloonError, BalloonHandle, BalloonState, RejectReason,
    BALLOON_STATE_VERSION, FENCED_HINT_CMD_ID,
};
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
        let mut h = self.hints.lock().unwrap();
        h.extend(ranges.iter().map(|r| (cmd_id, *r)));
        HintOutcome {
            hint_ranges_applied: ranges.len() as u64,
            ..HintOutcome::default()
        }
    }

    fn reported_free(&self, ranges: &[GpaRange]) -> HintOutcome {
        self.gate();
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
        let path = std::env::temp_dir().join(format!(
            "freehint-balloon-test-{}-{}.sock",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        let sink = Arc::new(RecordingSink::default());
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

// ------------------------------------------------------------- tests

/// A hostile guest hinting many tiny disjoint ranges in one batch: the
/// device keeps at most one range per 8 MiB of guest memory plus 1024 for
/// the batch, hands on those, and refuses and counts the rest.
#[test]
fn a_batch_of_many_tiny_disjoint_hints_is_bounded_and_the_rest_counted() {
    let mut h = Harness::start(ALL_BALLOON);
    let fp = 3;
    h.config_change(|b| b.start_round(CmdId(7)));
    h.send_cmd_id(fp, 7);
    h.kick_and_wait(fp, 1);
    let limit = RAM_BYTES / (8 * MIB) + 1024;
    // Every other 4 KiB page of the first 10 MiB: 1250 separate ranges,
    // in chains of 250 (the queue has 256 descriptors).
    let (chains, per_chain) = (5u64, 250u64);
    for c in 0..chains {
        let bufs: Vec<(u64, u32, bool)> = (0..per_chain)
            .map(|k| ((c * per_chain + k) * 8192, 4096, true))
            .collect();
        let mem = h.mem.clone();
        h.vq(fp).add(&mem, &bufs);
        h.kick_and_wait(fp, 1);
    }
    h.send_cmd_id(fp, 0);
    h.kick_and_wait(fp, 1);
    let hints = h.sink.hints();
    assert_eq!(hints.len() as u64, limit);
    assert!(hints
        .iter()
        .all(|&(id, r)| id == CmdId(7) && r.len_bytes == 4096));
    assert_eq!(
        h.handle.rejected(RejectReason::BatchRangesFull),
        chains * per_chain - limit
    );
    // Contiguous hints merge: a new batch of 4 MiB blocks side by side is
    // handed on whole, however many blocks.
    h.config_change(|b| b.start_round(CmdId(8)));
    h.send_cmd_id(fp, 8);
    for i in 0..12 {
        h.send_hint(fp, 12 * MIB + i * HINT_BLOCK / 4, (HINT_BLOCK / 4) as u32);
    }
    h.send_cmd_id(fp, 0);
    h.kick_and_wait(fp, 14);
    assert_eq!(h.sink.hints().len() as u64, limit + 12);
}

#[test]
fn hint_round_reaches_sink_with_cmd_id_and_done_is_sent() {
    let mut h = Harness::start(ALL_BALLOON);
    // Full features: inflate 0, deflate 1, stats 2, free_page 3, reporting 4.
    let fp = 3;
    h.fill(0, 12 * MIB, 0x5a);

    h.config_change(|b| b.start_round(CmdId(7)));
    assert_eq!(h.config()[2], 7, "free_page_hint_cmd_id");

    h.send_cmd_id(fp, 7);
    for i in 0..3 {
        h.send_hint(fp, i * HINT_BLOCK, HINT_BLOCK as u32);
    }
    h.send_cmd_id(fp, 0); // STOP
    let used = h.kick_and_wait(fp, 5);
    assert!(used.iter().all(|&(_, len)| len == 0), "{used:?}");
    let want: Vec<(CmdId, GpaRange)> = (0..3)
        .map(|i| (CmdId(7), GpaRange::new(i * HINT_BLOCK, HINT_BLOCK)))
        .collect();
    assert_eq!(h.sink.hints(), want);
    // Hinted blocks are neither read nor discarded.
    assert!(is_data(&h.file, 0, 12 * MIB));

    // A batch tagged with an older cmd_id still reaches the sink, with its
    // own id (the engine drops it as stale).
    h.send_cmd_id(fp, 6);
    h.send_hint(fp, 12 * MIB, HINT_BLOCK as u32);
    h.send_cmd_id(fp, 0);
    h.kick_and_wait(fp, 3);
    assert_eq!(
        h.sink.hints().last(),
        Some(&(CmdId(6), GpaRange::new(12 * MIB, HINT_BLOCK)))
    );

    // After STOP, a hint with no batch open is dropped and counted.
    h.send_hint(fp, 16 * MIB, HINT_BLOCK as u32);
    h.kick_and_wait(fp, 1);
    assert_eq!(h.sink.hints().len(), 4);
    assert_eq!(h.handle.rejected(RejectReason::HintWithoutCmdId), 1);

    h.config_change(|b| b.stop_round());
    assert_eq!(h.config()[2], 0);
    h.config_change(|b| b.finish());
    assert_eq!(h.config()[2], 1, "DONE in config");

    let st = h.handle.status();
    assert_eq!(st.counters.hint_ranges, 4);
    assert_eq!(st.counters.hint_bytes, 4 * HINT_BLOCK);
    assert_eq!(st.counters.hint_batches, 2);
    assert_eq!(st.counters.config_changes_sent, 3);
    assert!(st.backend_channel);
    // Not a round id.
    assert!(h.handle.start_round(CmdId::DONE).is_err());
}

#[test]
fn a_cmd_id_buffer_rewritten_for_a_newer_round_is_fenced() {
    let mut h = Harness::start(ALL_BALLOON);
    let fp = 3;
    let mem = h.mem.clone();
    h.config_change(|b| b.start_round(CmdId(7)));
    // The driver answers round 7 from its one cmd_id buffer; the device
    // has not got to the chains yet.
    let cmd_buf = h.small(&7u32.to_le_bytes());
    h.vq(fp).add(&mem, &[(cmd_buf, 4, false)]);
    h.send_hint(fp, 0, HINT_BLOCK as u32);
    h.send_hint(fp, HINT_BLOCK, HINT_BLOCK as u32);
    h.send_cmd_id(fp, 0);
    // The host starts round 8; the driver rewrites the same buffer in place
    // and queues it again, with the blocks it finds now.
    h.config_change(|b| b.start_round(CmdId(8)));
    mem.write_obj(8u32, GuestAddress(cmd_buf)).unwrap();
    h.vq(fp).add(&mem, &[(cmd_buf, 4, false)]);
    h.send_hint(fp, 8 * MIB, HINT_BLOCK as u32);
    h.send_cmd_id(fp, 0);
    h.kick_and_wait(fp, 7);
    // Round 7's blocks read "8" but were queued before 8 existed: never
    // tagged 8. Round 8's own blocks are.
    assert_eq!(
        h.sink.hints(),
        vec![
            (FENCED_HINT_CMD_ID, GpaRange::new(0, HINT_BLOCK)),
            (FENCED_HINT_CMD_ID, GpaRange::new(HINT_BLOCK, HINT_BLOCK)),
            (CmdId(8), GpaRange::new(8 * MIB, HINT_BLOCK)),
        ]
    );
    assert_ne!(FENCED_HINT_CMD_ID, CmdId(8));
    assert!(!FENCED_HINT_CMD_ID.is_round());
    let st = h.handle.status();
    assert_eq!(st.counters.hint_batches, 2);
    assert_eq!(st.counters.hint_batches_fenced, 1);
    assert_eq!(h.handle.round_reported(CmdId(8)), Some(true));

    // A normal round afterwards is tagged with its id.
    h.config_change(|b| b.start_round(CmdId(9)));
    mem.write_obj(9u32, GuestAddress(cmd_buf)).unwrap();
    h.vq(fp).add(&mem, &[(cmd_buf, 4, false)]);
    h.send_hint(fp, 16 * MIB, HINT_BLOCK as u32);
    h.send_cmd_id(fp, 0);
    h.kick_and_wait(fp, 3);
    assert_eq!(
        h.sink.hints().last(),
        Some(&(CmdId(9), GpaRange::new(16 * MIB, HINT_BLOCK)))
    );
    assert_eq!(h.handle.status().counters.hint_batches_fenced, 1);
    assert_eq!(h.handle.round_reported(CmdId(9)), Some(true));
}

#[test]
fn reported_ranges_become_holes_in_the_ram_file() {
    let mut h = Harness::start(ALL_BALLOON);
    let rep = 4;
    h.fill(16 * MIB, 8 * MIB, 0xa5);
    assert!(is_data(&h.file, 16 * MIB, 8 * MIB));
    // Linux reports up to 32 blocks of pageblock order per chain.
    let mem = h.mem.clone();
    h.vq(rep).add(
        &mem,
        &[
            (16 * MIB, (2 * MIB) as u32, true),
            (20 * MIB, (2 * MIB) as u32, true),
        ],
    );
    let used = h.kick_and_wait(rep, 1);
    assert_eq!(used[0].1, 0);
    assert_eq!(
        h.sink.reported(),
        vec![
            GpaRange::new(16 * MIB, 2 * MIB),
            GpaRange::new(20 * MIB, 2 * MIB)
        ]
    );
    assert!(is_hole(&h.file, 16 * MIB, 2 * MIB));
    assert!(is_hole(&h.file, 20 * MIB, 2 * MIB));
    assert!(
        is_data(&h.file, 18 * MIB, 2 * MIB),
        "unreported memory kept"
    );
    assert!(
        is_data(&h.file, 22 * MIB, 2 * MIB),
        "unreported memory kept"
    );
    let mut buf = vec![1u8; 4096];
    h.mem.read_slice(&mut buf, GuestAddress(17 * MIB)).unwrap();
    assert!(
        buf.iter().all(|&b| b == 0),
        "discarded memory reads as zero"
    );
    let st = h.handle.status();
    assert_eq!(st.counters.reported_ranges, 2);
    assert_eq!(st.counters.reported_bytes, 4 * MIB);
}

#[test]
fn poison_value_keeps_reported_pages() {
    let mut h = Harness::start(ALL_BALLOON);
    // The guest writes poison_val at probe.
    h.fe.set_config(
        12,
        VhostUserConfigFlags::WRITABLE,
        &0xaaaa_aaaau32.to_le_bytes(),
    )
    .unwrap();
    assert_eq!(h.config()[3], 0xaaaa_aaaa);
    h.fill(16 * MIB, 2 * MIB, 0xaa);
    let mem = h.mem.clone();
    h.vq(4).add(&mem, &[(16 * MIB, (2 * MIB) as u32, true)]);
    h.kick_and_wait(4, 1);
    assert!(is_data(&h.file, 16 * MIB, 2 * MIB));
    assert!(h.sink.reported().is_empty());
    assert_eq!(h.handle.status().counters.reported_skipped_poison, 1);
}

#[test]
fn poison_value_written_at_probe_before_set_features_is_kept() {
    // Linux writes poison_val in probe, before DRIVER_OK; QEMU forwards it
    // at once and sends SET_FEATURES only when it starts the device.
    let mut h = Harness::connect(5);
    h.fe.set_config(
        12,
        VhostUserConfigFlags::WRITABLE,
        &0xaaaa_aaaau32.to_le_bytes(),
    )
    .unwrap();
    assert_eq!(h.config()[3], 0xaaaa_aaaa);
    h.start_device(ALL_BALLOON);
    assert_eq!(h.config()[3], 0xaaaa_aaaa, "start keeps poison_val");
    h.fill(16 * MIB, 2 * MIB, 0xaa);
    let mem = h.mem.clone();
    h.vq(4).add(&mem, &[(16 * MIB, (2 * MIB) as u32, true)]);
    h.kick_and_wait(4, 1);
    assert!(
        is_data(&h.file, 16 * MIB, 2 * MIB),
        "a poisoned page was discarded to zero"
    );
    assert!(h.sink.reported().is_empty());
    let st = h.handle.status();
    assert_eq!(st.counters.reported_skipped_poison, 1);
    assert!(st.rejected.is_empty(), "{:?}", st.rejected);
}

fn stats_bytes(entries: &[(u16, u64)]) -> Vec<u8> {
    let mut b = Vec::new();
    for (tag, val) in entries {
        b.extend_from_slice(&tag.to_le_bytes());
        b.extend_from_slice(&val.to_le_bytes());
    }
    b
}

#[test]
fn stats_arrive_and_are_requested_again() {
    let mut h = Harness::start(ALL_BALLOON);
    let sq = 2;
    // Linux fills all its tags; a few suffice here.
    let first = stats_bytes(&[(4, 1000 * MIB), (5, 4096 * MIB), (6, 1500 * MIB), (2, 17)]);
    let gpa = h.small(&first);
    let mem = h.mem.clone();
    h.vq(sq).add(&mem, &[(gpa, first.len() as u32, false)]);
    h.vq(sq).kick();
    h.wait_for("stats", |h| h.status().guest_stats.updates == 1);
    let s = h.handle.status().guest_stats;
    assert_eq!(s.free_bytes, Some(1000 * MIB));
    assert_eq!(s.total_bytes, Some(4096 * MIB));
    assert_eq!(s.available_bytes, Some(1500 * MIB));
    assert_eq!(s.major_faults, Some(17));
    // The device holds the buffer until it wants new stats.
    h.vq(sq).assert_no_more_used(&mem);
    assert!(h.handle.request_stats().unwrap());
    assert!(!h.handle.request_stats().unwrap(), "nothing held any more");
    h.vq(sq).wait_used(&mem, 1);
    // The driver refills the same buffer and queues it again.
    let second = stats_bytes(&[(4, 900 * MIB), (5, 4096 * MIB), (6, 1400 * MIB), (2, 18)]);
    h.mem.write_slice(&second, GuestAddress(gpa)).unwrap();
    h.vq(sq).add(&mem, &[(gpa, second.len() as u32, false)]);
    h.vq(sq).kick();
    h.wait_for("second stats", |h| h.status().guest_stats.updates == 2);
    let s = h.handle.status().guest_stats;
    assert_eq!(s.free_bytes, Some(900 * MIB));
    assert_eq!(s.major_faults, Some(18));
    let json = serde_json::to_string(&h.handle.status()).unwrap();
    assert!(json.contains("\"free_bytes\":943718400"), "{json}");
}

fn pfn_array(first_pfn: u32, n: u32) -> Vec<u8> {
    (first_pfn..first_pfn + n)
        .flat_map(|p| p.to_le_bytes())
        .collect()
}

#[test]
fn device_state_travels_to_a_second_backend_and_stats_keep_coming() {
    // The source: poison set at probe, a target, two inflated pages, a
    // round published, and the guest's stats buffer held by the device.
    let mut src = Harness::start(ALL_BALLOON);
    let mem = src.mem.clone();
    src.fe
        .set_config(12, VhostUserConfigFlags::WRITABLE, &0x55u32.to_le_bytes())
        .unwrap();
    src.config_change(|b| b.set_target_pages(2));
    let arr = pfn_array(1000, 2);
    let gpa = src.small(&arr);
    src.vq(0).add(&mem, &[(gpa, arr.len() as u32, false)]);
    src.kick_and_wait(0, 1);
    src.guest_write_actual(2);
    src.config_change(|b| b.start_round(CmdId(5)));
    let sq = 2;
    let stats = stats_bytes(&[(4, 77 * MIB), (5, 512 * MIB)]);
    let stats_gpa = src.small(&stats);
    let head = src
        .vq(sq)
        .add(&mem, &[(stats_gpa, stats.len() as u32, false)]);
    src.vq(sq).kick();
    src.wait_for("stats", |h| h.status().guest_stats.updates == 1);

    // QEMU stops the source; the daemon exports.
    for i in 0..5 {
        src.fe.get_vring_base(i).unwrap();
    }
    let state = src.handle.export_state();
    assert_eq!(state.version, BALLOON_STATE_VERSION);
    assert_eq!(state.held_stats_head, Some(head));
    assert_eq!(
        (
            state.num_pages_4k,
            state.actual_pages_4k,
            state.poison_val,
            state.free_page_hint_cmd_id
        ),
        (2, 2, 0x55, 5)
    );
    assert_eq!(state.inflated_pfns_4k, vec![1000, 1001]);
    assert_eq!(state.guest_stats.free_bytes, Some(77 * MIB));
    assert_eq!(state.cmd_id_fences.len(), 1);
    let json = serde_json::to_string(&state).unwrap();
    let state: BalloonState = serde_json::from_str(&json).unwrap();
    assert_eq!(state, src.handle.export_state());

    // The destination: QEMU is connected and loaded its device state; the
    // guest's memory (the stats chain in the avail ring) came over.
    let mut dst = Harness::connect(5);
    let mut bad = state.clone();
    bad.version = BALLOON_STATE_VERSION + 1;
    let err = dst.handle.import_state(&bad).unwrap_err();
    assert!(
        matches!(err, BalloonError::StateVersion { found, .. } if found == bad.version),
        "{err}"
    );
    assert!(err.to_string().contains("version"), "{err}");
    let mut bad = state.clone();
    bad.held_stats_head = Some(u16::MAX);
    assert!(matches!(
        dst.handle.import_state(&bad),
        Err(BalloonError::InvalidState(_))
    ));
    assert_eq!(
        dst.config(),
        [0, 0, 0, 0],
        "a refused state applies nothing"
    );
    dst.handle.import_state(&state).unwrap();

    // QEMU starts the device at the source's positions (stats: 1).
    let dmem = dst.mem.clone();
    dst.set_mem_table();
    let acked = ALL_BALLOON | bit(features::VERSION_1) | bit(features::PROTOCOL_FEATURES);
    dst.fe.set_features(acked).unwrap();
    let dst_stats_gpa = dst.small(&stats);
    let mut stats_vq = Some(Vq::new(sq));
    for i in 0..5 {
        if i == sq {
            let mut vq = stats_vq.take().unwrap();
            let h = vq.add(&dmem, &[(dst_stats_gpa, stats.len() as u32, false)]);
            assert_eq!(h, head);
            dst.setup_vq(vq, 1);
        } else {
            dst.setup_queue(i);
        }
    }
    assert_eq!(dst.config(), [2, 2, 5, 0x55]);
    let st = dst.handle.status();
    assert_eq!(st.balloon_pages, 2);
    assert_eq!(st.guest_stats.free_bytes, Some(77 * MIB));
    // Nothing the start did returned the buffer, or lost it.
    dst.vq(sq).assert_no_more_used(&dmem);
    assert!(dst.handle.request_stats().unwrap());
    assert_eq!(dst.vq(sq).wait_used(&dmem, 1), vec![(u32::from(head), 0)]);
    // The guest refills its buffer and queues it again: stats go on.
    let fresh = stats_bytes(&[(4, 66 * MIB)]);
    dst.mem
        .write_slice(&fresh, GuestAddress(dst_stats_gpa))
        .unwrap();
    dst.vq(sq)
        .add(&dmem, &[(dst_stats_gpa, fresh.len() as u32, false)]);
    dst.vq(sq).kick();
    dst.wait_for("stats after migration", |h| {
        h.status().guest_stats.free_bytes == Some(66 * MIB)
    });
    assert!(
        dst.handle.status().rejected.is_empty(),
        "{:?}",
        dst.handle.status().rejected
    );
}

#[test]
fn inflate_and_deflate_follow_the_target() {
    let mut h = Harness::start(ALL_BALLOON);
    h.config_change(|b| b.set_target_pages(512));
    assert_eq!(h.config()[0], 512);

    // The driver inflates in arrays of at most 256 PFNs, waiting for each.
    let base_pfn = (32 * MIB / 4096) as u32;
    h.fill(32 * MIB, 2 * MIB, 0x77);
    for k in 0..2 {
        let arr = pfn_array(base_pfn + k * 256, 256);
        let gpa = h.small(&arr);
        let mem = h.mem.clone();
        h.vq(0).add(&mem, &[(gpa, arr.len() as u32, false)]);
        h.kick_and_wait(0, 1);
    }
    h.guest_write_actual(512);
    let st = h.handle.status();
    assert_eq!(st.balloon_pages, 512);
    assert_eq!(st.config.actual, 512);
    assert_eq!(h.config()[1], 512);
    assert!(
        is_hole(&h.file, 32 * MIB, 2 * MIB),
        "inflated pages discarded"
    );

    h.config_change(|b| b.set_target_pages(256));
    assert_eq!(h.config()[0], 256);
    let arr = pfn_array(base_pfn + 256, 256);
    let gpa = h.small(&arr);
    let mem = h.mem.clone();
    h.vq(1).add(&mem, &[(gpa, arr.len() as u32, false)]);
    h.kick_and_wait(1, 1);
    h.guest_write_actual(256);
    let st = h.handle.status();
    assert_eq!(st.balloon_pages, 256);
    assert_eq!(st.config.actual, 256);
    assert_eq!(st.counters.inflated_pfns, 512);
    assert_eq!(st.counters.deflated_pfns, 256);
    assert_eq!(st.counters.deflated_unknown_pfns, 0);
}

#[test]
fn queue_indices_are_compacted_for_every_feature_combination() {
    let s = bit(features::STATS_VQ);
    let f = bit(features::FREE_PAGE_HINT);
    let r = bit(features::REPORTING);
    // (features, stats index, free-page index, reporting index), written
    // out by hand from the Linux driver's find_vqs.
    type Row = (u64, Option<usize>, Option<usize>, Option<usize>);
    let table: [Row; 8] = [
        (0, None, None, None),
        (s, Some(2), None, None),
        (f, None, Some(2), None),
        (r, None, None, Some(2)),
        (s | f, Some(2), Some(3), None),
        (s | r, Some(2), None, Some(3)),
        (f | r, None, Some(2), Some(3)),
        (s | f | r, Some(2), Some(3), Some(4)),
    ];
    for (feat, sq, fq, rq) in table {
        let mut h = Harness::start(feat | bit(features::PAGE_POISON));
        let nq = 2 + [sq, fq, rq].iter().filter(|x| x.is_some()).count();
        assert_eq!(h.vqs.len(), nq);
        // Inflate is always 0.
        let arr = pfn_array(100, 1);
        let gpa = h.small(&arr);
        let mem = h.mem.clone();
        h.vq(0).add(&mem, &[(gpa, 4, false)]);
        h.kick_and_wait(0, 1);
        assert_eq!(
            h.handle.status().counters.inflated_pfns,
            1,
            "features {feat:#x}"
        );
        if let Some(q) = fq {
            h.send_cmd_id(q, 9);
            h.send_hint(q, 0, HINT_BLOCK as u32);
            h.send_cmd_id(q, 0);
            h.kick_and_wait(q, 3);
            assert_eq!(
                h.sink.hints(),
                vec![(CmdId(9), GpaRange::new(0, HINT_BLOCK))],
                "features {feat:#x}"
            );
        }
        if let Some(q) = rq {
            h.fill(8 * MIB, 2 * MIB, 1);
            let mem = h.mem.clone();
            h.vq(q).add(&mem, &[(8 * MIB, (2 * MIB) as u32, true)]);
            h.kick_and_wait(q, 1);
            assert_eq!(
                h.sink.reported(),
                vec![GpaRange::new(8 * MIB, 2 * MIB)],
                "features {feat:#x}"
            );
            assert!(is_hole(&h.file, 8 * MIB, 2 * MIB));
        }
        if let Some(q) = sq {
            let b = stats_bytes(&[(4, 42)]);
            let gpa = h.small(&b);
            let mem = h.mem.clone();
            h.vq(q).add(&mem, &[(gpa, b.len() as u32, false)]);
            h.vq(q).kick();
            h.wait_for("stats", |h| h.status().guest_stats.free_bytes == Some(42));
        }
        // Nothing else reached the sink from a wrongly mapped queue.
        assert_eq!(
            h.sink.hints().len(),
            usize::from(fq.is_some()),
            "features {feat:#x}"
        );
        assert_eq!(
            h.sink.reported().len(),
            usize::from(rq.is_some()),
            "features {feat:#x}"
        );
        assert!(
            h.handle.status().rejected.is_empty(),
            "{:?}",
            h.handle.status().rejected
        );
    }
}

#[test]
fn bad_input_is_rejected_counted_and_other_queues_keep_working() {
    let mut h = Harness::connect(16);
    let count = |h: &Harness, r| h.handle.rejected(r);

    // --- messages out of order, from the frontend
    // set_config before features is allowed (the driver writes config
    // before DRIVER_OK); it is applied.
    h.fe.set_config(4, VhostUserConfigFlags::WRITABLE, &5u32.to_le_bytes())
        .unwrap();
    let acked = ALL_BALLOON;
    h.fe.set_features(acked).unwrap();
    assert_eq!(h.config()[1], 5, "early actual write applied");
    // Ring addresses before the memory table: NACKed, counted.
    let early = Vq::new(0);
    let cfg = VringConfigData {
        queue_max_size: QSIZE,
        queue_size: QSIZE,
        flags: 0,
        desc_table_addr: h.host_base + early.desc,
        used_ring_addr: h.host_base + early.used,
        avail_ring_addr: h.host_base + early.avail,
        log_addr: None,
    };
    assert!(h.fe.set_vring_addr(0, &cfg).is_err());
    assert_eq!(count(&h, RejectReason::VringAddrBeforeMemTable), 1);
    // A queue kicked before the memory table.
    h.fe.set_vring_num(0, QSIZE).unwrap();
    h.fe.set_vring_kick(0, &early.kick).unwrap();
    h.fe.set_vring_enable(0, true).unwrap();
    early.kick();
    h.wait_for("kick before memory table", |h| {
        h.rejected(RejectReason::QueueNotReady) >= 1
    });
    // Bad vring messages.
    assert!(h.fe.set_vring_num(1, 0).is_err());
    assert!(h.fe.set_vring_num(1, 3).is_err());
    assert_eq!(count(&h, RejectReason::BadQueueSize), 2);
    let stray = EventFd::new(0).unwrap();
    assert!(h.fe.set_vring_kick(9, &stray).is_err());
    assert_eq!(count(&h, RejectReason::VringIndexOutOfRange), 1);
    // Config write outside the 16 bytes.
    h.fe.set_config(14, VhostUserConfigFlags::WRITABLE, &[1, 2, 3, 4])
        .unwrap();
    assert_eq!(count(&h, RejectReason::ConfigWriteOutOfRange), 1);

    // --- now set up properly; the same connection still works.
    h.set_mem_table();
    for i in 0..5 {
        h.setup_queue(i);
    }
    let (fp, rep) = (3, 4);

    // --- bad input from the guest on the free-page queue
    h.send_cmd_id(fp, 11);
    h.send_hint(fp, 0, HINT_BLOCK as u32); // good
    h.send_hint(fp, RAM_BYTES - MIB / 2, MIB as u32); // crosses the end of RAM
    h.send_hint(fp, 1 << 40, HINT_BLOCK as u32); // far outside
    h.send_hint(fp, 4 * MIB, 0); // zero length
    h.send_hint(fp, 2 * MIB, HINT_BLOCK as u32); // overlaps the first
    let mem = h.mem.clone();
    h.vq(fp).add_loop(&mem, 40 * MIB); // never ends
    let eight = h.small(&[11, 0, 0, 0, 0, 0, 0, 0]);
    h.vq(fp).add(&mem, &[(eight, 8, false)]); // cmd_id buffer of 8 bytes
    h.send_hint(fp, 8 * MIB, HINT_BLOCK as u32); // good, still batch 11
    h.send_cmd_id(fp, 0);
    let used = h.kick_and_wait(fp, 10);
    assert!(used.iter().all(|&(_, len)| len == 0));
    assert_eq!(
        h.sink.hints(),
        vec![
            (CmdId(11), GpaRange::new(0, HINT_BLOCK)),
            (CmdId(11), GpaRange::new(8 * MIB, HINT_BLOCK)),
        ]
    );
    assert_eq!(count(&h, RejectReason::DescOutsideMemory), 2);
    assert_eq!(count(&h, RejectReason::ZeroLength), 1);
    assert_eq!(count(&h, RejectReason::OverlappingRange), 1);
    assert_eq!(count(&h, RejectReason::ChainTooLong), 1);
    assert_eq!(count(&h, RejectReason::CmdIdBufferSize), 1);

    // --- bad reports are not applied; good ones in the same chain are.
    h.fill(24 * MIB, 4 * MIB, 3);
    let mem = h.mem.clone();
    h.vq(rep).add(
        &mem,
        &[
            (24 * MIB, (2 * MIB) as u32, true),
            (RAM_BYTES, (2 * MIB) as u32, true), // outside
            (25 * MIB, (2 * MIB) as u32, true),  // overlaps
            (26 * MIB, 0, true),                 // empty
        ],
    );
    h.kick_and_wait(rep, 1);
    assert_eq!(h.sink.reported(), vec![GpaRange::new(24 * MIB, 2 * MIB)]);
    assert!(is_hole(&h.file, 24 * MIB, 2 * MIB));
    assert!(
        is_data(&h.file, 26 * MIB, 2 * MIB),
        "overlapping report not applied"
    );
    assert_eq!(count(&h, RejectReason::DescOutsideMemory), 3);
    assert_eq!(count(&h, RejectReason::OverlappingRange), 2);
    assert_eq!(count(&h, RejectReason::ZeroLength), 2);

    // --- a PFN outside memory on the inflate queue is not discarded.
    let arr: Vec<u8> = [0x10_0000u32, 4096]
        .iter()
        .flat_map(|p| p.to_le_bytes())
        .collect();
    h.fill(4096 * 4096, 4096, 9);
    let gpa = h.small(&arr);
    let mem = h.mem.clone();
    h.vq(0).add(&mem, &[(gpa, 8, false)]);
    h.kick_and_wait(0, 1);
    assert_eq!(count(&h, RejectReason::DescOutsideMemory), 4);
    assert_eq!(h.handle.status().balloon_pages, 1);

    // --- the free-page queue keeps working after all that.
    h.send_cmd_id(fp, 12);
    h.send_hint(fp, 40 * MIB, HINT_BLOCK as u32);
    h.send_cmd_id(fp, 0);
    h.kick_and_wait(fp, 3);
    assert_eq!(
        h.sink.hints().last(),
        Some(&(CmdId(12), GpaRange::new(40 * MIB, HINT_BLOCK)))
    );
    let st = h.handle.status();
    assert_eq!(st.rejected.get("chain_too_long"), Some(&1));
    assert!(st.memory_table);
}

#[test]
fn get_vring_base_waits_for_the_hints_in_flight_and_nothing_moves_after() {
    let mut h = Harness::start(ALL_BALLOON);
    let fp = 3;
    let sink = h.sink.clone();
    let held = sink.hold();
    // One batch of many small blocks: more chains than one pass.
    const BLOCK: u64 = 64 * 1024;
    let blocks: u16 = 200;
    h.send_cmd_id(fp, 7);
    for i in 0..u64::from(blocks) {
        h.send_hint(fp, i * BLOCK, BLOCK as u32);
    }
    h.send_cmd_id(fp, 0);
    let total = blocks + 2;
    h.vq(fp).kick();
    let base = h.get_vring_base_while_worker_busy(fp, held);

    let mem = h.mem.clone();
    let used = h.vq(fp).used_idx(&mem);
    assert!(
        base > 0 && base < total,
        "base {base}: the worker stopped popping"
    );
    assert_eq!(used, base, "every chain popped is returned, no other");
    assert_eq!(h.handle.status().counters.buffers_used, u64::from(base));
    // The popped chains were the cmd_id and base - 1 blocks, all delivered.
    let want: Vec<(CmdId, GpaRange)> = (0..u64::from(base) - 1)
        .map(|i| (CmdId(7), GpaRange::new(i * BLOCK, BLOCK)))
        .collect();
    assert_eq!(h.sink.hints(), want);
    // Nothing moves any more: the rest waits in the avail ring.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(h.vq(fp).used_idx(&mem), used);
    assert_eq!(h.sink.hints().len(), want.len());
    h.vq(fp).kick();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        h.vq(fp).used_idx(&mem),
        used,
        "a stopped ring was processed"
    );
}

#[test]
fn get_vring_base_waits_for_the_reports_in_flight_and_no_hole_is_punched_after() {
    let mut h = Harness::start(ALL_BALLOON);
    let rep = 4;
    const CHUNK: u64 = 256 * 1024;
    let chains: u16 = 100;
    h.fill(0, u64::from(chains) * CHUNK, 0x3c);
    let sink = h.sink.clone();
    let held = sink.hold();
    let mem = h.mem.clone();
    for i in 0..u64::from(chains) {
        h.vq(rep).add(&mem, &[(i * CHUNK, CHUNK as u32, true)]);
    }
    h.vq(rep).kick();
    let base = h.get_vring_base_while_worker_busy(rep, held);

    assert!(base > 0 && base < chains, "base {base}");
    assert_eq!(h.vq(rep).used_idx(&mem), base);
    let check = |h: &Harness| {
        for i in 0..u64::from(chains) {
            if i < u64::from(base) {
                assert!(is_hole(&h.file, i * CHUNK, CHUNK), "chain {i} popped");
            } else {
                assert!(is_data(&h.file, i * CHUNK, CHUNK), "chain {i} not popped");
            }
        }
    };
    check(&h);
    assert_eq!(h.sink.reported().len(), usize::from(base));
    std::thread::sleep(Duration::from_millis(200));
    check(&h);
    assert_eq!(h.vq(rep).used_idx(&mem), base);
    assert_eq!(h.sink.reported().len(), usize::from(base));
}

#[test]
fn chains_queued_while_a_ring_is_stopped_wait_for_its_restart() {
    let mut h = Harness::start(ALL_BALLOON);
    let (sq, fp) = (2, 3);
    let mem = h.mem.clone();
    // The device holds the guest's stats buffer.
    let b = stats_bytes(&[(4, 42)]);
    let gpa = h.small(&b);
    h.vq(sq).add(&mem, &[(gpa, b.len() as u32, false)]);
    h.vq(sq).kick();
    h.wait_for("stats", |h| h.status().guest_stats.updates == 1);

    // QEMU stops the device (vhost_dev_stop: rings disabled, then
    // GET_VRING_BASE).
    h.fe.set_vring_enable(sq, false).unwrap();
    h.fe.set_vring_enable(fp, false).unwrap();
    assert_eq!(h.fe.get_vring_base(sq).unwrap(), 1);
    assert_eq!(h.fe.get_vring_base(fp).unwrap(), 0);
    // The stats buffer stays held while its ring is stopped.
    assert!(!h.handle.request_stats().unwrap());
    h.vq(sq).assert_no_more_used(&mem);
    // The guest queues a hint batch and kicks: nothing happens.
    h.send_cmd_id(fp, 7);
    h.send_hint(fp, 0, HINT_BLOCK as u32);
    h.send_hint(fp, HINT_BLOCK, HINT_BLOCK as u32);
    h.send_cmd_id(fp, 0);
    h.vq(fp).kick();
    h.vq(fp).assert_no_more_used(&mem);
    assert!(h.sink.hints().is_empty());

    // The migration failed; QEMU starts the rings again. The queued chains
    // are processed without the guest kicking again.
    h.restart_queue(sq, 1);
    h.restart_queue(fp, 0);
    let used = h.vq(fp).wait_used(&mem, 4);
    assert!(used.iter().all(|&(_, len)| len == 0));
    assert_eq!(
        h.sink.hints(),
        vec![
            (CmdId(7), GpaRange::new(0, HINT_BLOCK)),
            (CmdId(7), GpaRange::new(HINT_BLOCK, HINT_BLOCK)),
        ]
    );
    assert!(h.handle.request_stats().unwrap());
    h.vq(sq).wait_used(&mem, 1);
}

#[test]
fn nothing_touches_guest_memory_while_paused_and_queued_chains_run_after() {
    // A postcopy destination: paused before the device even starts.
    let mut h = Harness::connect(5);
    h.handle.pause_memory_access();
    h.start_device(ALL_BALLOON);
    let (sq, fp) = (2, 3);
    let mem = h.mem.clone();
    let b = stats_bytes(&[(4, 42)]);
    let gpa = h.small(&b);
    h.vq(sq).add(&mem, &[(gpa, b.len() as u32, false)]);
    h.vq(sq).kick();
    h.send_cmd_id(fp, 9);
    h.send_hint(fp, 0, HINT_BLOCK as u32);
    h.send_cmd_id(fp, 0);
    h.vq(fp).kick();
    std::thread::sleep(Duration::from_millis(200));
    h.vq(sq).assert_no_more_used(&mem);
    h.vq(fp).assert_no_more_used(&mem);
    assert!(h.sink.hints().is_empty());
    assert_eq!(
        h.handle.status().guest_stats.updates,
        0,
        "stats read while paused"
    );
    assert!(!h.handle.request_stats().unwrap());

    // The last page arrived: the chains queued meanwhile are served
    // without the guest kicking again.
    h.handle.resume_memory_access();
    h.vq(fp).wait_used(&mem, 3);
    assert_eq!(
        h.sink.hints(),
        vec![(CmdId(9), GpaRange::new(0, HINT_BLOCK))]
    );
    h.wait_for("stats", |h| h.status().guest_stats.updates == 1);
    assert!(h.handle.request_stats().unwrap());
    h.vq(sq).wait_used(&mem, 1);
}

#[test]
fn config_changes_are_held_while_the_frontend_has_the_device_stopped() {
    // QEMU 10.0 crashes on a config change between stopping the device
    // (GET_VRING_BASE) and starting it again: the backend holds it.
    let mut h = Harness::start(ALL_BALLOON);
    h.fe.get_vring_base(0).unwrap();
    h.handle.start_round(CmdId(9)).unwrap(); // returns at once: held
    let mut pfd = libc::pollfd {
        fd: h.req.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, 200) };
    assert_eq!(n, 0, "a config change was sent to a stopped device");
    assert_eq!(h.config()[2], 9, "the config itself is updated");
    // The frontend starts the device again: the held change goes out.
    let kick = h.vqs[0].kick.try_clone().unwrap();
    h.fe.set_vring_kick(0, &kick).unwrap();
    h.expect_config_change();
    assert_eq!(h.handle.status().counters.config_changes_sent, 1);
}
