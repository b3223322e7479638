#!/bin/sh
# /init of the floe test guest (tests/guest/build.py packs it; tests/test_guest.py boots it).
#
# The guest's only disk, /dev/vda, is a floe volume that QEMU attaches over iSCSI.
# The kernel command line picks what this boot does:
#   floe.mode=write  mkfs.ext4 the disk, write floe.files files of up to floe.kib KiB of
#                    random bytes (each with dd conv=fsync, so every file is a journal
#                    commit and a SYNCHRONIZE CACHE through QEMU), record their SHA-256 in
#                    /manifest on the same filesystem and on the console, sync, unmount.
#   floe.mode=check  e2fsck -fn the disk, mount it read-only, print every file's SHA-256,
#                    check them against /manifest.
# Every line meant for the test starts with "FLOE-GUEST "; the last one is
# "FLOE-GUEST RESULT ok" or "FLOE-GUEST RESULT fail <why>". Then the guest powers off
# (QEMU runs with -no-reboot, so a panic ends it too).

/bin/busybox mkdir -p /proc /sys /dev /mnt /tmp /usr/bin /usr/sbin
/bin/busybox --install -s /bin
# Debian's busybox-static runs its own applets before anything on PATH (its mke2fs
# makes ext2 only), so e2fsprogs' tools are called by their full path.
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

say() { echo "FLOE-GUEST $*"; }
finish() {
    say "RESULT $*"
    sync
    poweroff -f
    sleep 5
    exit 1
}

mode=
files=16
kib=256
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        floe.mode=*) mode=${arg#floe.mode=} ;;
        floe.files=*) files=${arg#floe.files=} ;;
        floe.kib=*) kib=${arg#floe.kib=} ;;
    esac
done
say "boot mode=$mode uptime=$(cut -d' ' -f1 /proc/uptime)"

# Drivers the kernel has as modules, in dependency order (build.py reads modules.dep).
if [ -f /modules/order ]; then
    for m in $(cat /modules/order); do
        insmod "/modules/$m.ko" || finish "fail insmod $m"
    done
fi
i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1))
    [ $i -gt 200 ] && finish "fail no /dev/vda after 20s"
    sleep 0.1
done
say "disk /dev/vda $(cat /sys/block/vda/size) sectors"

if [ "$mode" = write ]; then
    say "mkfs start"
    # nodiscard: nothing to discard on a fresh thin volume. Lazy inode table init with
    # noinit_itable below keeps the kernel from zeroing inode tables in the background.
    /sbin/mke2fs -t ext4 -q -F -E nodiscard,lazy_itable_init=1 -L floe /dev/vda >/tmp/mkfs.log 2>&1 \
        || { cat /tmp/mkfs.log; finish "fail mkfs"; }
    mount -t ext4 -o noinit_itable /dev/vda /mnt || finish "fail mount"
    mkdir /mnt/data || finish "fail mkdir"
    say "writing files count=$files kib_max=$kib"
    n=0
    while [ $n -lt "$files" ]; do
        # Sizes 4 KiB .. kib KiB, varied so files end at odd places within segments.
        blocks=$(( (n * 37) % (kib / 4) + 1 ))
        dd if=/dev/urandom of=/mnt/data/f$n bs=4k count=$blocks conv=fsync 2>/tmp/dd.log \
            || { cat /tmp/dd.log; finish "fail write f$n"; }
        set -- $(sha256sum /mnt/data/f$n)
        echo "$1  f$n" >>/mnt/manifest || finish "fail manifest f$n"
        say "wrote f$n $1 kib=$((blocks * 4))"
        n=$((n + 1))
    done
    sync
    say "synced"
    umount /mnt || finish "fail umount"
    finish ok
elif [ "$mode" = check ]; then
    /sbin/e2fsck -fn /dev/vda >/tmp/fsck.log 2>&1
    rc=$?
    cat /tmp/fsck.log
    say "e2fsck rc=$rc"
    mount -t ext4 -o ro /dev/vda /mnt || finish "fail mount e2fsck=$rc"
    for f in /mnt/data/*; do
        [ -f "$f" ] || continue
        set -- $(sha256sum "$f")
        say "file ${f##*/} $1"
    done
    (cd /mnt/data && sha256sum -c /mnt/manifest) >/tmp/check.log 2>&1
    crc=$?
    grep -v ': OK$' /tmp/check.log
    say "manifest rc=$crc entries=$(wc -l </mnt/manifest)"
    umount /mnt
    if [ $rc -eq 0 ] && [ $crc -eq 0 ]; then
        finish ok
    fi
    finish "fail e2fsck=$rc manifest=$crc"
fi
finish "fail unknown mode '$mode'"
