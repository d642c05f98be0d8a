"""Which volume capabilities the driver serves: single-node access, block or a filesystem."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from vmthunder.csi.errors import invalid
from vmthunder.csi.proto import csi_pb2

AccessMode = csi_pb2.VolumeCapability.AccessMode

# A volume's data lives on one node's disk: no multi-node modes.
SUPPORTED_MODES: Final = frozenset({
    AccessMode.SINGLE_NODE_WRITER,
    AccessMode.SINGLE_NODE_READER_ONLY,
    AccessMode.SINGLE_NODE_SINGLE_WRITER,
})
FS_TYPES: Final = frozenset({"ext4", "ext3", "xfs"})
DEFAULT_FS_TYPE: Final = "ext4"


def access_type(cap: csi_pb2.VolumeCapability) -> str:
    """"Block" or "Mount", the ImageVolume's spelling."""
    return "Block" if cap.HasField("block") else "Mount"


def fs_type(cap: csi_pb2.VolumeCapability) -> str:
    if not cap.HasField("mount"):
        return ""
    return cap.mount.fs_type or DEFAULT_FS_TYPE


def unsupported_reason(cap: csi_pb2.VolumeCapability) -> str | None:
    """Why the driver cannot serve `cap`, or None if it can."""
    if not cap.HasField("block") and not cap.HasField("mount"):
        return "access type (block or mount) is missing"
    if not cap.HasField("access_mode"):
        return "access mode is missing"
    if cap.access_mode.mode not in SUPPORTED_MODES:
        mode = cap.access_mode.mode
        # proto3 enums are open: a mode newer than our csi.proto (or garbage) has no name.
        name = AccessMode.Mode.Name(mode) if mode in AccessMode.Mode.values() else str(mode)
        return f"access mode {name} is not supported: a volume lives on one node"
    if cap.HasField("mount") and cap.mount.fs_type and cap.mount.fs_type not in FS_TYPES:
        return f"fs_type {cap.mount.fs_type!r} is not one of {sorted(FS_TYPES)}"
    return None


def require_one(cap: csi_pb2.VolumeCapability | None, present: bool) -> csi_pb2.VolumeCapability:
    """Validates a request's single volume_capability (InvalidArgument if missing/unsupported)."""
    if cap is None or not present:
        raise invalid("volume_capability is required")
    reason = unsupported_reason(cap)
    if reason:
        raise invalid(reason)
    return cap


def require_all(caps: Sequence[csi_pb2.VolumeCapability]) -> None:
    if not caps:
        raise invalid("volume_capabilities are required")
    for cap in caps:
        reason = unsupported_reason(cap)
        if reason:
            raise invalid(reason)
