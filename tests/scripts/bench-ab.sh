#!/usr/bin/env bash
# A/B benchmark of freehint's TCP path: freehint built at BASE against the
# working tree's build, on this machine, in one run, the two builds
# alternating run by run (this machine's speed drifts over minutes, so two
# separate runs would compare the drift). Written for issue 14's question:
# is the TCP path unchanged after the transport abstraction (the `Channel`
# that TCP, TLS and RDMA implement)? BASE defaults to 022a407, the last
# commit before it.
#
#   tests/scripts/bench-ab.sh [BASE] [REPS] [TABLE]   (root: namespaces and tc)
#
# Runs, REPS times each per build (default 5):
#   - the real Debian guest (after-job profile, 2 GiB, unshaped link) with
#     freehint-hints (TLS), freehint-hints-insecure (plain TCP) and
#     freehint-postcopy (TLS), through freehint-bench --bin-dir;
#   - the simulated VM: the 4 GiB all-data transfer of `make bench`
#     (transfer rate) and 2 GiB postcopy with hints (fault latency while the
#     bulk stream runs).
# Writes target/bench-ab/*.json and TABLE (default docs/bench/transport-ab.md,
# the table docs/BENCHMARKS.md embeds), each figure a median with its
# min-max range; another TABLE compares any other two builds.
set -euo pipefail
cd "$(dirname "$0")/../.."
base=${1:-022a407}
reps=${2:-5}
table=${3:-docs/bench/transport-ab.md}
./tests/scripts/setup-host.sh
features=freehint/failpoints,freehint/bench
cargo build --release -p freehint -p freehint-preload -p freehint-bench -p freehint-sim-vm \
  --features $features
FREEHINT_QEMU=$(./tests/qemu/build-qemu.sh)
FREEHINT_GUEST_DIR=$(./tests/guest/build-guest-image.sh)
export FREEHINT_QEMU FREEHINT_GUEST_DIR

# The base build lives in its own worktree with its own target folder.
wt=target/ab-base
want=$(git rev-parse "$base^{commit}")
if [ ! -d "$wt" ] || [ "$(git -C "$wt" rev-parse HEAD)" != "$want" ]; then
  git worktree remove --force "$wt" 2>/dev/null || rm -rf "$wt"
  git worktree prune
  git worktree add --detach "$wt" "$want"
fi
(cd "$wt" && cargo build --release -p freehint -p freehint-preload -p freehint-sim-vm \
  --features $features)

out=target/bench-ab
rm -rf "$out"
mkdir -p "$out"
bench=./target/release/freehint-bench
declare -A bin=([base]="$wt/target/release" [head]=./target/release)
git rev-parse --short "$want" > "$out/base.rev"
head_rev=$(git rev-parse --short HEAD)
# The product and the simulated VM (the runner, freehint-bench, is the
# working tree's for both builds).
git diff --quiet HEAD -- host tests/sim-vm || head_rev="$head_rev+changes"
echo "$head_rev" > "$out/head.rev"

for n in $(seq 1 "$reps"); do
  for build in base head; do
    echo "bench-ab: $build, repetition $n" >&2
    $bench --profiles after-job --mem-mib 2048 \
      --modes freehint-hints,freehint-hints-insecure,freehint-postcopy \
      --link unlimited --repeat 1 --bin-dir "${bin[$build]}" \
      --log-dir "$out/logs/$build-$n" --scratch-dir "$out/scratch" \
      --json "$out/guest-$build-$n.json"
    "${bin[$build]}/freehint" bench sim --mem-mib 4096 --used-percent 100 --dirty-mib-per-s 0 \
      --hints off --preallocate-destination --bulk-channels 2 --json > "$out/transfer-$build-$n.json"
    "${bin[$build]}/freehint" bench sim --mem-mib 2048 --used-percent 20 --dirty-mib-per-s 64 \
      --mode postcopy --hints on --json > "$out/postcopy-$build-$n.json"
  done
done
title=()
[ "$table" = docs/bench/transport-ab.md ] || title=("freehint at $base against ${head_rev} (A/B)")
python3 tests/scripts/bench-ab-table.py "$out" "tests/scripts/bench-ab.sh $*" "${title[@]}" > "$table"
echo "bench-ab: wrote $table" >&2
