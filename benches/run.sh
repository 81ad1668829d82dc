#!/usr/bin/env bash
# Build the release binaries and run the benchmarks: writes docs/benchmarks.md, docs/benchmarks/*.svg and
# target/bench/results.json. `--quick` for the short run (under 2 minutes); other flags go to cc-proxy-bench
# (see `target/release/cc-proxy-bench --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --quiet
mkdir -p target/bench
exec target/release/cc-proxy-bench "$@"
