#!/bin/busybox sh
# PID 1 of the guest initramfs: load the kernel modules, find the root disk by its virtio serial,
# open it through dm-verity with the table line from the kernel command line (ep.verity=, built
# by vm-images/build with snapshotter.verity: spaces as commas, @ for the disk), mount the EROFS
# root read-only and switch to it, where the guest agent runs (/etc/ep-agent.env: its command
# and PYTHONPATH, from passthrough/guest/payload.py).
# Any failure exits PID 1: the kernel panics, `panic=-1` reboots and QEMU's -no-reboot stops.
/bin/busybox --install -s /bin
export PATH=/bin:/sbin

fail() {
	echo "ep-init: FAILED: $*" >/dev/console
	exit 1
}

mount -t devtmpfs devtmpfs /dev || fail "mount devtmpfs"
mount -t proc proc /proc
mount -t sysfs sysfs /sys

while read -r mod; do
	insmod "/lib/modules/$mod.ko" || fail "insmod $mod"
done </etc/modules.order

ROOT_SERIAL=
VERITY=
. /etc/ep-agent.env
INIT=$EP_AGENT
for arg in $(cat /proc/cmdline); do
	case "$arg" in
	ep.root=*) ROOT_SERIAL="${arg#ep.root=}" ;;
	ep.verity=*) VERITY="${arg#ep.verity=}" ;;
	ep.init=*) INIT="${arg#ep.init=}" ;;
	esac
done
[ -n "$ROOT_SERIAL" ] || fail "no ep.root=SERIAL on the kernel command line"
[ -n "$VERITY" ] || fail "no ep.verity=TABLE on the kernel command line"

dev=
tries=0
while [ -z "$dev" ]; do
	for s in /sys/block/vd*/serial; do
		[ -e "$s" ] && [ "$(cat "$s")" = "$ROOT_SERIAL" ] && dev="${s%/serial}" && dev="${dev##*/}"
	done
	if [ -z "$dev" ]; then
		tries=$((tries + 1))
		[ $tries -gt 1000 ] && fail "no disk with serial $ROOT_SERIAL"
		usleep 5000
	fi
done

table=$(echo "$VERITY" | tr ',' ' ' | sed "s|@|/dev/$dev|g")
DM_DISABLE_UDEV=1 dmsetup create root --readonly --table "$table" || fail "dm-verity on /dev/$dev"
mkdir -p /newroot
mount -t erofs -o ro /dev/mapper/root /newroot || fail "mount the EROFS root (wrong root hash?)"
mount -t tmpfs -o mode=0755,size=64m tmpfs /newroot/run || fail "tmpfs /run"
mount -t tmpfs -o mode=1777,size=64m tmpfs /newroot/tmp || fail "tmpfs /tmp"
mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
export PYTHONPATH="$EP_PYTHONPATH"
exec switch_root /newroot $INIT
