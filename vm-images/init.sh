#!/bin/busybox sh
# PID 1 of the guest initramfs: load the kernel modules, find the root disk by its virtio serial,
# open it through dm-verity with the root hash from the kernel command line, mount the EROFS
# root read-only and switch to it, where the guest agent runs.
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
INIT=/usr/lib/erofs-passthrough/agent.py
for arg in $(cat /proc/cmdline); do
	case "$arg" in
	ep.root=*) ROOT_SERIAL="${arg#ep.root=}" ;;
	ep.verity=*) VERITY="${arg#ep.verity=}" ;;
	ep.init=*) INIT="${arg#ep.init=}" ;;
	esac
done
[ -n "$ROOT_SERIAL" ] || fail "no ep.root=SERIAL on the kernel command line"
[ -n "$VERITY" ] || fail "no ep.verity=BLOCKS,HASH_START,ROOT,SALT on the kernel command line"

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

set -- $(echo "$VERITY" | tr ',' ' ')
[ $# -eq 4 ] || fail "ep.verity wants BLOCKS,HASH_START,ROOT,SALT"
blocks=$1 hash_start=$2 root_hash=$3 salt=$4
DM_DISABLE_UDEV=1 dmsetup create root --readonly --table \
	"0 $((blocks * 8)) verity 1 /dev/$dev /dev/$dev 4096 4096 $blocks $hash_start sha256 $root_hash $salt" \
	|| fail "dm-verity on /dev/$dev"
mkdir -p /newroot
mount -t erofs -o ro /dev/mapper/root /newroot || fail "mount the EROFS root (wrong root hash?)"
mount -t tmpfs -o mode=0755,size=64m tmpfs /newroot/run || fail "tmpfs /run"
mount -t tmpfs -o mode=1777,size=64m tmpfs /newroot/tmp || fail "tmpfs /tmp"
mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
exec switch_root /newroot $INIT
