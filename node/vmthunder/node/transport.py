"""How a node reaches its parent's export: one interface, iSCSI by default."""

from __future__ import annotations

from typing import Protocol

from vmthunder.node import iscsi
from vmthunder.node.iscsi import Chap, TargetAddress


class Transport(Protocol):
    name: str

    def attach(self, address: TargetAddress, chap: Chap | None) -> str:
        """Connects to `address` (idempotent) and returns the local block device."""

    def detach(self, address: TargetAddress) -> None:
        """Disconnects; absent is success."""

    def attached(self) -> dict[TargetAddress, str]:
        """Every connection this transport holds now, with its local device."""

    def broken(self) -> frozenset[TargetAddress]:
        """The connections held that carry no I/O now (their peer is gone, maybe for now)."""


class IscsiTransport:
    """open-iscsi. `replacement_timeout` is how long the SCSI layer queues I/O for a dead
    session before failing it: long, so a dead parent makes reads wait for re-parenting."""

    name = "iscsi"

    def __init__(self, replacement_timeout: int = 600) -> None:
        self.replacement_timeout = replacement_timeout

    def attach(self, address: TargetAddress, chap: Chap | None) -> str:
        s = iscsi.login(address, chap, replacement_timeout=self.replacement_timeout)
        if s.recovery_tmo != self.replacement_timeout:
            iscsi.set_replacement_timeout(s.sid, self.replacement_timeout)
        disk = s.disk(address.lun)
        assert disk is not None  # login waits for it
        return disk

    def detach(self, address: TargetAddress) -> None:
        iscsi.logout(address)

    def attached(self) -> dict[TargetAddress, str]:
        result = {}
        for s in iscsi.sessions():
            for lun, disk in s.disks.items():
                result[TargetAddress(s.portal, s.iqn, lun)] = disk
        return result

    def broken(self) -> frozenset[TargetAddress]:
        return frozenset(TargetAddress(s.portal, s.iqn, lun) for s in iscsi.sessions()
                         if s.state != "LOGGED_IN" for lun in s.disks)
