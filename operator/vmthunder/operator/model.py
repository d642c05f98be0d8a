"""The custom resources' names and the typed facts the operator plans from."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from vmthunder.kube import custom_path, parse_time
from vmthunder.operator.planner import ORIGIN

GROUP: Final = "vmthunder.io"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
IMAGE_CACHES: Final = "imagecaches"
IMAGE_REPLICAS: Final = "imagereplicas"
IMAGE_VOLUMES: Final = "imagevolumes"


def resource_path(plural: str, name: str | None = None, subresource: str | None = None) -> str:
    """The REST path of our resources' collection, one of them, or its subresource."""
    return custom_path(GROUP, VERSION, plural, name, subresource)


LABEL_IMAGE_CACHE: Final = "vmthunder.io/image-cache"
LABEL_NODE: Final = "vmthunder.io/node"
# The replica's parent node ("" under the origin): an agent watches its children by it instead
# of every replica in the cluster, and the replicas of an older operator, without it, apart.
LABEL_PARENT: Final = "vmthunder.io/parent"

# Phases of a replica, in the order a node goes through them.
REPLICA_PHASES: Final = (
    "Pending", "Attaching", "Prefetching", "Attached", "Hydrating", "Hydrated", "Detached",
    "Failed",
)
HYDRATED_PHASES: Final = frozenset({"Hydrated", "Detached"})
# Volumes may start: the image device exists and the boot profile's regions are local (or no
# longer waited for). A node reads through to its parent until hydrated.
USABLE_REPLICA_PHASES: Final = frozenset({"Attached", "Hydrating", "Hydrated", "Detached"})
# The image device exists; while Prefetching, volumes are built but their VMs wait, so the
# boot reads find the boot set local instead of racing the prefetch up the tree.
ATTACHED_REPLICA_PHASES: Final = USABLE_REPLICA_PHASES | {"Prefetching"}
# A replica's condition: False while its node has no room for the cache and passes reads
# through to its parent (it then takes no children).
CACHE_CONDITION: Final = "Cached"


def replica_name(image_cache: str, node: str) -> str:
    """One replica per image and node; both are DNS subdomains, so the dot join is one too."""
    return f"{image_cache}.{node}"


@dataclass(frozen=True)
class CacheSpec:
    """The parts of an ImageCache's spec the operator plans from."""

    fanout: int = 4
    origin_fanout: int | None = None
    node_selector: Mapping[str, str] | None = None  # None: no pre-warming, volumes only
    topology_key: str = "topology.kubernetes.io/zone"
    size_bytes: int = 0  # 0: not given, a node finds it

    @staticmethod
    def from_spec(spec: Mapping[str, Any]) -> CacheSpec:
        selector = spec.get("nodeSelector")
        return CacheSpec(
            fanout=int(spec.get("fanout", 4)),
            origin_fanout=spec.get("originFanout"),
            node_selector=dict(selector) if selector is not None else None,
            topology_key=str(spec.get("topologyKey", "topology.kubernetes.io/zone")),
            size_bytes=int(spec.get("sizeBytes") or 0),
        )


@dataclass(frozen=True)
class NodeFacts:
    name: str
    ready: bool
    labels: Mapping[str, str] = field(default_factory=dict)

    @staticmethod
    def from_object(obj: Mapping[str, Any]) -> NodeFacts:
        meta, status = obj["metadata"], obj.get("status") or {}
        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in status.get("conditions") or []
        )
        return NodeFacts(meta["name"], ready, dict(meta.get("labels") or {}))


@dataclass(frozen=True)
class ReplicaFacts:
    name: str
    image_cache: str
    node: str
    parent: str
    depth: int
    phase: str = "Pending"
    heartbeat: datetime | None = None
    bytes_from_parent: int = 0
    hydrated_regions: int = 0
    total_regions: int = 0
    parent_lost: bool = False  # its session to its parent carries no I/O
    caching: bool = True  # False: no room for its cache, it passes reads through (a leaf)
    image_size: int = 0  # the image's size as its node found it (0: not yet)
    labeled: bool = True  # carries its parent's LABEL_PARENT (an older operator's does not)
    hold_until: datetime | None = None  # while Prefetching: until when its volumes wait

    @property
    def hydrated(self) -> bool:
        return self.phase in HYDRATED_PHASES

    @staticmethod
    def from_dict(obj: Mapping[str, Any]) -> ReplicaFacts:
        spec, status = obj.get("spec") or {}, obj.get("status") or {}
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return ReplicaFacts(
            name=obj["metadata"]["name"],
            image_cache=str(spec.get("imageCache", "")),
            node=str(spec.get("node", "")),
            parent=str(spec.get("parent", "")),
            depth=int(spec.get("depth", 0)),
            phase=str(status.get("phase", "Pending")),
            heartbeat=parse_time(status.get("heartbeat")),
            bytes_from_parent=int(status.get("bytesFromParent", 0)),
            hydrated_regions=int(status.get("hydratedRegions", 0)),
            total_regions=int(status.get("totalRegions", 0)),
            parent_lost=bool(status.get("parentLostAt")),
            caching=not any(c.get("type") == CACHE_CONDITION and c.get("status") == "False"
                            for c in status.get("conditions") or ()),
            image_size=int(status.get("imageSizeBytes") or 0),
            labeled=labels.get(LABEL_PARENT) == parent_label(str(spec.get("parent", ""))),
            hold_until=parse_time(status.get("holdUntil")),
        )


def parent_label(parent: str) -> str:
    """LABEL_PARENT's value for a replica under `parent`: the node's name, "" under the origin
    (ORIGIN is no valid label value)."""
    return "" if parent == ORIGIN else parent


def ready_for_vms(status: Mapping[str, Any] | None, now: datetime) -> bool:
    """Whether VMs may start on a replica with this status: usable, or Prefetching past the
    hold's deadline (status.holdUntil). The agent ends the hold itself; the deadline in the
    status is for an agent that died or hung holding: its node's volumes wait no longer."""
    if status is None:
        return False
    phase = status.get("phase", "Pending")
    if phase in USABLE_REPLICA_PHASES:
        return True
    until = parse_time(status.get("holdUntil"))  # not a time: held
    return phase == "Prefetching" and until is not None and now >= until


@dataclass(frozen=True)
class VolumeFacts:
    name: str
    image_cache: str
    node: str

    @staticmethod
    def from_dict(obj: Mapping[str, Any]) -> VolumeFacts:
        spec = obj.get("spec") or {}
        return VolumeFacts(obj["metadata"]["name"], str(spec.get("imageCache", "")),
                           str(spec.get("node", "")))
