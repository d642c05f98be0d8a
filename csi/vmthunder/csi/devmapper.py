"""device-mapper through dmsetup: tables in, typed device facts out.

Temporary home of the COW layer's dm calls until node/vmthunder/node/dm.py (the node
agent's wrapper) exists; then this folds into it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vmthunder.csi._command import CommandError, run

MAPPER = Path("/dev/mapper")


class DmError(CommandError):
    """dmsetup failed."""


@dataclass(frozen=True)
class Target:
    """One table line; start and length in 512-byte sectors."""

    start: int
    length: int
    type: str
    args: str

    def line(self) -> str:
        return f"{self.start} {self.length} {self.type} {self.args}"


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    major: int
    minor: int
    suspended: bool
    open_count: int

    @property
    def path(self) -> Path:
        return MAPPER / self.name


def _dmsetup(*args: str, table: Sequence[Target] | None = None) -> str:
    argv = ["dmsetup", *args]
    if table is not None:
        # --noudevsync: nodes without udev are made by mknodes, below; with udev, no waiting.
        argv += ["--noudevsync", "--table", "\n".join(t.line() for t in table)]
    return run(argv, DmError).stdout


def path(name: str) -> Path:
    return MAPPER / name


def info(name: str) -> DeviceInfo | None:
    """The device's facts, or None if no device of that name exists."""
    try:
        out = _dmsetup("info", "-c", "--noheadings", "--separator", ":",
                       "-o", "name,major,minor,attr,open", name)
    except DmError as e:
        if "No such device" in e.stderr or "not exist" in e.stderr:
            return None
        raise
    fields = out.strip().split(":")
    return DeviceInfo(fields[0], int(fields[1]), int(fields[2]),
                      suspended=fields[3][2:3] == "s", open_count=int(fields[4]))


def create(name: str, table: Sequence[Target]) -> DeviceInfo:
    _dmsetup("create", name, table=table)
    mknodes(name)
    created = info(name)
    if created is None:
        raise DmError(["dmsetup", "create", name], 1, "device vanished after create")
    return created


def reload(name: str, table: Sequence[Target]) -> None:
    """Loads the inactive table; it takes effect at the next resume."""
    _dmsetup("reload", name, table=table)


def suspend(name: str) -> None:
    _dmsetup("suspend", "--noudevsync", name)


def resume(name: str) -> None:
    _dmsetup("resume", "--noudevsync", name)


def remove(name: str) -> None:
    """Removes the device if it exists (--retry: a transient opener such as blkid)."""
    if info(name) is None:
        return
    _dmsetup("remove", "--noudevsync", "--retry", name)
    _dmsetup("mknodes")  # drops the stale /dev/mapper node where no udev does


def mknodes(name: str) -> None:
    _dmsetup("mknodes", name)


def table(name: str) -> list[Target]:
    return _parse(_dmsetup("table", name))


def status(name: str) -> list[Target]:
    return _parse(_dmsetup("status", name))


def _parse(out: str) -> list[Target]:
    targets = []
    for line in out.splitlines():
        start, length, type_, *rest = line.split(maxsplit=3)
        targets.append(Target(int(start), int(length), type_, rest[0] if rest else ""))
    return targets


def version() -> str:
    return _dmsetup("version").strip()
