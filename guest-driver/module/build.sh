#!/usr/bin/env bash
# Builds the freehint_free kernel module against the headers of the kernel
# the test guest boots (the one Debian's linux-image-amd64 depends on, as
# tests/guest/build-guest-image.sh picks it), installing those headers with
# apt when they are missing. Warnings are errors (Kbuild). Builds in a copy
# under OUT (default: target/guest-module), so the source folder stays
# clean; prints the path of the .ko on its last line.
#
#   guest-driver/module/build.sh [OUT]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${1:-$root/target/guest-module}

kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
if [ -z "$kpkg" ]; then
  apt-get update -qq
  kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
fi
kver=${kpkg#linux-image-}
kdir=/usr/src/linux-headers-$kver
if [ ! -f "$kdir/Module.symvers" ]; then
  echo "module: installing linux-headers-$kver" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "linux-headers-$kver" >&2
fi

rm -rf "$out"
mkdir -p "$out"
cp "$here/Kbuild" "$here/freehint_free.c" "$here/freehint_free_uapi.h" "$out/"
log=$out/build.log
if ! make -C "$kdir" M="$out" modules >"$log" 2>&1; then
  cat "$log" >&2
  echo "module: the build failed against $kdir" >&2
  exit 1
fi
# Kbuild's own warnings (modpost: undefined or GPL-only symbols) are not
# compiler warnings, so -Werror does not catch them.
if grep -qi "warning" "$log"; then
  cat "$log" >&2
  echo "module: the build printed warnings against $kdir" >&2
  exit 1
fi
echo "module: built against $kver" >&2
echo "$out/freehint_free.ko"
