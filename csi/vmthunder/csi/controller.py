"""CSI Controller service: ImageVolumes in the API server, placed on one node each.

CreateVolume learns the node from the topology requirement (WaitForFirstConsumer puts the
scheduled node first in `preferred`), records the ImageVolume, and waits until the operator
has planned that node's ImageReplica, so the node joins the image's tree before the pod
needs it. The plan_* functions are pure; the servicer does the I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

import grpc

from vmthunder.csi import capabilities
from vmthunder.csi.errors import CsiError, invalid, not_found
from vmthunder.csi.kube import KubeState, NodeInfo, Volume, wait_for
from vmthunder.csi.names import (
    ATTACHED_REPLICA_PHASES,
    PARAM_IMAGE_CACHE,
    PARAM_RESERVED_PREFIX,
    TOPOLOGY_KEY,
    is_volume_id,
    volume_id_for,
)
from vmthunder.csi.proto import csi_pb2, csi_pb2_grpc

SECTOR: Final = 512
# Beyond this a request is a typo, not a disk (a sparse COW file could go further).
MAX_CAPACITY: Final = 1 << 50
KNOWN_PARAMETERS: Final = frozenset({PARAM_IMAGE_CACHE})

RPC = csi_pb2.ControllerServiceCapability.RPC


# --- pure planning --------------------------------------------------------------------------

def plan_capacity(required: int, limit: int, image_size: int) -> int:
    """The volume's size: at least the image (a COW disk cannot be smaller than its origin)
    and the request, rounded up to a sector, within the limit."""
    if required < 0 or limit < 0:
        raise invalid("capacity_range bytes must not be negative")
    if limit and required > limit:
        raise invalid(f"required_bytes {required} exceed limit_bytes {limit}")
    size = -(-max(required, image_size) // SECTOR) * SECTOR
    if limit and size > limit:
        raise CsiError(grpc.StatusCode.OUT_OF_RANGE,
                       f"the volume needs {size} bytes, more than limit_bytes {limit}")
    if size > MAX_CAPACITY:
        raise CsiError(grpc.StatusCode.OUT_OF_RANGE, f"{size} bytes exceed {MAX_CAPACITY}")
    return size


def topology_nodes(topologies: Sequence[csi_pb2.Topology]) -> list[str]:
    """The nodes named by topology segments, in order (segments without our key name none)."""
    nodes: list[str] = []
    for topology in topologies:
        node = topology.segments.get(TOPOLOGY_KEY)
        if node and node not in nodes:
            nodes.append(node)
    return nodes


def plan_node(
    preferred: Sequence[str],
    requisite: Sequence[str],
    nodes: Mapping[str, NodeInfo],
    replica_phases: Mapping[str, str],
    volume_counts: Mapping[str, int],
) -> str | None:
    """Where a new volume lives. The CO's preference wins (with WaitForFirstConsumer it is
    the node the pod is scheduled to); with no preference, the ready node that already holds
    an attached replica of the image (its cache built), then one that has a replica at all,
    then the least busy."""
    allowed = set(requisite) if requisite else None
    for name in preferred:
        if name in nodes and (allowed is None or name in allowed):
            return name

    def rank(name: str) -> tuple[int, int, str]:
        phase = replica_phases.get(name)
        warmth = 0 if phase in ATTACHED_REPLICA_PHASES else 1 if phase is not None else 2
        return warmth, volume_counts.get(name, 0), name

    candidates = [
        name for name, info in nodes.items()
        if (allowed is None and info.ready) or (allowed is not None and name in allowed)
    ]
    return min(candidates, key=rank) if candidates else None


def incompatibility(
    existing: Volume, csi_name: str, image_cache: str, required: int, limit: int,
    requisite: Sequence[str],
) -> str | None:
    """Why an existing volume of the same name does not answer this request (AlreadyExists)."""
    if existing.csi_name != csi_name:
        return f"volume id {existing.volume_id} belongs to request name {existing.csi_name!r}"
    if existing.image_cache != image_cache:
        return f"volume exists with imageCache {existing.image_cache!r}"
    if existing.capacity_bytes < required or (limit and existing.capacity_bytes > limit):
        return f"volume exists with capacity {existing.capacity_bytes} bytes"
    if requisite and existing.node not in requisite:
        return f"volume exists on node {existing.node}, outside the requisite topology"
    return None


def plan_page(volume_ids: Sequence[str], starting_token: str, max_entries: int
              ) -> tuple[list[str], str]:
    """One page of ListVolumes over sorted ids; the token is the first id of the next page,
    so deleting listed volumes between pages does not shift the next page."""
    if max_entries < 0:
        raise invalid("max_entries must not be negative")
    if starting_token and not is_volume_id(starting_token):
        raise CsiError(grpc.StatusCode.ABORTED, f"starting_token {starting_token!r} is invalid")
    ids = sorted(volume_ids)
    start = next((i for i, v in enumerate(ids) if v >= starting_token), len(ids))
    end = len(ids) if max_entries == 0 else min(len(ids), start + max_entries)
    return ids[start:end], ids[end] if end < len(ids) else ""


def volume_message(volume: Volume) -> csi_pb2.Volume:
    return csi_pb2.Volume(
        volume_id=volume.volume_id,
        capacity_bytes=volume.capacity_bytes,
        volume_context={PARAM_IMAGE_CACHE: volume.image_cache},
        accessible_topology=[csi_pb2.Topology(segments={TOPOLOGY_KEY: volume.node})],
    )


# --- the service ----------------------------------------------------------------------------

class ControllerService(csi_pb2_grpc.ControllerServicer):
    def __init__(self, state: KubeState, replica_wait: float = 30.0) -> None:
        self.state = state
        self.replica_wait = replica_wait

    def ControllerGetCapabilities(
        self, request: csi_pb2.ControllerGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerGetCapabilitiesResponse:
        return csi_pb2.ControllerGetCapabilitiesResponse(capabilities=[
            csi_pb2.ControllerServiceCapability(rpc=RPC(type=t))
            for t in (RPC.CREATE_DELETE_VOLUME, RPC.LIST_VOLUMES, RPC.EXPAND_VOLUME)
        ])

    def CreateVolume(
        self, request: csi_pb2.CreateVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.CreateVolumeResponse:
        if not request.name:
            raise invalid("name is required")
        capabilities.require_all(request.volume_capabilities)
        image_cache = request.parameters.get(PARAM_IMAGE_CACHE, "")
        if not image_cache:
            raise invalid(f"parameter {PARAM_IMAGE_CACHE} (the ImageCache's name) is required")
        unknown = sorted(k for k in request.parameters
                         if k not in KNOWN_PARAMETERS and not k.startswith(PARAM_RESERVED_PREFIX))
        if unknown:
            raise invalid(f"unknown parameters {unknown}")
        if request.HasField("volume_content_source"):
            raise invalid("volume content sources (snapshots, clones) are not supported")
        if request.mutable_parameters:
            raise invalid("mutable parameters are not supported")
        required = request.capacity_range.required_bytes
        limit = request.capacity_range.limit_bytes
        if required < 0 or limit < 0 or (limit and required > limit):
            plan_capacity(required, limit, 0)  # raises the matching error
        reqs = request.accessibility_requirements
        preferred, requisite = topology_nodes(reqs.preferred), topology_nodes(reqs.requisite)
        if (reqs.preferred or reqs.requisite) and not (preferred or requisite):
            raise invalid(f"topology requirements name no {TOPOLOGY_KEY} segment")

        volume_id = volume_id_for(request.name)
        existing = self.state.get_volume(volume_id)
        if existing is None:
            existing = self._create(request, volume_id, image_cache, required, limit,
                                    preferred, requisite)
        if existing.deleting:
            raise CsiError(grpc.StatusCode.ABORTED, f"volume {volume_id} is being deleted")
        reason = incompatibility(existing, request.name, image_cache, required, limit, requisite)
        if reason:
            raise CsiError(grpc.StatusCode.ALREADY_EXISTS, reason)
        self._wait_for_replica(existing)
        return csi_pb2.CreateVolumeResponse(volume=volume_message(existing))

    def _create(
        self, request: csi_pb2.CreateVolumeRequest, volume_id: str, image_cache: str,
        required: int, limit: int, preferred: list[str], requisite: list[str],
    ) -> Volume:
        image = self.state.get_image(image_cache)
        if image is None:
            raise not_found(f"ImageCache {image_cache!r} does not exist")
        if image.size_bytes is None:
            raise CsiError(grpc.StatusCode.UNAVAILABLE,
                           f"the size of ImageCache {image_cache!r} is not known yet")
        capacity = plan_capacity(required, limit, image.size_bytes)
        node = self._place(image_cache, preferred, requisite)
        if node is None:
            raise CsiError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           "no node satisfies the topology requirement")
        cap = request.volume_capabilities[0]
        volume = Volume(
            volume_id=volume_id, csi_name=request.name, image_cache=image_cache, node=node,
            capacity_bytes=capacity, access_type=capabilities.access_type(cap),
            fs_type=capabilities.fs_type(cap), parameters=dict(request.parameters),
        )
        if not self.state.create_volume(volume):  # a concurrent retry won the race
            raced = self.state.get_volume(volume_id)
            if raced is None:
                raise CsiError(grpc.StatusCode.ABORTED, f"volume {volume_id} vanished, retry")
            return raced
        return volume

    def _place(self, image_cache: str, preferred: list[str], requisite: list[str]
               ) -> str | None:
        # The common case (WaitForFirstConsumer) reads only the preferred nodes; listing every
        # node, replica and volume is for requests that leave the choice to us.
        known = {n: info for n in preferred if (info := self.state.node(n)) is not None}
        node = plan_node(preferred, requisite, known, {}, {})
        if node is not None and node in preferred:
            return node
        counts: dict[str, int] = {}
        for v in self.state.list_volumes():
            counts[v.node] = counts.get(v.node, 0) + 1
        return plan_node([], requisite, self.state.nodes(),
                         self.state.replica_phases(image_cache), counts)

    def _wait_for_replica(self, volume: Volume) -> None:
        """The operator plans a replica for every node that has a volume of the image."""
        if not wait_for(
            lambda: self.state.replica_phase(volume.image_cache, volume.node) is not None,
            self.replica_wait,
        ):
            raise CsiError(
                grpc.StatusCode.UNAVAILABLE,
                f"the operator has not planned a replica of {volume.image_cache} for node "
                f"{volume.node} within {self.replica_wait:.0f} s; retry",
            )

    def DeleteVolume(
        self, request: csi_pb2.DeleteVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.DeleteVolumeResponse:
        if not request.volume_id:
            raise invalid("volume_id is required")
        # The node plugin's finalizer keeps the record until the node has freed the data.
        self.state.delete_volume(request.volume_id)
        return csi_pb2.DeleteVolumeResponse()

    def ValidateVolumeCapabilities(
        self, request: csi_pb2.ValidateVolumeCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ValidateVolumeCapabilitiesResponse:
        if not request.volume_id:
            raise invalid("volume_id is required")
        if not request.volume_capabilities:
            raise invalid("volume_capabilities are required")
        volume = self.state.get_volume(request.volume_id)
        if volume is None or volume.deleting:
            raise not_found(f"volume {request.volume_id} does not exist")
        for cap in request.volume_capabilities:
            reason = capabilities.unsupported_reason(cap)
            if reason:
                return csi_pb2.ValidateVolumeCapabilitiesResponse(message=reason)
        image = request.parameters.get(PARAM_IMAGE_CACHE)
        if image is not None and image != volume.image_cache:
            return csi_pb2.ValidateVolumeCapabilitiesResponse(
                message=f"the volume is a disk of {volume.image_cache}, not {image}")
        return csi_pb2.ValidateVolumeCapabilitiesResponse(
            confirmed=csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed(
                volume_context=request.volume_context,
                volume_capabilities=request.volume_capabilities,
                parameters=request.parameters,
            )
        )

    def ListVolumes(
        self, request: csi_pb2.ListVolumesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ListVolumesResponse:
        volumes = {v.volume_id: v for v in self.state.list_volumes() if not v.deleting}
        page, next_token = plan_page(list(volumes), request.starting_token, request.max_entries)
        return csi_pb2.ListVolumesResponse(
            entries=[csi_pb2.ListVolumesResponse.Entry(volume=volume_message(volumes[v]))
                     for v in page],
            next_token=next_token,
        )

    def ControllerExpandVolume(
        self, request: csi_pb2.ControllerExpandVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerExpandVolumeResponse:
        if not request.volume_id:
            raise invalid("volume_id is required")
        if not request.HasField("capacity_range"):
            raise invalid("capacity_range is required")
        if request.HasField("volume_capability"):
            capabilities.require_one(request.volume_capability, True)
        volume = self.state.get_volume(request.volume_id)
        if volume is None or volume.deleting:
            raise not_found(f"volume {request.volume_id} does not exist")
        range_ = request.capacity_range
        capacity = plan_capacity(range_.required_bytes, range_.limit_bytes, volume.capacity_bytes)
        if capacity != volume.capacity_bytes:
            self.state.set_capacity(volume.volume_id, capacity)
        # The node reloads the COW device's tables (and grows a filesystem) to the new size.
        return csi_pb2.ControllerExpandVolumeResponse(
            capacity_bytes=capacity, node_expansion_required=True)
