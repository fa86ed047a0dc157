#!/usr/bin/env bash
# Runs every benchmark of the project in one run and rewrites their sections of BENCHMARKS.md:
# the edge against Envoy's baselines (seckill-bench), the sync pipeline (seckill-bench-sync),
# the deduct endpoint against redis-benchmark and an end-to-end sale with its chart
# (seckill-bench-sale, which draws docs/sale.svg), what each Redis durability setting costs
# a hot goods (seckill-bench-durability), the db tier against one MySQL transaction per
# attempt (seckill-bench-tier), one hot goods through the batch endpoint against the seed's
# own Lua script under redis-benchmark (seckill-bench-hot), and one hot goods sharded over the 3
# masters of a local Redis Cluster against one unsharded goods on one master, with Redis's CPU
# per decision on each master (seckill-bench-hot --sharded). About 25 minutes on 2 cores.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
cargo build -q -p seckill-filter -p seckill-bench-reject-only --target wasm32-wasip1 --release --locked
cargo build -q --release -p seckill-syncer -p seckill-bench --locked
target/release/seckill-bench
target/release/seckill-bench-sync
target/release/seckill-bench-sale
target/release/seckill-bench-durability
target/release/seckill-bench-tier
target/release/seckill-bench-hot
target/release/seckill-bench-hot --sharded --rounds 5 --batch-sizes 16,128
