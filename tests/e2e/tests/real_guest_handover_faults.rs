//! The handover fault points (docs/FAULTS.md, `"handover": true`) ×
//! `return`, `panic`, `return(kill)` against a REAL QEMU/Linux guest.
//!
//! One guest hops from QEMU to QEMU: each case starts a fresh destination
//! (`freehint vm --incoming` + QEMU `-incoming defer`), sets the fault point
//! in the daemon that passes it (`freehint debug fault`), migrates, and
//! then watches the guest's heartbeat on both consoles:
//!
//! * it goes on on exactly one console; or
//! * on none, and a surviving daemon says `uncertain` and names the
//!   operator's action; the test takes that action (`freehint resume` on
//!   the source, through its daemon or, if that was killed, through QMP)
//!   and then the heartbeat goes on on exactly one console.
//!
//! The guest goes on with whichever side runs it; a fresh guest boots only
//! when the side that runs it lost its daemon (a killed daemon).

use std::time::{Duration, Instant};

use freehint_demo::{free_port, poll, Daemon, QemuGuest, Testbed};
use freehint_e2e::{daemon_status, freehint, real_guest_setup};

/// A QEMU running (or holding) the guest, and its daemon.
struct Vm {
    name: String,
    qemu: QemuGuest,
    daemon: Daemon,
}

/// The daemon's status, if it still runs.
fn status(d: &mut Daemon) -> Option<serde_json::Value> {
    d.running().then(|| daemon_status(&d.control))
}

/// Whether the guest's heartbeat goes on in this QEMU.
fn beating(g: &mut QemuGuest) -> bool {
    if !g.running() {
        return false;
    }
    let n = g.heartbeats().last().copied().unwrap_or(0);
    poll(Duration::from_millis(2500), || {
        g.heartbeats().last().is_some_and(|&m| m >= n + 2)
    })
}

fn boot(bed: &Testbed, name: &str) -> Vm {
    let daemon = bed.daemon(name, &[]).unwrap();
    let qemu = bed.freehint_qemu(name, &daemon, false).unwrap();
    bed.wait_ready(&qemu).unwrap();
    Vm {
        name: name.into(),
        qemu,
        daemon,
    }
}

#[test]
fn every_handover_fault_leaves_the_guest_running_on_exactly_one_side() {
    let Some(s) = real_guest_setup("handover-faults", 256, 0) else {
        return;
    };
    let (ok, out, err) = freehint(&["debug", "fault-points"]);
    assert!(ok, "{err} (build with --features freehint/failpoints)");
    let points: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|p: &serde_json::Value| p["handover"] == true)
        .collect();
    assert!(points.len() >= 12, "{points:?}");
    let bed = Testbed::new(&s, "handover-faults").unwrap();
    let mut seq = 0;
    let mut next_name = || {
        seq += 1;
        format!("vm{seq}")
    };
    let mut current = boot(&bed, &next_name());
    let mut failures = Vec::new();
    let mut table = Vec::new();
    let started = Instant::now();
    for p in &points {
        for action in ["return", "panic", "return(kill)"] {
            let point = p["name"].as_str().unwrap();
            let source_side = p["side"] == "source";
            let addr = format!("127.0.0.1:{}", free_port().unwrap());
            let dst_name = next_name();
            let dst_daemon = bed.daemon(&dst_name, &["--incoming", &addr]).unwrap();
            let dst_qemu = bed.freehint_qemu(&dst_name, &dst_daemon, true).unwrap();
            let mut dst = Vm {
                name: dst_name,
                qemu: dst_qemu,
                daemon: dst_daemon,
            };
            bed.settle_destination(&dst.daemon).unwrap();
            let (faulty, faulty_log) = if source_side {
                (
                    current.daemon.control.clone(),
                    bed.logs.join(format!("{}.daemon.log", current.name)),
                )
            } else {
                (
                    dst.daemon.control.clone(),
                    bed.logs.join(format!("{}.daemon.log", dst.name)),
                )
            };
            let spec = format!("{point}={action}");
            let log_before = std::fs::read(&faulty_log).map_or(0, |l| l.len());
            let (ok, _, err) = freehint(&[
                "debug",
                "fault",
                "--control",
                faulty.to_str().unwrap(),
                &spec,
            ]);
            assert!(ok, "{spec}: {err}");
            let (migrated, mout, merr) = freehint(&[
                "migrate",
                "--control",
                current.daemon.control.to_str().unwrap(),
                "--to",
                &addr,
                "--json",
                "--peer-timeout-s",
                "5",
            ]);
            // The side that did not fail may still be finishing (a
            // destination waiting for a commit that never comes).
            poll(Duration::from_secs(12), || {
                status(&mut dst.daemon).is_none_or(|v| v["state"] != "receiving")
            });
            // The point fired (`return` and `return(kill)` log it, `panic`
            // panics with its name).
            let log = std::fs::read(&faulty_log).unwrap_or_default();
            let log = String::from_utf8_lossy(log.get(log_before..).unwrap_or_default());
            if !log.contains(&format!("point=\"{point}\""))
                && !log.contains(&format!("failpoint {point} panic"))
            {
                failures.push(format!(
                    "{spec}: the fault point never fired; migrate: {mout} {merr}"
                ));
            }
            let mut src_runs = beating(&mut current.qemu);
            let mut dst_runs = beating(&mut dst.qemu);
            let mut note = String::new();
            let case = format!(
                "{spec} ({})",
                if migrated {
                    "migrate ok"
                } else {
                    "migrate failed"
                }
            );
            if src_runs && dst_runs {
                failures.push(format!("{case}: the guest runs on BOTH sides"));
            }
            if !src_runs && !dst_runs {
                // Both paused: a surviving daemon says so, with the action.
                let src_status = status(&mut current.daemon);
                let dst_status = status(&mut dst.daemon);
                let says = [&src_status, &dst_status].iter().any(|st| {
                    st.as_ref().is_some_and(|v| {
                        v["state"] == "uncertain"
                            && v["operator_action"]
                                .as_str()
                                .is_some_and(|a| a.contains("freehint resume"))
                    })
                });
                if !says {
                    failures.push(format!(
                        "{case}: the guest runs nowhere and no daemon says uncertain with the action; source {src_status:?}; destination {dst_status:?}; migrate: {mout} {merr}"
                    ));
                }
                // The operator resumes the source.
                let (ok, _, err) = if current.daemon.running() {
                    freehint(&[
                        "resume",
                        "--control",
                        current.daemon.control.to_str().unwrap(),
                    ])
                } else {
                    freehint(&["resume", "--qmp", current.daemon.qmp.to_str().unwrap()])
                };
                note = format!(
                    "operator resumed the source: {}",
                    if ok { "ok" } else { err.trim() }
                );
                src_runs = beating(&mut current.qemu);
                dst_runs = beating(&mut dst.qemu);
                let source_alone = src_runs && !dst_runs;
                if !source_alone {
                    failures.push(format!(
                        "{case}: after the operator resumed the source: source runs {src_runs}, destination runs {dst_runs} ({note})"
                    ));
                }
            }
            let source_alone = src_runs && !dst_runs;
            let took_effect = matches!(
                point,
                "src.after-commit" | "src.after-resumed" | "dst.after-resume"
            );
            if action != "return(kill)" && !took_effect && !source_alone {
                failures.push(format!(
                    "{case}: a failure before the commit took effect must leave the source running alone (source {src_runs}, destination {dst_runs}); {merr}"
                ));
            }
            table.push(format!(
                "{spec:<36} source {:<7} destination {:<7} {note}",
                if src_runs { "runs" } else { "-" },
                if dst_runs { "runs" } else { "-" },
            ));
            // Go on with the side that runs the guest, if its daemon lives;
            // otherwise boot a fresh guest.
            let _ = freehint(&[
                "debug",
                "fault",
                "--control",
                faulty.to_str().unwrap(),
                &format!("{point}=off"),
            ]);
            let survivor = match (src_runs, dst_runs) {
                (true, false) => Some(current),
                (false, true) => Some(dst),
                _ => None,
            };
            current = match survivor {
                Some(mut vm) => {
                    if vm.daemon.running() {
                        vm
                    } else {
                        drop(vm);
                        let name = next_name();
                        eprintln!("the guest's daemon is gone; booting a fresh guest {name}");
                        boot(&bed, &name)
                    }
                }
                None => {
                    let name = next_name();
                    eprintln!("booting a fresh guest {name}");
                    boot(&bed, &name)
                }
            };
            eprintln!("{spec}: done; the guest is on {}", current.name);
        }
    }
    eprintln!(
        "{} cases in {} s:\n{}",
        table.len(),
        started.elapsed().as_secs(),
        table.join("\n")
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
