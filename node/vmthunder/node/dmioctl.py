"""The two device-mapper calls the agent polls (a table's status, a target message) made as
ioctls on /dev/mapper/control, the way dmsetup makes them, without a dmsetup process each.

A dmsetup process costs ~0.1 s of a TCG guest's CPU, and a hydrating node polls its cache's
status and dm-stats every few seconds and on every round: a tenth of the guest's CPU, taken
from the iSCSI traffic it relays. The layouts are linux/dm-ioctl.h's (interface version 4).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from dataclasses import dataclass

CONTROL = "/dev/mapper/control"
# struct dm_ioctl: version[3], data_size, data_start, target_count, open_count, flags,
# event_nr, padding, dev, name[128], uuid[129], data[7]
_DM_IOCTL = struct.Struct("=3IIIIiIIIQ128s129s7s")
# struct dm_target_spec: sector_start, length, status, next, target_type[16]
_TARGET_SPEC = struct.Struct("=QQiI16s")
_SECTOR = struct.Struct("=Q")  # struct dm_target_msg: sector, then the message
_TABLE_STATUS_CMD = 12
_TARGET_MSG_CMD = 14
_BUFFER_FULL_FLAG = 1 << 8
_NOFLUSH_FLAG = 1 << 11
_DATA_OUT_FLAG = 1 << 16
_FIRST_BUFFER = 16 << 10
_LAST_BUFFER = 64 << 20  # dm-stats of a 64 GiB image in 64 KiB areas: ~40 MiB of text


class DmIoctlError(OSError):
    """An ioctl failed: errno as the kernel said it (ENXIO: no such device)."""


@dataclass(frozen=True)
class TargetLine:
    start: int
    length: int
    type: str
    params: str


def _request(nr: int) -> int:
    return (3 << 30) | (_DM_IOCTL.size << 16) | (0xFD << 8) | nr  # _IOWR(0xfd, nr, dm_ioctl)


def _call(nr: int, name: str, flags: int, payload: bytes = b"") -> tuple[bytearray, int, int]:
    """Calls ioctl `nr` on device `name`, growing the buffer while the kernel says it is full;
    returns the buffer, the flags and the target count the kernel wrote back."""
    encoded = name.encode()
    if not encoded or len(encoded) >= 128 or b"\0" in encoded:
        raise ValueError(f"not a device-mapper name: {name!r}")
    size = max(_FIRST_BUFFER, _DM_IOCTL.size + len(payload) + 1)
    fd = os.open(CONTROL, os.O_RDWR | os.O_CLOEXEC)
    try:
        while True:
            buf = bytearray(size)
            _DM_IOCTL.pack_into(buf, 0, 4, 0, 0, size, _DM_IOCTL.size, 0, 0, flags, 0, 0, 0,
                                encoded, b"", b"")
            buf[_DM_IOCTL.size:_DM_IOCTL.size + len(payload)] = payload
            try:
                fcntl.ioctl(fd, _request(nr), buf)
            except OSError as e:
                raise DmIoctlError(e.errno, f"{name}: {os.strerror(e.errno or 0)}") from None
            fields = _DM_IOCTL.unpack_from(buf, 0)
            out_flags, targets = fields[7], fields[5]
            if not out_flags & _BUFFER_FULL_FLAG:
                return buf, out_flags, targets
            if size >= _LAST_BUFFER:
                raise DmIoctlError(errno.ENOBUFS, f"{name}: the answer exceeds {size} bytes")
            size *= 4
    finally:
        os.close(fd)


def _string(buf: bytearray, at: int) -> str:
    end = buf.index(0, at)
    return buf[at:end].decode()


def table_status(name: str, *, noflush: bool = False) -> list[TargetLine]:
    """`dmsetup status [--noflush] name`: each target's status line."""
    buf, _, count = _call(_TABLE_STATUS_CMD, name, _NOFLUSH_FLAG if noflush else 0)
    lines, at = [], _DM_IOCTL.size
    for _ in range(count):
        start, length, _, following, kind = _TARGET_SPEC.unpack_from(buf, at)
        lines.append(TargetLine(start, length, kind.rstrip(b"\0").decode(),
                                _string(buf, at + _TARGET_SPEC.size)))
        at = _DM_IOCTL.size + following  # `next` counts from the start of the data
    return lines


def target_message(name: str, sector: int, message: str) -> str:
    """`dmsetup message name sector message...`: the target's answer ("" if none)."""
    buf, flags, _ = _call(_TARGET_MSG_CMD, name, 0,
                          _SECTOR.pack(sector) + message.encode() + b"\0")
    return _string(buf, _DM_IOCTL.size) if flags & _DATA_OUT_FLAG else ""
