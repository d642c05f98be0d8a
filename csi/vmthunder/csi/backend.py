"""What the node service needs from the node: the image device, and per volume a
copy-on-write device over it. cow.py implements it with device-mapper."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class BackendError(Exception):
    """The node could not build, change or tear down a volume's device."""


class NotStaged(BackendError):
    """The volume has no device on this node."""


@dataclass(frozen=True)
class CowSpec:
    volume_id: str
    image_device: str  # the node agent's device holding the image, read-only for volumes
    capacity_bytes: int  # >= the image's size; the tail past the image reads as zeros


@dataclass(frozen=True)
class CowDevice:
    volume_id: str
    path: str  # a block device node, e.g. /dev/mapper/vmt-vol-<id>
    size_bytes: int
    healthy: bool = True
    message: str = ""


class NodeBackend(Protocol):
    def problem(self) -> str | None:
        """None when the backend can build devices, else why not."""

    def image_device(self, image_cache: str) -> str | None:
        """The image's device path once the node agent has built it, else None."""

    def stage(self, spec: CowSpec) -> CowDevice:
        """Builds (or finds) the volume's device; its data survives unstage."""

    def device(self, volume_id: str) -> CowDevice | None:
        """The volume's device if it is staged here."""

    def expand(self, volume_id: str, capacity_bytes: int) -> CowDevice:
        """Grows a staged volume's device online; raises NotStaged if it is not staged."""

    def unstage(self, volume_id: str) -> None:
        """Tears the device down, keeping the volume's data."""

    def delete(self, volume_id: str) -> None:
        """Tears down and frees the volume's data (the ImageVolume is gone)."""

    def volumes_with_data(self) -> set[str]:
        """The volumes whose data is on this node."""
