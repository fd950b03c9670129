#!/bin/busybox sh
# /init of the RDMA test guest (tests/scripts/rdma-in-guest.sh builds it):
# loads soft-RoCE (rdma_rxe) and the RDMA connection manager, puts an rxe
# device on a dummy interface with 198.18.0.1 (the benchmarking range),
# runs each line of /rdma/commands (NAME COMMAND...), and prints what each
# printed as one line: "freehint-rdma-result NAME EXIT-CODE OUTPUT-LINE"
# for its last line of output. Then it powers the guest off.
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /tmp /dev/shm
mount -t tmpfs -o size=90% tmpfs /tmp
mount -t tmpfs -o size=90% tmpfs /dev/shm
say() { echo "freehint-rdma: $*"; }
fail() { say "FAIL $*"; poweroff -f; }

# lib/modules/rdma.modules: rdma_rxe, rdma_ucm, dummy and what they need,
# in load order.
for m in $(cat /lib/modules/rdma.modules); do
  [ -e "/sys/module/$(echo "$m" | tr - _)" ] && continue
  insmod "/lib/modules/$m.ko" || fail "could not load $m"
done
ip link set lo up
# Loading dummy makes dummy0 (numdummies=1).
[ -e /sys/class/net/dummy0 ] || ip link add dummy0 type dummy || fail "could not add dummy0"
ip addr add 198.18.0.1/24 dev dummy0
ip link set dummy0 up
rdma link add rxe0 type rxe netdev dummy0 || fail "could not add the rxe device"
n=0
while [ ! -e /dev/infiniband/rdma_cm ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n + 1)); done
say "rxe0 on dummy0 198.18.0.1: $(rdma link show 2>&1 | tr '\n' ' ')"

dmesg -c > /dev/null
export PATH=/opt/freehint:$PATH RUST_BACKTRACE=1 RUST_LOG=${RUST_LOG:-warn}
while read -r name cmd; do
  [ -z "$name" ] && continue
  say "running $name: $cmd"
  timeout "${FREEHINT_RDMA_RUN_TIMEOUT_S:-300}" sh -c "$cmd" > "/tmp/$name.out" 2> "/tmp/$name.err"
  rc=$?
  sed "s/^/freehint-rdma-log $name: /" "/tmp/$name.err" | tail -"${FREEHINT_RDMA_LOG_LINES:-40}"
  # What the kernel said meanwhile (a process killed by a signal, say).
  dmesg -c | grep -v "rdma_rxe\|rxe0" | tail -20 | sed "s/^/freehint-rdma-log $name: dmesg: /"
  echo "freehint-rdma-result $name $rc $(tail -1 "/tmp/$name.out")"
done < /rdma/commands
say "done"
poweroff -f
