# MariaDB from Debian's packages on the test's base (see tests/tests/compose.rs).
ARG BASE
FROM ${BASE}
COPY mariadb-entrypoint.sh /usr/local/bin/mariadb-entrypoint.sh
ENTRYPOINT ["/bin/sh", "/usr/local/bin/mariadb-entrypoint.sh"]
CMD ["mariadbd"]
