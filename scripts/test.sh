#!/usr/bin/env bash
# Sets everything up, builds, checks formatting and lints, and runs every test: unit tests of
# each crate and the end-to-end tests against real Envoy, Redis and MariaDB.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh

echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy -p seckill-filter -p seckill-bench-reject-only --target wasm32-wasip1 --locked -- -D warnings

echo "== build (the end-to-end tests run these binaries)"
cargo build -p seckill-filter --target wasm32-wasip1 --release --locked
cargo build --workspace --locked
# What a user installs must build on its own: a workspace build unifies features across crates
# and can hide one a crate forgot to ask for (seckill-load once relied on the syncer's clap env).
cargo check -p seckill-load --locked

echo "== tests"
cargo test --workspace --locked -- "$@"
