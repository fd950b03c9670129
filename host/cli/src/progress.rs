//! The progress of a running migration: a bar on a terminal (indicatif),
//! or one JSON line per second for scripts, read from a
//! [`freehint_engine::ProgressWatch`] (`send`) or the daemon's control
//! socket (`migrate`).

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::Duration;

use clap::Args;
use freehint_daemon::{ControlReply, ControlRequest};
use freehint_engine::{Phase, Progress};
use indicatif::{HumanBytes, HumanCount, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often the bar is refreshed.
const BAR_INTERVAL: Duration = Duration::from_millis(250);
/// How often a JSON line is printed.
const JSON_INTERVAL: Duration = Duration::from_secs(1);
/// The longest one poll of the daemon may take (the migration's answer
/// waits for the poller to stop).
const POLL_TIMEOUT: Duration = Duration::from_secs(2);

/// The bar on screen, if any: log lines and messages hide it while they
/// are written (see [`Stderr`]).
static BAR: Mutex<Option<ProgressBar>> = Mutex::new(None);

fn shown_bar() -> Option<ProgressBar> {
    BAR.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// stderr for log lines and messages: a progress bar on screen is taken
/// away while they are written and drawn again below them, so no line
/// lands in the middle of it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stderr;

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match shown_bar() {
            Some(bar) => bar.suspend(|| std::io::stderr().write(buf)),
            None => std::io::stderr().write(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match shown_bar() {
            Some(bar) => bar.suspend(|| std::io::stderr().write_all(buf)),
            None => std::io::stderr().write_all(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Prints `line` and a newline on stderr in one write (see [`Stderr`]).
pub fn eprint_line(line: impl std::fmt::Display) {
    let _ = Stderr.write_all(format!("{line}\n").as_bytes());
}

/// Progress output options of `migrate` and `send`.
#[derive(Args, Debug, Clone, Default)]
pub struct ProgressArgs {
    /// Print the progress as one JSON object per second on stdout,
    /// `{"progress":{"phase":…,"round":…,"bytes_sent":…,"bytes_left":…,
    /// "rate_bytes_per_s":…,"estimated_downtime_ms":…,"hint_pages_cleared":…}}`,
    /// before the result (no bar then).
    #[arg(long)]
    pub json_progress: bool,
    /// No progress bar. (The bar is drawn on stderr only when stderr is a
    /// terminal.)
    #[arg(long)]
    pub no_progress: bool,
}

/// Shows a migration's progress until [`Reporter::stop`] (or drop): polls
/// in a thread of its own, and clears its bar before it returns, so what
/// is printed next stands alone.
pub struct Reporter {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Reporter {
    /// Starts showing what `poll` returns (`None`: nothing to show now), as
    /// `args` and the terminal say: JSON lines, a bar, or nothing.
    pub fn start(
        args: &ProgressArgs,
        poll: impl FnMut() -> Option<Progress> + Send + 'static,
    ) -> Self {
        let bar = !args.json_progress && !args.no_progress && std::io::stderr().is_terminal();
        if !args.json_progress && !bar {
            return Self {
                stop: None,
                thread: None,
            };
        }
        let (tx, rx) = mpsc::channel();
        let json = args.json_progress;
        let thread = std::thread::Builder::new()
            .name("progress".into())
            .spawn(move || {
                if json {
                    json_lines(rx, poll)
                } else {
                    draw_bar(rx, poll)
                }
            })
            .ok();
        Self {
            stop: Some(tx),
            thread,
        }
    }

    /// Stops polling and clears the bar.
    pub fn stop(self) {}
}

impl Drop for Reporter {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Skips the figures of an earlier migration, which the daemon may still
/// report until it has started this one.
fn live(mut poll: impl FnMut() -> Option<Progress>) -> impl FnMut() -> Option<Progress> {
    let mut seen_live = false;
    move || {
        let p = poll()?;
        if !p.phase.is_final() {
            seen_live = true;
        }
        seen_live.then_some(p)
    }
}

/// Waits `interval`; false once the reporter is stopped.
fn wait(rx: &mpsc::Receiver<()>, interval: Duration) -> bool {
    matches!(rx.recv_timeout(interval), Err(RecvTimeoutError::Timeout))
}

fn json_lines(rx: mpsc::Receiver<()>, poll: impl FnMut() -> Option<Progress>) {
    let mut poll = live(poll);
    while wait(&rx, JSON_INTERVAL) {
        if let Some(p) = poll() {
            crate::emit(serde_json::json!({ "progress": p }));
        }
    }
}

fn draw_bar(rx: mpsc::Receiver<()>, poll: impl FnMut() -> Option<Progress>) {
    let mut poll = live(poll);
    let bar = ProgressBar::with_draw_target(Some(1), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{spinner} {prefix:.bold} [{bar:24}] {msg}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix("starting");
    bar.enable_steady_tick(Duration::from_millis(100));
    *BAR.lock().unwrap_or_else(|e| e.into_inner()) = Some(bar.clone());
    loop {
        if let Some(p) = poll() {
            let (prefix, msg) = describe(&p);
            bar.set_prefix(prefix);
            bar.set_message(msg);
            bar.set_length((p.bytes_sent + p.bytes_left).max(1));
            bar.set_position(p.bytes_sent);
        }
        if !wait(&rx, BAR_INTERVAL) {
            break;
        }
    }
    *BAR.lock().unwrap_or_else(|e| e.into_inner()) = None;
    bar.finish_and_clear();
}

/// The bar's prefix (phase and round) and message (the figures).
pub fn describe(p: &Progress) -> (String, String) {
    let prefix = match p.phase {
        Phase::Precopy => format!("round {}", p.round),
        Phase::Stopped => format!("final round {} (guest stopped)", p.round),
        other => other.name().to_string(),
    };
    let mut msg = format!(
        "{} sent, {} left, {}/s",
        HumanBytes(p.bytes_sent),
        HumanBytes(p.bytes_left),
        HumanBytes(p.rate_bytes_per_s)
    );
    if matches!(p.phase, Phase::Setup | Phase::Precopy) && p.estimated_downtime_ms > 0 {
        msg.push_str(&format!(", downtime ~{} ms", p.estimated_downtime_ms));
    }
    if p.hint_pages_cleared > 0 {
        msg.push_str(&format!(
            ", {} pages hinted free",
            HumanCount(p.hint_pages_cleared)
        ));
    }
    (prefix, msg)
}

/// The source daemon's live figures (the `progress` control request), or
/// `None` if it has none or does not answer within [`POLL_TIMEOUT`].
pub fn poll_daemon(control: &Path) -> Option<Progress> {
    let mut s = UnixStream::connect(control).ok()?;
    s.set_read_timeout(Some(POLL_TIMEOUT)).ok()?;
    s.set_write_timeout(Some(POLL_TIMEOUT)).ok()?;
    let mut line = serde_json::to_string(&ControlRequest::Progress).ok()?;
    line.push('\n');
    s.write_all(line.as_bytes()).ok()?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).ok()?;
    match serde_json::from_str(&answer).ok()? {
        ControlReply::Progress { progress } => progress,
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;
    use std::time::Instant;

    use super::*;

    #[test]
    fn the_bar_says_phase_round_and_figures_with_units() {
        let p = Progress {
            phase: Phase::Precopy,
            round: 3,
            bytes_sent: 3 << 30,
            bytes_left: 300 << 20,
            rate_bytes_per_s: 850 << 20,
            estimated_downtime_ms: 120,
            hint_pages_cleared: 12345,
            ..Default::default()
        };
        let (prefix, msg) = describe(&p);
        assert_eq!(prefix, "round 3");
        assert_eq!(
            msg,
            "3.00 GiB sent, 300.00 MiB left, 850.00 MiB/s, downtime ~120 ms, 12,345 pages hinted free"
        );
        let (prefix, msg) = describe(&Progress {
            phase: Phase::Stopped,
            round: 4,
            estimated_downtime_ms: 50,
            ..Default::default()
        });
        assert_eq!(prefix, "final round 4 (guest stopped)");
        assert!(
            !msg.contains("downtime") && !msg.contains("hinted"),
            "{msg}"
        );
    }

    #[test]
    fn figures_of_an_earlier_migration_are_skipped_until_this_one_runs() {
        let mut phases = vec![
            Phase::Completed,
            Phase::Setup,
            Phase::Precopy,
            Phase::Failed,
        ]
        .into_iter();
        let mut poll = live(move || {
            phases.next().map(|phase| Progress {
                phase,
                ..Default::default()
            })
        });
        let seen: Vec<_> = std::iter::from_fn(|| Some(poll().map(|p| p.phase)))
            .take(4)
            .collect();
        assert_eq!(
            seen,
            vec![
                None,
                Some(Phase::Setup),
                Some(Phase::Precopy),
                Some(Phase::Failed)
            ]
        );
    }

    #[test]
    fn stopping_a_reporter_returns_at_once_and_polls_no_more() {
        let polls = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let p = polls.clone();
        let r = Reporter::start(
            &ProgressArgs {
                json_progress: true,
                no_progress: false,
            },
            move || {
                p.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                None
            },
        );
        let t = Instant::now();
        std::thread::sleep(Duration::from_millis(50));
        r.stop();
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        let n = polls.load(std::sync::atomic::Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(polls.load(std::sync::atomic::Ordering::SeqCst), n);
    }

    #[test]
    fn a_daemon_that_does_not_answer_costs_one_poll_timeout_at_most() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl");
        let _listener = UnixListener::bind(&path).unwrap(); // never answers
        let t = Instant::now();
        assert_eq!(poll_daemon(&path), None);
        assert!(t.elapsed() < POLL_TIMEOUT + Duration::from_secs(1));
        assert_eq!(poll_daemon(&dir.path().join("absent")), None);
    }

    #[test]
    fn a_daemon_answer_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut req = String::new();
            BufReader::new(s.try_clone().unwrap())
                .read_line(&mut req)
                .unwrap();
            assert_eq!(req.trim(), r#"{"cmd":"progress"}"#);
            (&s).write_all(
                b"{\"result\":\"progress\",\"progress\":{\"phase\":\"precopy\",\"round\":2,\"bytes_sent\":42}}\n",
            )
            .unwrap();
        });
        let p = poll_daemon(&path).unwrap();
        server.join().unwrap();
        assert_eq!((p.phase, p.round, p.bytes_sent), (Phase::Precopy, 2, 42));
    }
}
