//! The **simulated VM** (`freehint-sim-vm`) and the engine's client for it.
//!
//! This is a stand-in for a guest, used beside the real QEMU/Linux guest
//! for scale and speed: a separate process that maps a RAM file shared,
//! creates its userfaultfd through the real preload library (so the real
//! dirty log tracks it), writes memory at a given rate over a working set,
//! runs a page allocator, and reports its free 4 MiB blocks as hints the way
//! the Linux virtio-balloon driver does — including the awkward timings a
//! real guest can produce: pages written right after being hinted (the
//! shrinker giving hinted blocks back) and hints generated before a bitmap
//! sync but delivered after it.
//!
//! Every page holds a pattern derived from its index and a generation
//! counter, so any corruption or stale copy shows when source and
//! destination are compared.
//!
//! The engine talks to it over a Unix socket with newline-delimited JSON
//! ([`ToSim`], [`FromSim`]); [`SimVmClient`] implements the engine's
//! [`Vmm`] and [`HintSource`] over that socket and feeds hints to a
//! [`HintSink`].

#![deny(missing_docs)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use freehint_types::{
    CmdId, DestinationVmm, GpaRange, HintCommand, HintSink, HintSource, HintSourceError, Vmm,
    VmmError, VmmOp,
};
use serde::{Deserialize, Serialize};

/// Pages per hinted block: 2^10 base pages (4 MiB), as Linux on x86 hints.
pub const HINT_BLOCK_PAGES: u64 = 1024;
/// Base page size of the simulated guest.
pub const PAGE_BYTES: u64 = 4096;

/// Commands from the engine to the simulated VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ToSim {
    /// Start reporting free blocks tagged `cmd_id`.
    StartRound {
        /// The round's id.
        cmd_id: u32,
    },
    /// Stop reporting (cmd_id STOP).
    StopRound,
    /// Migration over (cmd_id DONE).
    Finish,
    /// Stop every writer; answered once no write is in flight.
    Pause,
    /// Let writers go on.
    Resume,
    /// List the free pages (meaningful while paused).
    FreePages,
    /// The simulated device state (meaningful while paused): the
    /// generation counter and the free pages.
    SaveState,
    /// An incoming VM (`--incoming`) takes over this state; it runs once
    /// resumed.
    LoadState {
        /// The state the source saved.
        state: SimState,
    },
    /// Exit.
    Quit,
}

/// Messages from the simulated VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum FromSim {
    /// Memory is initialised; writers are running.
    Ready {
        /// The simulator's pid.
        pid: i32,
        /// Pages of guest RAM.
        pages: u64,
        /// Pages in use.
        used_pages: u64,
    },
    /// Free blocks, as (guest-physical start, length in bytes).
    Hints {
        /// The cmd_id the blocks were reported under.
        cmd_id: u32,
        /// The blocks.
        ranges: Vec<(u64, u64)>,
    },
    /// A command was carried out.
    Ack,
    /// Free pages as half-open (start_page, end_page) runs.
    FreePages {
        /// The runs.
        runs: Vec<(u64, u64)>,
    },
    /// The simulated device state.
    State {
        /// The state.
        state: SimState,
    },
    /// A command failed.
    Error {
        /// Why.
        message: String,
    },
}

/// What a simulated VM hands over besides its RAM: which pages it uses and
/// where its generation counter stands.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimState {
    /// The generation counter (every write takes the next one).
    pub generation: u64,
    /// Free pages, as half-open (start_page, end_page) runs.
    pub free_runs: Vec<(u64, u64)>,
}

/// What an incoming simulated VM checked after it resumed, written to its
/// `--report-file` when it ends.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestinationReport {
    /// Used pages it read and checked against the pattern.
    pub pages_checked: u64,
    /// Of those, pages whose content was not a whole pattern page.
    pub pattern_errors: u64,
    /// Pages it wrote (their content differs from the source's by design),
    /// as half-open runs.
    pub written_runs: Vec<(u64, u64)>,
}

/// Whether `words` (one page's 64-bit words, read from guest memory) are
/// the pattern of page `page` at some generation.
pub fn is_pattern_page(page: u64, words: &[u64]) -> bool {
    const A: u64 = 0x9E37_79B9_7F4A_7C15;
    const B: u64 = 0xC2B2_AE3D_27D4_EB4F;
    let Some(&w0) = words.first() else {
        return false;
    };
    // w0 = (page*A ^ gen*B) | 1: gen*B is w0 ^ page*A, up to its low bit.
    let mut inv = B; // Newton's iteration for B's inverse modulo 2^64.
    for _ in 0..6 {
        inv = inv.wrapping_mul(2u64.wrapping_sub(B.wrapping_mul(inv)));
    }
    let y = w0 ^ page.wrapping_mul(A);
    [y, y ^ 1].into_iter().any(|gb| {
        let generation = gb.wrapping_mul(inv);
        words
            .iter()
            .enumerate()
            .all(|(i, &w)| w == pattern_word(page, generation, i as u64))
    })
}

/// The engine's side of the simulated VM's control socket.
pub struct SimVmClient {
    writer: Mutex<UnixStream>,
    replies: Mutex<mpsc::Receiver<FromSim>>,
    /// The free pages recorded when the VM was paused for switchover.
    free_at_stop: Mutex<Option<Vec<(u64, u64)>>>,
    /// Size of the simulated device state handed over.
    device_state_bytes: std::sync::atomic::AtomicUsize,
    /// Whether the VM runs, as the last acknowledged command left it.
    running: std::sync::atomic::AtomicBool,
    timeout: Duration,
    /// The simulator's pid.
    pid: std::sync::atomic::AtomicI32,
    /// The device state an incoming VM loaded (its pattern part).
    loaded_state: Mutex<Option<Vec<u8>>>,
}

impl std::fmt::Debug for SimVmClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimVmClient").finish_non_exhaustive()
    }
}

/// Error talking to the simulated VM.
#[derive(Debug, thiserror::Error)]
#[error("simulated VM: {0}")]
pub struct SimError(pub String);

impl SimVmClient {
    /// Wraps an accepted control connection. Hints are handed to the sink
    /// installed later in `sink` (dropped until then, as a
    /// device with no migration running would). Returns the client and
    /// the simulator's Ready message.
    pub fn new(
        stream: UnixStream,
        sink: Arc<Mutex<Option<Arc<dyn HintSink>>>>,
    ) -> Result<(Arc<Self>, FromSim), SimError> {
        let reader = stream.try_clone().map_err(|e| SimError(e.to_string()))?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("sim-control-reader".into())
            .spawn(move || {
                for line in BufReader::new(reader).lines() {
                    let Ok(line) = line else { return };
                    let msg: FromSim = match serde_json::from_str(&line) {
                        Ok(m) => m,
                        Err(e) => {
                            tracing::warn!("simulated VM sent bad JSON: {e}");
                            continue;
                        }
                    };
                    if let FromSim::Hints { cmd_id, ranges } = &msg {
                        let ranges: Vec<GpaRange> =
                            ranges.iter().map(|&(s, l)| GpaRange::new(s, l)).collect();
                        let sink = sink.lock().unwrap_or_else(|e| e.into_inner()).clone();
                        if let Some(sink) = sink {
                            let out = sink.free_page_hints(CmdId(*cmd_id), &ranges);
                            tracing::debug!(
                                cmd_id,
                                ranges = ranges.len(),
                                ?out,
                                "hints from the simulated VM"
                            );
                        }
                        continue;
                    }
                    if tx.send(msg).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| SimError(e.to_string()))?;
        let client = Arc::new(Self {
            writer: Mutex::new(stream),
            replies: Mutex::new(rx),
            free_at_stop: Mutex::new(None),
            device_state_bytes: Default::default(),
            running: std::sync::atomic::AtomicBool::new(true),
            timeout: Duration::from_secs(120),
            pid: std::sync::atomic::AtomicI32::new(0),
            loaded_state: Mutex::new(None),
        });
        let ready = client.wait_reply()?;
        if let FromSim::Ready { pid, .. } = ready {
            client.pid.store(pid, std::sync::atomic::Ordering::SeqCst);
        }
        Ok((client, ready))
    }

    fn wait_reply(&self) -> Result<FromSim, SimError> {
        self.replies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .recv_timeout(self.timeout)
            .map_err(|e| SimError(format!("no answer: {e}")))
    }

    /// Sends a command and waits for its answer.
    pub fn request(&self, cmd: &ToSim) -> Result<FromSim, SimError> {
        let mut line = serde_json::to_string(cmd).map_err(|e| SimError(e.to_string()))?;
        line.push('\n');
        {
            let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            w.write_all(line.as_bytes())
                .map_err(|e| SimError(format!("sending {cmd:?}: {e}")))?;
        }
        match self.wait_reply()? {
            FromSim::Error { message } => Err(SimError(message)),
            other => Ok(other),
        }
    }

    fn ack(&self, cmd: ToSim) -> Result<(), SimError> {
        match self.request(&cmd)? {
            FromSim::Ack => Ok(()),
            other => Err(SimError(format!("{cmd:?} answered with {other:?}"))),
        }
    }

    /// The current free pages, as half-open page runs.
    pub fn free_pages(&self) -> Result<Vec<(u64, u64)>, SimError> {
        match self.request(&ToSim::FreePages)? {
            FromSim::FreePages { runs } => Ok(runs),
            other => Err(SimError(format!("free pages answered with {other:?}"))),
        }
    }

    /// Hands over `bytes` of simulated device state (a pattern
    /// [`device_state_pattern`] reproduces), to exercise large states.
    pub fn set_device_state_bytes(&self, bytes: usize) {
        self.device_state_bytes
            .store(bytes, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether the simulated VM runs (not paused).
    pub fn running(&self) -> bool {
        self.running.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Says the VM behind this client is an incoming one: paused until
    /// resumed.
    pub fn incoming(self: Arc<Self>) -> Arc<Self> {
        self.running
            .store(false, std::sync::atomic::Ordering::SeqCst);
        self
    }

    /// The device state an incoming VM loaded: the pattern that followed
    /// the [`SimState`] (see [`device_state_pattern`]).
    pub fn loaded_device_state(&self) -> Option<Vec<u8>> {
        self.loaded_state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The free pages recorded when the VM was stopped for switchover.
    pub fn free_at_stop(&self) -> Option<Vec<(u64, u64)>> {
        self.free_at_stop
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Vmm for SimVmClient {
    fn stop(&self) -> Result<(), VmmError> {
        self.ack(ToSim::Pause)
            .map_err(|e| VmmError::new(VmmOp::Stop, e))?;
        self.running
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let free = self
            .free_pages()
            .map_err(|e| VmmError::new(VmmOp::Stop, e))?;
        *self.free_at_stop.lock().unwrap_or_else(|e| e.into_inner()) = Some(free);
        Ok(())
    }

    fn resume(&self) -> Result<(), VmmError> {
        self.ack(ToSim::Resume)
            .map_err(|e| VmmError::new(VmmOp::Resume, e))?;
        self.running
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// One JSON line of [`SimState`], then the pattern of
    /// [`Self::set_device_state_bytes`] bytes.
    fn device_state(&self) -> Result<Vec<u8>, VmmError> {
        let state = match self
            .request(&ToSim::SaveState)
            .map_err(|e| VmmError::new(VmmOp::SaveDeviceState, e))?
        {
            FromSim::State { state } => state,
            other => {
                return Err(VmmError::new(
                    VmmOp::SaveDeviceState,
                    SimError(format!("save state answered with {other:?}")),
                ))
            }
        };
        let mut out = serde_json::to_vec(&state)
            .map_err(|e| VmmError::new(VmmOp::SaveDeviceState, SimError(e.to_string())))?;
        out.push(b'\n');
        out.extend(device_state_pattern(
            self.device_state_bytes
                .load(std::sync::atomic::Ordering::SeqCst),
        ));
        Ok(out)
    }

    fn device_state_estimate_bytes(&self) -> Result<Option<u64>, VmmError> {
        // The pattern, and the state line: a few bytes a free run.
        Ok(Some(
            self.device_state_bytes
                .load(std::sync::atomic::Ordering::SeqCst) as u64
                + (16 << 20),
        ))
    }

    fn handed_over(&self) -> Result<(), VmmError> {
        // The simulated source stays paused (its RAM file is the source
        // image the bench compares); the bench ends it.
        Ok(())
    }
}

/// Splits a simulated device state into its [`SimState`] and its pattern.
pub fn split_device_state(state: &[u8]) -> Result<(SimState, &[u8]), SimError> {
    let nl = state
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| SimError("device state has no state line".into()))?;
    let sim: SimState = serde_json::from_slice(&state[..nl])
        .map_err(|e| SimError(format!("device state line: {e}")))?;
    Ok((sim, &state[nl + 1..]))
}

/// An incoming simulated VM (`--incoming`) as the receiver's destination.
impl DestinationVmm for SimVmClient {
    fn load_device_state(&self, state: &[u8], _timeout: Duration) -> Result<(), VmmError> {
        let (sim, pattern) =
            split_device_state(state).map_err(|e| VmmError::new(VmmOp::LoadDeviceState, e))?;
        self.ack(ToSim::LoadState { state: sim })
            .map_err(|e| VmmError::new(VmmOp::LoadDeviceState, e))?;
        *self.loaded_state.lock().unwrap_or_else(|e| e.into_inner()) = Some(pattern.to_vec());
        Ok(())
    }

    fn resume(&self) -> Result<(), VmmError> {
        Vmm::resume(self)
    }

    fn postcopy_pid(&self) -> Option<i32> {
        match self.pid.load(std::sync::atomic::Ordering::SeqCst) {
            0 => None,
            pid => Some(pid),
        }
    }
}

impl HintSource for SimVmClient {
    fn start_round(&self, cmd_id: CmdId) -> Result<(), HintSourceError> {
        self.ack(ToSim::StartRound { cmd_id: cmd_id.0 })
            .map_err(|e| HintSourceError::new(HintCommand::StartRound(cmd_id), e))
    }

    fn stop_round(&self) -> Result<(), HintSourceError> {
        self.ack(ToSim::StopRound)
            .map_err(|e| HintSourceError::new(HintCommand::StopRound, e))
    }

    fn finish(&self) -> Result<(), HintSourceError> {
        self.ack(ToSim::Finish)
            .map_err(|e| HintSourceError::new(HintCommand::Finish, e))
    }

    /// The simulator reports continuously and never closes a round.
    fn round_reported(&self, _cmd_id: CmdId) -> Option<bool> {
        None
    }

    fn name(&self) -> &'static str {
        "sim"
    }
}

/// The simulated device state of `bytes` bytes: a pattern the destination
/// can check byte for byte.
pub fn device_state_pattern(bytes: usize) -> Vec<u8> {
    (0..bytes)
        .map(|i| (pattern_word(i as u64 / 8, 7, 0) >> ((i % 8) * 8)) as u8)
        .collect()
}

/// The pattern word `i` of page `page` at generation `generation`.
pub fn pattern_word(page: u64, generation: u64, i: u64) -> u64 {
    let x = page.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ generation.wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
        ^ i.wrapping_mul(0x1656_67B1_9E37_79F9);
    // Never zero, so a patterned page is never mistaken for a zero page.
    x | 1
}
