//! freehint's guest agent as a [`HintSource`].
//!
//! QEMU exposes the agent's virtio-serial port as a chardev socket
//! (`-chardev socket,id=fhagent,path=SOCK,server=on,wait=off -device
//! virtserialport,chardev=fhagent,name=org.freehint.agent.0`). For each
//! outgoing migration the daemon connects to it, asks the agent who it is
//! (`Query` → `Hello`), and then, every time the engine opens hint round
//! `k` (right after the dirty-log sync that opened it), asks for a report
//! tagged `k`. The agent answers with the guest's free page frames, which
//! go, as guest-physical ranges, into the same [`HintSink`] and the same
//! epoch rule as the balloon's hints (docs/ARCHITECTURE.md, "Hints and the
//! dirty log"). Unlike the balloon's, these pages stay the guest's: one
//! allocated and written after the report is caught by the dirty log.
//!
//! Nothing the agent sends is trusted. Every frame is bounded before it is
//! read ([`freehint_agent_protocol::MAX_PAYLOAD_BYTES`]), ranges outside
//! guest RAM are rejected by the sink, ranges of a report nobody asked for
//! are dropped before they reach it, a report may not hint more pages
//! than guest RAM has, and garbage only costs a resync: each is counted in
//! [`AgentStats`], and the migration goes on with whatever hints were
//! good. An agent that says nothing only makes the engine stop waiting for
//! its report.
//!
//! A guest whose free pages have a defined content relies on it, so a
//! reported page may not simply be left out: the destination would keep
//! whatever an earlier round sent there. Under `init_on_free=1` (zeros)
//! and `page_poison=1` (every byte 0xaa, which the kernel checks when it
//! hands a page out again) the ranges go to
//! [`HintSink::filled_free_page_hints`], which sends the pages as zero or
//! fill records instead of their data.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use freehint_agent_protocol::{Decoder, FreeContent, Hello, Message, PfnRange};
use freehint_types::{CmdId, GpaRange, HintCommand, HintSink, HintSource, HintSourceError};
use serde::{Deserialize, Serialize};

use crate::lock;

/// Rounds whose reports are remembered (older ones count as stale).
const ROUNDS_KEPT: usize = 32;
/// How long the agent may take to say hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(3);
/// How long writing a request to the port may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// The cmd_id of a link's one `Prepare` (0 is never a hint round).
const PREPARE_ID: u32 = 0;

/// Why the agent could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The chardev socket could not be reached or used.
    #[error("the agent's socket {path}: {source}")]
    Socket {
        /// The socket.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// No `Hello` came back.
    #[error(
        "the guest agent did not answer within {0:?} (is freehint-agent running in the guest?)"
    )]
    Silent(Duration),
    /// The agent's answer was not the protocol.
    #[error("the guest agent's hello: {0}")]
    Protocol(#[from] freehint_agent_protocol::ProtocolError),
    /// The agent's page size is not one the daemon can map.
    #[error("the guest agent reports {0}-byte pages; only 4096 is supported")]
    PageSize(u32),
    /// The guest could not prepare (drop caches, compact).
    #[error("the guest agent could not prepare the guest: {0}")]
    PrepareFailed(String),
    /// No answer to `Prepare`.
    #[error("the guest agent did not finish preparing the guest within {0:?}")]
    PrepareTimeout(Duration),
}

/// What the agent did during one migration, counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStats {
    /// Reports asked for.
    pub reports_asked: u64,
    /// Reports the agent completed (`Done`).
    pub reports_done: u64,
    /// Reports the agent could not make (`Failed`).
    pub reports_failed: u64,
    /// Ranges received in reports that were asked for.
    pub ranges_received: u64,
    /// Ranges of reports nobody asked for (or asked too long ago), dropped.
    pub ranges_unasked: u64,
    /// Ranges dropped because their report already hinted as many pages
    /// as guest RAM has.
    pub ranges_over_limit: u64,
    /// Ranges whose addresses overflow or lie outside guest RAM, dropped.
    pub ranges_invalid: u64,
    /// Frames that broke the protocol, and messages the host never takes
    /// from a guest.
    pub protocol_errors: u64,
    /// Bytes skipped to find the next frame after a protocol error.
    pub bytes_skipped: u64,
}

impl AgentStats {
    /// Everything the agent sent that was wrong.
    pub fn guest_errors(&self) -> u64 {
        self.ranges_unasked + self.ranges_over_limit + self.ranges_invalid + self.protocol_errors
    }
}

struct Round {
    cmd_id: u32,
    asked_at: Instant,
    pages_hinted: u64,
    ended_after: Option<Duration>,
}

struct State {
    rounds: VecDeque<Round>,
    stats: AgentStats,
    /// The answer to `Prepare`, once it came.
    prepared: Option<Result<Prepared, String>>,
}

/// What preparing the guest did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prepared {
    /// How long the guest took.
    pub took: Duration,
    /// Bytes that became free (MemFree after − before; 0 if it fell).
    pub freed_bytes: u64,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when `prepared` is set or the link closes.
    changed: Condvar,
    /// The link is gone: no report will end any more.
    closed: AtomicBool,
}

/// A connection to the guest agent for one migration; hangs up when
/// dropped.
pub struct AgentLink {
    writer: Mutex<UnixStream>,
    hello: Hello,
    min_order: u8,
    shared: Arc<Shared>,
}

impl AgentLink {
    /// Connects to the agent's chardev socket at `path`, waits for its
    /// hello, and starts feeding the ranges it reports to `sink`, at most
    /// `max_pages` pages per report (guest RAM). Reports ask for free
    /// blocks of order `min_order` and up.
    /// The hello may take [`HELLO_TIMEOUT`].
    pub fn connect(
        path: &Path,
        sink: Arc<dyn HintSink>,
        max_pages: u64,
        min_order: u8,
    ) -> Result<Self, AgentError> {
        Self::connect_within(path, sink, max_pages, min_order, HELLO_TIMEOUT)
    }

    /// [`Self::connect`], waiting `hello_timeout` for the hello.
    pub fn connect_within(
        path: &Path,
        sink: Arc<dyn HintSink>,
        max_pages: u64,
        min_order: u8,
        hello_timeout: Duration,
    ) -> Result<Self, AgentError> {
        let socket_err = |source| AgentError::Socket {
            path: path.display().to_string(),
            source,
        };
        let mut stream = UnixStream::connect(path).map_err(socket_err)?;
        stream
            .set_write_timeout(Some(WRITE_TIMEOUT))
            .map_err(socket_err)?;
        let (hello, decoder, skipped) =
            handshake(&mut stream, hello_timeout).map_err(|e| match e {
                Handshake::Io(source) => socket_err(source),
                Handshake::Agent(e) => e,
            })?;
        if hello.page_bytes != 4096 {
            return Err(AgentError::PageSize(hello.page_bytes));
        }
        stream.set_read_timeout(None).map_err(socket_err)?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rounds: VecDeque::new(),
                stats: AgentStats {
                    bytes_skipped: skipped,
                    ..AgentStats::default()
                },
                prepared: None,
            }),
            changed: Condvar::new(),
            closed: AtomicBool::new(false),
        });
        let reader = stream.try_clone().map_err(socket_err)?;
        let reading = Reader {
            shared: shared.clone(),
            sink,
            page_bytes: u64::from(hello.page_bytes),
            max_pages,
            fill: match hello.free_content {
                FreeContent::Undefined => None,
                FreeContent::Zero => Some(0),
                FreeContent::Pattern(b) => Some(b),
            },
        };
        crate::spawn("agent", move || reading.run(reader, decoder))
            .map_err(|_| socket_err(std::io::Error::other("could not start its reader")))?;
        tracing::info!(
            socket = %path.display(),
            page_bytes = hello.page_bytes,
            free_content = ?hello.free_content,
            "the guest agent answered; it supplies the free-page hints"
        );
        Ok(Self {
            writer: Mutex::new(stream),
            hello,
            min_order,
            shared,
        })
    }

    /// What the agent said about the guest.
    pub fn hello(&self) -> Hello {
        self.hello
    }

    /// Asks the guest to drop its clean page cache and/or compact its
    /// memory, and waits for it (at most `timeout`). Call it once, before
    /// the migration's first report.
    pub fn prepare(
        &self,
        drop_caches: bool,
        compact: bool,
        timeout: Duration,
    ) -> Result<Prepared, AgentError> {
        self.send(&Message::Prepare {
            cmd_id: PREPARE_ID,
            drop_caches,
            compact,
        })
        .map_err(|source| AgentError::Socket {
            path: "(the agent's port)".into(),
            source,
        })?;
        let t = Instant::now();
        let mut st = lock(&self.shared.state);
        loop {
            if let Some(answer) = st.prepared.take() {
                return answer.map_err(AgentError::PrepareFailed);
            }
            if self.shared.closed.load(SeqCst) {
                return Err(AgentError::PrepareFailed("the link closed".into()));
            }
            let left = timeout.saturating_sub(t.elapsed());
            if left.is_zero() {
                return Err(AgentError::PrepareTimeout(timeout));
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, left.min(Duration::from_millis(100)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Writes one message to the agent.
    fn send(&self, m: &Message) -> std::io::Result<()> {
        let mut frame = Vec::new();
        m.encode(&mut frame);
        lock(&self.writer).write_all(&frame)
    }

    /// The counts so far.
    pub fn stats(&self) -> AgentStats {
        lock(&self.shared.state).stats
    }
}

impl Drop for AgentLink {
    fn drop(&mut self) {
        // Ends the reader's blocking read.
        let _ = lock(&self.writer).shutdown(std::net::Shutdown::Both);
    }
}

enum Handshake {
    Io(std::io::Error),
    Agent(AgentError),
}

/// Sends `Query` and reads until a `Hello`, within `timeout`. Returns the
/// hello, the decoder holding whatever came after it, and the bytes
/// skipped on the way (leftovers of an earlier conversation).
fn handshake(
    stream: &mut UnixStream,
    timeout: Duration,
) -> Result<(Hello, Decoder, u64), Handshake> {
    let mut query = Vec::new();
    Message::Query.encode(&mut query);
    stream.write_all(&query).map_err(Handshake::Io)?;
    let t = Instant::now();
    let mut decoder = Decoder::default();
    let mut buf = vec![0u8; 64 << 10];
    let mut skipped = 0u64;
    let mut asked_again = false;
    loop {
        let left = timeout.saturating_sub(t.elapsed());
        if left.is_zero() {
            return Err(Handshake::Agent(AgentError::Silent(timeout)));
        }
        // Bytes written while nobody listened can be lost: ask once more
        // half-way.
        if !asked_again && t.elapsed() > timeout / 2 {
            asked_again = true;
            stream.write_all(&query).map_err(Handshake::Io)?;
        }
        stream
            .set_read_timeout(Some(left.min(timeout / 4).max(Duration::from_millis(1))))
            .map_err(Handshake::Io)?;
        match stream.read(&mut buf) {
            Ok(0) => {
                return Err(Handshake::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "QEMU closed the connection",
                )))
            }
            Ok(n) => decoder.push(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(Handshake::Io(e)),
        }
        while let Some(m) = decoder.next_message() {
            match m {
                Ok(Message::Hello(h)) => return Ok((h, decoder, skipped)),
                // A report of an earlier conversation.
                Ok(_) => {}
                Err(_) => skipped += decoder.resync() as u64,
            }
        }
        if decoder.pending_bytes() > freehint_agent_protocol::MAX_PAYLOAD_BYTES * 2 {
            return Err(Handshake::Agent(AgentError::Protocol(
                freehint_agent_protocol::ProtocolError::Malformed {
                    kind: "hello",
                    why: "no frame boundary in 128 KiB".into(),
                },
            )));
        }
    }
}

/// The thread that reads the agent's reports.
struct Reader {
    shared: Arc<Shared>,
    sink: Arc<dyn HintSink>,
    page_bytes: u64,
    max_pages: u64,
    /// Every byte of a free page in this guest, if defined (0:
    /// init_on_free; the poison byte: page_poison).
    fill: Option<u8>,
}

impl Reader {
    fn run(self, mut stream: UnixStream, mut decoder: Decoder) {
        let mut buf = vec![0u8; 64 << 10];
        self.drain(&mut decoder);
        loop {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => decoder.push(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("reading from the guest agent: {e}");
                    break;
                }
            }
            self.drain(&mut decoder);
        }
        self.shared.closed.store(true, SeqCst);
        self.shared.changed.notify_all();
        tracing::info!(stats = ?self.stats(), "the guest agent's link closed");
    }

    fn stats(&self) -> AgentStats {
        lock(&self.shared.state).stats
    }

    fn drain(&self, decoder: &mut Decoder) {
        while let Some(m) = decoder.next_message() {
            match m {
                Ok(Message::Ranges { cmd_id, ranges }) => self.ranges(cmd_id, &ranges),
                Ok(Message::Done {
                    cmd_id,
                    pages,
                    took_us,
                    truncated,
                    ..
                }) => {
                    if let Some(ms) = self.end(cmd_id, true) {
                        tracing::debug!(
                            cmd_id,
                            pages,
                            took_us,
                            truncated,
                            report_ms = ms,
                            "agent report done"
                        );
                    }
                }
                Ok(Message::Failed { cmd_id, reason }) if cmd_id == PREPARE_ID => {
                    self.prepared(Err(reason))
                }
                Ok(Message::Prepared {
                    cmd_id: PREPARE_ID,
                    took_us,
                    free_pages_before,
                    free_pages_after,
                }) => self.prepared(Ok(Prepared {
                    took: Duration::from_micros(took_us),
                    freed_bytes: free_pages_after
                        .saturating_sub(free_pages_before)
                        .saturating_mul(self.page_bytes),
                })),
                Ok(Message::Failed { cmd_id, reason }) => {
                    if self.end(cmd_id, false).is_some() {
                        tracing::warn!(cmd_id, "the guest agent could not report: {reason}");
                    }
                }
                // Another hello (the agent answered a repeated query).
                Ok(Message::Hello(_)) => {}
                Ok(
                    m @ (Message::Query
                    | Message::Report { .. }
                    | Message::Prepare { .. }
                    | Message::Prepared { .. }),
                ) => {
                    lock(&self.shared.state).stats.protocol_errors += 1;
                    tracing::warn!("the guest agent sent a host's {} message", m.kind().name());
                }
                Err(e) => {
                    let skipped = decoder.resync() as u64;
                    let mut st = lock(&self.shared.state);
                    st.stats.protocol_errors += 1;
                    st.stats.bytes_skipped += skipped;
                    tracing::warn!("from the guest agent: {e} (skipped {skipped} bytes)");
                }
            }
        }
    }

    fn prepared(&self, answer: Result<Prepared, String>) {
        lock(&self.shared.state).prepared = Some(answer);
        self.shared.changed.notify_all();
    }

    /// Marks report `cmd_id` ended; its time since asked, if it was asked
    /// for and had not ended.
    fn end(&self, cmd_id: u32, done: bool) -> Option<u64> {
        let mut st = lock(&self.shared.state);
        let Some(r) = st.rounds.iter_mut().find(|r| r.cmd_id == cmd_id) else {
            st.stats.protocol_errors += 1;
            return None;
        };
        if r.ended_after.is_some() {
            st.stats.protocol_errors += 1;
            return None;
        }
        let after = r.asked_at.elapsed();
        r.ended_after = Some(after);
        if done {
            st.stats.reports_done += 1;
        } else {
            st.stats.reports_failed += 1;
        }
        Some(after.as_millis() as u64)
    }

    fn ranges(&self, cmd_id: u32, ranges: &[PfnRange]) {
        let n = ranges.len() as u64;
        let mut gpa = Vec::with_capacity(ranges.len());
        {
            let mut st = lock(&self.shared.state);
            let State { rounds, stats, .. } = &mut *st;
            let Some(r) = rounds
                .iter_mut()
                .find(|r| r.cmd_id == cmd_id && r.ended_after.is_none())
            else {
                stats.ranges_unasked += n;
                return;
            };
            stats.ranges_received += n;
            for p in ranges {
                if r.pages_hinted.saturating_add(p.pages) > self.max_pages {
                    stats.ranges_over_limit += 1;
                    continue;
                }
                match (
                    p.first_pfn.checked_mul(self.page_bytes),
                    p.pages.checked_mul(self.page_bytes),
                ) {
                    (Some(start), Some(len)) => {
                        r.pages_hinted += p.pages;
                        gpa.push(GpaRange::new(start, len));
                    }
                    _ => stats.ranges_invalid += 1,
                }
            }
        }
        // Outside the lock: the sink takes the hint filter's lock, which
        // a dirty-log sync may hold.
        if gpa.is_empty() {
            return;
        }
        let outcome = match self.fill {
            Some(byte) => self.sink.filled_free_page_hints(CmdId(cmd_id), &gpa, byte),
            None => self.sink.free_page_hints(CmdId(cmd_id), &gpa),
        };
        // Outside guest RAM (the sink's translation refused them).
        lock(&self.shared.state).stats.ranges_invalid += outcome.hint_ranges_rejected_invalid;
    }
}

impl HintSource for AgentLink {
    fn start_round(&self, cmd_id: CmdId) -> Result<(), HintSourceError> {
        {
            let mut st = lock(&self.shared.state);
            if st.rounds.len() == ROUNDS_KEPT {
                st.rounds.pop_front();
            }
            st.rounds.push_back(Round {
                cmd_id: cmd_id.0,
                asked_at: Instant::now(),
                pages_hinted: 0,
                ended_after: None,
            });
            st.stats.reports_asked += 1;
        }
        self.send(&Message::Report {
            cmd_id: cmd_id.0,
            min_order: self.min_order,
        })
        .map_err(|e| HintSourceError::new(HintCommand::StartRound(cmd_id), e))
    }

    fn stop_round(&self) -> Result<(), HintSourceError> {
        // A report is one snapshot: there is nothing to stop. Ranges that
        // arrive after the final sync fall to the epoch rule.
        Ok(())
    }

    fn finish(&self) -> Result<(), HintSourceError> {
        // The agent holds no guest memory.
        Ok(())
    }

    fn round_reported(&self, cmd_id: CmdId) -> Option<bool> {
        if self.shared.closed.load(SeqCst) {
            return Some(true);
        }
        let st = lock(&self.shared.state);
        Some(
            st.rounds
                .iter()
                .any(|r| r.cmd_id == cmd_id.0 && r.ended_after.is_some()),
        )
    }

    fn name(&self) -> &'static str {
        "agent"
    }

    fn report_ms(&self, cmd_id: CmdId) -> Option<u64> {
        let st = lock(&self.shared.state);
        st.rounds
            .iter()
            .find(|r| r.cmd_id == cmd_id.0)
            .and_then(|r| r.ended_after)
            .map(|d| d.as_millis() as u64)
    }

    fn guest_errors(&self) -> u64 {
        self.stats().guest_errors()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use freehint_types::HintOutcome;
    use std::os::unix::net::UnixListener;

    /// Records every hint it is handed (zeroed ones apart).
    #[derive(Default)]
    struct Recorder(
        Mutex<Vec<(CmdId, Vec<GpaRange>)>>,
        Mutex<Vec<(CmdId, Vec<GpaRange>)>>,
    );

    impl HintSink for Recorder {
        fn free_page_hints(&self, cmd_id: CmdId, ranges: &[GpaRange]) -> HintOutcome {
            lock(&self.0).push((cmd_id, ranges.to_vec()));
            HintOutcome::default()
        }
        fn reported_free(&self, _: &[GpaRange]) -> HintOutcome {
            HintOutcome::default()
        }
        fn filled_free_page_hints(
            &self,
            cmd_id: CmdId,
            ranges: &[GpaRange],
            byte: u8,
        ) -> HintOutcome {
            assert_eq!(byte, 0, "init_on_free's zeros");
            lock(&self.1).push((cmd_id, ranges.to_vec()));
            HintOutcome::default()
        }
    }

    impl Recorder {
        fn pages(&self) -> u64 {
            lock(&self.0)
                .iter()
                .flat_map(|(_, r)| r.iter())
                .map(|r| r.len_bytes / 4096)
                .sum()
        }
    }

    fn frame(m: &Message) -> Vec<u8> {
        let mut out = Vec::new();
        m.encode(&mut out);
        out
    }

    fn hello(free_content: FreeContent) -> Vec<u8> {
        frame(&Message::Hello(Hello {
            page_bytes: 4096,
            free_content,
        }))
    }

    /// A fake agent on a socket (as QEMU would serve the port): runs
    /// `script` on the first connection.
    fn fake_agent(
        script: impl FnOnce(UnixStream) + Send + 'static,
    ) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let l = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            script(s);
        });
        (dir, path)
    }

    /// Reads one frame from the host.
    fn read_frame(s: &mut UnixStream) -> Message {
        let mut d = Decoder::default();
        let mut buf = [0u8; 256];
        loop {
            if let Some(m) = d.next_message() {
                return m.unwrap();
            }
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "the host hung up");
            d.push(&buf[..n]);
        }
    }

    fn wait_for(mut f: impl FnMut() -> bool) {
        let t = Instant::now();
        while !f() {
            assert!(t.elapsed() < Duration::from_secs(5), "timed out");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_silent_agent_is_given_up_with_a_clear_error() {
        let (_dir, path) = fake_agent(|s| {
            std::thread::sleep(Duration::from_secs(2));
            drop(s);
        });
        let t = Instant::now();
        let e = AgentLink::connect_within(
            &path,
            Arc::new(Recorder::default()),
            1 << 20,
            0,
            Duration::from_millis(300),
        )
        .err()
        .expect("no hello, no link");
        assert!(matches!(e, AgentError::Silent(_)), "{e}");
        assert!(e.to_string().contains("did not answer"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn a_missing_socket_is_refused_with_its_path() {
        let e = AgentLink::connect(
            Path::new("/nonexistent/agent.sock"),
            Arc::new(Recorder::default()),
            1,
            0,
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("/nonexistent/agent.sock"), "{e}");
    }

    /// Garbage before the hello, then, for the one report asked for:
    /// ranges of a report never asked for, a range whose address
    /// overflows, garbage, a flood beyond guest RAM, and good ranges.
    /// Only the good ones (within the per-report limit) reach the sink,
    /// and everything else is counted.
    #[test]
    fn garbage_unasked_overflowing_and_flooding_ranges_are_dropped_and_counted() {
        let max_pages = 1000;
        let (_dir, path) = fake_agent(|mut s| {
            s.write_all(b"leftover bytes of another conversation")
                .unwrap();
            assert_eq!(read_frame(&mut s), Message::Query);
            s.write_all(&hello(FreeContent::Undefined)).unwrap();
            let Message::Report { cmd_id, min_order } = read_frame(&mut s) else {
                panic!("expected a report");
            };
            assert_eq!(min_order, 0);
            let r = |first_pfn, pages| PfnRange { first_pfn, pages };
            s.write_all(&frame(&Message::Ranges {
                cmd_id: cmd_id + 7,
                ranges: vec![r(0, 10)],
            }))
            .unwrap();
            s.write_all(&frame(&Message::Ranges {
                cmd_id,
                ranges: vec![r(u64::MAX / 4096 + 1, 1), r(100, 600)],
            }))
            .unwrap();
            s.write_all(b"FHAGxxxxxxxxgarbage").unwrap();
            // 600 pages so far: this batch passes 1000 after its first.
            s.write_all(&frame(&Message::Ranges {
                cmd_id,
                ranges: (0..4096).map(|i| r(10_000 + 2 * i, 1)).collect(),
            }))
            .unwrap();
            s.write_all(&frame(&Message::Report {
                cmd_id,
                min_order: 0,
            }))
            .unwrap();
            s.write_all(&frame(&Message::Done {
                cmd_id,
                pages: 5000,
                ranges: 4098,
                took_us: 1,
                truncated: false,
            }))
            .unwrap();
            // After its end, the report takes nothing more.
            s.write_all(&frame(&Message::Ranges {
                cmd_id,
                ranges: vec![r(50_000, 1)],
            }))
            .unwrap();
            std::thread::sleep(Duration::from_millis(500));
        });
        let sink = Arc::new(Recorder::default());
        let link = AgentLink::connect(&path, sink.clone(), max_pages, 0).unwrap();
        assert!(link.stats().bytes_skipped > 0);
        assert_eq!(link.round_reported(CmdId(5)), Some(false));
        link.start_round(CmdId(5)).unwrap();
        wait_for(|| link.stats().ranges_unasked == 2);
        assert_eq!(link.round_reported(CmdId(5)), Some(true));
        assert!(link.report_ms(CmdId(5)).is_some());
        let st = link.stats();
        assert_eq!(st.reports_asked, 1);
        assert_eq!(st.reports_done, 1);
        assert_eq!(st.ranges_invalid, 1);
        assert_eq!(st.ranges_over_limit, 4096 - 400);
        assert!(st.protocol_errors >= 2, "{st:?}");
        assert_eq!(st.guest_errors(), link.guest_errors());
        assert_eq!(sink.pages(), max_pages);
        let got = lock(&sink.0);
        assert!(got.iter().all(|(id, _)| *id == CmdId(5)));
        assert_eq!(got[0].1, vec![GpaRange::new(100 * 4096, 600 * 4096)]);
    }

    /// A guest with init_on_free: its ranges go to the sink as zeroed
    /// hints, which it must send as zero records, never as plain ones.
    #[test]
    fn an_init_on_free_guests_ranges_are_zeroed_hints() {
        let (_dir, path) = fake_agent(|mut s| {
            assert_eq!(read_frame(&mut s), Message::Query);
            s.write_all(&hello(FreeContent::Zero)).unwrap();
            let Message::Report { cmd_id, .. } = read_frame(&mut s) else {
                panic!("expected a report");
            };
            s.write_all(&frame(&Message::Ranges {
                cmd_id,
                ranges: vec![PfnRange {
                    first_pfn: 16,
                    pages: 4,
                }],
            }))
            .unwrap();
            std::thread::sleep(Duration::from_millis(300));
        });
        let sink = Arc::new(Recorder::default());
        let link = AgentLink::connect(&path, sink.clone(), 100, 0).unwrap();
        assert_eq!(link.hello().free_content, FreeContent::Zero);
        link.start_round(CmdId(3)).unwrap();
        wait_for(|| !lock(&sink.1).is_empty());
        assert!(lock(&sink.0).is_empty());
        assert_eq!(
            lock(&sink.1)[0],
            (CmdId(3), vec![GpaRange::new(16 * 4096, 4 * 4096)])
        );
    }

    #[test]
    fn prepare_waits_for_the_guests_answer_and_reports_its_failure() {
        let (_dir, path) = fake_agent(|mut s| {
            assert_eq!(read_frame(&mut s), Message::Query);
            s.write_all(&hello(FreeContent::Undefined)).unwrap();
            assert_eq!(
                read_frame(&mut s),
                Message::Prepare {
                    cmd_id: PREPARE_ID,
                    drop_caches: true,
                    compact: false
                }
            );
            s.write_all(&frame(&Message::Prepared {
                cmd_id: PREPARE_ID,
                took_us: 1500,
                free_pages_before: 100,
                free_pages_after: 356,
            }))
            .unwrap();
            let _ = read_frame(&mut s);
            s.write_all(&frame(&Message::Failed {
                cmd_id: PREPARE_ID,
                reason: "/proc/sys/vm/compact_memory: Permission denied".into(),
            }))
            .unwrap();
            // A third one is never answered.
            let _ = read_frame(&mut s);
            std::thread::sleep(Duration::from_millis(500));
        });
        let link = AgentLink::connect(&path, Arc::new(Recorder::default()), 10, 0).unwrap();
        let p = link.prepare(true, false, Duration::from_secs(5)).unwrap();
        assert_eq!(p.took, Duration::from_micros(1500));
        assert_eq!(p.freed_bytes, 256 * 4096);
        let e = link
            .prepare(false, true, Duration::from_secs(5))
            .unwrap_err();
        assert!(e.to_string().contains("Permission denied"), "{e}");
        let e = link
            .prepare(true, true, Duration::from_millis(200))
            .unwrap_err();
        assert!(matches!(e, AgentError::PrepareTimeout(_)), "{e}");
    }

    #[test]
    fn a_link_that_closes_ends_every_wait_for_its_report() {
        let (_dir, path) = fake_agent(|mut s| {
            assert_eq!(read_frame(&mut s), Message::Query);
            s.write_all(&hello(FreeContent::Undefined)).unwrap();
            let _ = read_frame(&mut s);
        });
        let link = AgentLink::connect(&path, Arc::new(Recorder::default()), 10, 0).unwrap();
        link.start_round(CmdId(9)).unwrap();
        wait_for(|| link.round_reported(CmdId(9)) == Some(true));
        assert_eq!(link.report_ms(CmdId(9)), None, "it never ended its report");
    }
}
