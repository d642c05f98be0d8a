"""How a node reaches its parent's export: one interface, iSCSI by default."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from vmthunder.node import iscsi
from vmthunder.node.iscsi import Chap, TargetAddress


@dataclass(frozen=True)
class Connection:
    device: str  # the local block device
    carries_io: bool  # False: its peer is gone, maybe for now


def devices(connections: Mapping[TargetAddress, Connection]) -> dict[TargetAddress, str]:
    return {a: c.device for a, c in connections.items()}


def broken(connections: Mapping[TargetAddress, Connection]) -> frozenset[TargetAddress]:
    return frozenset(a for a, c in connections.items() if not c.carries_io)


class Transport(Protocol):
    name: str

    def prepare(self) -> None:
        """Readies the kernel side (modules, daemons) ahead of the first attach."""

    def attach(self, address: TargetAddress, chap: Chap | None) -> str:
        """Connects to `address` (idempotent) and returns the local block device."""

    def detach(self, address: TargetAddress) -> None:
        """Disconnects; absent is success."""

    def connections(self) -> dict[TargetAddress, Connection]:
        """Every connection this transport holds now (one look at the kernel)."""


class IscsiTransport:
    """open-iscsi. `replacement_timeout` is how long the SCSI layer queues I/O for a dead
    session before failing it: long, so a dead parent makes reads wait for re-parenting."""

    name = "iscsi"

    def __init__(self, replacement_timeout: int = 600) -> None:
        self.replacement_timeout = replacement_timeout

    def prepare(self) -> None:
        iscsi.ensure_daemon()

    def attach(self, address: TargetAddress, chap: Chap | None) -> str:
        s = iscsi.login(address, chap, replacement_timeout=self.replacement_timeout)
        if s.recovery_tmo != self.replacement_timeout:
            iscsi.set_replacement_timeout(s.sid, self.replacement_timeout)
        disk = s.disk(address.lun)
        assert disk is not None  # login waits for it
        iscsi.set_disk_timeout(disk)
        return disk

    def detach(self, address: TargetAddress) -> None:
        iscsi.logout(address)

    def connections(self) -> dict[TargetAddress, Connection]:
        return {TargetAddress(s.portal, s.iqn, lun): Connection(disk, s.state == "LOGGED_IN")
                for s in iscsi.sessions() for lun, disk in s.disks.items()}
