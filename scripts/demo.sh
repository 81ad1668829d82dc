#!/usr/bin/env bash
# The main job, end to end: start cc-proxy on a temporary socket with a local test guest (cc-test-agent over
# hybrid vsock, as a Firecracker-style VMM would expose it), register it, run processes through it, show their
# output, exit codes and the daemon's metrics, then stop everything cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."

PROFILE=${PROFILE:-debug}
flag=""; [ "$PROFILE" = release ] && flag="--release"
echo "==> building (cargo build $flag)"
cargo build -q $flag -p cc-proxy -p cc-test-agent
BIN=target/$PROFILE

work=$(mktemp -d /tmp/cc-proxy-demo.XXXXXX)
agent_pid=""; proxy_pid=""
cleanup() {
    [ -n "$proxy_pid" ] && kill "$proxy_pid" 2>/dev/null || true
    [ -n "$agent_pid" ] && kill "$agent_pid" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

admin_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null || echo 14191)
sock=$work/proxy.sock

echo "==> starting a test guest agent (hybrid vsock socket $work/vm.sock)"
"$BIN/cc-test-agent" --hvsock "$work/vm.sock" > "$work/agent.out" 2> "$work/agent.log" &
agent_pid=$!
for _ in $(seq 100); do grep -q listening "$work/agent.out" 2>/dev/null && break; sleep 0.05; done

echo "==> starting cc-proxy on $sock (admin on 127.0.0.1:$admin_port)"
"$BIN/cc-proxy" --socket "$sock" --state-dir "$work/state" --admin-addr "127.0.0.1:$admin_port" \
    --log info --log-target stderr 2> "$work/proxy.log" &
proxy_pid=$!
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done

ccp() { "$BIN/cc-proxy" --socket "$sock" "$@"; }

echo; echo "==> the daemon's version (JSON-RPC proxy.version; with curl:"
echo "    curl --unix-socket $sock -d '{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"proxy.version\"}' http://localhost/)"
ccp call proxy.version
echo; echo "==> register the VM 'demo' (vm.register)"
ccp vm register demo --control "hvsock://$work/vm.sock:2718" --io "hvsock://$work/vm.sock:2719"
echo; echo "==> forward an agent command (agent.call ping)"
ccp call agent.call '{"vm":"demo","command":"ping"}'

run() {
    echo; echo "\$ cc-proxy exec demo -- $*"
    set +e
    "$BIN/cc-proxy" --socket "$sock" exec demo -- "$@" < "${STDIN:-/dev/null}"
    local status=$?
    set -e
    echo "[exit status $status]"
}

echo; echo "==> processes in the VM, their stdio relayed through cc-proxy"
run uname -sr
run sh -c 'echo "to stdout"; echo "to stderr" >&2; exit 3'
printf 'hello through stdin\n' > "$work/input"
STDIN=$work/input run tr a-z A-Z
run sh -c 'kill -9 $$'

echo; echo "==> cc-proxy vm list"
ccp vm list

echo; echo "==> metrics (GET http://127.0.0.1:$admin_port/metrics, a selection)"
metrics() {
    exec 3<>"/dev/tcp/127.0.0.1/$admin_port"
    printf 'GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n' >&3
    cat <&3
    exec 3<&-
}
metrics | grep -E '^cc_proxy_(vms|agent_commands_total|io_bytes_total|shim_attaches_total|streams_open)' | head -20

echo; echo "==> stopping cc-proxy (SIGTERM)"
kill -TERM "$proxy_pid"
wait "$proxy_pid"; status=$?
proxy_pid=""
echo "cc-proxy exited with status $status"
echo; echo "==> the daemon's log"
sed -e 's/^/    /' "$work/proxy.log" | tail -n 12
