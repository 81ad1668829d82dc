#!/usr/bin/env bash
# `make system-test`: cc-proxy installed and run the way an operator does, in a booted Debian 12 guest with
# systemd as PID 1, twice: SELinux off, then SELinux enforcing with the policy module installed.
#
#   tests/system/run.sh [plain|selinux]...     (default: both phases)
#
# 1. The guest image is built once and cached outside the clone (tests/system/image.sh), in the background
#    while step 2 runs.
# 2. On the host: the release build of cc-proxy and cc-test-agent, the stripped binary and its split debug info
#    (make), and the SELinux module built with the Makefile's fallback (checkmodule + semodule_package, no
#    refpolicy headers), after checking that the fallback's sources match the module's sources.
# 3. This repository's files plus those artifacts go to the guest as a tar archive on a raw disk; the guest runs
#    tests/system/guest.sh (make install, systemctl, cc-proxy, journalctl, semodule, ...) and powers off.
#
# QEMU uses KVM when /dev/kvm works, TCG otherwise (CC_SYSTEST_ACCEL=kvm|tcg forces one). The guest's serial
# console and the test's own output are in target/systest/<phase>/ (console.log, test.log), with the guest's
# journal, audit log and make output (logs/).
#
# Exit status: 0 all passed, or skipped with the reason printed (QEMU cannot run here, or the guest image cannot
# be built: not root, no debootstrap); 1 a check failed or the guest did not finish.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
OUT=${CC_SYSTEST_OUT:-$ROOT/target/systest}
# Guest memory (semodule rebuilds the whole policy in it) and how long one phase may take, in seconds.
MEM_MIB=1536
TIMEOUT_KVM=300
TIMEOUT_TCG=1500
cd "$ROOT"

say() { echo "system-test: $*"; }
skip() {
    say "SKIPPED: $*"
    exit 0
}

phases=("$@")
[ ${#phases[@]} -gt 0 ] || phases=(plain selinux)
for p in "${phases[@]}"; do
    case "$p" in plain | selinux) ;; *) echo "usage: tests/system/run.sh [plain|selinux]..." >&2; exit 2 ;; esac
done

# QEMU.
command -v qemu-system-x86_64 >/dev/null ||
    skip "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"

# 1. The guest image: can it be had here? It is then built (or found in the cache) in the background, while
# the release build runs.
mkdir -p "$OUT"
"$ROOT/tests/system/image.sh" --check
rc=$?
if [ $rc = 77 ]; then
    skip "the guest image cannot be built here (reason above)"
elif [ $rc != 0 ]; then
    say "FAILED: tests/system/image.sh --check exited $rc"
    exit 1
fi
"$ROOT/tests/system/image.sh" >"$OUT/image.dir" &
image_pid=$!

# 2. What the guest installs, built here.
export PATH=$PATH:$HOME/.cargo/bin
say "building the release binaries"
cargo build --quiet --release -p cc-proxy -p cc-test-agent || { say "FAILED: cargo build --release"; exit 1; }
make --no-print-directory split-debug || { say "FAILED: make split-debug"; exit 1; }
# The stripped binary carries no symbols or debug sections; its debug info is in the .debug file it links to.
stripped=target/release/cc-proxy.stripped
# (readelf's output is kept first: it exits non-zero on the debug file, which has no program interpreter.)
stripped_sections=$(readelf -SW "$stripped" 2>/dev/null)
debug_sections=$(readelf -SW target/release/cc-proxy.debug 2>/dev/null)
if grep -qE '\.(symtab|debug_(info|line|abbrev|str|ranges|loc)) ' <<<"$stripped_sections"; then
    say "FAILED: $stripped still has symbols or debug sections"
    exit 1
fi
grep -q '\.gnu_debuglink ' <<<"$stripped_sections" || { say "FAILED: $stripped has no .gnu_debuglink"; exit 1; }
grep -q '\.debug_line ' <<<"$debug_sections" ||
    { say "FAILED: target/release/cc-proxy.debug has no .debug_line"; exit 1; }
say "SELinux module: the fallback build (checkmodule + semodule_package)"
make --no-print-directory selinux-fallback-check || { say "FAILED: make selinux-fallback-check"; exit 1; }
rm -f selinux/cc-proxy.pp
make --no-print-directory selinux SELINUX_DEVEL_MAKEFILE=/nonexistent || { say "FAILED: make selinux (fallback)"; exit 1; }

wait "$image_pid"
rc=$?
image=$(cat "$OUT/image.dir" 2>/dev/null)
if [ $rc != 0 ] || [ -z "$image" ]; then
    say "FAILED: tests/system/image.sh exited $rc"
    exit 1
fi
say "guest image: $image ($(cat "$image/kernel-release"))"

# The accelerator: KVM when the guest kernel really runs under it (nested setups may refuse some CPU models:
# QEMU then aborts on an MSR it cannot set), else TCG.
# kvm_boots CPU: the kernel, without a root file system, gets as far as its panic and QEMU exits (a second or
# two under a working KVM; a nested KVM that accepts the VM but never runs it shows nothing).
kvm_boots() {
    rm -f "$OUT/kvm-check.log"
    # (in a subshell that waits and exits, its stderr discarded: bash would report a QEMU abort on stderr)
    (timeout 15 qemu-system-x86_64 -accel kvm -cpu "$1" -M q35 -m 256M -display none -nodefaults -no-user-config \
        -no-reboot -kernel "$image/vmlinuz" -append "console=ttyS0 panic=-1" -serial "file:$OUT/kvm-check.log" \
        >/dev/null 2>&1; exit $?) 2>/dev/null && grep -aq 'Kernel panic' "$OUT/kvm-check.log"
}
accel=${CC_SYSTEST_ACCEL:-}
cpu=
if [ -z "$accel" ] || [ "$accel" = kvm ]; then
    if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
        for candidate in host host,-arch-capabilities; do
            if kvm_boots "$candidate"; then
                accel=kvm
                cpu=$candidate
                break
            fi
        done
    fi
    [ "$accel" = kvm ] && [ -z "$cpu" ] && { say "FAILED: KVM was asked for but does not work here"; exit 1; }
fi
if [ "$accel" = kvm ]; then
    timeout=$TIMEOUT_KVM
else
    accel=tcg
    cpu=max
    timeout=$TIMEOUT_TCG
fi
say "QEMU accelerator: $accel (-cpu $cpu)"

# 3. The payload: the files of this checkout (tracked or new, not ignored) and the artifacts.
mkdir -p "$OUT"
payload=$OUT/payload.tar
{
    git ls-files -z --cached --others --exclude-standard
    printf '%s\0' target/release/cc-proxy target/release/cc-proxy.stripped target/release/cc-proxy.debug \
        target/release/cc-test-agent selinux/cc-proxy.pp
} | sort -zu | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
    tar -cf "$payload" --null -T - || { say "FAILED: cannot pack the payload"; exit 1; }

# run_phase PHASE: boots the guest once; 0 when the guest reported a pass.
run_phase() {
    local phase=$1 dir=$OUT/$1 append qemu_pid start result
    rm -rf "$dir"
    mkdir -p "$dir/logs"
    append="console=ttyS0 panic=-1 systest.phase=$phase"
    if [ "$phase" = selinux ]; then
        append="$append security=selinux selinux=1 enforcing=0"
    else
        append="$append selinux=0"
    fi
    truncate -s 64M "$dir/logs.tar"
    say "[$phase] booting (timeout ${timeout}s)"
    start=$SECONDS
    qemu-system-x86_64 -accel "$accel" -cpu "$cpu" -M q35 -m "${MEM_MIB}M" -smp 2 \
        -no-reboot -display none -nodefaults -no-user-config \
        -kernel "$image/vmlinuz" -initrd "$image/initramfs.gz" -append "$append" \
        -drive "file=$image/rootfs.img,format=raw,if=virtio,snapshot=on" \
        -drive "file=$payload,format=raw,if=virtio,readonly=on" \
        -drive "file=$dir/logs.tar,format=raw,if=virtio" \
        -serial "file:$dir/console.log" -serial "file:$dir/test.log" \
        >"$dir/qemu.log" 2>&1 </dev/null &
    qemu_pid=$!
    while kill -0 "$qemu_pid" 2>/dev/null; do
        if [ $((SECONDS - start)) -ge "$timeout" ]; then
            say "[$phase] the guest did not finish within ${timeout}s; killing QEMU"
            kill "$qemu_pid"
            break
        fi
        sleep 1
    done
    wait "$qemu_pid"
    tar -xf "$dir/logs.tar" -C "$dir/logs" 2>/dev/null
    rm -f "$dir/logs.tar"
    # (the guest's tty ends lines with \r\n)
    tr -d '\r' <"$dir/test.log" >"$dir/test.txt" && mv "$dir/test.txt" "$dir/test.log"
    sed 's/^/    /' "$dir/test.log"
    result=$(grep -a '^SYSTEST-RESULT' "$dir/test.log" | tail -n 1)
    say "[$phase] ${result:-no result} after $((SECONDS - start))s"
    if [ "$result" != "SYSTEST-RESULT pass" ]; then
        say "[$phase] console tail ($dir/console.log):"
        tail -n 25 "$dir/console.log" | sed 's/^/    /'
        return 1
    fi
}

status=0
for p in "${phases[@]}"; do
    run_phase "$p" || status=1
done
if [ $status = 0 ]; then
    say "passed (${phases[*]})"
else
    say "FAILED (logs in $OUT)"
fi
exit $status
