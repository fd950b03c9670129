#!/usr/bin/env bash
# The benchmark suite (`make bench`): runs the standard matrix on this
# machine and writes docs/BENCHMARKS.md (tables and plots in docs/bench/)
# from the results, each figure with its command. Needs root (network
# namespaces and tc). About 70 minutes before the guest-agent runs (suite 1's
# freehint-agent and suite 6) and suite 5's unshaped link were added; they
# add an estimated 30 (66 runs, not yet timed as a whole); at its peak
# about 18 GiB of memory (a 16 GiB guest whose kernel zeroes its free memory
# to hint it).
#
#   FREEHINT_BENCH_QUICK=1 make bench   one repetition of a smaller real-guest
#                                       matrix (a check that everything runs;
#                                       the commands in the report show it)
#   FREEHINT_BENCH_SUITES=5,6,7,sim make bench
#                                       only those parts (1-7: the real-guest
#                                       suites below; sim: the simulated-VM
#                                       and micro benchmarks), keeping the
#                                       other parts' results in target/bench;
#                                       the report is written once every part
#                                       has results, each suite saying when it
#                                       ran and from which commit. For a
#                                       machine where the whole does not fit
#                                       in one sitting.
set -euo pipefail
cd "$(dirname "$0")/../.."
./tests/scripts/setup-host.sh
# freehint-sim-vm: `freehint bench sim` runs it as its sibling binary.
cargo build --release -p freehint -p freehint-preload -p freehint-bench -p freehint-sim-vm \
  --features freehint/failpoints,freehint/bench
FREEHINT_QEMU=$(./tests/qemu/build-qemu.sh)
FREEHINT_GUEST_DIR=$(./tests/guest/build-guest-image.sh)
export FREEHINT_QEMU FREEHINT_GUEST_DIR
out=target/bench
parts=${FREEHINT_BENCH_SUITES:-1,2,3,4,5,6,7,sim}
want() { [[ ",$parts," == *",$1,"* ]]; }
[ -n "${FREEHINT_BENCH_SUITES:-}" ] || rm -rf "$out"
mkdir -p "$out"
FREEHINT_BENCH_BUILT_FROM=$(git describe --always --dirty 2>/dev/null || echo unknown)
export FREEHINT_BENCH_BUILT_FROM
fh=./target/release/freehint
bench=./target/release/freehint-bench

run() { # name, command...
  local name=$1; shift
  echo "bench: $name: $*" >&2
  echo "$*" > "$out/$name.cmd"
  "$@" > "$out/$name.json"
}

quick=${FREEHINT_BENCH_QUICK:-}
reps=3
[ -n "$quick" ] && reps=1

# 1. Every profile, every mode, 2 GiB, on a 1 Gbit/s link.
want 1 && $bench --profiles fresh,after-job,fragmented,page-cache,busy-idle --mem-mib 2048 \
  --modes freehint-hints,freehint-agent,freehint-nohints,qemu-native,qemu-native-fph,qemu-native-fpr,qemu-multifd-fph,qemu-postcopy \
  --link 1gbit --repeat $reps --json $out/suite-1-profiles.json
# 2. How cost grows with RAM size (the 2 GiB point is in 1.).
sizes=4096,8192,16384
[ -n "$quick" ] && sizes=8192
want 2 && $bench --profiles fresh,after-job --mem-mib $sizes \
  --modes freehint-hints,qemu-native,qemu-native-fph \
  --link 1gbit --repeat $reps --json $out/suite-2-scaling.json
# 3. Faster links (where waiting for the guest's first report saves bytes).
want 3 && $bench --profiles after-job --mem-mib 2048 \
  --modes freehint-hints,freehint-hints-wait,freehint-nohints,qemu-native-fph,qemu-multifd-fph \
  --link unlimited,10gbit --repeat $reps --json $out/suite-3-links.json
# 4. After 10 s of idling: free page reporting has discarded freed memory.
want 4 && $bench --profiles after-job --mem-mib 2048 --idle-s 10 \
  --modes freehint-hints,qemu-native-fpr,qemu-native-fph \
  --link 1gbit --repeat $reps --json $out/suite-4-idle.json

# 5. Postcopy and hybrid beside precopy with hints and QEMU's own postcopy,
#    unshaped (where goal 8's fault latency is judged) and on 1 Gbit/s;
#    freehint-postcopy-insecure shows what TLS costs the switch and faults.
want 5 && $bench --profiles after-job,busy-idle --mem-mib 2048 \
  --modes freehint-hints,freehint-postcopy,freehint-postcopy-insecure,freehint-hybrid,qemu-postcopy \
  --link unlimited,1gbit --repeat $reps --json $out/suite-5-postcopy.json

# 6. freehint's guest agent vs the stock driver's hints, on the demo's
# unshaped link, and the agent dropping the guest's page cache first.
want 6 && $bench --profiles after-job,fragmented,page-cache --mem-mib 2048 \
  --modes freehint-hints,freehint-agent,freehint-agent-drop-caches \
  --link unlimited --repeat $reps --json $out/suite-6-agent.json

# 7. What TLS costs: freehint-hints (TLS, as every freehint mode runs)
# beside the same over plain TCP, on the unshaped link.
want 7 && $bench --profiles after-job --mem-mib 2048 \
  --modes freehint-hints,freehint-hints-insecure \
  --link unlimited --repeat $reps --json $out/suite-7-tls.json

# The simulated VM and the micro benchmarks (loopback, no guest).
if want sim; then
  sim=(bench sim --mem-mib 4096 --used-percent 15 --dirty-mib-per-s 16 --json)
  for i in 1 2 3; do
    for h in on off; do
      run "sim4g-hints-$h-$i" $fh "${sim[@]}" --hints "$h"
      run "sim4g-prealloc-hints-$h-$i" $fh "${sim[@]}" --hints "$h" --preallocate-destination
    done
  done
  # Postcopy and hybrid on the simulated VM: fault latency with the bulk
  # stream running.
  pc=(bench sim --mem-mib 2048 --used-percent 20 --dirty-mib-per-s 64 --json)
  for i in 1 2 3; do
    for h in on off; do
      run "sim2g-postcopy-hints-$h-$i" $fh "${pc[@]}" --mode postcopy --hints "$h"
      run "sim2g-hybrid-hints-$h-$i" $fh "${pc[@]}" --mode hybrid --min-rounds 3 --max-rounds 3 --hints "$h"
    done
  done
  # Transfer rate: pairs of (plain loopback TCP, then freehint's first round
  # of an all-data guest), each pair back to back, because this machine's
  # loopback rate itself varies run to run.
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
fi

missing=()
for f in suite-1-profiles suite-2-scaling suite-3-links suite-4-idle suite-5-postcopy \
  suite-6-agent suite-7-tls sync; do
  [ -s "$out/$f.json" ] || missing+=("$f")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bench: docs/BENCHMARKS.md not rewritten: no results yet for ${missing[*]} (sync: the sim part); run the rest with FREEHINT_BENCH_SUITES" >&2
  exit 0
fi

$bench report --dir "$out" --out docs/BENCHMARKS.md --plots-dir docs/bench
echo "bench: wrote docs/BENCHMARKS.md and docs/bench/" >&2
