#!/usr/bin/env bash
# Runs the benchmarks side by side in one run and rewrites their sections of BENCHMARKS.md.
# Extra arguments go to seckill-bench (try --help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
cargo build -q -p seckill-filter --target wasm32-wasip1 --release --locked
cargo build -q --release -p seckill-syncer -p seckill-e2e --locked
exec target/release/seckill-bench "$@"
