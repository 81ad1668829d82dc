#!/bin/busybox sh
# /init of the system-test guest's small initramfs (built by tests/system/image.sh).
#
# The Debian cloud kernel builds virtio_pci and virtio_blk as modules, so the root disk cannot be mounted
# without them: load them (load.order lists each module after the ones it needs; vsock_loopback is there too,
# for the test's vsock VM), mount /dev/vda (ext4, built into the kernel) and hand over to systemd on it. Any failure is printed on the console with "sysinit:" and
# powers the guest off, so the host sees QEMU exit instead of waiting for a timeout.
/bin/busybox mkdir -p /proc /sys /dev /newroot
/bin/busybox mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys

die() {
    echo "sysinit: $*"
    poweroff -f
}
for m in $(cat /lib/modules/load.order); do
    insmod "/lib/modules/$m.ko" || echo "sysinit: insmod $m failed"
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do
    sleep 0.1
    i=$((i + 1))
done
[ -b /dev/vda ] || die "no /dev/vda"
mount -t ext4 -o rw /dev/vda /newroot || die "cannot mount /dev/vda"
umount /proc /sys
mount --move /dev /newroot/dev || umount /dev
exec switch_root /newroot /sbin/init
