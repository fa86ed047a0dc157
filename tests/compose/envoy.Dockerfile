# Envoy from the PyPI package scripts/setup.sh installs, on the path as in the official image.
ARG BASE
FROM ${BASE}
COPY envoy /usr/local/bin/envoy
