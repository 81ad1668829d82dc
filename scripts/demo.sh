#!/usr/bin/env bash
# The main job, end to end: start cc-proxy on a temporary socket with a local test guest (cc-test-agent over
# hybrid vsock, as a Firecracker-style VMM would expose it), register it, run processes through it, show their
# output, exit codes and the daemon's metrics; then the mesh front: two meshed test VMs, a and b, where a
# process in a calls b's service through a's outbound listener, mTLS, and b's inbound listener, and the service
# sees a's identity; the mesh metrics, `cc-proxy mesh identity`, `cc-proxy mesh endpoints` and a
# `cc-proxy tap --mesh` line; then stop everything cleanly.
#
# Self-checking: a step that does not show what it should stops the demo with "demo: FAILED: ..." and exit
# status 1 (tests/it/demo.rs runs it). Needs python3 and curl (.ci/run installs them).
#
# DEMO_BIN=DIR uses the cc-proxy and cc-test-agent binaries in DIR instead of building them.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${DEMO_BIN:-}" ]; then
    BIN=$DEMO_BIN
else
    PROFILE=${PROFILE:-debug}
    flag=""; [ "$PROFILE" = release ] && flag="--release"
    echo "==> building (cargo build $flag)"
    cargo build -q $flag -p cc-proxy -p cc-test-agent
    BIN=target/$PROFILE
fi

work=$(mktemp -d /tmp/cc-proxy-demo.XXXXXX)
proxy_pid=""
pids=()
cleanup() {
    [ -n "$proxy_pid" ] && kill "$proxy_pid" 2>/dev/null || true
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

fail() {
    echo "demo: FAILED: $*" >&2
    if [ -f "$work/proxy.log" ]; then
        echo "---- the daemon's log (last 30 lines) ----" >&2
        tail -n 30 "$work/proxy.log" >&2
    fi
    exit 1
}

command -v python3 >/dev/null || fail "python3 is needed (the mesh demo's service, free ports)"
command -v curl >/dev/null || fail "curl is needed (the mesh demo's client)"

# A free loopback TCP port.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Wait (at most 5 s) until FILE contains PATTERN.
wait_for() {
    local file=$1 pattern=$2
    for _ in $(seq 100); do grep -q -- "$pattern" "$file" 2>/dev/null && return 0; sleep 0.05; done
    return 1
}

# Start a test guest agent on the hybrid vsock socket $work/$1.sock.
start_agent() {
    "$BIN/cc-test-agent" --hvsock "$work/$1.sock" > "$work/$1-agent.out" 2> "$work/$1-agent.log" &
    pids+=($!)
    wait_for "$work/$1-agent.out" listening || fail "the test agent for $1 did not start"
}

admin_port=$(free_port)
sock=$work/proxy.sock

echo "==> starting a test guest agent (hybrid vsock socket $work/vm.sock)"
start_agent vm

echo "==> starting cc-proxy on $sock (admin on 127.0.0.1:$admin_port)"
"$BIN/cc-proxy" --socket "$sock" --state-dir "$work/state" --admin-addr "127.0.0.1:$admin_port" \
    --log info --log-target stderr 2> "$work/proxy.log" &
proxy_pid=$!
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
[ -S "$sock" ] || fail "cc-proxy did not create $sock"

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

echo; echo "==> the mesh: two more test VMs, a and b; a process in a calls b's service through cc-proxy"
echo "    (test VMs: cc-test-agent runs their processes on this host; the listeners are on loopback)"
A_ID=a.demo.serviceaccount.identity.linkerd.cluster.local
B_ID=b.demo.serviceaccount.identity.linkerd.cluster.local
svc_port=$(free_port); b_inbound=$(free_port); a_outbound=$(free_port)

# b's service: a small HTTP server on the host standing in for one in b's guest. It answers with, and logs,
# the l5d-client-id header it got: the identity cc-proxy authenticated over mTLS.
cat > "$work/service.py" <<'EOF'
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        who = self.headers.get("l5d-client-id", "(none)")
        print(f"b's service: {self.command} {self.path} from l5d-client-id={who}", flush=True)
        body = f"hello from b's service; you are {who}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


server = HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
print("listening", flush=True)
server.serve_forever()
EOF
python3 "$work/service.py" "$svc_port" > "$work/service.out" 2>&1 &
pids+=($!)
wait_for "$work/service.out" listening || fail "b's service did not start"
echo "b's service listens on 127.0.0.1:$svc_port"
start_agent a
start_agent b

b_mesh='{"identity": "'$B_ID'",
  "inbound": [{"listen": "127.0.0.1:'$b_inbound'", "target": "tcp://127.0.0.1:'$svc_port'",
               "authz": {"identities": ["'$A_ID'"]}}]}'
a_mesh='{"identity": "'$A_ID'",
  "outbound": [{"listen": "127.0.0.1:'$a_outbound'",
                "destination": {"endpoints": ["127.0.0.1:'$b_inbound'"], "identity": "'$B_ID'"}}]}'
echo; echo "\$ cc-proxy vm register b ... --mesh '$b_mesh'"
ccp vm register b --control "hvsock://$work/b.sock:2718" --io "hvsock://$work/b.sock:2719" --mesh "$b_mesh"
echo; echo "\$ cc-proxy vm register a ... --mesh '$a_mesh'"
ccp vm register a --control "hvsock://$work/a.sock:2718" --io "hvsock://$work/a.sock:2719" --mesh "$a_mesh"

echo; echo "==> cc-proxy tap b --mesh (in the background while the request runs)"
"$BIN/cc-proxy" --socket "$sock" tap b --mesh > "$work/tap.out" 2> "$work/tap.err" &
pids+=($!)
# The tap opens asynchronously: requests from the host until it shows one, so the next one is surely seen.
for _ in $(seq 50); do
    curl -s --max-time 5 -o /dev/null "http://127.0.0.1:$a_outbound/warm-up" || true
    grep -q warm-up "$work/tap.out" 2>/dev/null && break
    sleep 0.1
done
grep -q warm-up "$work/tap.out" || fail "the tap showed no mesh request (tap: $(cat "$work/tap.err"))"

echo; echo "==> a request from inside a: a's outbound listener -> mTLS -> b's inbound listener -> b's service"
echo "\$ cc-proxy exec a -- curl -sS http://127.0.0.1:$a_outbound/hello"
reply=$("$BIN/cc-proxy" --socket "$sock" exec a -- curl -sS --max-time 10 "http://127.0.0.1:$a_outbound/hello") \
    || fail "the request through the mesh failed"
echo "$reply"
[[ "$reply" == *"you are $A_ID"* ]] || fail "b's service did not see a's identity: $reply"
echo; echo "==> b's service's log"
wait_for "$work/service.out" "GET /hello from l5d-client-id=$A_ID" || fail "b's service did not log a's identity"
grep " /hello " "$work/service.out"

echo; echo "==> the tap line"
wait_for "$work/tap.out" " /hello " || fail "the tap did not show the request"
tap_line=$(grep " /hello " "$work/tap.out" | head -n 1)
echo "$tap_line"
[[ "$tap_line" == *" inbound "*" 200 "*"peer=$A_ID endpoint=tcp://127.0.0.1:$svc_port"* ]] \
    || fail "the tap line lacks the direction, status, peer or endpoint: $tap_line"

echo; echo "==> mesh metrics (GET /metrics: cc_proxy_mesh_*, Linkerd's request/response families, a selection)"
mesh_metrics=$(metrics | grep -E '^(cc_proxy_mesh|identity_cert|request_total|response_total)' || true)
echo "$mesh_metrics" | grep -E "^(cc_proxy_mesh_certificate|response_total)" | grep "$A_ID\|$B_ID" | head -n 12
echo "$mesh_metrics" | grep -q "^cc_proxy_mesh_certificate_issuances_total{identity=\"$A_ID\",source=\"ca\"} 1" \
    || fail "a's certificate issuance is not counted"
echo "$mesh_metrics" | grep -E "^response_total\{direction=\"inbound\"" | grep "client_id=\"$A_ID\"" \
    | grep -q 'status_code="200"' || fail "b's inbound 200 responses to a are not counted"
echo "$mesh_metrics" | grep -E "^response_total\{direction=\"outbound\"" | grep "server_id=\"$B_ID\"" \
    | grep -q 'status_code="200"' || fail "a's outbound 200 responses from b are not counted"

echo; echo "==> cc-proxy mesh identity a (the chain's PEM left out)"
identity=$(ccp mesh identity a) || fail "cc-proxy mesh identity a failed"
echo "$identity" | sed '/-----BEGIN CERTIFICATE-----/,$d'
echo "$identity" | grep -q "^state: *valid" || fail "a's identity is not valid: $identity"
echo "$identity" | grep -q "^source: *ca (the embedded CA)" || fail "a's certificate is not from the embedded CA"

echo; echo "==> cc-proxy mesh endpoints a (a's outbound destination: b's inbound listener)"
endpoints=$(ccp mesh endpoints a) || fail "cc-proxy mesh endpoints a failed"
echo "$endpoints"
echo "$endpoints" | grep "127.0.0.1:$b_inbound" | grep -q " ready " \
    || fail "a's endpoint 127.0.0.1:$b_inbound is not listed as ready"

echo; echo "==> stopping cc-proxy (SIGTERM)"
kill -TERM "$proxy_pid"
wait "$proxy_pid"; status=$?
proxy_pid=""
echo "cc-proxy exited with status $status"
echo; echo "==> the daemon's log"
sed -e 's/^/    /' "$work/proxy.log" | tail -n 12
