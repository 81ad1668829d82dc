# Sourced by tests/vm/prepare.sh and tests/system/image.sh: which Debian cloud kernel the guests boot.
#
# Only the 6.1 series is known to work with the VM harness's module list and vhost-device-vsock 0.3.0.
KERNEL_PKG_RE='^linux-image-6\.1\.0-[0-9]+-cloud-amd64$'

# Prints the newest package matching KERNEL_PKG_RE (or $CC_VM_KERNEL_PKG when set); runs `apt-get update`
# once when the apt lists know none and we are root. Prints nothing when there is none.
cc_vm_kernel_pkg() {
    local pkg=${CC_VM_KERNEL_PKG:-}
    if [ -z "$pkg" ]; then
        pkg=$(apt-cache search --names-only "$KERNEL_PKG_RE" | awk '{print $1}' | sort -V | tail -n 1)
        if [ -z "$pkg" ] && [ "$(id -u)" = 0 ]; then
            DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || true
            pkg=$(apt-cache search --names-only "$KERNEL_PKG_RE" | awk '{print $1}' | sort -V | tail -n 1)
        fi
    fi
    echo "$pkg"
}

# cc_vm_fetch_kernel PKG DIR: downloads PKG (not installed) and unpacks it into DIR/root; the .deb stays in DIR.
cc_vm_fetch_kernel() {
    local pkg=$1 dir=$2
    mkdir -p "$dir"
    # apt drops privileges to _apt for downloads; let it write into the download dir.
    chmod 0777 "$dir"
    (cd "$dir" && apt-get download -q "$pkg" >&2) || return 1
    dpkg-deb -x "$dir/$pkg"_*.deb "$dir/root"
}
