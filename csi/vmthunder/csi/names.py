"""Names the driver derives: volume ids, kernel device names, topology, labels."""

from __future__ import annotations

import hashlib
import re
from typing import Final

DRIVER_NAME: Final = "csi.vmthunder.io"
DRIVER_VERSION: Final = "0.1.0"
TOPOLOGY_KEY: Final = "topology.vmthunder.io/node"

GROUP: Final = "vmthunder.io"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
IMAGE_CACHES: Final = "imagecaches"
IMAGE_REPLICAS: Final = "imagereplicas"
IMAGE_VOLUMES: Final = "imagevolumes"
LABEL_IMAGE_CACHE: Final = "vmthunder.io/image-cache"
LABEL_NODE: Final = "vmthunder.io/node"
# Held by the node plugin while the volume's copy-on-write data exists on its node.
FINALIZER_COW_DATA: Final = "vmthunder.io/cow-data"

PARAM_IMAGE_CACHE: Final = "imageCache"
# external-provisioner's own keys (csi.storage.k8s.io/fstype ...) reach us in some setups.
PARAM_RESERVED_PREFIX: Final = "csi.storage.k8s.io/"

# Replica phases in which the image device is usable (the node reads through to its parent
# until hydrated; a VM need not wait for hydration).
USABLE_REPLICA_PHASES: Final = frozenset({"Attached", "Hydrating", "Hydrated", "Detached"})

_VOLUME_ID = re.compile(r"^[0-9a-f]{32}$")


def volume_id_for(request_name: str) -> str:
    """Deterministic in the CreateVolume name, so a retried request finds its volume."""
    return hashlib.sha256(request_name.encode()).hexdigest()[:32]


def is_volume_id(value: str) -> bool:
    return _VOLUME_ID.match(value) is not None


def replica_name(image_cache: str, node: str) -> str:
    return f"{image_cache}.{node}"


def image_device_name(image_cache: str) -> str:
    """The node agent's device for an image (dm-clone over the parent's export)."""
    return f"vmt-{image_cache}"


def volume_device_name(volume_id: str) -> str:
    return f"vmt-vol-{volume_id}"
