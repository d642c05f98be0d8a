"""Volume state in the API server: ImageVolumes (the driver's only records), and the
ImageCaches, ImageReplicas and Nodes the driver reads. No private database."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from vmthunder.csi.names import (
    API_VERSION,
    FINALIZER_COW_DATA,
    IMAGE_CACHES,
    IMAGE_REPLICAS,
    IMAGE_VOLUMES,
    LABEL_IMAGE_CACHE,
    LABEL_NODE,
    is_object_name,
    replica_name,
    resource_path,
)
from vmthunder.kube import ApiError, Obj, Rest, core_path


def phase_of(status: Mapping[str, Any] | None) -> str | None:
    """A replica's phase from its status (replica_status's); None: no replica."""
    return None if status is None else str(status.get("phase", "Pending"))


@dataclass(frozen=True)
class Volume:
    """An ImageVolume: one CSI volume, a copy-on-write disk of an image on one node."""

    volume_id: str
    csi_name: str
    image_cache: str
    node: str
    capacity_bytes: int
    access_type: str  # "Block" or "Mount"
    fs_type: str = ""
    parameters: Mapping[str, str] = field(default_factory=dict)
    deleting: bool = False
    finalizers: tuple[str, ...] = ()
    phase: str = "Pending"

    @staticmethod
    def from_object(obj: Mapping[str, Any]) -> Volume:
        meta, spec = obj["metadata"], obj.get("spec", {})
        return Volume(
            volume_id=meta["name"],
            csi_name=str(spec.get("csiName", "")),
            image_cache=str(spec["imageCache"]),
            node=str(spec["node"]),
            capacity_bytes=int(spec["capacityBytes"]),
            access_type=str(spec.get("accessType", "Block")),
            fs_type=str(spec.get("fsType", "")),
            parameters=dict(spec.get("parameters") or {}),
            deleting=meta.get("deletionTimestamp") is not None,
            finalizers=tuple(meta.get("finalizers") or ()),
            phase=str((obj.get("status") or {}).get("phase", "Pending")),
        )

    def to_object(self) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "imageCache": self.image_cache,
            "node": self.node,
            "capacityBytes": self.capacity_bytes,
            "csiName": self.csi_name,
            "accessType": self.access_type,
            "parameters": dict(self.parameters),
        }
        if self.fs_type:
            spec["fsType"] = self.fs_type
        return {
            "apiVersion": API_VERSION,
            "kind": "ImageVolume",
            "metadata": {
                "name": self.volume_id,
                "labels": {LABEL_IMAGE_CACHE: self.image_cache, LABEL_NODE: self.node},
            },
            "spec": spec,
        }


@dataclass(frozen=True)
class Image:
    name: str
    size_bytes: int | None  # None until the origin's size is known


@dataclass(frozen=True)
class NodeInfo:
    name: str
    ready: bool


class KubeState:
    """Typed reads and writes of the driver's objects. Not found reads return None."""

    def __init__(self, rest: Rest) -> None:
        self.rest = rest

    # --- reachability ---

    def reachable(self) -> bool:
        try:
            self.rest.get("/version", timeout=5)
        except Exception:
            return False
        return True

    # --- ImageVolumes ---

    def get_volume(self, volume_id: str) -> Volume | None:
        obj = self._get(IMAGE_VOLUMES, volume_id)
        return Volume.from_object(obj) if obj is not None else None

    def create_volume(self, volume: Volume) -> bool:
        """Creates the ImageVolume; False if one of that name exists already."""
        try:
            self.rest.create(resource_path(IMAGE_VOLUMES), volume.to_object())
        except ApiError as e:
            if e.status == 409:
                return False
            raise
        return True

    def list_volumes(self, node: str | None = None) -> list[Volume]:
        selector = f"{LABEL_NODE}={node}" if node else ""
        result = self.rest.get(resource_path(IMAGE_VOLUMES), {"labelSelector": selector})
        return [Volume.from_object(obj) for obj in result.get("items", [])]

    def watch_volumes(self, node: str, timeout_seconds: int) -> Iterator[tuple[str, Volume]]:
        """(event type, volume) for the node's ImageVolumes until the server ends the watch."""
        for event in self.rest.watch(resource_path(IMAGE_VOLUMES), timeout_seconds,
                                     {"labelSelector": f"{LABEL_NODE}={node}"}):
            obj = event.get("object")
            if isinstance(obj, dict) and obj.get("kind") == "ImageVolume":
                yield str(event["type"]), Volume.from_object(obj)

    def delete_volume(self, volume_id: str) -> None:
        if not is_object_name(volume_id):
            return  # no such object can exist (and "." would name the collection)
        try:
            self.rest.delete(resource_path(IMAGE_VOLUMES, volume_id))
        except ApiError as e:
            if e.status != 404:
                raise

    def set_capacity(self, volume_id: str, capacity_bytes: int) -> None:
        self.rest.patch(resource_path(IMAGE_VOLUMES, volume_id),
                        {"spec": {"capacityBytes": capacity_bytes}})

    def set_phase(self, volume_id: str, phase: str, message: str = "") -> None:
        """Best effort: the phase is for humans (kubectl get iv), nothing decides on it."""
        try:
            self.rest.patch(resource_path(IMAGE_VOLUMES, volume_id, "status"),
                            {"status": {"phase": phase, "message": message}})
        except ApiError as e:
            if e.status != 404:
                raise

    def add_finalizer(self, volume_id: str) -> None:
        self._update_finalizers(volume_id, lambda f: f if FINALIZER_COW_DATA in f
                                else [*f, FINALIZER_COW_DATA])

    def remove_finalizer(self, volume_id: str) -> None:
        self._update_finalizers(volume_id, lambda f: [x for x in f if x != FINALIZER_COW_DATA])

    def _update_finalizers(self, volume_id: str, change: Callable[[list[str]], list[str]]) -> None:
        # Read-modify-write with the resourceVersion: finalizers are a list other writers share.
        for _ in range(5):
            obj = self._get(IMAGE_VOLUMES, volume_id)
            if obj is None:
                return
            current = list(obj["metadata"].get("finalizers") or [])
            wanted = change(current)
            if wanted == current:
                return
            patch = {"metadata": {"finalizers": wanted,
                                  "resourceVersion": obj["metadata"]["resourceVersion"]}}
            try:
                self.rest.patch(resource_path(IMAGE_VOLUMES, volume_id), patch)
                return
            except ApiError as e:
                if e.status == 404:
                    return
                if e.status != 409:
                    raise
        raise RuntimeError(f"finalizers of ImageVolume {volume_id}: too many conflicts")

    # --- ImageCaches, ImageReplicas, Nodes ---

    def get_image(self, name: str) -> Image | None:
        obj = self._get(IMAGE_CACHES, name)
        if obj is None:
            return None
        size = (obj.get("status") or {}).get("imageSizeBytes") or obj["spec"].get("sizeBytes")
        return Image(name, int(size) if size else None)

    def replica_phase(self, image_cache: str, node: str) -> str | None:
        """The phase of the node's replica of the image; None if the replica does not exist."""
        return phase_of(self.replica_status(image_cache, node))

    def replica_status(self, image_cache: str, node: str) -> dict[str, Any] | None:
        """The status of the node's replica of the image ({} before the agent's first report);
        None if the replica does not exist."""
        obj = self._get(IMAGE_REPLICAS, replica_name(image_cache, node))
        return None if obj is None else dict(obj.get("status") or {})

    def wait_replica(self, image_cache: str, node: str,
                     until: Callable[[dict[str, Any] | None], bool], timeout: float,
                     recheck: float | None = None) -> tuple[bool, dict[str, Any] | None]:
        """Waits until `until(status)` holds for the node's replica of the image (status as
        replica_status gives it), on a watch of that one object: a wait of minutes costs no
        polling (a TCG guest's CPU is what its neighbours' boots run on). With `recheck`,
        `until` is asked that often with no change too, for conditions that hold by time.
        Returns whether it held, and the last status seen."""
        name = replica_name(image_cache, node)
        deadline = time.monotonic() + timeout
        status = self.replica_status(image_cache, node)
        while not until(status):
            left = deadline - time.monotonic()
            if left <= 0 or not is_object_name(name):
                return False, status
            events = self.rest.watch(  # with no resourceVersion: first the object as it is
                resource_path(IMAGE_REPLICAS), max(1, int(min(left, recheck or left))),
                {"fieldSelector": f"metadata.name={name}"})
            try:
                for event in events:
                    obj = event.get("object")
                    if not isinstance(obj, dict) or obj.get("kind") != "ImageReplica":
                        continue  # not the replica (an error raises ApiError: see below)
                    status = (None if event["type"] == "DELETED"
                              else dict(obj.get("status") or {}))
                    if until(status):
                        return True, status
            except ApiError:
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            finally:
                events.close()
        return True, status

    def replica_phases(self, image_cache: str) -> dict[str, str]:
        """node -> phase for every replica of the image."""
        result = self.rest.get(resource_path(IMAGE_REPLICAS),
                               {"labelSelector": f"{LABEL_IMAGE_CACHE}={image_cache}"})
        return {
            str(obj["spec"]["node"]): str((obj.get("status") or {}).get("phase", "Pending"))
            for obj in result.get("items", [])
        }

    def node(self, name: str) -> NodeInfo | None:
        if not is_object_name(name):
            return None
        node = self.rest.find(core_path("nodes", name))
        return None if node is None else _node_info(node)

    def nodes(self) -> dict[str, NodeInfo]:
        infos = (_node_info(n) for n in self.rest.get(core_path("nodes")).get("items", []))
        return {info.name: info for info in infos}

    def _get(self, plural: str, name: str) -> dict[str, Any] | None:
        """The object, or None if it does not exist or `name` cannot name one (a request's
        id or parameter is no API path: "." would read the whole list)."""
        if not is_object_name(name):
            return None
        return self.rest.find(resource_path(plural, name))


def _node_info(node: Obj) -> NodeInfo:
    conditions = (node.get("status") or {}).get("conditions") or []
    return NodeInfo(str(node["metadata"]["name"]), any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in conditions))


def wait_for(check: Callable[[], bool], timeout: float, interval: float = 0.25) -> bool:
    """Polls `check` until it is true or `timeout` seconds pass; True if it became true."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
