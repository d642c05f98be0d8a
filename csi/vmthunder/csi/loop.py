"""Loop devices through losetup: a file on the cache disk as a block device."""

from __future__ import annotations

from pathlib import Path

from vmthunder.csi._command import CommandError, run


class LoopError(CommandError):
    """losetup failed."""


def find(backing: Path) -> str | None:
    """The loop device attached to `backing`, if any."""
    out = run(["losetup", "--noheadings", "--output", "NAME", "--associated", str(backing)],
              LoopError).stdout.split()
    return out[0] if out else None


def attach(backing: Path) -> str:
    existing = find(backing)
    if existing:
        return existing
    return run(["losetup", "--find", "--show", str(backing)], LoopError).stdout.strip()


def refresh_size(device: str) -> None:
    """Makes the loop device follow its grown backing file."""
    run(["losetup", "--set-capacity", device], LoopError)


def detach(backing: Path) -> None:
    device = find(backing)
    if device:
        run(["losetup", "--detach", device], LoopError)
