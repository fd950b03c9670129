#!/usr/bin/env bash
# Migrates the SIMULATED VM over real RDMA: soft-RoCE (rdma_rxe) inside a
# Debian guest under QEMU, because this host's kernel has no RDMA. The
# guest runs Debian's 6.12 kernel (from bookworm: freehint's dirty log
# needs userfaultfd's asynchronous write-protect, Linux >= 6.7) with
# rdma_rxe, rdma_ucm and a dummy interface, the RDMA user-space libraries
# (libibverbs, librdmacm, the rxe provider) and freehint's binaries, and
# runs `freehint bench sim --transport rdma --address 198.18.0.1` there.
#
#   tests/scripts/rdma-in-guest.sh [BENCH-SIM-ARGS...]
#       one run (default: --mem-mib 256 --used-percent 30 --hints on);
#       the run's JSON is the last line printed
#   (FREEHINT_RDMA_GUEST_ENV="RUST_LOG=debug" for the run's environment,
#   FREEHINT_RDMA_LOG_LINES: lines of its log shown, default 40)
#   tests/scripts/rdma-in-guest.sh --suite
#       the RDMA transport's tests, in one boot: precopy with hints and
#       postcopy (page-by-page equal, "transport": "rdma"), a source whose
#       page references carry a wrong memory key, a destination that dies
#       mid-transfer (a clear error, the source VM still running); exits
#       non-zero if any check fails
#
# Does its own set-up (apt packages, the patched QEMU, the guest's kernel
# and libraries, cached under ~/.cache/freehint). Needs root for apt.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
cache=${FREEHINT_CACHE:-$HOME/.cache/freehint}
log() { echo "rdma-in-guest: $*" >&2; }

./tests/scripts/setup-host.sh >&2
qemu=${FREEHINT_QEMU:-$(./tests/qemu/build-qemu.sh)}

# 1. The guest's kernel, its RDMA modules and user space, busybox: cached
#    per kernel package and version of this script and the guest's init.
kmeta=linux-image-6.12-amd64
kpkg=$(apt-cache depends "$kmeta" 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
if [ -z "$kpkg" ]; then
  apt-get update -qq
  kpkg=$(apt-cache depends "$kmeta" | awk '/Depends: linux-image-/ {print $2; exit}')
fi
[ -n "$kpkg" ] || { log "no package $kmeta (Debian bookworm's 6.12 kernel)"; exit 1; }
key=$(cat "$0" tests/guest/rdma-init.sh | sha256sum | cut -c1-12)
base=$cache/rdma-guest-$kpkg-$key
copy_with_libs() { # root, files...: each file and the shared libraries it needs, at their paths
  local root=$1 f lib
  shift
  for f in "$@"; do
    mkdir -p "$root$(dirname "$f")"
    cp -L "$f" "$root$f"
    for lib in $(ldd "$f" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
      [ -e "$root$lib" ] && continue
      mkdir -p "$root$(dirname "$lib")"
      cp -L "$lib" "$root$lib"
    done
  done
}
if [ ! -s "$base/vmlinuz" ] || [ ! -s "$base/base.cpio.gz" ]; then
  log "building the RDMA guest from $kpkg (once)"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && apt-get download -q "$kpkg" busybox-static >/dev/null 2>&1)
  dpkg-deb -x "$work/$kpkg"_*.deb "$work/kernel"
  dpkg-deb -x "$work"/busybox-static_*.deb "$work/busybox"
  kver=${kpkg#linux-image-}
  root=$work/root
  mkdir -p "$root"/{bin,dev,proc,sys,tmp,rdma,opt/freehint,lib/modules,etc/libibverbs.d}
  cp "$work/busybox/bin/busybox" "$root/bin/busybox"
  export PATH=$PATH:/usr/sbin:/sbin
  depmod -b "$work/kernel" "$kver"
  # crc32_generic: rxe computes its packets' ICRC with the kernel's
  # "crc32" hash, which it asks the crypto API for (no module dependency).
  modprobe -d "$work/kernel" -S "$kver" --show-depends -a crc32_generic rdma_rxe rdma_ucm dummy \
    | awk '$1 == "insmod" {print $2}' > "$work/paths"
  [ -s "$work/paths" ] || { log "could not resolve rdma_rxe's modules in $kpkg"; exit 1; }
  while read -r f; do
    name=$(basename "$f")
    name=${name%.xz}
    name=${name%.ko}
    case "$f" in
      *.xz) xz -dc "$f" > "$root/lib/modules/$name.ko" ;;
      *) cp "$f" "$root/lib/modules/$name.ko" ;;
    esac
    echo "$name"
  done < "$work/paths" > "$root/lib/modules/rdma.modules"
  log "modules: $(tr '\n' ' ' < "$root/lib/modules/rdma.modules")"
  # iproute2's ip (dummy links) and rdma (the rxe link), the rxe provider
  # of libibverbs and its driver file; libraries by ldd.
  provider=$(ls /usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav*.so)
  copy_with_libs "$root" "$(command -v ip)" "$(command -v rdma)" "$provider"
  cp /etc/libibverbs.d/rxe.driver "$root/etc/libibverbs.d/"
  install -m 0755 tests/guest/rdma-init.sh "$root/init"
  rm -rf "$base.tmp"
  mkdir -p "$base.tmp"
  cp "$work/kernel/boot/vmlinuz-$kver" "$base.tmp/vmlinuz"
  (cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$base.tmp/base.cpio.gz"
  rm -rf "$base"
  mv "$base.tmp" "$base"
  rm -rf "$work"
  trap - EXIT
  # Every edit of this script or the guest's init makes a new key: drop
  # the builds of older keys so that the cache does not grow with them.
  for old in "$cache"/rdma-guest-*; do
    [ "$old" = "$base" ] || rm -rf "$old"
  done
fi

# 2. freehint's binaries, with RDMA, fault points and the benchmark runner
#    (the features `make test` builds with), stripped.
log "building freehint with RDMA"
cargo build -q -p freehint -p freehint-sim-vm -p freehint-preload \
  --features freehint/failpoints,freehint/bench,freehint/rdma >&2
run=$(mktemp -d)
trap 'rm -rf "$run"' EXIT
over=$run/root
mkdir -p "$over/opt/freehint" "$over/rdma"
for b in freehint freehint-sim-vm libfreehint_preload.so; do
  strip -o "$over/opt/freehint/$b" "target/debug/$b"
done
copy_with_libs "$over" target/debug/freehint
rm -rf "$over$repo"

# 3. What the guest runs: one bench sim, or the suite.
# FREEHINT_RDMA_GUEST_ENV: variables for the runs, e.g. RUST_LOG=debug.
sim="${FREEHINT_RDMA_GUEST_ENV:-} freehint bench sim --transport rdma --address 198.18.0.1 --json"
small="--mem-mib 256 --used-percent 30 --dirty-mib-per-s 8"
suite=
if [ "${1:-}" = "--suite" ]; then
  suite=1
  cat > "$over/rdma/commands" <<EOF
precopy $sim $small --hints on
postcopy $sim $small --hints on --mode postcopy
wrong-rkey export FAILPOINTS='src.rdma-wrong-rkey=return'; $sim $small --hints off
dead-destination export FAILPOINTS='dst.mid-round=return(kill)'; $sim $small --hints off
EOF
else
  [ $# -gt 0 ] || set -- $small --hints on
  echo "run $sim $*" > "$over/rdma/commands"
fi
(cd "$over" && find . | cpio -o -H newc --quiet | gzip -1) > "$run/over.cpio.gz"
cat "$base/base.cpio.gz" "$run/over.cpio.gz" > "$run/initramfs.gz"

# 4. Boot it: two vCPUs (source and destination run at once), 3 GiB (two
#    RAM files in tmpfs and the binaries), the serial console as output.
log "booting the guest (TCG) and migrating over soft-RoCE"
timeout "${FREEHINT_RDMA_GUEST_TIMEOUT_S:-900}" "$qemu" \
  -L /usr/share/seabios -L /usr/share/qemu -L /usr/lib/ipxe/qemu \
  -M q35 -cpu max -smp 2 -m 3072 -nodefaults \
  -display none -no-reboot -nic none -serial "file:$run/console.log" \
  -kernel "$base/vmlinuz" -initrd "$run/initramfs.gz" \
  -append "console=ttyS0 quiet panic=-1 FREEHINT_RDMA_RUN_TIMEOUT_S=${FREEHINT_RDMA_RUN_TIMEOUT_S:-300} FREEHINT_RDMA_LOG_LINES=${FREEHINT_RDMA_LOG_LINES:-40}" \
  >&2 || log "QEMU exited with $?"
# The whole console, for a look after the fact.
mkdir -p target
cp "$run/console.log" target/rdma-in-guest-console.log
grep -aE "^freehint-rdma" "$run/console.log" | grep -v "^freehint-rdma-result" >&2 || true
results=$(grep -a "^freehint-rdma-result" "$run/console.log" | tr -d '\r' || true)
logs=$(grep -a "^freehint-rdma-log" "$run/console.log" | tr -d '\r' || true)
[ -n "$results" ] || { log "the guest printed no result; its console:"; tail -50 "$run/console.log" >&2; exit 1; }

if [ -z "$suite" ]; then
  last=$(echo "$results" | tail -1)
  echo "$last" | cut -d' ' -f4-
  exit "$(echo "$last" | cut -d' ' -f3)"
fi
printf '%s\n%s\n' "$logs" "$results" | python3 tests/scripts/check-rdma-suite.py
