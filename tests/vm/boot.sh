#!/usr/bin/env bash
# Boots one test guest under QEMU (TCG) and keeps it running until this script is told to stop.
#
#   tests/vm/boot.sh --workdir DIR [--transport vsock|serial|none] [--dialect hyperstart|cc-agent]
#                    [--cid N] [--mem MiB] [--timeout SECS] [--watch-pid PID] [--artifacts FILE]
#
# vsock: starts vhost-device-vsock (vhost-user backend of QEMU's vhost-user-vsock-pci) whose hybrid-vsock socket
#        DIR/vm.sock reaches the guest agent: control hvsock://DIR/vm.sock:2718, I/O hvsock://DIR/vm.sock:2719.
# serial: two virtio-serial ports sh.hyper.channel.0/1 backed by the listening sockets DIR/ch0.sock and
#        DIR/ch1.sock: control unix://DIR/ch0.sock, I/O unix://DIR/ch1.sock.
# none:  no agent, the guest idles (plumbing checks); vhost-device-vsock runs as for vsock.
#
# Files in DIR: console.log (guest serial console), qemu.log, vhost-device-vsock.log, qemu.pid, vhost.pid,
# boot.pid (this script), ready (written once the guest's /init reached the agent: KEY=value lines control=,
# io=, qemu_pid=, vhost_pid=, kernel=), exited (written when QEMU ended on its own, with its status).
#
# Stopping: SIGTERM/SIGINT to this script, the death of --watch-pid, or QEMU exiting (guest poweroff, panic, a
# test killing it) all end with every process it started killed and waited for. Exit status: 0 when stopped
# by a signal or the watched process, 3 when QEMU exited by itself, 2 on a boot failure (with the reason and
# the console tail on stderr).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
workdir=
transport=vsock
dialect=hyperstart
cid=3
mem=512
timeout=90
watch_pid=
artifacts=${CC_VM_DIR:-$ROOT/target/vm}/artifacts.env
extra_append=

usage() {
    sed -n '2,9p' "${BASH_SOURCE[0]}" >&2
    exit 2
}
while [ $# -gt 0 ]; do
    case "$1" in
        --workdir) workdir=$2; shift 2 ;;
        --transport) transport=$2; shift 2 ;;
        --dialect) dialect=$2; shift 2 ;;
        --cid) cid=$2; shift 2 ;;
        --mem) mem=$2; shift 2 ;;
        --timeout) timeout=$2; shift 2 ;;
        --watch-pid) watch_pid=$2; shift 2 ;;
        --artifacts) artifacts=$2; shift 2 ;;
        --append) extra_append=$2; shift 2 ;;
        -h | --help) usage ;;
        *) echo "boot.sh: unknown argument $1" >&2; usage ;;
    esac
done
[ -n "$workdir" ] || usage
case "$transport" in vsock | serial | none) ;; *) echo "boot.sh: bad --transport $transport" >&2; exit 2 ;; esac
[ -r "$artifacts" ] || { echo "boot.sh: $artifacts missing: run tests/vm/prepare.sh" >&2; exit 2; }
# shellcheck disable=SC1090
. "$artifacts"

mkdir -p "$workdir"
workdir=$(cd "$workdir" && pwd)
# Unix socket paths are limited to 108 bytes; hvsock URIs add ":PORT" on top but are not socket paths.
if [ ${#workdir} -gt 90 ]; then
    echo "boot.sh: workdir path too long for unix sockets: $workdir" >&2
    exit 2
fi
rm -f "$workdir"/{console.log,qemu.log,vhost-device-vsock.log,qemu.pid,vhost.pid,ready,exited} \
    "$workdir"/{vm.sock,vhost-user.sock,ch0.sock,ch1.sock}
echo $$ >"$workdir/boot.pid"

qemu_pid=
vhost_pid=
log() { echo "boot.sh[$(basename "$workdir")]: $*" >&2; }

# Ends one child: SIGTERM, up to ~3 s of grace, then SIGKILL; always reaped.
stop_pid() {
    local pid=$1 i
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null; return 0; }
    for i in $(seq 30); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    return 0
}
cleanup() {
    trap - EXIT INT TERM
    stop_pid "$qemu_pid"
    stop_pid "$vhost_pid"
    rm -f "$workdir"/{vm.sock,vhost-user.sock,ch0.sock,ch1.sock} "$workdir"/vm.sock_*
}
trap cleanup EXIT
trap 'exit 0' INT TERM

fail() {
    log "boot failed: $*"
    if [ -s "$workdir/qemu.log" ]; then
        log "qemu.log:"
        tail -n 20 "$workdir/qemu.log" >&2
    fi
    if [ -s "$workdir/console.log" ]; then
        log "console tail:"
        tail -n 30 "$workdir/console.log" >&2
    fi
    exit 2
}
alive() { kill -0 "$1" 2>/dev/null; }
watched_alive() { [ -z "$watch_pid" ] || alive "$watch_pid"; }

qemu_args=(
    -M "q35,memory-backend=mem,accel=${CC_VM_ACCEL:-tcg}"
    -object "memory-backend-memfd,id=mem,size=${mem}M,share=on"
    -m "${mem}M" -smp 1
    -no-reboot -display none -nodefaults -no-user-config
    -serial "file:$workdir/console.log"
    -kernel "$CC_VM_KERNEL" -initrd "$CC_VM_INITRD"
    -append "console=ttyS0 panic=-1 no_timer_check ccagent.transport=$transport ccagent.dialect=$dialect $extra_append"
)

case "$transport" in
    vsock | none)
        "$CC_VM_VHOST_VSOCK" --vm "guest-cid=$cid,socket=$workdir/vhost-user.sock,uds-path=$workdir/vm.sock" \
            >"$workdir/vhost-device-vsock.log" 2>&1 &
        vhost_pid=$!
        echo "$vhost_pid" >"$workdir/vhost.pid"
        for _ in $(seq 100); do
            [ -S "$workdir/vhost-user.sock" ] && break
            alive "$vhost_pid" || fail "vhost-device-vsock exited: $(cat "$workdir/vhost-device-vsock.log")"
            sleep 0.1
        done
        [ -S "$workdir/vhost-user.sock" ] || fail "vhost-device-vsock did not create its socket"
        qemu_args+=(-chardev "socket,id=vs,path=$workdir/vhost-user.sock" -device vhost-user-vsock-pci,chardev=vs)
        control="hvsock://$workdir/vm.sock:2718"
        io="hvsock://$workdir/vm.sock:2719"
        sockets=("$workdir/vm.sock")
        ;;
    serial)
        qemu_args+=(
            -device virtio-serial-pci,id=vser
            -chardev "socket,id=c0,path=$workdir/ch0.sock,server=on,wait=off"
            -device virtserialport,bus=vser.0,chardev=c0,name=sh.hyper.channel.0
            -chardev "socket,id=c1,path=$workdir/ch1.sock,server=on,wait=off"
            -device virtserialport,bus=vser.0,chardev=c1,name=sh.hyper.channel.1
        )
        control="unix://$workdir/ch0.sock"
        io="unix://$workdir/ch1.sock"
        sockets=("$workdir/ch0.sock" "$workdir/ch1.sock")
        ;;
esac

"$CC_VM_QEMU" "${qemu_args[@]}" >"$workdir/qemu.log" 2>&1 </dev/null &
qemu_pid=$!
echo "$qemu_pid" >"$workdir/qemu.pid"
log "qemu pid $qemu_pid, transport $transport, dialect $dialect"

# Wait for the host-side sockets and for /init to reach the agent; fail fast if anything dies.
start=$SECONDS
while :; do
    alive "$qemu_pid" || fail "qemu exited early"
    [ -z "$vhost_pid" ] || alive "$vhost_pid" || fail "vhost-device-vsock exited"
    watched_alive || exit 0
    ready=1
    for s in "${sockets[@]}"; do [ -S "$s" ] || ready=; done
    grep -q '^ccinit: ready' "$workdir/console.log" 2>/dev/null || ready=
    [ -n "$ready" ] && break
    if grep -q 'Kernel panic' "$workdir/console.log" 2>/dev/null; then
        fail "guest kernel panic"
    fi
    [ $((SECONDS - start)) -lt "$timeout" ] || fail "guest not ready after ${timeout}s"
    sleep 0.1
done

cat >"$workdir/ready.tmp" <<EOF
control=$control
io=$io
qemu_pid=$qemu_pid
vhost_pid=$vhost_pid
kernel=$CC_VM_KERNEL_RELEASE
boot_secs=$((SECONDS - start))
EOF
mv "$workdir/ready.tmp" "$workdir/ready"
log "guest ready after $((SECONDS - start))s: control $control io $io"

# Stay alive with the VM; QEMU exiting ends everything (like a VMM that owns its hybrid-vsock socket).
while alive "$qemu_pid"; do
    watched_alive || exit 0
    sleep 0.2
done
wait "$qemu_pid"
status=$?
qemu_pid=
echo "$status" >"$workdir/exited"
log "qemu exited with status $status"
exit 3
