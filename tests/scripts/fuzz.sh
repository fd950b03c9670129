#!/usr/bin/env bash
# Fuzzes what freehint reads from peers and guests: the coverage-guided
# targets of tests/fuzz (cargo fuzz, libFuzzer; nightly toolchain, which
# this script installs with the cargo-fuzz tool if missing).
#
#   tests/scripts/fuzz.sh [SECONDS]   every target for SECONDS each
#                                     (default 10: the short runs of
#                                     `make test`)
#   tests/scripts/fuzz.sh --runs N    every target for N executions or an
#                                     hour, whichever comes first
#                                     (`make fuzz`: 10 million each, about
#                                     an hour on 2 cores)
#
# Each target starts from its committed seeds (tests/fuzz/seeds/TARGET:
# inputs that once crashed it stay there as regression inputs) and a
# corpus kept in target/fuzz-corpus/TARGET between runs. A crash stops the
# script with libFuzzer's report; the input is in
# tests/fuzz/artifacts/TARGET/.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "${1:-}" = --runs ]; then
  # N executions or an hour (FREEHINT_FUZZ_MAX_S), whichever comes first:
  # the slower targets run about a thousand executions a second.
  max_s=${FREEHINT_FUZZ_MAX_S:-3600}
  limit=(-runs="${2:?--runs needs a count}" -max_total_time="$max_s")
  what="${2} executions or ${max_s}s"
else
  limit=(-max_total_time="${1:-10}")
  what="${1:-10}s"
fi

if ! rustup toolchain list | grep -q '^nightly'; then
  rustup toolchain install nightly --profile minimal
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi

mkdir -p target
# The harnesses behind the balloon's `fuzzing` feature reach the code they
# fuzz (their own unit tests), and lint and document clean.
cargo test -q -p freehint-balloon --features fuzzing --lib fuzzing
cargo clippy -q -p freehint-balloon --features fuzzing --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc -q --no-deps -p freehint-balloon --features fuzzing

summary=()
for t in $(cargo +nightly fuzz list --fuzz-dir tests/fuzz); do
  corpus=target/fuzz-corpus/$t
  seeds=tests/fuzz/seeds/$t
  mkdir -p "$corpus" "$seeds"
  log=target/fuzz-$t.log
  echo "== fuzz $t: $what"
  if ! cargo +nightly fuzz run --fuzz-dir tests/fuzz "$t" "$corpus" "$seeds" -- \
      "${limit[@]}" -rss_limit_mb=2048 -max_len=65536 >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "fuzz: $t failed (its log: $log)" >&2
    exit 1
  fi
  runs=$(grep -o 'Done [0-9]* runs in [0-9]* second' "$log" | tail -n 1)
  summary+=("$t: ${runs:-no summary in $log}")
done
printf 'fuzz: %s\n' "${summary[@]}"
