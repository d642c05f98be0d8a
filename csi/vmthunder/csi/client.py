"""A client of the driver's socket, as kubelet or external-provisioner would call it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

from vmthunder.csi.proto import csi_pb2_grpc


@dataclass(frozen=True)
class Client:
    channel: grpc.Channel
    identity: Any  # the generated stubs are untyped; requests and replies are typed messages
    controller: Any
    node: Any

    def close(self) -> None:
        self.channel.close()


def connect(endpoint: str) -> Client:
    """`endpoint` is unix:///path, as the driver's --endpoint."""
    channel = grpc.insecure_channel(endpoint)
    return Client(
        channel,
        csi_pb2_grpc.IdentityStub(channel),  # type: ignore[no-untyped-call]
        csi_pb2_grpc.ControllerStub(channel),  # type: ignore[no-untyped-call]
        csi_pb2_grpc.NodeStub(channel),  # type: ignore[no-untyped-call]
    )
