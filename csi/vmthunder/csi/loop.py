"""What the COW layer needs from losetup beyond vmthunder.node.blockdev: following a grown
backing file. (To fold into blockdev.py.)"""

from __future__ import annotations

from vmthunder.csi._command import CommandError, run


class LoopError(CommandError):
    """losetup failed."""


def set_capacity(device: str) -> None:
    """Makes the loop device follow its grown backing file."""
    run(["losetup", "--set-capacity", device], LoopError)
