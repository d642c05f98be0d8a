"""The volume's copy-on-write layer with device-mapper: dm-snapshot over a sparse file.

    vmt-<image>                (node agent: dm-clone of the parent's export, read-only here)
      vmt-vol-<id>-base        linear over the image + zero tail up to the volume's capacity
        vmt-vol-<id>           snapshot  base  loop(<state>/<id>.cow)  persistent, 4 KiB chunks

A persistent snapshot keeps its exception store in the file, so the volume's writes survive
unstage, a plugin restart and a node reboot; the kernel's device names carry the volume id,
so a restarted plugin finds its devices again with no private database. Growing is online:
grow the file, then reload both tables with the longer length under a suspend.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from vmthunder.csi._command import CommandError
from vmthunder.csi.backend import BackendError, CowDevice, CowSpec, NotStaged
from vmthunder.csi.names import image_device_name, volume_device_name
from vmthunder.node import blockdev, dm
from vmthunder.node.blockdev import BlockDevError
from vmthunder.node.dm import DmError, Target

KERNEL_ERRORS: Final = (DmError, BlockDevError, CommandError, OSError)

SECTOR: Final = 512
CHUNK_SECTORS: Final = 8  # 4 KiB: a VM's small writes copy little
EXCEPTIONS_PER_CHUNK: Final = CHUNK_SECTORS * SECTOR // 16  # persistent store: 16 B each
BROKEN_STATUS: Final = ("Invalid", "Overflow", "Merge failed")


def cow_file_size(capacity_bytes: int) -> int:
    """Room for every chunk of the volume to be written, plus the exception store's
    metadata chunks and header, so the snapshot can never overflow (sparse: costs nothing
    until written)."""
    chunk = CHUNK_SECTORS * SECTOR
    data = -(-capacity_bytes // chunk)
    metadata = -(-data // EXCEPTIONS_PER_CHUNK)
    return (data + metadata + 16) * chunk


@dataclass(frozen=True)
class Tables:
    base: list[Target]
    top: list[Target]


def plan_tables(image: str, image_sectors: int, capacity_sectors: int, base: str,
                cow: str) -> Tables:
    """The two tables of a volume of `capacity_sectors` over an image of `image_sectors`.
    `image`, `base` and `cow` are device paths or major:minor pairs."""
    if capacity_sectors < image_sectors:
        raise BackendError(f"capacity {capacity_sectors} sectors is below the image's "
                           f"{image_sectors}")
    base_table = [dm.linear(image_sectors, image)]
    if capacity_sectors > image_sectors:
        base_table.append(Target(image_sectors, capacity_sectors - image_sectors, "zero"))
    top = [dm.snapshot(capacity_sectors, base, cow, chunk_sectors=CHUNK_SECTORS)]
    return Tables(base_table, top)


class DmSnapshotBackend:
    """NodeBackend over dm-snapshot; state_dir is on the node's cache disk."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    def _file(self, volume_id: str) -> Path:
        return self.state_dir / f"{volume_id}.cow"

    def problem(self) -> str | None:
        if not os.path.exists("/dev/loop-control"):
            return "no /dev/loop-control: the loop module is not loaded"
        try:
            dm.names()
            self.state_dir.mkdir(parents=True, exist_ok=True)
            probe = self.state_dir / ".probe"
            probe.write_bytes(b"")
            probe.unlink()
        except KERNEL_ERRORS as e:
            return str(e)
        return None

    def image_device(self, image_cache: str) -> str | None:
        name = image_device_name(image_cache)
        dev = dm.info(name)
        if dev is None:
            return None
        dm.ensure_nodes(name)
        return dev.path

    def device(self, volume_id: str) -> CowDevice | None:
        name = volume_device_name(volume_id)
        dev = dm.info(name)
        if dev is None:
            return None
        dm.ensure_nodes(name)
        status = dm.status(name)
        message = " ".join(status[0].fields) if status else "no table"
        healthy = bool(status) and not message.startswith(BROKEN_STATUS)
        size = sum(t.length for t in status) * SECTOR
        return CowDevice(volume_id, dev.path, size, healthy,
                         "" if healthy else f"copy-on-write layer: {message}")

    def stage(self, spec: CowSpec) -> CowDevice:
        try:
            current = self.device(spec.volume_id)
            if current is not None:
                if current.size_bytes < spec.capacity_bytes:  # grown while unstaged
                    return self.expand(spec.volume_id, spec.capacity_bytes)
                return current
            return self._build(spec)
        except KERNEL_ERRORS as e:
            raise BackendError(str(e)) from e

    def _build(self, spec: CowSpec) -> CowDevice:
        name = volume_device_name(spec.volume_id)
        base_name = f"{name}-base"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        cow = self._grow_file(spec.volume_id, spec.capacity_bytes)
        image_sectors = blockdev.size_bytes(spec.image_device) // SECTOR
        tables = plan_tables(spec.image_device, image_sectors, spec.capacity_bytes // SECTOR,
                             dm.mapper_path(base_name), cow)
        if dm.exists(base_name):  # left by an interrupted stage, perhaps without its node
            dm.ensure_nodes(base_name)
            dm.reload(base_name, tables.base)
        else:
            dm.create(base_name, tables.base)
        dm.create(name, tables.top)
        built = self.device(spec.volume_id)
        if built is None or not built.healthy:
            raise BackendError(f"{name} is not usable: {built.message if built else 'missing'}")
        return built

    def _grow_file(self, volume_id: str, capacity_bytes: int) -> str:
        """Makes the sparse COW file big enough and returns its loop device."""
        path = str(self._file(volume_id))
        wanted = cow_file_size(capacity_bytes)
        grew = not os.path.exists(path) or os.path.getsize(path) < wanted
        blockdev.ensure_sparse_file(path, wanted)
        device = self._loop(volume_id)
        if device is None:
            return blockdev.loop_attach(path)
        if grew:
            blockdev.loop_set_capacity(device)
        return device

    def _loop(self, volume_id: str) -> str | None:
        return next(iter(blockdev.loops_of(str(self._file(volume_id)))), None)

    def expand(self, volume_id: str, capacity_bytes: int) -> CowDevice:
        name = volume_device_name(volume_id)
        base_name = f"{name}-base"
        try:
            current = self.device(volume_id)
            if current is None:
                raise NotStaged(f"volume {volume_id} is not staged on this node")
            if capacity_bytes <= current.size_bytes:
                return current
            self._grow_file(volume_id, capacity_bytes)
            # Keep the resolved devices (major:minor) of the live tables; change only lengths.
            image = dm.table(base_name)[0]
            base_dev, cow_dev = dm.table(name)[0].args[:2]
            tables = plan_tables(image.args[0], image.length, capacity_bytes // SECTOR,
                                 base_dev, cow_dev)
            # Quiesce the volume, grow what it reads from, then grow the volume itself.
            dm.suspend(name)
            try:
                dm.reload(base_name, tables.base)
                dm.load(name, tables.top)
            finally:
                dm.resume(name)
        except KERNEL_ERRORS as e:
            raise BackendError(str(e)) from e
        grown = self.device(volume_id)
        if grown is None:
            raise BackendError(f"{name} vanished while growing")
        return grown

    def unstage(self, volume_id: str) -> None:
        name = volume_device_name(volume_id)
        try:
            dm.remove(name)
            dm.remove(f"{name}-base")
            device = self._loop(volume_id)
            if device is not None:
                blockdev.loop_detach(device)
        except KERNEL_ERRORS as e:
            raise BackendError(str(e)) from e

    def delete(self, volume_id: str) -> None:
        self.unstage(volume_id)
        self._file(volume_id).unlink(missing_ok=True)

    def volumes_with_data(self) -> set[str]:
        if not self.state_dir.exists():
            return set()
        return {p.stem for p in self.state_dir.glob("*.cow")}
