#!/bin/bash
# The system test, inside the guest (Debian 12, systemd as PID 1), run by cc-systest.service from the payload
# that tests/system/run.sh packed: this repository's files with the host-built artifacts (target/release/
# cc-proxy, its stripped copy and split debug info, cc-test-agent, selinux/cc-proxy.pp). The guest has no cargo.
#
# The kernel command line chooses the phase:
#   systest.phase=plain     SELinux off: install, socket activation, Type=notify, VMs, exec, journal, restarts
#   systest.phase=selinux   the same with the policy module installed and SELinux enforcing, then no AVC denial
#
# Every check prints "ok: ..." or "FAIL: ..."; the last line is "SYSTEST-RESULT pass" or "SYSTEST-RESULT fail
# (N failed)". Logs for the host go into a tar archive written to the raw disk /dev/vdc. The guest powers off at
# the end.
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export LC_ALL=C
SRC=/var/tmp/systest
OUT=/var/tmp/systest-out
SOCK=/run/cc-oci-runtime/proxy.sock
# How long a VM's agent socket may take to appear, and the daemon to answer, in tenths of a second.
WAIT_TENTHS=300

phase=plain
for word in $(cat /proc/cmdline); do
    case "$word" in systest.phase=*) phase=${word#systest.phase=} ;; esac
done
rm -rf "$OUT"
mkdir -p "$OUT"
failed=0
say() { echo "systest[$phase]: $*"; }
ok() { echo "ok: $*"; }
fail() {
    echo "FAIL: $*"
    failed=$((failed + 1))
}
# check DESCRIPTION COMMAND...: runs the command, ok when it succeeds.
check() {
    local what=$1
    shift
    if "$@"; then ok "$what"; else fail "$what"; fi
}
# expect_eq DESCRIPTION EXPECTED ACTUAL
expect_eq() {
    if [ "$2" = "$3" ]; then ok "$1 ($3)"; else fail "$1: expected '$2', got '$3'"; fi
}
prop() { systemctl show -P "$2" "$1"; }
finish() {
    say "collecting logs"
    journalctl -b --no-pager -o short-precise >"$OUT/journal.txt" 2>&1
    journalctl -b --no-pager -o verbose -u cc-proxy.service >"$OUT/cc-proxy-journal-verbose.txt" 2>&1
    cp /var/log/audit/audit.log "$OUT/" 2>/dev/null
    tar -cf /dev/vdc -C "$OUT" . 2>/dev/null || say "cannot write the logs to /dev/vdc"
    if [ "$failed" = 0 ]; then
        echo "SYSTEST-RESULT pass"
    else
        echo "SYSTEST-RESULT fail ($failed failed)"
    fi
    sync
    # (start the target directly: the poweroff verb first asks logind over D-Bus, which this guest lacks)
    systemctl --no-block --job-mode=replace-irreversibly start poweroff.target
    exit 0
}
# wait_for TENTHS COMMAND...: retries the command every 0.1 s until it succeeds or TENTHS have passed.
wait_for() {
    local n=$1 i=0
    shift
    until "$@"; do
        i=$((i + 1))
        [ "$i" -lt "$n" ] || return 1
        sleep 0.1
    done
}
# The daemon's main PID, empty when it is not running.
daemon_pid() {
    local pid
    pid=$(prop cc-proxy.service MainPID)
    [ "$pid" != 0 ] && echo "$pid"
}
# http_get PORT PATH: the status code of a GET to 127.0.0.1:PORT (bash's /dev/tcp; the guest has no curl).
http_get() {
    local line
    exec 3<>"/dev/tcp/127.0.0.1/$1" || return 1
    printf 'GET %s HTTP/1.0\r\nHost: localhost\r\n\r\n' "$2" >&3
    IFS= read -r line <&3
    exec 3<&-
    line=${line#HTTP/1.? }
    echo "${line%% *}"
}
# The VM's state from `cc-proxy --json vm info` (its error, if any, on stdout).
vm_state() {
    cc-proxy --json vm info "$1" 2>&1 | sed -n -e 's/^ *"state": *"\([a-z]*\)".*/\1/p' -e '/^cc-proxy:/p'
}
# settled_state VM: the state once recovery is over. Right after a (re)start a recorded VM is `recovering`
# (never unknown) until its agent answered or the recovery timeout passed; the first answer is checked too.
settled_state() {
    local state i=0
    state=$(vm_state "$1")
    case "$state" in
        ready | recovering) ;;
        *) echo "first answer '$state'"; return ;;
    esac
    while [ "$state" = recovering ] && [ $i -lt "$WAIT_TENTHS" ]; do
        sleep 0.1
        i=$((i + 1))
        state=$(vm_state "$1")
    done
    echo "$state"
}

say "kernel $(uname -r), $(systemctl --version | head -n 1)"
expect_eq "PID 1 is systemd" /usr/lib/systemd/systemd "$(readlink /proc/1/exe)"
check "no cargo in the guest" bash -c '! command -v cargo'
selinux=off
if [ -d /sys/fs/selinux ] && [ "$(cat /sys/fs/selinux/enforce 2>/dev/null)" != "" ]; then
    selinux=$(getenforce)
fi
say "SELinux: $selinux"
if [ "$phase" = selinux ]; then
    expect_eq "SELinux is on, permissive until the module is in" Permissive "$selinux"
    [ "$selinux" = Permissive ] || finish
else
    expect_eq "SELinux is off" off "$selinux"
fi

# 1. make install of what the host built, without cargo.
cd "$SRC" || finish
make install >"$OUT/make-install.log" 2>&1
rc=$?
sed 's/^/    make: /' "$OUT/make-install.log"
expect_eq "make install exits 0 without cargo" 0 "$rc"
check "make install did not try to build" bash -c "! grep -q 'cargo' '$OUT/make-install.log'"
check "the installed binary is the stripped build" cmp -s target/release/cc-proxy.stripped /usr/local/bin/cc-proxy
check "its debug info is installed beside it" cmp -s target/release/cc-proxy.debug \
    /usr/lib/debug/usr/local/bin/cc-proxy.debug
size_installed=$(stat -c %s /usr/local/bin/cc-proxy)
size_built=$(stat -c %s target/release/cc-proxy)
check "the installed binary ($size_installed B) is smaller than the unstripped one ($size_built B)" \
    test "$size_installed" -lt "$size_built"
check "the Grafana dashboard is installed" test -s /usr/local/share/doc/cc-proxy/grafana/cc-proxy.json
check "the units are installed" test -s /etc/systemd/system/cc-proxy.service -a -s /etc/systemd/system/cc-proxy.socket
install -m 0755 target/release/cc-test-agent /usr/local/bin/cc-test-agent

# 2. SELinux: the module, the admin port label and the file labels, as docs/operations.md says; then enforcing.
if [ "$phase" = selinux ]; then
    check "semodule -i cc-proxy.pp" semodule -i /usr/local/share/selinux/packages/cc-proxy.pp
    check "semanage port -a -t cc_proxy_port_t -p tcp 4191" semanage port -a -t cc_proxy_port_t -p tcp 4191
    mkdir -p /var/lib/cc-proxy
    restorecon -RF /usr/local/bin/cc-proxy /var/lib/cc-proxy /run/cc-oci-runtime 2>/dev/null
    expect_eq "cc_proxy_connect_any is off by default" "cc_proxy_connect_any --> off" \
        "$(getsebool cc_proxy_connect_any 2>&1)"
    for b in cc_proxy_connect_unconfined_vmm cc_proxy_connect_service_vmm cc_proxy_connect_libvirt_vmm \
        cc_proxy_connect_container_vmm; do
        expect_eq "$b is on by default" "$b --> on" "$(getsebool "$b" 2>&1)"
    done
    expect_eq "the binary's label" cc_proxy_exec_t "$(stat -c %C /usr/local/bin/cc-proxy | cut -d: -f3)"
    # Denials are counted from here on.
    audit_from=$(stat -c %s /var/log/audit/audit.log 2>/dev/null || echo 0)
    setenforce 1
    expect_eq "SELinux enforcing" Enforcing "$(getenforce)"
fi

# 3. Socket activation: the socket is there, the daemon is not, until the first connection.
printf 'CC_PROXY_OPTS="--log info"\n' >/etc/default/cc-proxy
systemctl daemon-reload
check "systemctl enable --now cc-proxy.socket" systemctl enable --now cc-proxy.socket
expect_eq "cc-proxy.socket" active "$(systemctl is-active cc-proxy.socket)"
check "the socket exists" test -S "$SOCK"
expect_eq "socket mode and owner" "660 root:root" "$(stat -c '%a %U:%G' "$SOCK")"
expect_eq "socket directory mode" 750 "$(stat -c '%a' "$(dirname "$SOCK")")"
expect_eq "cc-proxy.service before any connection" inactive "$(systemctl is-active cc-proxy.service)"
check "no cc-proxy process before any connection" bash -c '! pgrep -x cc-proxy >/dev/null'

check "the first connection (cc-proxy version) is served" cc-proxy version
expect_eq "cc-proxy.service after it" active "$(systemctl is-active cc-proxy.service)"
expect_eq "the unit's type" notify "$(prop cc-proxy.service Type)"
expect_eq "the service's substate (Type=notify: active only after READY=1)" running \
    "$(prop cc-proxy.service SubState)"
status_text=$(prop cc-proxy.service StatusText)
check "the daemon sent a STATUS= line ('$status_text')" test -n "$status_text"
expect_eq "RestartPreventExitStatus" 2 "$(prop cc-proxy.service RestartPreventExitStatus)"
pid=$(daemon_pid)
capbnd=$(awk '/^CapBnd:/ {print $2}' "/proc/$pid/status")
check "the daemon's bounding set (0x$capbnd) has no CAP_NET_BIND_SERVICE" test $(((0x$capbnd >> 10) & 1)) = 0
expect_eq "the admin server's /ready answers" 200 "$(http_get 4191 /ready)"
if [ "$phase" = selinux ]; then
    expect_eq "the daemon's domain" cc_proxy_t "$(ps -o label= -p "$pid" | cut -d: -f3)"
    expect_eq "the socket's label" cc_proxy_runtime_t "$(stat -c %C "$SOCK" | cut -d: -f3)"
    expect_eq "the state directory's label" cc_proxy_var_lib_t "$(stat -c %C /var/lib/cc-proxy | cut -d: -f3)"
fi

# 4. VMs served by cc-test-agent, each a systemd service:
#    vm1  hybrid vsock (like Firecracker or Cloud Hypervisor), a system service with its socket in a runtime
#         directory under /run;
#    vm2  two unix sockets (like QEMU virtio-serial chardevs) created directly in /run by a VMM that runs
#         unconfined (under SELinux: unconfined_t, as when an administrator starts it);
#    vm3  AF_VSOCK (like QEMU's vhost-vsock), through the kernel's loopback transport: vsock://1:2718.
cat >/etc/systemd/system/ccvm-hvsock@.service <<'EOF'
[Unit]
Description=cc-test-agent playing VM %i (hybrid vsock)
[Service]
RuntimeDirectory=ccvm/%i
ExecStart=/usr/local/bin/cc-test-agent --hvsock /run/ccvm/%i/vm.sock
EOF
systemctl daemon-reload
check "the vm1 agent service starts" systemctl start ccvm-hvsock@vm1.service
vm2_props=()
[ "$phase" = selinux ] && vm2_props=(-p SELinuxContext=unconfined_u:unconfined_r:unconfined_t:s0)
check "the vm2 agent service starts" systemd-run --quiet --unit=ccvm-serial-vm2 "${vm2_props[@]}" \
    /usr/local/bin/cc-test-agent --control /run/ccvm-vm2-control.sock --io /run/ccvm-vm2-io.sock
check "the vm3 agent service starts" systemd-run --quiet --unit=ccvm-vsock-vm3 /usr/local/bin/cc-test-agent --vsock
check "vm1's agent socket appears" wait_for "$WAIT_TENTHS" test -S /run/ccvm/vm1/vm.sock
check "vm2's agent sockets appear" wait_for "$WAIT_TENTHS" test -S /run/ccvm-vm2-io.sock
vm3_listening() { journalctl -u ccvm-vsock-vm3.service -o cat | grep -q '^cc-test-agent: listening'; }
check "vm3's agent listens on vsock" wait_for "$WAIT_TENTHS" vm3_listening
if [ "$phase" = selinux ]; then
    say "vm1 agent: $(ps -o label= -p "$(prop ccvm-hvsock@vm1.service MainPID)"), socket $(stat -c %C /run/ccvm/vm1/vm.sock)"
    say "vm2 agent: $(ps -o label= -p "$(prop ccvm-serial-vm2.service MainPID)"), socket $(stat -c %C /run/ccvm-vm2-io.sock)"
fi
check "cc-proxy vm register vm1 (hvsock)" cc-proxy vm register vm1 \
    --control hvsock:///run/ccvm/vm1/vm.sock:2718 --io hvsock:///run/ccvm/vm1/vm.sock:2719
check "cc-proxy vm register vm2 (unix)" cc-proxy vm register vm2 \
    --control unix:///run/ccvm-vm2-control.sock --io unix:///run/ccvm-vm2-io.sock
check "cc-proxy vm register vm3 (vsock)" cc-proxy vm register vm3 --control vsock://1:2718 --io vsock://1:2719
expect_eq "vm1 state" ready "$(vm_state vm1)"
expect_eq "vm2 state" ready "$(vm_state vm2)"
expect_eq "vm3 state" ready "$(vm_state vm3)"

# 5. cc-proxy exec: stdout, stderr, stdin and the exit status come through.
exec_checks() {
    local out err rc
    out=$(cc-proxy exec vm1 -- sh -c 'echo out-vm1; echo err-vm1 >&2; exit 7' 2>"$OUT/exec.err")
    rc=$?
    expect_eq "exec on vm1: stdout" out-vm1 "$out"
    expect_eq "exec on vm1: stderr" err-vm1 "$(cat "$OUT/exec.err")"
    expect_eq "exec on vm1: exit status" 7 "$rc"
    out=$(printf 'line one\nline two\n' | cc-proxy exec vm2 -- sed 's/line/LINE/')
    rc=$?
    expect_eq "exec on vm2: stdin relayed and answered" "LINE one
LINE two" "$out"
    expect_eq "exec on vm2: exit status" 0 "$rc"
    out=$(cc-proxy exec vm3 -- echo over-vsock)
    rc=$?
    expect_eq "exec on vm3: stdout" over-vsock "$out"
    expect_eq "exec on vm3: exit status" 0 "$rc"
}
exec_checks

# 6. The journal: VM=<id> selects that VM's entries, and only them.
journalctl --sync 2>/dev/null
vm1_lines=$(journalctl -u cc-proxy VM=vm1 -o cat --no-pager | wc -l)
check "journalctl -u cc-proxy VM=vm1 returns vm1's lines ($vm1_lines)" test "$vm1_lines" -gt 0
others=$(journalctl -u cc-proxy VM=vm1 -o json --no-pager | grep -vc '"VM":"vm1"')
expect_eq "entries selected by VM=vm1 that belong to another VM" 0 "$others"
vm2_lines=$(journalctl -u cc-proxy VM=vm2 -o cat --no-pager | wc -l)
check "journalctl -u cc-proxy VM=vm2 returns vm2's lines ($vm2_lines)" test "$vm2_lines" -gt 0

# 7. systemctl restart keeps the VMs; the agents see a new connection.
old_pid=$(daemon_pid)
check "systemctl restart cc-proxy" systemctl restart cc-proxy.service
new_pid=$(daemon_pid)
check "a new daemon process ($old_pid -> $new_pid)" test -n "$new_pid" -a "$new_pid" != "$old_pid"
expect_eq "vm1 state after the restart" ready "$(settled_state vm1)"
expect_eq "vm2 state after the restart" ready "$(settled_state vm2)"
expect_eq "vm3 state after the restart" ready "$(settled_state vm3)"
exec_checks

# 8. systemctl stop: the daemon exits 0; the next connection starts it again, with the VMs.
check "systemctl stop cc-proxy" systemctl stop cc-proxy.service
expect_eq "the daemon's exit status" 0 "$(prop cc-proxy.service ExecMainStatus)"
expect_eq "the service's result" success "$(prop cc-proxy.service Result)"
expect_eq "cc-proxy.service after the stop" inactive "$(systemctl is-active cc-proxy.service)"
expect_eq "vm1 state once a connection started the daemon again" ready "$(settled_state vm1)"
expect_eq "vm2 state likewise" ready "$(settled_state vm2)"
expect_eq "vm3 state likewise" ready "$(settled_state vm3)"

# 9. A configuration error (exit 2) is not retried: RestartPreventExitStatus=2.
systemctl stop cc-proxy.service
printf 'CC_PROXY_OPTS="--log nonsense"\n' >/etc/default/cc-proxy
check "a bad option makes the start fail" bash -c '! systemctl start cc-proxy.service 2>/dev/null'
sleep 3
expect_eq "its exit status" 2 "$(prop cc-proxy.service ExecMainStatus)"
expect_eq "restarts after exit status 2 (RestartSec=1s, 3 s later)" 0 "$(prop cc-proxy.service NRestarts)"
expect_eq "the service after a configuration error" failed "$(systemctl is-active cc-proxy.service)"
printf 'CC_PROXY_OPTS="--log info"\n' >/etc/default/cc-proxy
systemctl reset-failed cc-proxy.service
check "fixed, it starts again" systemctl start cc-proxy.service
check "systemctl stop cc-proxy.socket cc-proxy.service" systemctl stop cc-proxy.socket cc-proxy.service
expect_eq "the daemon's exit status after the final stop" 0 "$(prop cc-proxy.service ExecMainStatus)"
check "the socket unit removed the socket" test ! -e "$SOCK"

# 10. Under SELinux: not one denial since enforcing began.
if [ "$phase" = selinux ]; then
    expect_eq "still enforcing" Enforcing "$(getenforce)"
    tail -c +"$((audit_from + 1))" /var/log/audit/audit.log >"$OUT/audit-during-test.log"
    grep -E 'type=(AVC|USER_AVC|SELINUX_ERR)' "$OUT/audit-during-test.log" >"$OUT/denials.log"
    denials=$(wc -l <"$OUT/denials.log")
    expect_eq "AVC denials while enforcing" 0 "$denials"
    sed 's/^/    /' "$OUT/denials.log"
fi
finish
