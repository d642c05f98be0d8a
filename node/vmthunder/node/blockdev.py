"""Block devices: sizes, sysfs I/O counters, loop devices (losetup), sparse backing files."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

SECTOR = 512


class BlockDevError(RuntimeError):
    """A block-device command failed; `stderr` is its error output."""

    def __init__(self, what: str, rc: int, stderr: str) -> None:
        super().__init__(f"{what} failed (rc={rc}): {stderr.strip()}")
        self.what = what
        self.rc = rc
        self.stderr = stderr


def _run(what: str, cmd: Sequence[str], timeout: float = 60) -> str:
    try:
        p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)
    except (subprocess.TimeoutExpired, FileNotFoundError) as e:
        raise BlockDevError(what, -1, str(e)) from e
    if p.returncode != 0:
        raise BlockDevError(what, p.returncode, p.stderr)
    return p.stdout


@dataclass(frozen=True)
class IoStat:
    """Counters of /sys/class/block/<dev>/stat (sectors are 512 bytes whatever the device)."""

    reads: int
    sectors_read: int
    writes: int
    sectors_written: int
    in_flight: int

    @property
    def bytes_read(self) -> int:
        return self.sectors_read * SECTOR

    @property
    def bytes_written(self) -> int:
        return self.sectors_written * SECTOR


def kernel_name(path: str) -> str:
    """/dev/mapper/vmt-x -> dm-3, /dev/sda -> sda (follows symlinks and device numbers)."""
    st = os.stat(path)
    if not stat.S_ISBLK(st.st_mode):
        raise BlockDevError(f"kernel_name {path}", -1, "not a block device")
    link = os.readlink(f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
    return os.path.basename(link)


def devno(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return os.major(st.st_rdev), os.minor(st.st_rdev)


def devno_str(path: str) -> str:
    major, minor = devno(path)
    return f"{major}:{minor}"


def size_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    with open(f"/sys/class/block/{kernel_name(path)}/size") as f:
        return int(f.read()) * SECTOR


def iostat(path: str) -> IoStat:
    with open(f"/sys/class/block/{kernel_name(path)}/stat") as f:
        w = [int(x) for x in f.read().split()]
    return IoStat(reads=w[0], sectors_read=w[2], writes=w[4], sectors_written=w[6],
                  in_flight=w[8])


def cap_max_sectors_kb(path: str, kb: int) -> None:
    """Lowers the largest request the block layer builds for `path` to `kb` KiB (never above
    what the hardware takes)."""
    queue = f"/sys/class/block/{kernel_name(path)}/queue"
    with open(f"{queue}/max_hw_sectors_kb") as f:
        hw = int(f.read())
    with open(f"{queue}/max_sectors_kb", "w") as f:
        f.write(str(min(kb, hw)))


def holders(path: str) -> list[str]:
    """Kernel names of the devices stacked on `path` (dm tables, ...)."""
    return sorted(os.listdir(f"/sys/class/block/{kernel_name(path)}/holders"))


def slaves(path: str) -> list[str]:
    """Kernel names of the devices `path` is stacked on (the other way round from holders)."""
    return sorted(os.listdir(f"/sys/class/block/{kernel_name(path)}/slaves"))


class NoSpace(OSError):
    """The filesystem cannot hold a file of the asked size."""


def reserve_file(path: str, size: int) -> None:
    """Creates `path` of `size` bytes with every block allocated (no data written: unwritten
    extents read as zeros), so writes into it can never fail for want of space later.
    Raises NoSpace, leaving no new file behind, when the filesystem lacks the room."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    existed = os.path.exists(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        if not existed:
            os.unlink(path)
        raise NoSpace(errno.ENOSPC, f"no room for {size} bytes", path) from e
    finally:
        os.close(fd)


def allocated_bytes(path: str) -> int:
    """Bytes the filesystem holds for `path` (0 when it does not exist)."""
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def free_bytes(path: str) -> tuple[int, int]:
    """(free, total) bytes of the filesystem holding `path` (or its nearest existing parent).
    Free as an unprivileged writer sees it: the root reserve is kept for the system."""
    while not os.path.exists(path):
        path = os.path.dirname(path) or "/"
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def ensure_sparse_file(path: str, size: int) -> None:
    """Creates `path` (sparse) of at least `size` bytes; never shrinks it."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "ab") as f:
        if f.tell() < size:
            f.truncate(size)


@dataclass(frozen=True)
class Loop:
    device: str
    backing_file: str
    readonly: bool


def loops() -> list[Loop]:
    out = _run("losetup --list", ["losetup", "--list", "--noheadings", "--raw",
                                  "-O", "NAME,BACK-FILE,RO"])
    result = []
    for line in out.splitlines():
        w = line.split()
        if len(w) >= 3:
            result.append(Loop(w[0], w[1], w[2] == "1"))
    return result


def loop_attach(backing_file: str, *, readonly: bool = False, direct_io: bool = True) -> str:
    """The loop device over `backing_file`, reused if one exists (idempotent)."""
    real = os.path.realpath(backing_file)
    for lp in loops():
        if lp.backing_file == real and lp.readonly == readonly:
            return lp.device
    cmd = ["losetup", "--find", "--show"]
    if readonly:
        cmd.append("--read-only")
    if direct_io:
        cmd.append("--direct-io=on")
    cmd.append(real)
    return _run(f"losetup {real}", cmd).strip()


def loops_of(backing_file: str) -> list[str]:
    """The loop devices over `backing_file`."""
    real = os.path.realpath(backing_file)
    return [lp.device for lp in loops() if lp.backing_file == real]


def loop_set_capacity(device: str) -> None:
    """Makes the loop device follow its grown backing file."""
    _run(f"losetup --set-capacity {device}", ["losetup", "--set-capacity", device])


def loop_detach(device: str) -> None:
    try:
        _run(f"losetup -d {device}", ["losetup", "--detach", device])
    except BlockDevError as e:
        if "No such" not in e.stderr:
            raise


def flush_buffers(path: str) -> None:
    _run(f"blockdev --flushbufs {path}", ["blockdev", "--flushbufs", path])
