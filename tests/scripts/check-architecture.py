#!/usr/bin/env python3
"""Checks docs/ARCHITECTURE.md's crate table against the Cargo.toml files.

Every workspace crate must have a row; each row's "depends on" must list
exactly the crate's normal (non-dev) dependencies on other workspace
crates, optional ones as `name (feature)`; and no product crate (host/,
vhost-backend/) may depend on a test crate (tests/) except optionally.
Prints what differs and exits 1, or prints one line and exits 0.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

root = Path(__file__).resolve().parents[2]
doc = (root / "docs" / "ARCHITECTURE.md").read_text()
meta = json.loads(
    subprocess.run(
        ["cargo", "metadata", "--no-deps", "--format-version", "1"],
        cwd=root, check=True, capture_output=True, text=True,
    ).stdout
)
packages = {p["name"]: p for p in meta["packages"]}


def short(name):
    return "freehint" if name == "freehint" else name.removeprefix("freehint-")


def folder(p):
    return str(Path(p["manifest_path"]).parent.relative_to(root))


actual = {}
for name, p in packages.items():
    features = p.get("features", {})
    deps = set()
    for d in p["dependencies"]:
        if d["name"] not in packages or d["kind"] is not None:
            continue
        if d.get("optional"):
            feats = sorted(f for f, on in features.items() if f"dep:{d['name']}" in on)
            deps.add(f"{short(d['name'])} ({', '.join(feats) or 'optional'})")
        else:
            deps.add(short(d["name"]))
    actual[short(name)] = (folder(p), deps)

rows = {}
table = doc.split("<!-- crate-table -->", 2)
if len(table) != 3:
    sys.exit("docs/ARCHITECTURE.md: no <!-- crate-table --> ... <!-- crate-table --> block")
for line in table[1].splitlines():
    m = re.match(r"\|\s*`([^`]+)`\s*\|\s*`([^`]+)`\s*\|(.*)\|\s*$", line)
    if not m:
        continue
    deps = {d.strip() for d in m.group(3).split(",") if d.strip() not in ("", "—")}
    rows[m.group(1)] = (m.group(2), deps)

errors = []
for name, (path, deps) in sorted(actual.items()):
    if name not in rows:
        errors.append(f"{name} ({path}) has no row in the crate table")
        continue
    doc_path, doc_deps = rows[name]
    if doc_path != path:
        errors.append(f"{name}: the table says {doc_path}, Cargo says {path}")
    if doc_deps != deps:
        errors.append(
            f"{name}: the table says it depends on {sorted(doc_deps)}, Cargo.toml on {sorted(deps)}"
        )
    if not path.startswith("tests/"):
        for d in deps:
            if "(" not in d and actual.get(d, ("",))[0].startswith("tests/"):
                errors.append(f"product crate {name} depends on test crate {d}")
for name in sorted(set(rows) - set(actual)):
    errors.append(f"the crate table lists {name}, which is not in the workspace")

if errors:
    print("docs/ARCHITECTURE.md is out of date:", *errors, sep="\n  ")
    sys.exit(1)
print(f"docs/ARCHITECTURE.md: crate table matches Cargo.toml ({len(actual)} crates)")
