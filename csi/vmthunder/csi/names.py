"""Names the driver derives: volume ids, kernel device names, topology, labels."""

from __future__ import annotations

import hashlib
import re
from typing import Final

# The API's names are the operator's; the kernel's device names are the node agent's.
from vmthunder.node.names import cache_dev as image_device_name
from vmthunder.node.names import volume_dev as volume_device_name
from vmthunder.operator.model import (
    API_VERSION,
    ATTACHED_REPLICA_PHASES,
    GROUP,
    IMAGE_CACHES,
    IMAGE_REPLICAS,
    IMAGE_VOLUMES,
    LABEL_IMAGE_CACHE,
    LABEL_NODE,
    USABLE_REPLICA_PHASES,
    VERSION,
    ready_for_vms,
    replica_name,
    resource_path,
)

__all__ = [
    "API_VERSION", "ATTACHED_REPLICA_PHASES", "GROUP", "IMAGE_CACHES", "IMAGE_REPLICAS",
    "IMAGE_VOLUMES", "LABEL_IMAGE_CACHE", "LABEL_NODE", "USABLE_REPLICA_PHASES", "VERSION",
    "image_device_name", "ready_for_vms", "replica_name", "resource_path", "volume_device_name",
]

DRIVER_NAME: Final = "csi.vmthunder.io"
DRIVER_VERSION: Final = "0.1.0"
TOPOLOGY_KEY: Final = "topology.vmthunder.io/node"

# Held by the node plugin while the volume's copy-on-write data exists on its node.
FINALIZER_COW_DATA: Final = "vmthunder.io/cow-data"

PARAM_IMAGE_CACHE: Final = "imageCache"
# external-provisioner's own keys (csi.storage.k8s.io/fstype ...) reach us in some setups.
PARAM_RESERVED_PREFIX: Final = "csi.storage.k8s.io/"

_VOLUME_ID = re.compile(r"^[0-9a-f]{32}$")
_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_OBJECT_NAME = re.compile(rf"{_LABEL}(\.{_LABEL})*")


def volume_id_for(request_name: str) -> str:
    """Deterministic in the CreateVolume name, so a retried request finds its volume."""
    return hashlib.sha256(request_name.encode()).hexdigest()[:32]


def is_volume_id(value: str) -> bool:
    return _VOLUME_ID.match(value) is not None


def is_object_name(value: str) -> bool:
    """A DNS subdomain, the only name a cluster-scoped object or a Node can have. Anything
    else must not reach an API path: "." or ".." there names the whole collection."""
    return len(value) <= 253 and _OBJECT_NAME.fullmatch(value) is not None
