#!/usr/bin/env bash
# Builds QEMU 10.0.2 from Debian's source with the generic vhost-user device
# made user-creatable and migratable, and kept from starting once its backend
# is gone (the two .patch files here, explained in docs/QEMU.md), and with
# Linux AIO and io_uring for disks
# (-drive ...,aio=native / aio=io_uring), and installs the reference QEMU
# 10.0.2 from bookworm-backports (its firmware is used by both). Caches the build under
# ~/.cache/freehint; prints the path of the patched qemu-system-x86_64.
# Needs root (apt). About 5 minutes on two cores the first time.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${FREEHINT_CACHE:-$HOME/.cache/freehint}
# The generic vhost-user device made user-creatable and migratable, and
# kept from starting (and aborting QEMU) once its backend is gone.
patches=("$here/vhost-user-device-creatable-migratable.patch"
         "$here/vhost-user-base-backend-loss.patch")
version=10.0.2
key=$(cat "${patches[@]}" "$0" | sha256sum | cut -c1-12)
prefix=$cache/qemu-$version-$key
bin=$prefix/bin/qemu-system-x86_64
log() { echo "build-qemu: $*" >&2; }

if [ -x "$bin" ] && command -v qemu-system-x86_64 >/dev/null; then
  echo "$bin"
  exit 0
fi
[ "$(id -u)" = 0 ] || { log "needs root to install packages"; exit 1; }

sources=/etc/apt/sources.list.d/freehint-backports.sources
if [ ! -e "$sources" ]; then
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  log "adding bookworm-backports ($mirror)"
  cat > "$sources" <<SRC
Types: deb deb-src
URIs: $mirror
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
log "installing the reference QEMU and the build dependencies"
apt-get install -y -qq -t bookworm-backports qemu-system-x86 >/dev/null
apt-get install -y -qq ninja-build libglib2.0-dev libpixman-1-dev pkg-config flex bison \
  python3-venv libslirp-dev libfdt-dev xz-utils patch bzip2 liburing-dev libaio-dev >/dev/null
python3 -m pip install -q meson==1.5.0 pycotap 2>&1 | grep -v "Running pip as the 'root'" || true

work=$cache/build/qemu-$version
rm -rf "$work"
mkdir -p "$work"
cd "$work"
# Only the upstream tarball of the +ds source downloads; the Debian
# packaging files are not needed.
apt-get source --download-only "qemu/bookworm-backports" >/dev/null 2>&1 || true
tarball=$(ls qemu_"$version"+ds.orig.tar.xz 2>/dev/null || true)
[ -n "$tarball" ] || { log "could not download the QEMU $version source"; exit 1; }
tar xf "$tarball"
cd "qemu-$version"
for p in "${patches[@]}"; do patch -p1 < "$p" >&2; done
# The +ds tarball carries no firmware blobs: skip unpacking them.
sed -i 's/^if unpack_edk2_blobs$/if false/' pc-bios/meson.build
log "configuring"
./configure --prefix="$prefix" --target-list=x86_64-softmmu --without-default-features \
  --enable-tcg --enable-kvm --enable-vhost-user --enable-slirp --enable-fdt=system \
  --enable-linux-aio --enable-linux-io-uring \
  --disable-docs --disable-werror --disable-install-blobs >"$work/configure.log" 2>&1 \
  || { tail -30 "$work/configure.log" >&2; exit 1; }
# meson drops io_uring without a word if liburing does not link: insist.
for feature in "Linux AIO support" "Linux io_uring support"; do
  grep -q "$feature *: *YES" "$work/configure.log" \
    || { log "configure did not enable $feature"; grep -i "$feature" "$work/configure.log" >&2; exit 1; }
done
log "building (a few minutes)"
ninja -C build >"$work/build.log" 2>&1 || { tail -30 "$work/build.log" >&2; exit 1; }
ninja -C build install >/dev/null
rm -rf "$work"
echo "$bin"
