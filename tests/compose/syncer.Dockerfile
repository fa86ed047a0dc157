# The runtime stage of syncer/Dockerfile, with the binary this workspace already built.
ARG BASE
FROM ${BASE}
COPY seckill-syncer /usr/local/bin/seckill-syncer
USER 65534:65534
ENTRYPOINT ["seckill-syncer"]
CMD ["serve", "--pipeline"]
