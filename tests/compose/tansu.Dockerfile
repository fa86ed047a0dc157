# Tansu laid out as its official image is (/tansu, entrypoint the binary, /data), from the
# binary scripts/setup.sh installs.
ARG BASE
FROM ${BASE}
COPY tansu /tansu
RUN mkdir -p /data
ENTRYPOINT ["/tansu"]
CMD ["broker"]
