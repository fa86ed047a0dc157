#!/usr/bin/env bash
# The main job: set everything up, build, and run a local flash sale through the real stack.
# Extra arguments go to the demo (try --help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
echo "[demo] building the filter (wasm) and the syncer (release)..."
cargo build -q -p seckill-filter --target wasm32-wasip1 --release --locked
cargo build -q --release -p seckill-syncer -p seckill-demo -p seckill-load --locked
exec target/release/seckill-demo "$@"
