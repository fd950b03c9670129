#!/usr/bin/env bash
# The benchmark suite: runs every benchmark on this machine and writes
# docs/BENCHMARKS.md from the results (each figure with its command).
# Takes about 25 minutes; uses about 9 GiB of /dev/shm at its peak.
set -euo pipefail
cd "$(dirname "$0")/../.."
./tests/scripts/setup-host.sh
cargo build --release --workspace --features freehint/failpoints,freehint/bench
out=target/bench
mkdir -p "$out"
fh=./target/release/freehint

run() { # name, command...
  local name=$1; shift
  echo "bench: $name: $*" >&2
  echo "$*" > "$out/$name.cmd"
  "$@" > "$out/$name.json"
}

sim=(bench sim --mem-mib 4096 --used-percent 15 --dirty-mib-per-s 16 --json)
# Three interleaved repetitions: this machine's memory makes single runs noisy.
for i in 1 2 3; do
  for h in on off; do
    run "sim4g-hints-$h-$i" $fh "${sim[@]}" --hints "$h"
    run "sim4g-prealloc-hints-$h-$i" $fh "${sim[@]}" --hints "$h" --preallocate-destination
  done
done
# Transfer rate: five pairs of (plain loopback TCP, then freehint's first
# round of an all-data guest), each pair back to back, because this
# machine's loopback rate itself varies run to run.
for n in 1 2 3 4 5; do
  iperf3 -s -1 -p 5301 >/dev/null 2>&1 &
  sleep 0.5
  run "iperf3-$n" iperf3 -c 127.0.0.1 -p 5301 -t 3 -J
  run "transfer-2-$n" $fh bench sim --mem-mib 4096 --used-percent 100 --dirty-mib-per-s 0 --hints off \
    --preallocate-destination --bulk-channels 2 --json
done
run transfer-1-1 $fh bench sim --mem-mib 4096 --used-percent 100 --dirty-mib-per-s 0 --hints off \
  --preallocate-destination --bulk-channels 1 --json
run hints $fh bench hints --mem-mib 4096
run sync $fh bench sync --mem-mib 4096

# The REAL guest: the demo's four modes, three times round-robin, for the
# demo's guest, a freshly booted idle guest, and the demo's guest with
# Debian's init_on_alloc off.
FREEHINT_QEMU=$(./tests/qemu/build-qemu.sh)
FREEHINT_GUEST_DIR=$(./tests/guest/build-guest-image.sh)
export FREEHINT_QEMU FREEHINT_GUEST_DIR
real() { # name, demo args...
  local name=$1; shift
  echo "bench: $name: freehint-demo $*" >&2
  echo "make demo ARGS=\"$*\"" > "$out/$name.cmd"
  ./target/release/freehint-demo "$@" --out "$out/$name.json" --log-dir "$out/$name-logs" > "$out/$name.txt"
}
real real-demo --repeat 3
real real-idle --work-mib 0 --keep-mib 0 --repeat 3
real real-ioa0 --guest-append init_on_alloc=0 --repeat 3

python3 tests/scripts/bench_report.py "$out" > docs/BENCHMARKS.md
echo "bench: wrote docs/BENCHMARKS.md" >&2
