"""Names that encode ownership: after a restart the agent rediscovers its stack from the kernel."""

from __future__ import annotations

PREFIX = "vmt-"
IQN_BASE = "iqn.2026-11.io.vmthunder"
ORIGIN = "@origin"


def src_dev(image: str) -> str:
    """dm-linear over the parent's LUN: re-parenting reloads only this table."""
    return f"{PREFIX}{image}-src"


def cache_dev(image: str) -> str:
    """The cache layer (dm-clone or the backend's device): what volumes and children read."""
    return f"{PREFIX}{image}"


def export_dev(image: str) -> str:
    """dm-linear over the cache layer, opened exclusively by LIO.

    LIO's iblock backend claims its device exclusively; device-mapper tables (the CSI side's
    copy-on-write volumes) claim with a shared holder. Exporting a separate linear device keeps
    the two from excluding each other.
    """
    return f"{PREFIX}{image}-exp"


def volume_dev(volume_id: str) -> str:
    return f"{PREFIX}vol-{volume_id}"


def export_iqn(image: str, node: str) -> str:
    return f"{IQN_BASE}:{node}.{image}"


def backstore(image: str) -> str:
    return f"{PREFIX}{image}"


def image_of(dm_name: str) -> str | None:
    """The image a stack device belongs to, or None for devices that are not ours."""
    if not dm_name.startswith(PREFIX) or dm_name.startswith(f"{PREFIX}vol-"):
        return None
    rest = dm_name[len(PREFIX):]
    for suffix in ("-src", "-exp"):
        if rest.endswith(suffix):
            return rest[: -len(suffix)]
    return rest
