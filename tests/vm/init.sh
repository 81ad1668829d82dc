#!/bin/busybox sh
# /init of the test guest's initramfs (copied there by tests/vm/prepare.sh).
#
# Brings up just enough of a Linux userland for cc-test-agent: proc, sys and dev, the virtio and vsock modules
# (the Debian cloud kernel builds them as modules), a busybox toolbox on PATH for the commands the tests run,
# and then becomes the agent. Kernel command line parameters choose what runs:
#   ccagent.transport=vsock|serial|none   vsock: listen on AF_VSOCK 2718/2719; serial: the sh.hyper.channel.*
#                                          virtio-serial ports; none: no agent, idle (plumbing checks)
#   ccagent.dialect=hyperstart|cc-agent    passed to the agent as --dialect
#   ccagent.args=a,b,c                     extra agent arguments, comma separated
#   ccagent.echo=PORT                      also run vsock-echo on PORT (plumbing self-check, tests/vm/check.sh)
# Every line this script prints starts with "ccinit:" and goes to the serial console, which the host harness
# reads to follow the boot.

/bin/busybox mkdir -p /proc /sys /dev /tmp /run /bin /sbin /usr/bin /usr/sbin
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
# The kernel opens /dev/console before /init runs; if the archive had no node yet, reopen it now.
exec </dev/console >/dev/console 2>&1
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/ TERM=dumb

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts 2>/dev/null
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
hostname ccguest

echo "ccinit: kernel $(uname -r)"

transport=vsock
dialect=hyperstart
extra=
echo_port=
for word in $(cat /proc/cmdline); do
    case "$word" in
        ccagent.transport=*) transport=${word#ccagent.transport=} ;;
        ccagent.dialect=*) dialect=${word#ccagent.dialect=} ;;
        ccagent.args=*) extra=$(echo "${word#ccagent.args=}" | tr ',' ' ') ;;
        ccagent.echo=*) echo_port=${word#ccagent.echo=} ;;
    esac
done

# insmod does not resolve dependencies: load.order (made by prepare.sh from the modules' own dependency lists)
# puts each module after the ones it needs.
for m in $(cat /lib/modules/load.order); do
    if ! insmod "/lib/modules/$m.ko"; then
        echo "ccinit: insmod $m failed"
    fi
done

# virtio-serial ports show up asynchronously after virtio_console loads; wait briefly for their names.
if [ "$transport" = serial ]; then
    i=0
    while [ $i -lt 50 ]; do
        n=$(cat /sys/class/virtio-ports/*/name 2>/dev/null | grep -c sh.hyper.channel)
        [ "$n" -ge 2 ] && break
        sleep 0.1
        i=$((i + 1))
    done
    for p in /sys/class/virtio-ports/*; do
        [ -e "$p/name" ] && echo "ccinit: port $(basename "$p") = $(cat "$p/name")"
    done
fi

if [ -n "$echo_port" ]; then
    vsock-echo "$echo_port" &
fi

case "$transport" in
    vsock) mode=--vsock ;;
    serial) mode=--virtio-serial ;;
    none)
        echo "ccinit: no agent requested; idle"
        echo "ccinit: ready"
        while true; do sleep 3600; done
        ;;
    *)
        echo "ccinit: unknown ccagent.transport=$transport"
        poweroff -f
        ;;
esac

if [ ! -x /bin/cc-test-agent ]; then
    echo "ccinit: /bin/cc-test-agent is missing from the initramfs"
    echo "ccinit: ready"
    while true; do sleep 3600; done
fi

echo "ccinit: starting cc-test-agent $mode --dialect $dialect $extra"
echo "ccinit: ready"
# The agent runs as a child (not exec'd) so that its exit status reaches the console; the shell, as PID 1, also
# reaps orphaned processes. An agent that ends powers the guest off: QEMU exits (-no-reboot), and the host sees
# a dead agent as a dead VM.
# shellcheck disable=SC2086
/bin/cc-test-agent $mode --dialect "$dialect" $extra
echo "ccinit: cc-test-agent exited with status $?; powering off"
poweroff -f
