#!/usr/bin/env bash
# Runs every fuzz target for a while and prints what each did.
#
#   fuzz/run.sh [--ci] [SECONDS]      (make fuzz / make fuzz-ci)
#
# SECONDS per target (default $FUZZ_SECONDS, else 60). Each target starts from its committed
# seeds (fuzz/seeds/<target>) plus the corpus earlier runs grew (fuzz/corpus/<target>, not
# committed). A crash stops the run with exit 1; libFuzzer leaves the input in
# fuzz/artifacts/<target>/ (replay it with `cargo +nightly fuzz run <target> <file>`).
# With --ci, a missing nightly toolchain or cargo-fuzz is a skip with the reason printed, not a
# failure. The summary table goes to stdout and to target/fuzz-summary.txt.
set -euo pipefail

cd "$(dirname "$0")/.."

ci=0
if [ "${1:-}" = "--ci" ]; then
    ci=1
    shift
fi
seconds="${1:-${FUZZ_SECONDS:-60}}"
case "$seconds" in
    '' | *[!0-9]*) echo "fuzz: SECONDS must be a whole number, not '$seconds'" >&2; exit 2 ;;
esac

missing() {
    if [ "$ci" -eq 1 ]; then
        echo "fuzz-ci: skipped: $1"
        exit 0
    fi
    echo "fuzz: $1" >&2
    exit 1
}

CARGO="${CARGO:-cargo}"
if ! "$CARGO" +nightly --version >/dev/null 2>&1; then
    missing "no nightly toolchain (cargo-fuzz needs 'cargo +nightly'; rustup toolchain install nightly)"
fi
if ! "$CARGO" +nightly fuzz --version >/dev/null 2>&1; then
    missing "cargo-fuzz is not installed (cargo install --locked cargo-fuzz)"
fi

targets=()
while IFS= read -r t; do
    [ -n "$t" ] && targets+=("$t")
done < <("$CARGO" +nightly fuzz list)
if [ "${#targets[@]}" -eq 0 ]; then
    echo "fuzz: no targets found" >&2
    exit 1
fi

echo "==> cargo +nightly fuzz build (${#targets[@]} targets)"
"$CARGO" +nightly fuzz build

mkdir -p target
summary=target/fuzz-summary.txt
logdir=target/fuzz-logs
mkdir -p "$logdir"
printf '%-22s %8s %12s %10s %8s  %s\n' target seconds executions exec/s corpus result | tee "$summary"
failed=0
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/seeds/$t" "fuzz/artifacts/$t"
    log="$logdir/$t.log"
    result=ok
    if ! "$CARGO" +nightly fuzz run "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 \
        -artifact_prefix="fuzz/artifacts/$t/" >"$log" 2>&1; then
        result="FAILED (see $log)"
        failed=1
    fi
    runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)"
    rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)"
    corpus="$(find "fuzz/corpus/$t" -type f | wc -l)"
    printf '%-22s %8s %12s %10s %8s  %s\n' "$t" "$seconds" "${runs:-?}" "${rate:-?}" "$corpus" "$result" | tee -a "$summary"
    if [ "$result" != ok ]; then
        grep -E 'panicked at|ERROR: libFuzzer|SUMMARY|Test unit written' "$log" | head -n 8 >&2 || true
    fi
done
exit "$failed"
