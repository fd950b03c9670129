#!/usr/bin/env python3
"""Checks the results of `tests/scripts/rdma-in-guest.sh --suite`.

Reads the guest's lines on stdin: each run's log ("freehint-rdma-log NAME:
LINE", the end of its stderr, where the destination's errors are too) and
result ("freehint-rdma-result NAME EXIT JSON"), checks each run against
what the RDMA transport must do, prints one line per check and exits 1 if
any failed.
"""
import json
import sys

runs = {}
logs = {}
for line in sys.stdin:
    if line.startswith("freehint-rdma-log "):
        name, _, text = line[len("freehint-rdma-log "):].partition(": ")
        logs.setdefault(name, []).append(text.strip())
        continue
    parts = line.strip().split(" ", 3)
    if len(parts) < 3 or parts[0] != "freehint-rdma-result":
        continue
    name, rc = parts[1], int(parts[2])
    try:
        report = json.loads(parts[3]) if len(parts) > 3 else None
    except json.JSONDecodeError:
        report = None
    runs[name] = (rc, report, parts[3] if len(parts) > 3 else "")

failures = 0


def check(name, ok, what):
    global failures
    print(f"rdma suite: {name}: {'ok' if ok else 'FAILED'}: {what}")
    if not ok:
        failures += 1


def migrated(name, mode):
    rc, r, raw = runs.get(name, (None, None, ""))
    if r is None:
        check(name, False, f"no JSON report (exit {rc}): {raw[:300]}")
        return
    check(name, rc == 0 and not r.get("error"), f"exit {rc}, error {r.get('error')!r}")
    check(name, r.get("transport") == "rdma", f'"transport": {r.get("transport")!r}')
    check(name, r.get("migration_mode") == mode, f'"migration_mode": {r.get("migration_mode")!r}')
    check(name, r.get("pages_compared", 0) > 0 and r.get("mismatched_pages") == 0,
          f'{r.get("mismatched_pages")} of {r.get("pages_compared")} pages mismatched')
    check(name, r.get("state") == "completed", f'state {r.get("state")!r}')
    if mode == "postcopy":
        check(name, r.get("destination_pattern_errors") == 0,
              f'the destination VM\'s own checks: {r.get("destination_pattern_errors")} errors')


def refused(name, words):
    """A run that must fail: with an error from the source, the reason
    (`words`) said by the source or the destination (the side that saw it:
    a refused key is seen by the destination's READ), and the source
    keeping its VM."""
    rc, r, raw = runs.get(name, (None, None, ""))
    if r is None:
        check(name, False, f"no JSON report (exit {rc}): {raw[:300]}")
        return
    error = r.get("error") or ""
    check(name, rc != 0 and error != "", f"exit {rc}, error {error!r}")
    said = [error] + [l for l in logs.get(name, []) if "error" in l]
    why = next((l for l in said if any(w in l for w in words)), None)
    check(name, why is not None, f"the error says why ({' or '.join(words)}): {why!r}")
    # The source keeps (resumes) its VM when a migration fails before the
    # handover.
    check(name, r.get("state") == "failed", f'state {r.get("state")!r} (the source runs the VM)')


migrated("precopy", "precopy")
migrated("postcopy", "postcopy")
refused("wrong-rkey", ["memory key", "remote access", "REM_ACCESS"])
refused("dead-destination", ["disconnect", "went down", "reset", "closed", "connection"])
print(f"rdma suite: {len(runs)} runs, {failures} checks failed")
sys.exit(1 if failures else 0)
