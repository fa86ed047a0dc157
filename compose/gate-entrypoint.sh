#!/bin/sh
# Starts the gate's Envoy: puts the deduct timeout into the filter's configuration (in a file
# only this container sees), then runs Envoy in this process. The syncer's edge credential is
# NOT put into the configuration (Envoy's admin /config_dump prints it): the filter reads
# SECKILL_EDGE_SECRET from Envoy's environment (compose/envoy.yaml: host_env_keys).
set -eu
: "${SECKILL_EDGE_SECRET:?SECKILL_EDGE_SECRET is not set}"
# The syncer refuses a credential it cannot use; say so here too, before Envoy starts.
case "$SECKILL_EDGE_SECRET" in
  *[!A-Za-z0-9._~+/=-]*)
    echo "SECKILL_EDGE_SECRET may hold only letters, digits and . _ ~ + / = -" >&2; exit 1 ;;
esac
if [ "${#SECKILL_EDGE_SECRET}" -lt 16 ]; then
  echo "SECKILL_EDGE_SECRET must be at least 16 characters long" >&2; exit 1
fi
# How long the gate waits for the syncer (filter/README.md: deduct.timeout_ms, 1 to 10000).
timeout_ms="${SECKILL_DEDUCT_TIMEOUT_MS:-300}"
case "$timeout_ms" in
  ''|*[!0-9]*) echo "SECKILL_DEDUCT_TIMEOUT_MS must be a number of milliseconds" >&2; exit 1 ;;
esac
rendered=/tmp/seckill-envoy.yaml
sed -e "s|@SECKILL_DEDUCT_TIMEOUT_MS@|$timeout_ms|" /etc/seckill/envoy.yaml > "$rendered"
exec envoy -c "$rendered" --log-level "${SECKILL_ENVOY_LOG_LEVEL:-warn}" \
  --concurrency "${SECKILL_ENVOY_CONCURRENCY:-2}"
