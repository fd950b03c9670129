#!/usr/bin/env bash
# The demo: boots a REAL 2 GiB Linux guest under QEMU (TCG) that writes
# 1.4 GB and frees all but 128 MiB of it, and live-migrates it to a second
# QEMU on this host five ways: freehint with the stock driver's free-page
# hints, freehint with its own guest agent's hints, freehint without hints,
# QEMU's own migration, and QEMU's own with its virtio-balloon
# free-page-hint. Prints one table; writes target/demo/report.json.
# Does its own set-up: packages, the patched QEMU and the guest image
# (cached under ~/.cache/freehint; the first run builds QEMU, ~6 minutes).
# Extra arguments (or make demo ARGS="...") go to freehint-demo (see
# `freehint-demo --help`).
set -euo pipefail
cd "$(dirname "$0")/../.."
./tests/scripts/setup-host.sh
FREEHINT_QEMU=$(./tests/qemu/build-qemu.sh)
FREEHINT_GUEST_DIR=$(./tests/guest/build-guest-image.sh)
export FREEHINT_QEMU FREEHINT_GUEST_DIR
cargo build --release --workspace --features freehint/failpoints,freehint/bench
mkdir -p target/demo
./target/release/freehint-demo --out target/demo/report.json --log-dir target/demo/logs ${ARGS:-} "$@"
