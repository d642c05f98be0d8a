"""Mounts and filesystems: /proc/self/mountinfo, mount, umount, blkid, mkfs, growfs."""

from __future__ import annotations

import ctypes
import os
import re
from dataclasses import dataclass
from pathlib import Path

from vmthunder.csi._command import CommandError, run


class MountError(CommandError):
    """mount, umount, blkid, mkfs or a resize tool failed."""


@dataclass(frozen=True)
class MountInfo:
    mount_point: str
    root: str
    major: int
    minor: int
    fstype: str
    source: str
    options: frozenset[str]

    @property
    def readonly(self) -> bool:
        return "ro" in self.options


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts() -> list[MountInfo]:
    result = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, right = line.split(" - ", 1)
        fields = left.split()
        major, minor = fields[2].split(":")
        fstype, source, *_ = right.split()
        result.append(MountInfo(
            mount_point=_unescape(fields[4]), root=_unescape(fields[3]),
            major=int(major), minor=int(minor), fstype=fstype, source=_unescape(source),
            options=frozenset(fields[5].split(",")),
        ))
    return result


def mounted_at(path: str) -> MountInfo | None:
    """The top mount at `path` (the last one listed), or None."""
    real = os.path.realpath(path)
    found = None
    for m in mounts():
        if m.mount_point == real:
            found = m
    return found


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
MS_RDONLY, MS_REMOUNT, MS_BIND = 1, 32, 4096
KEPT_ON_REMOUNT = (os.ST_NOSUID | os.ST_NODEV | os.ST_NOEXEC | os.ST_NOATIME
                   | os.ST_NODIRATIME)


def _call(argv: list[str], result: int) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise MountError(argv, errno, os.strerror(errno))


def bind(source: str, target: str, readonly: bool = False) -> None:
    """A bind mount by the syscall: no mount(8) process (a second of a busy emulated guest,
    which a VM waits for at every publish)."""
    _call(["mount", "--bind", source, target],
          _libc.mount(source.encode(), target.encode(), None, MS_BIND, None))
    if readonly:
        # A remount sets all the mount's flags: keep those the bind inherited, as mount(8)
        # does (statvfs's ST_ bits for these have the MS_ values).
        kept = os.statvfs(target).f_flag & KEPT_ON_REMOUNT
        _call(["mount", "-o", "remount,bind,ro", target],
              _libc.mount(None, target.encode(), None,
                          MS_REMOUNT | MS_BIND | MS_RDONLY | kept, None))


def mount(device: str, target: str, fstype: str, options: list[str], readonly: bool) -> None:
    opts = [*options, "ro"] if readonly else list(options)
    argv = ["mount", "-t", fstype]
    if opts:
        argv += ["-o", ",".join(opts)]
    run([*argv, device, target], MountError)


def umount(target: str) -> None:
    _call(["umount", target], _libc.umount2(target.encode(), 0))


def signatures(device: str) -> dict[str, str]:
    """What blkid finds on `device` (TYPE for a filesystem, PTTYPE for a partition table);
    empty when the device is blank (blkid exits 2)."""
    out = run(["blkid", "-p", "-o", "export", device], MountError, ok_codes=(0, 2)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def mkfs(device: str, fstype: str) -> None:
    force = "-f" if fstype == "xfs" else "-F"
    run([f"mkfs.{fstype}", force, "-q", device], MountError, timeout=600)


def grow(device: str, mount_point: str, fstype: str) -> None:
    if fstype == "xfs":
        run(["xfs_growfs", mount_point], MountError, timeout=600)
    else:
        run(["resize2fs", device], MountError, timeout=600)
