# syntax=docker/dockerfile:1.7
# check=error=true;experimental=all
# One image for every VMThunder role: `vmthunder operator`, `vmthunder csi`, `vmthunder agent`.
#   docker build -t ghcr.io/vmthunder/vmthunder:0.1.0 .
# The operator and the CSI controller run as the image's user (10001); the node pod runs as
# root and privileged (the chart says so), because it drives iSCSI, device-mapper and LIO.
# Debian's own python3 (3.11, as the project pins) so Debian's rtslib-fb serves the agent.

# DEBIAN is the tag of the Debian base image of every Python stage.
ARG DEBIAN=bookworm-slim
ARG CSI_SPEC_VERSION=1.13.0
ARG GO_VERSION=1.26

# The Go module proxy checks the spec module against the Go checksum database.

# csi-spec holds the CSI spec's csi.proto, from the Go module proxy.
FROM golang:${GO_VERSION}-bookworm AS csi-spec
ARG CSI_SPEC_VERSION
ENV GOFLAGS=-mod=mod GOTOOLCHAIN=local
RUN go mod download -json "github.com/container-storage-interface/spec@v${CSI_SPEC_VERSION}" \
      > /tmp/spec.json \
 && cp "$(go env GOMODCACHE)/github.com/container-storage-interface/spec@v${CSI_SPEC_VERSION}/csi.proto" \
      /csi.proto

FROM debian:${DEBIAN} AS python
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*

# The CSI stubs are not in the repository: the project's own script makes them from the spec.

# build installs the project, its pinned dependencies and the generated CSI stubs in a venv.
FROM python AS build
WORKDIR /src
RUN python3 -m venv /opt/build && /opt/build/bin/pip install --no-cache-dir grpcio-tools==1.85.1
COPY pyproject.toml ./
COPY scripts/gen-csi-stubs.sh scripts/
COPY operator/ operator/
COPY csi/ csi/
COPY node/ node/
COPY lab/ lab/
COPY --from=csi-spec /csi.proto /cache/csi-spec/csi.proto
RUN VMT_CACHE=/cache scripts/gen-csi-stubs.sh /opt/build/bin/python \
 && test -f csi/vmthunder/csi/proto/csi_pb2_grpc.py
# .dockerignore leaves .gitignore out, so hatchling packs the generated stubs it would skip.
RUN python3 -m venv /opt/vmthunder \
 && /opt/vmthunder/bin/pip install --no-cache-dir . \
 && /opt/vmthunder/bin/python -c "import vmthunder.csi.proto.csi_pb2_grpc, vmthunder.cli"

FROM python AS runtime
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="vmthunder" \
      org.opencontainers.image.description="VMThunder: fast bulk VM provisioning for KubeVirt (operator, CSI driver, node agent)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# The node's tools: open-iscsi (initiator), dmsetup and thin tools (device-mapper), kmod
# (modprobe), util-linux (losetup, blockdev, mount), filesystems for Mount-mode volumes, and
# rtslib-fb for the LIO export.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      open-iscsi dmsetup thin-provisioning-tools kmod util-linux e2fsprogs xfsprogs \
      python3-rtslib-fb ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 vmthunder \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin vmthunder
COPY --from=build /opt/vmthunder /opt/vmthunder
ENV PATH=/opt/vmthunder/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
ENTRYPOINT ["vmthunder"]
CMD ["--help"]
