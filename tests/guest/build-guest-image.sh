#!/usr/bin/env bash
# Builds the freehint test guest: Debian's 6.1 kernel and a busybox
# initramfs with the virtio modules and the static guest programs from
# guest-driver/programs (heartbeat, memory workload, data checker). Caches
# it under ~/.cache/freehint/guest-<hash>/ and prints that directory, which
# holds vmlinuz and initramfs.gz, and disk/ with the same for a guest with a
# virtio-blk ext4 disk (freehint.disk, see init.sh): that initramfs adds the
# disk's modules and the disk checker. The image also carries freehint's
# own guest driver: the freehint_free module (guest-driver/module), the
# agent (guest-driver/agent, a static Rust binary) and virtio_console for
# the agent's port; init.sh starts them with freehint.agent. Needs root
# for apt the first time.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${FREEHINT_CACHE:-$HOME/.cache/freehint}
log() { echo "build-guest-image: $*" >&2; }

key=$(cat "$0" "$here/init.sh" "$repo"/guest-driver/programs/*.c "$repo"/guest-driver/module/* \
  "$repo"/guest-driver/agent/Cargo.toml "$repo"/guest-driver/agent/src/*.rs \
  "$repo"/guest-driver/protocol/Cargo.toml "$repo"/guest-driver/protocol/src/*.rs | sha256sum | cut -c1-12)
out=$cache/guest-$key
if [ -s "$out/vmlinuz" ] && [ -s "$out/initramfs.gz" ] && [ -s "$out/disk/initramfs.gz" ]; then
  echo "$out"
  exit 0
fi
need=()
command -v cpio >/dev/null || need+=(cpio)
command -v depmod >/dev/null || [ -x /usr/sbin/depmod ] || need+=(kmod)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
export PATH=$PATH:/usr/sbin:/sbin

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
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_balloon virtio_console; do
  f=$(find "kernel/lib/modules/$kver" -name "$m.ko" | head -1)
  [ -n "$f" ] || { log "module $m not found in $kpkg"; exit 1; }
  cp "$f" "$root/lib/modules/"
done
# A guest with a disk (freehint.disk) boots disk/initramfs.gz: the same
# archive with a second one appended (the kernel unpacks both) that adds
# fh-diskcheck and the modules virtio_blk and ext4 need, so that a guest
# without a disk has not a byte more in its memory. The modules are listed
# in load order in lib/modules/disk.modules, as modprobe resolves them from
# the package's modules.dep and softdeps (ext4 and jbd2 want crc32c).
disk_root=$work/disk-root
mkdir -p "$disk_root"/{bin,lib/modules}
depmod -b kernel "$kver"
modprobe -d kernel -S "$kver" --show-depends -a virtio_blk ext4 | awk '$1 == "insmod" {print $2}' > disk.paths
[ -s disk.paths ] || { log "could not resolve the disk modules in $kpkg"; exit 1; }
while read -r f; do
  [ -e "$root/lib/modules/$(basename "$f")" ] || cp "$f" "$disk_root/lib/modules/"
  basename "$f" .ko
done < disk.paths > "$disk_root/lib/modules/disk.modules"
log "disk modules: $(tr '\n' ' ' < "$disk_root/lib/modules/disk.modules")"
for src in "$repo"/guest-driver/programs/*.c; do
  name=$(basename "$src" .c)
  dest=$root
  [ "$name" = fh-diskcheck ] && dest=$disk_root
  gcc -static -O2 -Wall -Wextra -Werror -o "$dest/bin/$name" "$src"
done
# freehint's own module (guest-driver/module), built against this kernel's
# headers; init.sh loads it only when asked (freehint.freeranges).
ko=$("$repo/guest-driver/module/build.sh" "$work/module" | tail -1)
cp "$ko" "$root/lib/modules/"
# The agent (guest-driver/agent): Rust, linked statically against glibc
# (the toolchain has no musl target here), in its own target directory so
# that its flags do not rebuild the host's crates; stripped, as it lives in
# the guest's memory.
log "building freehint-agent"
RUSTFLAGS="-C target-feature=+crt-static" cargo build -q --release --locked \
  --manifest-path "$repo/Cargo.toml" -p freehint-agent \
  --target x86_64-unknown-linux-gnu --target-dir "$repo/target/guest-agent"
strip -o "$root/bin/freehint-agent" "$repo/target/guest-agent/x86_64-unknown-linux-gnu/release/freehint-agent"
install -m 0755 "$here/init.sh" "$root/init"

rm -rf "$out.tmp"
mkdir -p "$out.tmp"
cp "kernel/boot/vmlinuz-$kver" "$out.tmp/vmlinuz"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$out.tmp/initramfs.gz"
mkdir "$out.tmp/disk"
ln -s ../vmlinuz "$out.tmp/disk/vmlinuz"
(cat "$out.tmp/initramfs.gz"; cd "$disk_root" && find . | cpio -o -H newc --quiet | gzip -1) \
  > "$out.tmp/disk/initramfs.gz"
rm -rf "$out"
mv "$out.tmp" "$out"
log "guest image in $out"
echo "$out"
