#!/usr/bin/env bash
# Runs every test of freehint: format and lint checks, unit and property
# tests, the loom model check, end-to-end migrations of the SIMULATED VM
# (with the fault matrix: every fault point of docs/FAULTS.md), the
# hugetlbfs test, and the real-guest tests (QEMU + Linux: migration, faults,
# handover fault matrix, disks, page poisoning), the RDMA transport on
# soft-RoCE inside a guest, then short runs of the fuzz targets
# (tests/fuzz). Does its own set-up.
set -euo pipefail
cd "$(dirname "$0")/../.."
./tests/scripts/setup-host.sh

# Fault points (docs/FAULTS.md), the benchmark runner (`freehint bench`,
# which drives the simulated VM) and the RDMA transport are compiled in for
# the tests; every cargo command below uses the same features so the
# binaries are built once.
features=(--features freehint/failpoints,freehint/bench,freehint/rdma)

echo "== format and lint"
cargo fmt --all -- --check
cargo build --workspace --all-targets "${features[@]}"
cargo clippy --workspace --all-targets "${features[@]}" -- -D warnings
echo "== docs: the crate table matches Cargo.toml; rustdoc without warnings"
python3 tests/scripts/check-architecture.py
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --workspace "${features[@]}" --quiet

mkdir -p target
echo "== loom model check of the hint/sync lock"
RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
  cargo test -p freehint-hint-filter --test loom --release 2>&1 | tee target/test-loom.log

echo "== real guest: QEMU with the vhost-user device, Debian kernel (cached)"
if [ "$(id -u)" = 0 ]; then
  FREEHINT_QEMU=$(./tests/qemu/build-qemu.sh)
  FREEHINT_GUEST_DIR=$(./tests/guest/build-guest-image.sh)
  export FREEHINT_QEMU FREEHINT_GUEST_DIR
  export FREEHINT_REQUIRE_HUGETLBFS=1 FREEHINT_REQUIRE_REAL_GUEST=1
fi

echo "== tests"
cargo test --workspace "${features[@]}" 2>&1 | tee target/test.log

if [ "$(id -u)" = 0 ]; then
  echo "== RDMA: the simulated VM migrated over soft-RoCE inside a Debian guest (docs/RDMA.md)"
  ./tests/scripts/rdma-in-guest.sh --suite 2>&1 | tee target/test-rdma.log
fi

echo "== fuzz: each target of tests/fuzz for a few seconds (make fuzz: 10 million executions each)"
./tests/scripts/fuzz.sh "${FREEHINT_FUZZ_SECONDS:-10}" 2>&1 | tee target/test-fuzz.log

# One closing line for everything above.
awk '/^test result:/ { passed += $4; failed += $6 }
     END { printf "tests: %d passed, %d failed\n", passed, failed }' target/test-loom.log target/test.log
