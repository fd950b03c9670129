#!/usr/bin/env bash
# Installs what freehint's tests and benchmarks need on this machine, and
# prepares hugetlbfs. Safe to run again. Needs root for apt and hugetlbfs;
# without root it only checks.
set -euo pipefail

need_cmd() { command -v "$1" >/dev/null 2>&1; }

if ! need_cmd cargo; then
  echo "setup: cargo is missing; freehint needs a Rust toolchain (rustup) on PATH" >&2
  exit 1
fi

if [ "$(id -u)" = 0 ]; then
  missing=()
  need_cmd iperf3 || missing+=(iperf3)
  need_cmd python3 || missing+=(python3)
  # mkfs.ext4 makes the test guest's disk images (tests/demo/src/disk.rs).
  need_cmd mkfs.ext4 || [ -x /usr/sbin/mkfs.ext4 ] || missing+=(e2fsprogs)
  # The font of the benchmark report's plots (freehint-bench report).
  [ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
  # The RDMA transport (freehint-rdma): rdma-sys builds against libibverbs
  # and librdmacm with bindgen (libclang); tests/scripts/rdma-in-guest.sh
  # copies the rxe provider, iproute2's ip and rdma, and xz-compressed
  # kernel modules (xz, cpio, kmod) into its guest.
  [ -f /usr/include/infiniband/verbs.h ] || missing+=(libibverbs-dev)
  [ -f /usr/include/rdma/rdma_cma.h ] || missing+=(librdmacm-dev)
  ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1 || missing+=(libclang-dev)
  ls /usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav*.so >/dev/null 2>&1 || missing+=(ibverbs-providers)
  need_cmd rdma || [ -x /usr/sbin/rdma ] || missing+=(iproute2)
  need_cmd xz || missing+=(xz-utils)
  need_cmd cpio || missing+=(cpio)
  need_cmd depmod || [ -x /usr/sbin/depmod ] || missing+=(kmod)
  need_cmd pkg-config || missing+=(pkg-config)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  # 2 MiB huge pages for the hugetlbfs test: keep at least 64 reserved.
  hp=/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages
  if [ -w "$hp" ] && [ "$(cat "$hp")" -lt 64 ]; then
    echo 64 > "$hp" || true
  fi
  if ! grep -q ' hugetlbfs ' /proc/mounts; then
    mkdir -p /dev/hugepages
    mount -t hugetlbfs -o pagesize=2M none /dev/hugepages || echo "setup: could not mount hugetlbfs" >&2
  fi
else
  echo "setup: not root; skipping package installs and hugetlbfs setup" >&2
fi

if [ ! -e /dev/userfaultfd ] && ! grep -q userfaultfd /proc/kallsyms 2>/dev/null; then
  echo "setup: warning: this kernel may lack userfaultfd; dirty tracking needs Linux >= 6.7" >&2
fi
