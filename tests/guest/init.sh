#!/bin/busybox sh
# /init of the freehint test guest (busybox initramfs).
# Kernel command line options:
#   freehint.memwork=MIB   write and free MIB MiB before saying ready
#   freehint.keep=MIB      of the memwork, keep MIB MiB resident (application data)
#   freehint.check=MIB     size of the region fh-checker keeps and verifies
#   freehint.noballoon     do not load virtio_balloon (a guest without the driver)
#   freehint.disk[=1]      load virtio_blk and ext4, mount /dev/vda read-only at
#                          /mnt/disk and run fh-diskcheck on it (its MANIFEST)
#   freehint.readdisk      with freehint.disk: read every file of the disk once
#                          (into the page cache) instead of running fh-diskcheck
#   freehint.fragment=MIB  touch MIB MiB in 4 KiB pages, then free every other
#                          64 KiB of it (fh-fragment) before saying ready
#   freehint.hotset=MIB    keep MIB MiB hot, rewritten at freehint.hotrate MiB/s
#                          (default 16) for ever (fh-hotset)
#   freehint.freeranges    load freehint_free and print what it reports
#                          (fh-freeranges, orders 0 and 9) before saying ready
#   freehint.agent         load virtio_console and freehint_free and start
#                          freehint-agent on the port org.freehint.agent.0
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
memwork=0
keep=0
check=64
disk=
readdisk=
fragment=0
hotset=0
hotrate=16
freeranges=
agent=
modules="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_balloon"
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    freehint.memwork=*) memwork=${arg#*=} ;;
    freehint.keep=*) keep=${arg#*=} ;;
    freehint.check=*) check=${arg#*=} ;;
    freehint.noballoon) modules=${modules% virtio_balloon} ;;
    freehint.disk=0) disk= ;;
    freehint.disk|freehint.disk=*) disk=1 ;;
    freehint.readdisk) readdisk=1 ;;
    freehint.fragment=*) fragment=${arg#*=} ;;
    freehint.hotset=*) hotset=${arg#*=} ;;
    freehint.hotrate=*) hotrate=${arg#*=} ;;
    freehint.freeranges) freeranges=1 ;;
    freehint.agent) agent=1 ;;
  esac
done
for m in $modules; do
  insmod "/lib/modules/$m.ko" || echo "freehint-guest: could not load $m"
done
echo "freehint-guest: modules loaded"
ls /sys/bus/virtio/drivers/virtio_balloon/ 2>/dev/null | grep -q virtio && echo "freehint-guest: balloon bound"
fh-checker "$check" &
fh-heartbeat &
if [ "$memwork" -gt 0 ]; then fh-memwork "$memwork" "$keep"; fi
if [ "$fragment" -gt 0 ]; then fh-fragment "$fragment"; fi
# fh-hotset says "freehint-hotset ready" once its set is written.
if [ "$hotset" -gt 0 ]; then fh-hotset "$hotset" "$hotrate" & fi
awk '/^MemTotal|^MemFree/ { printf "freehint-meminfo %s %s\n", $1, $2 }' /proc/meminfo
# freehint's module: the free memory as ranges, every order, then only
# whole 2 MiB blocks (fh-freeranges checks the ranges and prints a line).
if [ -n "$freeranges" ]; then
  if insmod /lib/modules/freehint_free.ko; then
    fh-freeranges 0
    fh-freeranges 9
  else
    echo "freehint-free FAIL could not load freehint_free"
  fi
fi
# freehint's guest driver: the module, and the agent on its virtio-serial
# port (it prints "freehint-agent: ready on /dev/vportNpM").
if [ -n "$agent" ]; then
  insmod /lib/modules/virtio_console.ko || echo "freehint-guest: could not load virtio_console"
  [ -e /sys/module/freehint_free ] || insmod /lib/modules/freehint_free.ko \
    || echo "freehint-agent FAIL could not load freehint_free"
  freehint-agent &
fi
if [ -n "$disk" ] && [ ! -e /lib/modules/disk.modules ]; then
  echo "freehint-disk FAIL no disk modules: boot the disk/ initramfs of the guest image"
elif [ -n "$disk" ]; then
  # lib/modules/disk.modules: virtio_blk, ext4 and what they need, in load
  # order (only in disk/initramfs.gz, see tests/guest/build-guest-image.sh).
  # "No such device": a module for hardware this guest lacks (crc32c-intel
  # without SSE4.2).
  for m in $(cat /lib/modules/disk.modules); do
    [ -e "/sys/module/$(echo "$m" | tr - _)" ] && continue
    err=$(insmod "/lib/modules/$m.ko" 2>&1) || case "$err" in
      *"No such device"*) ;;
      *) echo "freehint-guest: could not load $m: $err" ;;
    esac
  done
  mkdir -p /mnt/disk
  n=0
  while [ ! -b /dev/vda ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n + 1)); done
  if mount -t ext4 -o ro /dev/vda /mnt/disk; then
    echo "freehint-guest: disk mounted"
    if [ -n "$readdisk" ]; then
      for f in /mnt/disk/*; do [ -f "$f" ] && cat "$f"; done > /dev/null
      echo "freehint-guest: disk read into the page cache"
    else
      fh-diskcheck /mnt/disk &
    fi
  else
    echo "freehint-disk FAIL /dev/vda: could not mount it"
  fi
fi
echo "freehint-guest: ready"
while true; do sleep 3600; done
