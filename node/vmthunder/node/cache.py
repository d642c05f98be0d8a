"""The cache layer `vmt-<image>` over the swappable source `vmt-<image>-src`: one interface,
two backends.

- DmCloneBackend (default): dm-clone, kernel only. dm-clone does not cache reads, so
  `hydrate(regions)` reads each region and writes the same bytes back as one full-region
  write, which dm-clone stores without copying from the source: the bytes cross the link once.
  Background hydration is dm-clone's own (kernel state: it survives agent restarts).
- QemuCorBackend: qemu-nbd serving a copy-on-read filter over a local qcow2 whose backing is
  `-src`, attached to the kernel as /dev/nbdN; `vmt-<image>` is a linear over it. Every read
  is cached by qemu (concurrent misses of a cluster coalesce); `hydrate` only reads.

Both keep their state in the kernel and in files named after the image, never in a database.

When the cache filesystem lacks room for an image's cache, the stack builds `vmt-<image>` as
a pass-through instead (dm-linear straight over `-src`): volumes read from the parent,
nothing is cached, nothing can fail half-written. `build` later turns a pass-through into a
cache by reloading its table, under the volumes, once there is room.
"""

from __future__ import annotations

import glob
import json
import mmap
import os
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from vmthunder.node import blockdev, dm, names

SECTOR = 512
# Share of the cache filesystem a new cache leaves free: the volumes' copy-on-write files live
# there too, sparse, and a VM whose COW write finds no room loses its disk (the snapshot turns
# invalid), while an image without a cache merely passes its reads through.
VOLUME_HEADROOM = 0.10


class CacheError(RuntimeError):
    """A cache-backend operation failed; `stderr` carries the tool's message."""

    def __init__(self, what: str, stderr: str) -> None:
        super().__init__(f"cache {what} failed: {stderr.strip()}")
        self.stderr = stderr


class CacheSpaceError(CacheError):
    """The cache filesystem cannot hold the image's cache."""


@dataclass(frozen=True)
class CacheState:
    """What the kernel shows of one image's cache layer."""

    # "absent"; "caching" (reads may still go to -src); "detached" (local only);
    # "passthrough" (no room for a cache: every read goes to -src, nothing is kept)
    kind: str
    hydrated: int = 0
    total: int = 0
    region_bytes: int = 0
    size: int = 0

    @property
    def complete(self) -> bool:
        return self.kind == "detached" or (self.total > 0 and self.hydrated >= self.total)


class CacheBackend(Protocol):
    name: str
    cache_dir: str
    kernel_background: bool  # True: the kernel hydrates in the background by itself
    # False: a read of a region not yet local passes through to -src and is not kept, so a
    # child must stay behind its parent or its reads run on up to the origin.
    caches_reads: bool

    def observe(self, image: str) -> CacheState: ...

    def build(self, image: str, size: int, region_bytes: int) -> None:
        """Creates vmt-<image> over /dev/mapper/vmt-<image>-src, or turns its pass-through
        into a cache (idempotent). Raises CacheSpaceError when the cache does not fit."""

    def missing_bytes(self, image: str, size: int, region_bytes: int) -> int:
        """How many more bytes the cache filesystem needs free to hold the cache and keep
        VOLUME_HEADROOM free (0: it fits)."""

    def hydrate(self, image: str, regions: Sequence[int], region_bytes: int, size: int,
                queue_depth: int) -> int:
        """Makes `regions` local; returns the bytes read through the stack."""

    def start_background(self, image: str, threshold: int) -> None: ...

    def detach(self, image: str) -> None:
        """Stops reading -src (only once complete); the caller then removes -src."""

    def remove(self, image: str) -> None: ...


def _aligned(n: int) -> mmap.mmap:
    return mmap.mmap(-1, n)  # page-aligned, as O_DIRECT wants


def _region_span(r: int, region_bytes: int, size: int) -> tuple[int, int]:
    off = r * region_bytes
    return off, max(0, min(region_bytes, size - off))


def _parallel(fn: Callable[[tuple[int, int]], int], items: Iterable[tuple[int, int]],
              queue_depth: int) -> int:
    with ThreadPoolExecutor(max(1, queue_depth)) as pool:
        return sum(pool.map(fn, items))


def runs(regions: Sequence[int], max_run: int) -> list[tuple[int, int]]:
    """Groups regions into (first, count) runs of consecutive regions, in the given order."""
    out: list[tuple[int, int]] = []
    for r in regions:
        if out and out[-1][0] + out[-1][1] == r and out[-1][1] < max_run:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((r, 1))
    return out


def io_runs(regions: Iterable[int], max_run: int = 16) -> list[tuple[int, int]]:
    """The reads one hydrate call makes. They go out in parallel, so their order is free:
    sorted, neighbours merge into one larger I/O (over a third fewer for the boot profile's
    batches), and every I/O costs a guest's CPU at both ends of a link."""
    return runs(sorted(set(regions)), max_run)


def passes_through(image: str) -> bool:
    """Whether vmt-<image> sits directly on -src (a pass-through), read from sysfs: no
    dmsetup call, the agent asks every round."""
    try:
        below = blockdev.slaves(dm.mapper_path(names.cache_dev(image)))
        src = blockdev.kernel_name(dm.mapper_path(names.src_dev(image)))
    except (OSError, blockdev.BlockDevError):
        return False
    return below == [src]


def create_or_upgrade(image: str, table: dm.Table) -> None:
    """Creates vmt-<image> with `table`, or swaps a pass-through's table for it: a reload under
    the volumes, which see a pause and then the same bytes (the cache is empty, every read
    still goes to -src)."""
    name = names.cache_dev(image)
    if dm.exists(name):
        dm.reload(name, table)
    else:
        dm.create(name, table)


class _Files:
    def __init__(self, cache_dir: str) -> None:
        self.cache_dir = cache_dir

    def dir(self, image: str) -> str:
        return os.path.join(self.cache_dir, image)

    def _files(self, image: str, size: int, region_bytes: int) -> dict[str, int]:
        """Each file the image's cache keeps, with the bytes it needs on the filesystem."""
        raise NotImplementedError

    def missing_bytes(self, image: str, size: int, region_bytes: int) -> int:
        need = sum(max(0, n - blockdev.allocated_bytes(path))
                   for path, n in self._files(image, size, region_bytes).items())
        free, total = blockdev.free_bytes(self.dir(image))
        return max(0, need + int(total * VOLUME_HEADROOM) - free)

    def _needs_build(self, image: str) -> bool:
        return not dm.exists(names.cache_dev(image)) or passes_through(image)


class DmCloneBackend(_Files):
    name = "dm-clone"
    kernel_background = True
    caches_reads = False

    def _data(self, image: str) -> str:
        return os.path.join(self.dir(image), "data")

    def _meta(self, image: str) -> str:
        return os.path.join(self.dir(image), "meta")

    def observe(self, image: str) -> CacheState:
        st = dm.status_if_exists(names.cache_dev(image), noflush=True)  # asked every round
        if st is None:
            return CacheState("absent")
        size = sum(x.length for x in st) * SECTOR
        if st and st[0].type == "clone":
            c = dm.CloneStatus.parse(st[0].fields)
            return CacheState("caching", c.hydrated, c.total, c.region_sectors * SECTOR, size)
        return CacheState("passthrough" if passes_through(image) else "detached", size=size)

    def _files(self, image: str, size: int, region_bytes: int) -> dict[str, int]:
        regions = -(-size // region_bytes)
        # dm-clone metadata: a bitmap bit per region plus btree blocks; generous and still small.
        meta_size = max(4 << 20, (regions // 8) * 4 + (2 << 20))
        return {self._data(image): size, self._meta(image): meta_size}

    def build(self, image: str, size: int, region_bytes: int) -> None:
        if not self._needs_build(image):
            return
        # Every block reserved up front: dm-clone fails every I/O once a write to its data or
        # metadata device fails, so the cache must never meet a full filesystem midway.
        try:
            for path, n in self._files(image, size, region_bytes).items():
                blockdev.reserve_file(path, n)
        except blockdev.NoSpace as e:
            self._drop_files(image)
            raise CacheSpaceError(f"build {image}", str(e)) from e
        data = blockdev.loop_attach(self._data(image))
        meta = blockdev.loop_attach(self._meta(image))
        src = dm.mapper_path(names.src_dev(image))
        create_or_upgrade(image, [dm.clone(size // SECTOR, dm.CloneArgs(
            meta, data, src, region_bytes // SECTOR, hydration=False))])

    def hydrate(self, image: str, regions: Sequence[int], region_bytes: int, size: int,
                queue_depth: int) -> int:
        path = dm.mapper_path(names.cache_dev(image))
        fd = os.open(path, os.O_RDWR | os.O_DIRECT)

        def one(run: tuple[int, int]) -> int:
            first, count = run
            off = first * region_bytes
            length = max(0, min(count * region_bytes, size - off))
            if length == 0:
                return 0
            # Whole regions only (the image's tail region may be short): dm-clone splits at
            # region boundaries and stores each full-region write without a copy.
            buf = _aligned(-(-length // 4096) * 4096)
            try:
                with memoryview(buf) as mv, mv[:length] as view:
                    n = os.preadv(fd, [view], off)
                    if n != length:
                        raise CacheError(f"hydrate {image}", f"short read at {off}: {n}")
                    os.pwritev(fd, [view], off)
                    return n
            finally:
                buf.close()

        try:
            return _parallel(one, io_runs(regions), queue_depth)
        finally:
            os.close(fd)

    def start_background(self, image: str, threshold: int) -> None:
        name = names.cache_dev(image)
        t = dm.table(name)
        if not t or t[0].type != "clone":
            return  # detached already: nothing left to hydrate
        dm.message(name, ["hydration_threshold", str(max(1, threshold))])
        dm.message(name, ["hydration_batch_size", str(max(1, threshold))])
        dm.message(name, ["enable_hydration"])

    def detach(self, image: str) -> None:
        name = names.cache_dev(image)
        t = dm.table(name)
        if not t or t[0].type != "clone":
            return
        st = dm.clone_status(name)
        if not st.complete:
            raise CacheError(f"detach {image}", f"only {st.hydrated}/{st.total} regions hydrated")
        data = t[0].args[1]
        dm.reload(name, [dm.linear(t[0].length, data)])
        meta = t[0].args[0]
        if meta.startswith("/dev/loop"):
            blockdev.loop_detach(meta)

    def remove(self, image: str) -> None:
        dm.remove(names.cache_dev(image))
        self._drop_files(image)

    def _drop_files(self, image: str) -> None:
        for f in (self._data(image), self._meta(image)):
            for device in blockdev.loops_of(f):
                blockdev.loop_detach(device)
            if os.path.exists(f):
                os.unlink(f)


class QemuCorBackend(_Files):
    name = "qemu-cor"
    kernel_background = False
    caches_reads = True

    def _qcow(self, image: str) -> str:
        return os.path.join(self.dir(image), "cache.qcow2")

    def _nbd_of(self, image: str) -> str | None:
        name = names.cache_dev(image)
        if not dm.exists(name) or passes_through(image):
            return None
        t = dm.table(name)
        if not t or t[0].type != "linear":
            return None
        dev = t[0].args[0]  # the kernel shows "43:0": name the device node for qemu-nbd -d
        if ":" in dev and not dev.startswith("/"):
            dev = "/dev/" + os.path.basename(os.readlink(f"/sys/dev/block/{dev}"))
        return dev

    def observe(self, image: str) -> CacheState:
        t = dm.table_if_exists(names.cache_dev(image))
        if t is None:
            return CacheState("absent")
        size = sum(x.length for x in t) * SECTOR
        if passes_through(image):
            return CacheState("passthrough", size=size)
        local, region = self._allocated(image)
        total = -(-size // region) if region else 0
        src = dm.table_if_exists(names.src_dev(image))
        # detach leaves -src as an error table (qemu keeps its backing file open)
        kind = "caching" if src and src[0].type != "error" else "detached"
        return CacheState(kind, local // region if region else 0, total, region, size)

    def _allocated(self, image: str) -> tuple[int, int]:
        """(bytes held by the qcow2 itself, cluster size), read while qemu-nbd has it open."""
        q = self._qcow(image)
        info = _qemu_img(["info", "-U", "--output=json", q])
        region = int(json.loads(info).get("cluster-size", 65536))
        extents = json.loads(_qemu_img(["map", "-U", "--output=json", q]))
        local = sum(int(e["length"]) for e in extents if e.get("depth") == 0 and e.get("data"))
        return local, region

    def _files(self, image: str, size: int, region_bytes: int) -> dict[str, int]:
        # The qcow2 grows as it caches (no preallocation over a backing file): the room is
        # checked here, not reserved; its L1/L2 tables take 8 bytes per cluster.
        return {self._qcow(image): size + 8 * -(-size // region_bytes) + (1 << 20)}

    def build(self, image: str, size: int, region_bytes: int) -> None:
        if not self._needs_build(image):
            return
        if self.missing_bytes(image, size, region_bytes):
            raise CacheSpaceError(f"build {image}", f"no room in {self.cache_dir}")
        os.makedirs(self.dir(image), exist_ok=True)
        q = self._qcow(image)
        src = dm.mapper_path(names.src_dev(image))
        if not os.path.exists(q):
            _qemu_img(["create", "-q", "-f", "qcow2", "-o", f"cluster_size={region_bytes}",
                       "-b", src, "-F", "raw", q, str(size)])
        nbd = _nbd_serving(q)
        if nbd is not None:  # a build that died before its reload: its qemu-nbd holds the lock
            create_or_upgrade(image, [dm.linear(size // SECTOR, nbd)])
            return
        nbd = _free_nbd()
        opts = (f"driver=copy-on-read,file.driver=qcow2,file.file.driver=file,"
                f"file.file.filename={q}")
        # --fork: the daemon must not inherit our pipes (a reader would wait for EOF forever).
        try:
            p = subprocess.run(["qemu-nbd", "--fork", "--persistent", "-c", nbd,
                                "--image-opts", opts], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               timeout=60, check=False, start_new_session=True)
        except (subprocess.TimeoutExpired, FileNotFoundError) as e:
            raise CacheError(f"qemu-nbd {image}", str(e)) from e
        if p.returncode != 0:
            raise CacheError(f"qemu-nbd {image}", f"exit status {p.returncode}")
        deadline = time.monotonic() + 10
        while blockdev.size_bytes(nbd) == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        create_or_upgrade(image, [dm.linear(size // SECTOR, nbd)])

    def hydrate(self, image: str, regions: Sequence[int], region_bytes: int, size: int,
                queue_depth: int) -> int:
        fd = os.open(dm.mapper_path(names.cache_dev(image)), os.O_RDONLY | os.O_DIRECT)

        def one(run: tuple[int, int]) -> int:
            off = run[0] * region_bytes
            length = max(0, min(run[1] * region_bytes, size - off))
            if length == 0:
                return 0
            buf = _aligned(-(-length // 4096) * 4096)
            try:
                with memoryview(buf) as mv, mv[:length] as view:
                    return os.preadv(fd, [view], off)
            finally:
                buf.close()

        try:
            return _parallel(one, io_runs(regions), queue_depth)
        finally:
            os.close(fd)

    def start_background(self, image: str, threshold: int) -> None:
        return None  # the agent's hydrator reads the rest (kernel_background is False)

    def detach(self, image: str) -> None:
        local, _ = self._allocated(image)
        size = sum(x.length for x in dm.table(names.cache_dev(image))) * SECTOR
        if local < size:
            raise CacheError(f"detach {image}", f"only {local}/{size} bytes local")
        src = names.src_dev(image)
        if dm.exists(src):
            # Every cluster is local, so qemu never reads its backing again; an error table
            # makes a stray read loud instead of silently reaching a logged-out parent.
            dm.reload(src, [dm.error(size // SECTOR)])

    def remove(self, image: str) -> None:
        nbd = self._nbd_of(image)
        dm.remove(names.cache_dev(image))
        if nbd:
            _check(["qemu-nbd", "-d", nbd], f"qemu-nbd -d {nbd}")
        q = self._qcow(image)
        if os.path.exists(q):
            os.unlink(q)


def _check(cmd: list[str], what: str) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    except (subprocess.TimeoutExpired, FileNotFoundError) as e:
        raise CacheError(what, str(e)) from e
    if p.returncode != 0:
        raise CacheError(what, p.stderr)
    return p.stdout


def _qemu_img(args: list[str]) -> str:
    return _check(["qemu-img", *args], f"qemu-img {args[0]}")


def _nbd_serving(path: str) -> str | None:
    """The /dev/nbdN a qemu-nbd serves `path` on, if one does."""
    for pid_file in glob.glob("/sys/block/nbd*/pid"):
        try:
            with open(pid_file) as f, open(f"/proc/{f.read().strip()}/cmdline", "rb") as c:
                if f"filename={path}".encode() in c.read():
                    return "/dev/" + pid_file.split("/")[3]
        except OSError:
            continue
    return None


def _free_nbd() -> str:
    if not os.path.exists("/sys/block/nbd0"):
        subprocess.run(["modprobe", "nbd", "nbds_max=32"], capture_output=True, check=False)
    for path in sorted(glob.glob("/sys/block/nbd*"), key=lambda p: int(p[len("/sys/block/nbd"):])):
        if not os.path.exists(f"{path}/pid"):
            return f"/dev/{os.path.basename(path)}"
    raise CacheError("nbd", "no free /dev/nbd device")


BACKENDS: dict[str, type[DmCloneBackend] | type[QemuCorBackend]] = {
    DmCloneBackend.name: DmCloneBackend,
    QemuCorBackend.name: QemuCorBackend,
}
DEFAULT_BACKEND = DmCloneBackend.name


def make_backend(name: str, cache_dir: str) -> CacheBackend:
    try:
        return BACKENDS[name](cache_dir)
    except KeyError as e:
        raise CacheError("backend", f"unknown backend {name!r}; known: {sorted(BACKENDS)}") from e
