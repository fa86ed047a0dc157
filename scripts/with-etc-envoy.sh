#!/usr/bin/env bash
# Runs a command where /etc/envoy looks as it does on a host that runs the shipped Envoy
# configurations: this checkout's envoy/ directory, plus the built filter as
# /etc/envoy/seckill_filter.wasm. The shipped files name those absolute paths, as a deployment
# does, so they can be checked as shipped, e.g. (each file's header says its own):
#
#   scripts/with-etc-envoy.sh envoy --mode validate -c envoy/production.yaml
#
# The command runs in a private mount namespace (unshare) with an overlay on /etc that only it
# sees: the machine's /etc is not written, and nothing is left behind. Works as root and, where
# the kernel allows unprivileged user namespaces (Debian's default), as any user. `envoy` is
# the project's (.venv/bin, from scripts/setup.sh); the command runs from the checkout's root.
#
# SECKILL_FILTER_WASM and SECKILL_ENVOY_BIN override the filter and Envoy, as in the tests.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [ $# -eq 0 ]; then
  echo "usage: $0 COMMAND [ARG...]   (e.g. envoy --mode validate -c envoy/production.yaml)" >&2
  exit 2
fi
wasm="${SECKILL_FILTER_WASM:-$ROOT/target/wasm32-wasip1/release/seckill_filter.wasm}"
if [ ! -f "$wasm" ]; then
  echo "no filter at $wasm: cargo build -p seckill-filter --target wasm32-wasip1 --release" >&2
  exit 2
fi
envoy_bin="${SECKILL_ENVOY_BIN:-$ROOT/.venv/bin/envoy}"
if [ ! -x "$envoy_bin" ]; then
  echo "no Envoy at $envoy_bin: run scripts/setup.sh" >&2
  exit 2
fi

# The overlay's upper layer: what /etc gains. Upper and work directories must share a file
# system; both live in one scratch directory, removed on exit.
scratch="$(mktemp -d "${TMPDIR:-/tmp}/with-etc-envoy.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$scratch/upper/envoy" "$scratch/work"
cp -R "$ROOT/envoy/." "$scratch/upper/envoy/"
cp "$wasm" "$scratch/upper/envoy/seckill_filter.wasm"
# The namespace's root is mapped to the caller, who must be able to read the layer.
chmod -R a+rX "$scratch/upper"

cd "$ROOT"
# `envoy` on PATH is the one named above, whatever its file is called.
mkdir -p "$scratch/bin"
ln -s "$envoy_bin" "$scratch/bin/envoy"
export PATH="$scratch/bin:$PATH"
unshare --user --map-root-user --mount --propagation private -- sh -c '
  mount -t overlay overlay -o "lowerdir=/etc,upperdir=$1,workdir=$2" /etc || exit 2
  shift 2
  exec "$@"
' sh "$scratch/upper" "$scratch/work" "$@"
