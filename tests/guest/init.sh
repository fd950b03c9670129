#!/bin/busybox sh
# /init of the freehint test guest (busybox initramfs).
# Kernel command line options:
#   freehint.memwork=MIB   write and free MIB MiB before saying ready
#   freehint.keep=MIB      of the memwork, keep MIB MiB resident (application data)
#   freehint.check=MIB     size of the region fh-checker keeps and verifies
#   freehint.noballoon     do not load virtio_balloon (a guest without the driver)
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
memwork=0
keep=0
check=64
modules="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_balloon"
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    freehint.memwork=*) memwork=${arg#*=} ;;
    freehint.keep=*) keep=${arg#*=} ;;
    freehint.check=*) check=${arg#*=} ;;
    freehint.noballoon) modules=${modules% virtio_balloon} ;;
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
awk '/^MemTotal|^MemFree/ { printf "freehint-meminfo %s %s\n", $1, $2 }' /proc/meminfo
echo "freehint-guest: ready"
while true; do sleep 3600; done
