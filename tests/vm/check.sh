#!/usr/bin/env bash
# Self-check of the VM harness, needing no cc-proxy:
#   1. plumbing: a guest with no agent and the vsock-echo server on port 1234; through the hybrid-vsock socket
#      (CONNECT 1234) 256 KiB must come back intact, 16 KiB at a time;
#   2. the agent in the guest (when the initramfs has one), over hybrid vsock (hyperstart dialect) and over
#      virtio-serial (cc-agent dialect): READY on the control channel, then GETVERSION answered with ACK and
#      the dialect's API version.
# Exit 0 when all pass, 77 when QEMU cannot be had (from prepare.sh), 1 otherwise.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
"$ROOT/tests/vm/prepare.sh" || exit $?
# shellcheck disable=SC1091
. "${CC_VM_DIR:-$ROOT/target/vm}/artifacts.env"

work=
boot_pid=
stop_vm() {
    [ -z "$boot_pid" ] || { kill -TERM "$boot_pid" 2>/dev/null; wait "$boot_pid" 2>/dev/null; }
    [ -z "$work" ] || rm -rf "$work"
    boot_pid=
    work=
}
trap stop_vm EXIT

# boot_vm TRANSPORT [boot.sh args...]: boots a guest and waits for its ready file.
boot_vm() {
    # Under /tmp: unix socket paths must stay short whatever the checkout path.
    work=$(mktemp -d /tmp/ccvmchk.XXXXXX)
    "$ROOT/tests/vm/boot.sh" --workdir "$work" --transport "$@" --watch-pid $$ &
    boot_pid=$!
    for _ in $(seq 900); do
        [ -f "$work/ready" ] && return 0
        kill -0 "$boot_pid" 2>/dev/null || { echo "check: boot failed" >&2; exit 1; }
        sleep 0.1
    done
    echo "check: guest not ready" >&2
    exit 1
}

# probe MODE ARGS...: the socket-level checks, in Python for its socket module.
probe() {
    python3 - "$@" <<'EOF'
import os, socket, struct, sys, time

def hvsock_connect(path, port, deadline):
    """CONNECT through a hybrid-vsock socket, retrying while the guest is not listening yet."""
    while True:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(path)
        s.sendall(b"CONNECT %d\n" % port)
        line = b""
        try:
            while not line.endswith(b"\n"):
                b = s.recv(1)
                if not b:
                    break
                line += b
        except (socket.timeout, ConnectionResetError):
            pass
        if line.startswith(b"OK "):
            return s
        s.close()
        if time.time() > deadline:
            sys.exit("check: no OK from CONNECT %d: %r" % (port, line))
        time.sleep(0.2)

def read_exact(s, n):
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            sys.exit("check: connection closed after %d of %d bytes" % (len(data), n))
        data += chunk
    return data

def read_frame(s):
    code, length = struct.unpack(">II", read_exact(s, 8))
    return code, read_exact(s, length - 8)

mode, args = sys.argv[1], sys.argv[2:]
deadline = time.time() + 60
if mode == "echo":
    path, = args
    s = hvsock_connect(path, 1234, deadline)
    payload = os.urandom(256 * 1024)
    # One chunk at a time, read back before the next: bulk both ways at once can stall vhost-device-vsock.
    for off in range(0, len(payload), 16384):
        s.sendall(payload[off:off + 16384])
        if read_exact(s, 16384) != payload[off:off + 16384]:
            sys.exit("check: echo mismatch at offset %d" % off)
    print("check: vsock echo of %d bytes intact" % len(payload))
else:
    expected_version = {"hyperstart": 4244, "cc-agent": 4242}[args[-1]]
    if mode == "vsock":
        control = hvsock_connect(args[0], 2718, deadline)
        io = hvsock_connect(args[0], 2719, deadline)
    else:
        control = socket.socket(socket.AF_UNIX)
        control.settimeout(30)
        control.connect(args[0])
        io = socket.socket(socket.AF_UNIX)
        io.connect(args[1])
    control.settimeout(30)
    code, _ = read_frame(control)
    if code != 8:
        sys.exit("check: expected READY (8), got code %d" % code)
    control.sendall(struct.pack(">II", 0, 8))
    while True:
        code, payload = read_frame(control)
        if code != 14:  # NEXT credits (hyperstart) are not replies
            break
    if code != 9 or struct.unpack(">I", payload[:4])[0] != expected_version:
        sys.exit("check: GETVERSION answered code %d payload %r" % (code, payload))
    print("check: %s agent (%s) answered READY and GETVERSION %d" % (mode, args[-1], expected_version))
EOF
}

boot_vm none --append ccagent.echo=1234
probe echo "$work/vm.sock" || exit 1
stop_vm

if [ "${CC_VM_HAS_AGENT:-0}" = 1 ]; then
    boot_vm vsock --dialect hyperstart
    probe vsock "$work/vm.sock" hyperstart || exit 1
    stop_vm
    boot_vm serial --dialect cc-agent
    probe serial "$work/ch0.sock" "$work/ch1.sock" cc-agent || exit 1
    stop_vm
else
    echo "check: no agent in the initramfs; agent checks skipped"
fi
echo "check: guest kernel $CC_VM_KERNEL_RELEASE: all checks passed"
