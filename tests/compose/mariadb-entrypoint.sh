#!/bin/sh
# The docker compose test's MariaDB image, built from Debian's mariadb-server: honours the
# variables of the official image that docker-compose.yml sets (MARIADB_DATABASE,
# MARIADB_USER, MARIADB_PASSWORD), so the stack runs unchanged on either image.
set -eu
datadir=/var/lib/mysql
mkdir -p /run/mysqld
chown mysql:mysql /run/mysqld "$datadir"
if [ ! -e "$datadir/.seckill-initialised" ]; then
  if [ ! -d "$datadir/mysql" ]; then
    mariadb-install-db --user=mysql --datadir="$datadir" --skip-test-db >/dev/null
  fi
  # A first start without networking, as the official image does, so nothing connects
  # before the account exists.
  mariadbd --user=mysql --datadir="$datadir" --skip-networking --socket=/run/mysqld/init.sock &
  pid=$!
  i=0
  until mariadb-admin --socket=/run/mysqld/init.sock ping >/dev/null 2>&1; do
    i=$((i + 1))
    [ "$i" -lt 300 ] || { echo "mariadb did not start for initialisation" >&2; exit 1; }
    sleep 0.1
  done
  mariadb --socket=/run/mysqld/init.sock -u root <<SQL
CREATE DATABASE IF NOT EXISTS \`$MARIADB_DATABASE\`;
CREATE USER IF NOT EXISTS '$MARIADB_USER'@'%' IDENTIFIED BY '$MARIADB_PASSWORD';
GRANT ALL PRIVILEGES ON \`$MARIADB_DATABASE\`.* TO '$MARIADB_USER'@'%';
FLUSH PRIVILEGES;
SQL
  mariadb-admin --socket=/run/mysqld/init.sock -u root shutdown
  wait "$pid" || true
  touch "$datadir/.seckill-initialised"
fi
exec "$@" --user=mysql --datadir="$datadir" --bind-address=0.0.0.0
