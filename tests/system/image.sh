#!/usr/bin/env bash
# Builds (once) and caches the system test's guest: a lean Debian 12 (bookworm) with systemd as PID 1, the
# reference SELinux policy and the audit daemon, booted with the Debian cloud kernel the VM harness uses
# (tests/vm/kernel.sh).
#
#   tests/system/image.sh            prints the directory of the ready image (building it when needed)
#   tests/system/image.sh --check    exit 0 when the image is ready or can be built here, 77 (reason on stderr)
#                                    when it can be neither; builds nothing
#
# The cache lives outside the clone, in $CC_SYSTEST_CACHE (default /var/cache/cc-proxy-systest), one directory
# per key: the sha256 of this script, the initramfs /init, the package list and the kernel package's name and
# version. A ready directory holds:
#
#   rootfs.img       ext4 root filesystem (raw, sparse), SELinux labels set; boot it with QEMU's -snapshot so it
#                    stays pristine
#   vmlinuz          the cloud kernel
#   initramfs.gz     busybox /init that loads virtio_pci + virtio_blk (and vsock_loopback), mounts /dev/vda and
#                    runs systemd on it
#   kernel-release   its `uname -r`
#   ready            written last; its presence means the rest is complete
#
# Removing the cache directory is always safe: the next run rebuilds it (about 3-5 minutes, mostly
# debootstrap downloading from the Debian archive). Older keys are removed after a successful build.
#
# Inside the image, cc-systest.service (enabled) reads a tar archive from the raw disk /dev/vdb into
# /var/tmp/systest and runs tests/system/guest.sh from it, its output on the second serial port (ttyS1); the test
# itself therefore never needs an image rebuild.
#
# Needs root (debootstrap, chroot), debootstrap, mke2fs (e2fsprogs), setfiles (policycoreutils), busybox-static,
# cpio, kmod. Exit codes: 0 ready (directory on stdout), 77 cannot be built here (reason on stderr), 1 error.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CACHE=${CC_SYSTEST_CACHE:-/var/cache/cc-proxy-systest}
MIRROR=${CC_SYSTEST_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
# What the test needs and nothing else: systemd as init; make for `make install`; procps for `ps -eZ`; the
# reference policy, its tools (semodule, restorecon, setenforce) and semanage (port labels; it brings python3);
# auditd so that denials land in /var/log/audit/audit.log and ausearch can read them; netbase for
# /etc/protocols, without which semanage cannot label a port.
PACKAGES=systemd,systemd-sysv,make,procps,netbase,selinux-policy-default,policycoreutils,policycoreutils-python-utils,selinux-utils,auditd
# Root filesystem size (sparse: only what is written takes space).
IMAGE_SIZE=2G
# Modules the initramfs loads: the root disk's (ext4 is built into the cloud kernel), and vsock with its
# loopback transport, so that a VM's agent can be reached at vsock://1:PORT inside the guest.
MODULES="virtio virtio_ring virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk vsock_loopback"

# shellcheck source=tests/vm/kernel.sh
. "$ROOT/tests/vm/kernel.sh"

log() { echo "systest-image: $*" >&2; }
skip() {
    log "SKIP: $*"
    exit 77
}
die() {
    log "ERROR: $*"
    exit 1
}

check_only=
[ "${1:-}" = --check ] && check_only=1
command -v apt-cache >/dev/null || skip "the guest's kernel comes from Debian's archive: apt is needed"

kernel_pkg=$(cc_vm_kernel_pkg)
[ -n "$kernel_pkg" ] || die "no Debian package matches $KERNEL_PKG_RE"
# (awk reads all its input: an early exit would SIGPIPE apt-cache and trip pipefail)
kernel_version=$(apt-cache policy "$kernel_pkg" | awk '/Candidate:/ && !found {print $2; found=1}')
key=$( {
    cat "${BASH_SOURCE[0]}" "$ROOT/tests/system/initramfs-init.sh"
    echo "$PACKAGES $SUITE $kernel_pkg $kernel_version"
} | sha256sum | cut -c1-16)
dir=$CACHE/$key
if [ -f "$dir/ready" ]; then
    [ -n "$check_only" ] || echo "$dir"
    exit 0
fi

[ "$(id -u)" = 0 ] || skip "building the guest image needs root (debootstrap, chroot)"
for tool in debootstrap mke2fs setfiles modinfo cpio; do
    command -v "$tool" >/dev/null || skip "$tool is not installed (see the package list in .ci/run)"
done
[ -x /bin/busybox ] && ! readelf -lW /bin/busybox 2>/dev/null | grep -q 'program interpreter' ||
    skip "a static /bin/busybox is needed (apt-get install busybox-static)"
[ -z "$check_only" ] || exit 0

mkdir -p "$CACHE"
# One build at a time; a second caller waits for the first and then finds the image ready.
exec 9>"$CACHE/.lock"
flock 9
if [ -f "$dir/ready" ]; then
    echo "$dir"
    exit 0
fi
start=$SECONDS
tmp=$CACHE/$key.tmp
rm -rf "$tmp"
mkdir -p "$tmp"
log "building guest image $key in $CACHE (debootstrap $SUITE, a few minutes)"

# 1. The root filesystem.
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$tmp/root" "$MIRROR" >"$tmp/debootstrap.log" 2>&1 ||
    { tail -n 30 "$tmp/debootstrap.log" >&2; die "debootstrap failed (log: $tmp/debootstrap.log)"; }
r=$tmp/root
echo ccsys >"$r/etc/hostname"
echo "# the root file system is mounted by the initramfs" >"$r/etc/fstab"
cat >"$r/etc/selinux/config" <<'EOF'
# Used only when the kernel is booted with security=selinux (the test's SELinux phase); the test switches to
# enforcing with setenforce once its module is in.
SELINUX=permissive
SELINUXTYPE=default
EOF
# Nothing the test does not need runs: no gettys, no timers.
for unit in getty.target serial-getty@ttyS0.service apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer \
    e2scrub_all.timer e2scrub_reap.service fstrim.timer systemd-timesyncd.service; do
    ln -sf /dev/null "$r/etc/systemd/system/$unit"
done
cat >"$r/usr/local/sbin/cc-systest-boot" <<'EOF'
#!/bin/sh
# Runs the system test delivered as a tar archive on /dev/vdb (see tests/system/image.sh in cc-proxy).
exec >/dev/ttyS1 2>&1
echo "systest-boot: $(uname -r), $(systemctl --version | head -n 1)"
rm -rf /var/tmp/systest
mkdir -p /var/tmp/systest
if ! tar -xf /dev/vdb -C /var/tmp/systest; then
    echo "SYSTEST-RESULT fail: cannot read the payload from /dev/vdb"
    systemctl poweroff --no-block
    exit 1
fi
exec /var/tmp/systest/tests/system/guest.sh
EOF
chmod 0755 "$r/usr/local/sbin/cc-systest-boot"
cat >"$r/etc/systemd/system/cc-systest.service" <<'EOF'
[Unit]
Description=cc-proxy system test (payload on /dev/vdb)
After=local-fs.target systemd-journald.service auditd.service
ConditionPathExists=/dev/vdb

[Service]
Type=exec
# Under SELinux, the test runs as an administrator's shell does (ignored when SELinux is off).
SELinuxContext=-unconfined_u:unconfined_r:unconfined_t:s0
ExecStart=/usr/local/sbin/cc-systest-boot
TimeoutStartSec=infinity

[Install]
WantedBy=multi-user.target
EOF
ln -sf /etc/systemd/system/cc-systest.service "$r/etc/systemd/system/multi-user.target.wants/cc-systest.service"
rm -rf "$r"/var/cache/apt/archives/*.deb "$r"/var/lib/apt/lists/*

# 2. SELinux labels, from the guest's own file contexts (set as xattrs here; mke2fs -d copies them).
fc=$r/etc/selinux/default/contexts/files/file_contexts
[ -f "$fc" ] || die "the guest has no $fc"
setfiles -r "$r" -F "$fc" "$r" >"$tmp/setfiles.log" 2>&1 ||
    { tail -n 20 "$tmp/setfiles.log" >&2; die "setfiles failed"; }

# 3. The disk image.
truncate -s "$IMAGE_SIZE" "$tmp/rootfs.img"
mke2fs -q -t ext4 -L ccsys -d "$r" "$tmp/rootfs.img" || die "mke2fs -d failed"

# 4. Kernel and initramfs.
log "fetching kernel $kernel_pkg"
cc_vm_fetch_kernel "$kernel_pkg" "$tmp/kernel" || die "cannot fetch $kernel_pkg"
release=$(basename "$(ls -d "$tmp"/kernel/root/lib/modules/*/ | head -n 1)")
cp "$tmp/kernel/root/boot/vmlinuz-$release" "$tmp/vmlinuz"
echo "$release" >"$tmp/kernel-release"
ird=$tmp/initramfs
mkdir -p "$ird"/{bin,dev,proc,sys,newroot,lib/modules}
install -m 0755 "$ROOT/tests/system/initramfs-init.sh" "$ird/init"
install -m 0755 /bin/busybox "$ird/bin/busybox"
seen=" "
add_module() {
    local mod=$1 ko dep
    case "$seen" in *" $mod "*) return ;; esac
    seen="$seen$mod "
    ko=$(find "$tmp/kernel/root/lib/modules/$release" -name "$mod.ko" | head -n 1)
    [ -n "$ko" ] || die "$kernel_pkg has no module $mod.ko"
    for dep in $(modinfo -F depends "$ko" | tr ',' ' '); do add_module "$dep"; done
    cp "$ko" "$ird/lib/modules/"
    echo "$mod" >>"$ird/lib/modules/load.order"
}
for m in $MODULES; do add_module "$m"; done
mknod -m 0600 "$ird/dev/console" c 5 1
(cd "$ird" && find . -print0 | sort -z | cpio --null -o -H newc --owner 0:0 --quiet) | gzip -1 >"$tmp/initramfs.gz"

rm -rf "$r" "$ird" "$tmp/kernel"
date -u +%FT%TZ >"$tmp/ready"
rm -rf "$dir"
mv "$tmp" "$dir"
# Older images are no longer wanted.
for old in "$CACHE"/*/; do
    [ "${old%/}" = "$dir" ] || rm -rf "${old%/}"
done
log "guest image ready in $((SECONDS - start))s: $dir ($(du -sh "$dir/rootfs.img" | cut -f1) on disk)"
echo "$dir"
