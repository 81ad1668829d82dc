#!/usr/bin/env bash
# `make vm-test`: the real-VM end-to-end tests.
#
#   1. tests/vm/prepare.sh caches the kernel, initramfs (with a static cc-test-agent) and vhost-device-vsock
#      under target/vm/; exit 77 from it means QEMU cannot be had here: print why and exit 0 (skip).
#   2. tests/vm/check.sh: the harness's own plumbing check (guest vsock echo through vhost-device-vsock).
#   3. `cargo test --test it vm::` with CC_PROXY_VM_DIR set: the real cc-proxy binary against the guest agent,
#      once over hybrid vsock and once over virtio-serial (tests/it/vm.rs).
# Extra arguments go to the test binary (e.g. `tests/vm/run.sh --nocapture`).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export CC_VM_DIR=${CC_VM_DIR:-$ROOT/target/vm}
cd "$ROOT"

"$ROOT/tests/vm/prepare.sh"
rc=$?
if [ $rc = 77 ]; then
    echo "vm-test: skipped: QEMU with vhost-user-vsock support cannot be installed on this machine"
    exit 0
elif [ $rc != 0 ]; then
    echo "vm-test: FAILED: tests/vm/prepare.sh exited $rc" >&2
    exit $rc
fi

echo "vm-test: plumbing check"
if ! "$ROOT/tests/vm/check.sh"; then
    echo "vm-test: FAILED: the VM plumbing check failed (see above)" >&2
    exit 1
fi

echo "vm-test: end-to-end tests (cargo test --test it vm::)"
# One VM at a time: two TCG guests on two shared cores only slow each other down.
CC_PROXY_VM_DIR=$CC_VM_DIR cargo test --test it vm:: -- --test-threads=1 "$@"
