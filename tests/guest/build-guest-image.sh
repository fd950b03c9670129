#!/usr/bin/env bash
# Builds the freehint test guest: Debian's 6.1 kernel and a busybox
# initramfs with the virtio modules and the static guest programs from
# guest-driver/programs (heartbeat, memory workload, data checker). Caches
# it under ~/.cache/freehint/guest-<hash>/ and prints that directory, which
# holds vmlinuz and initramfs.gz. Needs root for apt the first time.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${FREEHINT_CACHE:-$HOME/.cache/freehint}
log() { echo "build-guest-image: $*" >&2; }

key=$(cat "$0" "$here/init.sh" "$repo"/guest-driver/programs/*.c | sha256sum | cut -c1-12)
out=$cache/guest-$key
if [ -s "$out/vmlinuz" ] && [ -s "$out/initramfs.gz" ]; then
  echo "$out"
  exit 0
fi
command -v cpio >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cpio >/dev/null; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
[ -n "$kpkg" ] || { apt-get update -qq; kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/ {print $2; exit}'); }
log "downloading $kpkg and busybox-static"
apt-get download -q "$kpkg" busybox-static >/dev/null 2>&1
dpkg-deb -x "$kpkg"_*.deb kernel
dpkg-deb -x busybox-static_*.deb busybox
kver=${kpkg#linux-image-}

root=$work/root
mkdir -p "$root"/{bin,dev,proc,sys,tmp,lib/modules}
cp busybox/bin/busybox "$root/bin/busybox"
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_balloon; do
  f=$(find "kernel/lib/modules/$kver" -name "$m.ko" | head -1)
  [ -n "$f" ] || { log "module $m not found in $kpkg"; exit 1; }
  cp "$f" "$root/lib/modules/"
done
for src in "$repo"/guest-driver/programs/*.c; do
  gcc -static -O2 -Wall -Wextra -Werror -o "$root/bin/$(basename "$src" .c)" "$src"
done
install -m 0755 "$here/init.sh" "$root/init"

mkdir -p "$out.tmp"
cp "kernel/boot/vmlinuz-$kver" "$out.tmp/vmlinuz"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$out.tmp/initramfs.gz"
rm -rf "$out"
mv "$out.tmp" "$out"
log "guest image in $out"
echo "$out"
