# The `gate` stage of filter/Dockerfile, with the wasm this workspace already built.
ARG ENVOY_IMAGE
FROM ${ENVOY_IMAGE}
COPY seckill_filter.wasm /etc/envoy/seckill_filter.wasm
