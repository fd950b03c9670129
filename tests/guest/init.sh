#!/bin/busybox sh
# /init of the freehint test guest (busybox initramfs).
# Kernel command line options:
#   freehint.memwork=MIB   write and free MIB MiB before saying ready
#   freehint.check=MIB     size of the region fh-checker keeps and verifies
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_balloon; do
  insmod "/lib/modules/$m.ko" || echo "freehint-guest: could not load $m"
done
memwork=0
check=64
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    freehint.memwork=*) memwork=${arg#*=} ;;
    freehint.check=*) check=${arg#*=} ;;
  esac
done
echo "freehint-guest: modules loaded"
ls /sys/bus/virtio/drivers/virtio_balloon/ 2>/dev/null | grep -q virtio && echo "freehint-guest: balloon bound"
fh-checker "$check" &
fh-heartbeat &
if [ "$memwork" -gt 0 ]; then fh-memwork "$memwork"; fi
awk '/^MemTotal|^MemFree/ { printf "freehint-meminfo %s %s\n", $1, $2 }' /proc/meminfo
echo "freehint-guest: ready"
while true; do sleep 3600; done
