//! `freehint migrate` against a scripted daemon: it polls the live figures
//! on a second connection while the migration runs, stops polling when the
//! answer arrives, and a failure is still one line on stderr.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[test]
fn migrate_prints_progress_lines_until_the_answer_then_one_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("src.ctl");
    let listener = UnixListener::bind(&control).unwrap();
    let polls = Arc::new(AtomicU32::new(0));
    let polls_after_answer = Arc::new(AtomicU32::new(0));
    let answered = Arc::new(AtomicBool::new(false));
    {
        let (polls, after, answered) =
            (polls.clone(), polls_after_answer.clone(), answered.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let conn = conn.unwrap();
                let (polls, after, answered) = (polls.clone(), after.clone(), answered.clone());
                std::thread::spawn(move || {
                    let mut req = String::new();
                    BufReader::new(conn.try_clone().unwrap())
                        .read_line(&mut req)
                        .unwrap();
                    let req: serde_json::Value = serde_json::from_str(&req).unwrap();
                    let answer = match req["cmd"].as_str().unwrap() {
                        "progress" => {
                            let n = polls.fetch_add(1, Ordering::SeqCst) + 1;
                            if answered.load(Ordering::SeqCst) {
                                after.fetch_add(1, Ordering::SeqCst);
                            }
                            serde_json::json!({"result": "progress", "progress": {
                                "phase": "precopy", "round": n, "bytes_sent": n * 1000,
                                "bytes_left": 5000, "rate_bytes_per_s": 1000
                            }})
                        }
                        "migrate" => {
                            assert_eq!(req["params"]["downtime_target_ms"], 77);
                            std::thread::sleep(Duration::from_millis(3200));
                            answered.store(true, Ordering::SeqCst);
                            let stats = freehint_engine::MigrationStats {
                                state: freehint_engine::Phase::Failed,
                                source_running: true,
                                ..Default::default()
                            };
                            serde_json::json!({"result": "migration_failed",
                                "message": "the destination refused\nthe guest runs on",
                                "stats": stats})
                        }
                        other => panic!("unexpected request {other}"),
                    };
                    (&conn).write_all(format!("{answer}\n").as_bytes()).unwrap();
                });
            }
        });
    }
    let out = Command::new(env!("CARGO_BIN_EXE_freehint"))
        .args(["migrate", "--control"])
        .arg(&control)
        .args(["--to", "127.0.0.1:9", "--json-progress", "--json"])
        .args(["--downtime-target-ms", "77"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{:?}\n{stdout}\n{stderr}",
        out.status
    );

    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (last, progress) = lines.split_last().unwrap();
    assert!(progress.len() >= 2, "{stdout}");
    for p in progress {
        assert_eq!(p["progress"]["phase"], "precopy", "{p}");
    }
    assert!(progress
        .windows(2)
        .all(|w| w[0]["progress"]["round"].as_u64().unwrap()
            < w[1]["progress"]["round"].as_u64().unwrap()));
    assert_eq!(last["state"], "failed");
    assert!(last["error"].as_str().unwrap().contains("refused"));

    assert_eq!(
        stderr,
        "freehint: error: the destination refused the guest runs on\n"
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(polls_after_answer.load(Ordering::SeqCst), 0);
    assert!(polls.load(Ordering::SeqCst) >= 2);
}
