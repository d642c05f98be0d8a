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

from vmthunder.csi import devmapper, loop
from vmthunder.csi._command import CommandError
from vmthunder.csi.backend import BackendError, CowDevice, CowSpec, NotStaged
from vmthunder.csi.devmapper import Target
from vmthunder.csi.names import image_device_name, volume_device_name

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
    base_table = [Target(0, image_sectors, "linear", f"{image} 0")]
    if capacity_sectors > image_sectors:
        base_table.append(Target(image_sectors, capacity_sectors - image_sectors, "zero", ""))
    top = [Target(0, capacity_sectors, "snapshot", f"{base} {cow} P {CHUNK_SECTORS}")]
    return Tables(base_table, top)


def device_size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


class DmSnapshotBackend:
    """NodeBackend over dm-snapshot; state_dir is on the node's cache disk."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    def _file(self, volume_id: str) -> Path:
        return self.state_dir / f"{volume_id}.cow"

    def problem(self) -> str | None:
        try:
            devmapper.version()
            self.state_dir.mkdir(parents=True, exist_ok=True)
            probe = self.state_dir / ".probe"
            probe.write_bytes(b"")
            probe.unlink()
        except (OSError, CommandError) as e:
            return str(e)
        return None

    def image_device(self, image_cache: str) -> str | None:
        name = image_device_name(image_cache)
        dev = devmapper.info(name)
        if dev is None:
            return None
        if not dev.path.exists():
            devmapper.mknodes(name)
        return str(dev.path)

    def device(self, volume_id: str) -> CowDevice | None:
        name = volume_device_name(volume_id)
        dev = devmapper.info(name)
        if dev is None:
            return None
        if not dev.path.exists():
            devmapper.mknodes(name)
        status = devmapper.status(name)
        message = status[0].args if status else "no table"
        healthy = bool(status) and not message.startswith(BROKEN_STATUS)
        size = sum(t.length for t in status) * SECTOR
        return CowDevice(volume_id, str(dev.path), size, healthy,
                         "" if healthy else f"copy-on-write layer: {message}")

    def stage(self, spec: CowSpec) -> CowDevice:
        try:
            current = self.device(spec.volume_id)
            if current is not None:
                if current.size_bytes < spec.capacity_bytes:  # grown while unstaged
                    return self.expand(spec.volume_id, spec.capacity_bytes)
                return current
            return self._build(spec)
        except CommandError as e:
            raise BackendError(str(e)) from e

    def _build(self, spec: CowSpec) -> CowDevice:
        name = volume_device_name(spec.volume_id)
        base_name = f"{name}-base"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        cow = self._grow_file(spec.volume_id, spec.capacity_bytes)
        image_sectors = device_size(spec.image_device) // SECTOR
        tables = plan_tables(spec.image_device, image_sectors, spec.capacity_bytes // SECTOR,
                             str(devmapper.path(base_name)), cow)
        if devmapper.info(base_name) is None:
            devmapper.create(base_name, tables.base)
        else:  # left by an interrupted stage
            devmapper.reload(base_name, tables.base)
            devmapper.resume(base_name)
        devmapper.create(name, tables.top)
        built = self.device(spec.volume_id)
        if built is None or not built.healthy:
            raise BackendError(f"{name} is not usable: {built.message if built else 'missing'}")
        return built

    def _grow_file(self, volume_id: str, capacity_bytes: int) -> str:
        """Makes the sparse COW file big enough and returns its loop device."""
        path = self._file(volume_id)
        wanted = cow_file_size(capacity_bytes)
        with open(path, "ab") as f:
            grew = os.fstat(f.fileno()).st_size < wanted
            if grew:
                f.truncate(wanted)
        device = loop.find(path)
        if device is None:
            return loop.attach(path)
        if grew:
            loop.refresh_size(device)
        return device

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
            image = devmapper.table(base_name)[0]
            top = devmapper.table(name)[0]
            base_dev, cow_dev = top.args.split()[:2]
            tables = plan_tables(image.args.split()[0], image.length,
                                 capacity_bytes // SECTOR, base_dev, cow_dev)
            devmapper.suspend(name)
            try:
                devmapper.reload(base_name, tables.base)
                devmapper.resume(base_name)
                devmapper.reload(name, tables.top)
            finally:
                devmapper.resume(name)
        except CommandError as e:
            raise BackendError(str(e)) from e
        grown = self.device(volume_id)
        if grown is None:
            raise BackendError(f"{name} vanished while growing")
        return grown

    def unstage(self, volume_id: str) -> None:
        name = volume_device_name(volume_id)
        try:
            devmapper.remove(name)
            devmapper.remove(f"{name}-base")
            loop.detach(self._file(volume_id))
        except CommandError as e:
            raise BackendError(str(e)) from e

    def delete(self, volume_id: str) -> None:
        self.unstage(volume_id)
        self._file(volume_id).unlink(missing_ok=True)

    def volumes_with_data(self) -> set[str]:
        if not self.state_dir.exists():
            return set()
        return {p.stem for p in self.state_dir.glob("*.cow")}
