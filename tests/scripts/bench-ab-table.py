#!/usr/bin/env python3
"""The table of tests/scripts/bench-ab.sh: base against head, each figure the
median of the repetitions with its min-max range, and head's median relative
to base's. Usage: bench-ab-table.py RESULTS_DIR COMMAND [TITLE] > TABLE.md;
without TITLE, the transport abstraction's A/B (base 022a407)."""
import json
import pathlib
import statistics
import sys

out = pathlib.Path(sys.argv[1])
command = sys.argv[2]
title = sys.argv[3] if len(sys.argv) > 3 else None
revs = {b: (out / f"{b}.rev").read_text().strip() for b in ("base", "head")}


def load(pattern):
    """{build: [json, ...]} for files named PATTERN-build-N.json."""
    found = {"base": [], "head": []}
    for build in found:
        for p in sorted(out.glob(f"{pattern}-{build}-*.json")):
            found[build].append(json.loads(p.read_text()))
    return found


def guest_runs():
    """{(mode, build): [run, ...]} of the real-guest runs, failed ones apart."""
    runs, failed = {}, []
    for build, docs in load("guest").items():
        for doc in docs:
            for run in doc["runs"]:
                if run["status"] != "ok" or run.get("data_check") != "ok":
                    failed.append(f"{build} {run['mode']} rep: {run['status']} {run['reason']}")
                    continue
                runs.setdefault((run["mode"], build), []).append(run)
    return runs, failed


def cell(values, fmt):
    if not values:
        return "no run"
    med = statistics.median(values)
    return f"{fmt(med)} ({fmt(min(values))}–{fmt(max(values))})"


def change(base, head):
    if not base or not head:
        return ""
    b, h = statistics.median(base), statistics.median(head)
    if b == 0:
        return ""
    return f"{(h - b) / b * 100:+.0f}%"


def verdict(base, head, higher_is_better):
    """Head's median against the range of base's runs: inside it is within
    this machine's run-to-run noise."""
    if not base or not head:
        return ""
    h = statistics.median(head)
    if min(base) <= h <= max(base):
        return "within base's range"
    better = (h > max(base)) == higher_is_better
    return "better than every base run" if better else "**worse than every base run**"


def row(name, base, head, fmt, higher_is_better=False):
    return (f"| {name} | {cell(base, fmt)} | {cell(head, fmt)} | {change(base, head)} "
            f"| {verdict(base, head, higher_is_better)} |")


ms = lambda v: f"{v:.0f} ms"
us = lambda v: f"{v:.0f} µs"
mib = lambda v: f"{v / 2**20:.0f} MiB"
rate = lambda v: f"{v:.0f} MiB/s"

base_note = "" if title else " (before the `Channel` that TCP, TLS and RDMA implement)"
lines = [
    f"## {title or 'The TCP path before and after the transport abstraction (A/B)'}",
    "",
    f"Base: freehint at {revs['base']}{base_note}; "
    f"head: freehint at {revs['head']}. Both built and run on this machine in one run, "
    "alternating run by run; each cell is the median of the repetitions with their range "
    "(min–max); then head's median against base's, and whether it lies within the range "
    "of base's runs (this machine's run-to-run noise) or outside it.",
    "",
    f"Command: `{command}` (not part of `make bench`, which only embeds its last table: "
    "it builds a second freehint).",
    "",
    "| figure | base | head | head vs base | head's median |",
    "|---|---|---|---|---|",
]
runs, failed = guest_runs()
for mode in ("freehint-hints", "freehint-hints-insecure", "freehint-postcopy"):
    b, h = runs.get((mode, "base"), []), runs.get((mode, "head"), [])
    label = f"Debian guest, after-job, 2 GiB, unshaped, {mode}"
    lines.append(row(f"{label}: total time", [r["total_time_ms"] for r in b],
                     [r["total_time_ms"] for r in h], ms))
    lines.append(row(f"{label}: downtime (STOP to RESUME)", [r["downtime_ms"] for r in b],
                     [r["downtime_ms"] for r in h], ms))
    lines.append(row(f"{label}: bytes on the link", [r["bytes_link"] for r in b],
                     [r["bytes_link"] for r in h], mib))
    if mode == "freehint-postcopy":
        for q in ("p50", "p99"):
            key = f"fault_latency_us_{q}"
            lines.append(row(f"{label}: remote-fault latency {q}",
                             [r["tool_stats"][key] for r in b],
                             [r["tool_stats"][key] for r in h], us))
transfer = load("transfer")
lines.append(row("simulated VM, 4 GiB all data, 2 channels: transfer rate",
                 [r["peak_bandwidth_mib_per_s"] for r in transfer["base"]],
                 [r["peak_bandwidth_mib_per_s"] for r in transfer["head"]], rate,
                 higher_is_better=True))
lines.append(row("simulated VM, 4 GiB all data, 2 channels: total time",
                 [r["total_time_ms"] for r in transfer["base"]],
                 [r["total_time_ms"] for r in transfer["head"]], ms))
postcopy = load("postcopy")
for key, name, fmt in (("total_time_ms", "total time", ms), ("downtime_ms", "downtime", ms),
                       ("fault_latency_us_p50", "remote-fault latency p50", us),
                       ("fault_latency_us_p99", "remote-fault latency p99", us)):
    lines.append(row(f"simulated VM, 2 GiB postcopy with hints, 64 MiB/s dirtied: {name}",
                     [r[key] for r in postcopy["base"]], [r[key] for r in postcopy["head"]], fmt))
mismatched = [r.get("mismatched_pages") for rs in (transfer, postcopy) for b in rs.values() for r in b]
lines += [
    "",
    f"Every simulated run checked its pages: mismatched pages {sorted(set(mismatched))}.",
]
worse = sum("worse than every" in line for line in lines)
lines += [
    "",
    f"Figures whose head median is worse than every base run: {worse}. With a few "
    "repetitions a median falls outside the other build's range by chance now and then "
    "(on this machine a run's p99 and postcopy's total time vary by up to 1.7× from run "
    "to run): a real change shows outside the range again when the A/B is repeated.",
]
if failed:
    lines += ["", "Runs that failed (left out of the medians):", ""]
    lines += [f"- {f}" for f in failed]
print("\n".join(lines))
