#!/usr/bin/env bash
# Prepares everything the real-VM tests need and caches it under target/vm/ (or $CC_VM_DIR):
#
#   target/vm/kernel/vmlinuz          Debian 12 cloud kernel 6.1 (apt-get download + dpkg-deb -x, not installed)
#   target/vm/kernel/release          its `uname -r`
#   target/vm/kernel/modules/*.ko     the virtio, virtio-serial and vsock modules /init loads
#   target/vm/busybox                 static busybox, the guest's whole userland
#   target/vm/vsock-echo              static guest vsock echo server (tests/vm/vsock-echo.c), plumbing checks
#   target/vm/tools/bin/vhost-device-vsock   the vhost-user vsock backend (cargo install, version 0.3.0)
#   target/vm/agent/cc-test-agent     static build of tests/agent
#   target/vm/initramfs.cpio.gz       /init (tests/vm/init.sh) + busybox + modules + agent
#   target/vm/artifacts.env           KEY=value lines naming all of the above (read by boot.sh and the tests)
#
# Idempotent: every step is skipped when its output is present (the agent is always rebuilt, which cargo makes a
# no-op when nothing changed, and the initramfs is rebuilt only when one of its inputs changed).
#
# Exit codes: 0 ready; 77 QEMU (with vhost-user-vsock support) cannot be had on this machine: callers skip;
# anything else is an error. Set CC_VM_NO_AGENT=1 to build an initramfs without the agent (plumbing checks).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VM_DIR=${CC_VM_DIR:-$ROOT/target/vm}
VHOST_VSOCK_VERSION=0.3.0
# The modules /init loads (the kernel builds them as modules, not built in). The load order comes from each
# module's own `depends` field (modinfo), written to kernel/modules/load.order.
MODULES="virtio virtio_ring virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_console vsock
 vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport"
# KERNEL_PKG_RE, cc_vm_kernel_pkg, cc_vm_fetch_kernel (shared with the system test, tests/system/).
# shellcheck source=tests/vm/kernel.sh
. "$ROOT/tests/vm/kernel.sh"

# True when an ELF file needs no dynamic loader (ldd is no help: it exits 0 on static-pie binaries too).
is_static() { [ -f "$1" ] && ! readelf -lW "$1" 2>/dev/null | grep -q 'program interpreter'; }
log() { echo "vm-prepare: $*" >&2; }
skip() {
    log "SKIP: $*"
    exit 77
}
die() {
    log "ERROR: $*"
    exit 1
}

mkdir -p "$VM_DIR"
cd "$VM_DIR"

apt_updated=
apt_install() {
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        return 1
    fi
    log "installing $*"
    if [ -z "$apt_updated" ]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || return 1
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
}

# 1. Host packages.
need_pkgs=()
command -v qemu-system-x86_64 >/dev/null || need_pkgs+=(qemu-system-x86)
is_static /bin/busybox || need_pkgs+=(busybox-static)
command -v cpio >/dev/null || need_pkgs+=(cpio)
command -v modinfo >/dev/null || need_pkgs+=(kmod)
command -v readelf >/dev/null || need_pkgs+=(binutils)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    apt_install "${need_pkgs[@]}" || log "could not install ${need_pkgs[*]}"
fi
command -v qemu-system-x86_64 >/dev/null ||
    skip "qemu-system-x86_64 is not installed and cannot be (as root: apt-get install qemu-system-x86)"
qemu-system-x86_64 -device help 2>/dev/null | grep -q '"vhost-user-vsock-pci"' ||
    skip "this QEMU has no vhost-user-vsock-pci device"
is_static /bin/busybox ||
    die "a static /bin/busybox is needed (apt-get install busybox-static)"
command -v cpio >/dev/null || die "cpio is needed (apt-get install cpio)"

# 2. Guest kernel and its modules.
# Prints the modules in an order where each one follows everything it depends on.
load_order() {
    local seen=" " m
    visit() {
        local mod=$1 dep
        case "$seen" in *" $mod "*) return ;; esac
        seen="$seen$mod "
        for dep in $(modinfo -F depends "kernel.tmp/modules/$mod.ko" | tr ',' ' '); do
            [ -f "kernel.tmp/modules/$dep.ko" ] || die "module $mod needs $dep, which is not in the list"
            visit "$dep"
        done
        echo "$mod"
    }
    for m in $MODULES; do visit "$m"; done
}

if [ ! -s kernel/vmlinuz ] || [ ! -s kernel/release ] || [ ! -s kernel/modules/load.order ]; then
    pkg=$(cc_vm_kernel_pkg)
    [ -n "$pkg" ] || die "no Debian package matches $KERNEL_PKG_RE (is this Debian 12 with apt lists?)"
    log "fetching kernel $pkg"
    rm -rf dl kernel.tmp
    mkdir -p kernel.tmp/modules
    cc_vm_fetch_kernel "$pkg" dl || die "apt-get download $pkg failed"
    release=$(basename "$(ls -d dl/root/lib/modules/*/ | head -n 1)")
    cp dl/root/boot/vmlinuz-"$release" kernel.tmp/vmlinuz
    for m in $MODULES; do
        ko=$(find dl/root/lib/modules/"$release" -name "$m.ko" | head -n 1)
        [ -n "$ko" ] || die "$pkg has no module $m.ko"
        cp "$ko" kernel.tmp/modules/
    done
    load_order >kernel.tmp/modules/load.order
    echo "$release" >kernel.tmp/release
    rm -rf kernel dl
    mv kernel.tmp kernel
fi
release=$(cat kernel/release)

# 3. Static busybox.
if ! cmp -s /bin/busybox busybox; then
    cp /bin/busybox busybox.tmp && mv busybox.tmp busybox
fi

# 3b. The guest-side vsock echo server for plumbing checks (static, as the guest has no libc).
if [ ! -x vsock-echo ] || [ "$ROOT/tests/vm/vsock-echo.c" -nt vsock-echo ]; then
    command -v gcc >/dev/null || die "gcc is needed to build tests/vm/vsock-echo.c"
    gcc -static -O2 -Wall -Wextra -o vsock-echo.tmp "$ROOT/tests/vm/vsock-echo.c" ||
        die "cannot build tests/vm/vsock-echo.c statically (is libc6-dev installed?)"
    mv vsock-echo.tmp vsock-echo
fi

# 4. vhost-device-vsock.
if [ ! -x tools/bin/vhost-device-vsock ]; then
    log "building vhost-device-vsock $VHOST_VSOCK_VERSION (about a minute)"
    cargo install --quiet --locked vhost-device-vsock --version "$VHOST_VSOCK_VERSION" \
        --root "$VM_DIR/tools" --target-dir "$VM_DIR/tools-build" >&2 ||
        die "cargo install vhost-device-vsock failed"
    rm -rf "$VM_DIR/tools-build"
fi

# 5. The agent, statically linked so it runs in a busybox-only guest.
mkdir -p agent
if [ "${CC_VM_NO_AGENT:-0}" = 1 ]; then
    rm -f agent/cc-test-agent
else
    log "building cc-test-agent (static)"
    (cd "$ROOT" && RUSTFLAGS='-C target-feature=+crt-static' cargo build --quiet -p cc-test-agent --release \
        --target x86_64-unknown-linux-gnu >&2) || die "static build of cc-test-agent failed"
    built="$ROOT/target/x86_64-unknown-linux-gnu/release/cc-test-agent"
    if ! is_static "$built"; then
        die "$built is dynamically linked; the guest has no libc"
    fi
    cmp -s "$built" agent/cc-test-agent || cp "$built" agent/cc-test-agent
fi

# 6. The initramfs, rebuilt when an input changed.
inputs=("$ROOT/tests/vm/init.sh" busybox vsock-echo kernel/modules/*)
[ -x agent/cc-test-agent ] && inputs+=(agent/cc-test-agent)
stamp=$(sha256sum "${inputs[@]}" | sha256sum | cut -d' ' -f1)
if [ ! -s initramfs.cpio.gz ] || [ "$(cat initramfs.stamp 2>/dev/null)" != "$stamp" ]; then
    log "building initramfs"
    rm -rf initramfs.tmp
    mkdir -p initramfs.tmp/{bin,sbin,dev,proc,sys,tmp,run,lib/modules}
    install -m 0755 "$ROOT/tests/vm/init.sh" initramfs.tmp/init
    install -m 0755 busybox initramfs.tmp/bin/busybox
    install -m 0755 vsock-echo initramfs.tmp/bin/vsock-echo
    cp kernel/modules/* initramfs.tmp/lib/modules/
    [ -x agent/cc-test-agent ] && install -m 0755 agent/cc-test-agent initramfs.tmp/bin/cc-test-agent
    # A console node lets the kernel give /init its stdio; /init copes without it (unprivileged builds).
    mknod -m 0600 initramfs.tmp/dev/console c 5 1 2>/dev/null || true
    (cd initramfs.tmp && find . -print0 | sort -z | cpio --null -o -H newc --owner 0:0 --quiet) |
        gzip -1 >initramfs.cpio.gz.tmp
    mv initramfs.cpio.gz.tmp initramfs.cpio.gz
    echo "$stamp" >initramfs.stamp
    rm -rf initramfs.tmp
fi

cat >artifacts.env.tmp <<EOF
CC_VM_KERNEL=$VM_DIR/kernel/vmlinuz
CC_VM_KERNEL_RELEASE=$release
CC_VM_INITRD=$VM_DIR/initramfs.cpio.gz
CC_VM_VHOST_VSOCK=$VM_DIR/tools/bin/vhost-device-vsock
CC_VM_QEMU=$(command -v qemu-system-x86_64)
CC_VM_HAS_AGENT=$([ -x agent/cc-test-agent ] && echo 1 || echo 0)
EOF
mv artifacts.env.tmp artifacts.env
log "ready: $VM_DIR/artifacts.env (guest kernel $release)"
