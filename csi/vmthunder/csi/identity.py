"""CSI Identity service: who the plugin is, what it offers, and whether it is ready."""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc
from google.protobuf import wrappers_pb2

from vmthunder.csi.names import DRIVER_NAME, DRIVER_VERSION
from vmthunder.csi.proto import csi_pb2, csi_pb2_grpc

Service = csi_pb2.PluginCapability.Service
Expansion = csi_pb2.PluginCapability.VolumeExpansion
log = logging.getLogger(__name__)


class IdentityService(csi_pb2_grpc.IdentityServicer):
    def __init__(self, controller: bool, readiness: Callable[[], str | None]) -> None:
        """`readiness` returns None when ready, else why not (logged, not sent)."""
        self.controller = controller
        self.readiness = readiness

    def GetPluginInfo(
        self, request: csi_pb2.GetPluginInfoRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetPluginInfoResponse:
        return csi_pb2.GetPluginInfoResponse(name=DRIVER_NAME, vendor_version=DRIVER_VERSION)

    def GetPluginCapabilities(
        self, request: csi_pb2.GetPluginCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetPluginCapabilitiesResponse:
        caps = [
            csi_pb2.PluginCapability(
                service=Service(type=Service.VOLUME_ACCESSIBILITY_CONSTRAINTS)),
            # The COW device's tables reload under a mounted or running VM's disk.
            csi_pb2.PluginCapability(volume_expansion=Expansion(type=Expansion.ONLINE)),
        ]
        if self.controller:
            caps.insert(0, csi_pb2.PluginCapability(
                service=Service(type=Service.CONTROLLER_SERVICE)))
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=caps)

    def Probe(
        self, request: csi_pb2.ProbeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ProbeResponse:
        problem = self.readiness()
        if problem:
            log.warning("probe: not ready: %s", problem)
        return csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=problem is None))
