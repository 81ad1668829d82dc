#!/usr/bin/env bash
# Plumbing self-check of the VM harness, needing neither the agent nor cc-proxy: boots a guest with no agent
# and the vsock-echo server on port 1234, then goes through the hybrid-vsock socket (CONNECT 1234) and expects
# 256 KiB back intact, 16 KiB at a time. Exit 0 when it works, 77 when QEMU cannot be had.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
"$ROOT/tests/vm/prepare.sh" || exit $?

# Under /tmp: unix socket paths must stay short whatever the checkout path.
work=$(mktemp -d /tmp/ccvmchk.XXXXXX)
boot_pid=
finish() {
    [ -z "$boot_pid" ] || { kill -TERM "$boot_pid" 2>/dev/null; wait "$boot_pid" 2>/dev/null; }
    rm -rf "$work"
}
trap finish EXIT

"$ROOT/tests/vm/boot.sh" --workdir "$work" --transport none --append ccagent.echo=1234 --watch-pid $$ &
boot_pid=$!
for _ in $(seq 900); do
    [ -f "$work/ready" ] && break
    kill -0 "$boot_pid" 2>/dev/null || { echo "check: boot failed" >&2; exit 1; }
    sleep 0.1
done
[ -f "$work/ready" ] || { echo "check: guest not ready" >&2; exit 1; }

python3 - "$work/vm.sock" <<'EOF'
import os, socket, sys, time
path = sys.argv[1]
payload = os.urandom(256 * 1024)
deadline = time.time() + 30
while True:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(path)
    s.sendall(b"CONNECT 1234\n")
    line = b""
    try:
        while not line.endswith(b"\n"):
            b = s.recv(1)
            if not b:
                break
            line += b
    except socket.timeout:
        pass
    if line.startswith(b"OK "):
        break
    s.close()
    # vsock-echo may not be listening yet right after /init printed "ready".
    if time.time() > deadline:
        sys.exit("check: no OK from CONNECT 1234: %r" % line)
    time.sleep(0.2)
# One chunk at a time, read back before the next: bulk in both directions at once can stall vhost-device-vsock.
got = b""
for off in range(0, len(payload), 16384):
    s.sendall(payload[off:off + 16384])
    while len(got) < off + 16384:
        chunk = s.recv(65536)
        if not chunk:
            sys.exit("check: echo connection closed after %d bytes" % len(got))
        got += chunk
if got != payload:
    sys.exit("check: echo mismatch: sent %d bytes, got %d" % (len(payload), len(got)))
print("check: vsock echo of %d bytes through %s intact (%s)" % (len(payload), path, line.decode().strip()))
EOF
rc=$?
[ $rc = 0 ] && echo "check: guest kernel $(grep '^ccinit: kernel' "$work/console.log" | cut -d' ' -f3)"
exit $rc
