"""Boot profiles: which byte ranges of an image a boot reads, in which order, with which gaps.

Recorded from a real boot of the golden image under qemu (block trace event `blk_co_preadv`
at the guest device, until the image's systemd prints VMT-GOLDEN-BOOTED on its serial port),
stored as a small text file, consumed by the prefetcher and the boot replayer.

File format (text, one item per line; `end` carries the sha256 of the read lines, so a
truncated or edited file is rejected)::

    vmthunder-boot-profile 1
    image-size 805306368
    image-sha256 <64 hex>
    recorded-under tcg
    gap-scale 1.0
    boot-seconds 24.100
    reads 1459
    <offset> <length> <gap_us>      # gap_us: microseconds since the previous read was issued
    ...
    end <sha256 of the read lines, each with its newline>

Gaps recorded under TCG are longer than on hardware. They are kept as recorded
(`gap-scale 1.0`); `BootProfile.scaled(f)` multiplies them by f and records the product in
`gap_scale`, so whoever prints figures can say which scale was used.

Pure part: `parse_profile`, `load_profile`, `dump_profile`, `BootProfile` (no I/O besides
reading the named file). World-touching part: `record_boot_profile` (runs qemu).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

MAGIC = "vmthunder-boot-profile"
VERSION = 1
BOOT_MARKER = "VMT-GOLDEN-BOOTED"
_DIGITS = re.compile(r"[0-9]+")
_HEADER = ("image-size", "image-sha256", "recorded-under", "gap-scale", "boot-seconds", "reads")


class ProfileError(ValueError):
    """A boot profile file is corrupt, truncated or inconsistent; says where."""


@dataclass(frozen=True)
class Read:
    offset: int
    length: int
    gap_us: int


@dataclass(frozen=True)
class BootProfile:
    image_size: int
    image_sha256: str
    recorded_under: str
    gap_scale: float
    boot_seconds: float
    reads: tuple[Read, ...]

    @property
    def bytes_read(self) -> int:
        """Total bytes the boot read, re-reads included."""
        return sum(r.length for r in self.reads)

    @property
    def unique_bytes(self) -> int:
        """Bytes of the image the boot touched at least once."""
        return sum(end - start for start, end in merge_extents(self.reads))

    @property
    def total_gap_us(self) -> int:
        return sum(r.gap_us for r in self.reads)

    def scaled(self, factor: float) -> BootProfile:
        """Gaps multiplied by factor (e.g. 0.1 to approximate hardware from TCG)."""
        if factor < 0:
            raise ValueError("gap scale must be >= 0")
        reads = tuple(replace(r, gap_us=round(r.gap_us * factor)) for r in self.reads)
        return replace(self, reads=reads, gap_scale=self.gap_scale * factor)

    def regions(self, region_size: int) -> list[int]:
        """Indices of the region_size regions the boot touches, in first-touch order."""
        if region_size <= 0:
            raise ValueError("region size must be > 0")
        seen: set[int] = set()
        order: list[int] = []
        for r in self.reads:
            for i in range(r.offset // region_size, (r.offset + r.length - 1) // region_size + 1):
                if i not in seen:
                    seen.add(i)
                    order.append(i)
        return order


def merge_extents(reads: Iterable[Read]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted((r.offset, r.offset + r.length) for r in reads):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _records_digest(lines: Iterable[str]) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode(errors="surrogatepass") + b"\n")  # a lone surrogate: no crash
    return h.hexdigest()


def dump_profile(p: BootProfile) -> str:
    body = [f"{r.offset} {r.length} {r.gap_us}" for r in p.reads]
    head = [
        f"{MAGIC} {VERSION}",
        f"image-size {p.image_size}",
        f"image-sha256 {p.image_sha256}",
        f"recorded-under {p.recorded_under}",
        f"gap-scale {p.gap_scale!r}",
        f"boot-seconds {p.boot_seconds:.3f}",
        f"reads {len(p.reads)}",
    ]
    return "\n".join([*head, *body, f"end {_records_digest(body)}"]) + "\n"


def parse_profile(text: str, source: str = "<profile>") -> BootProfile:
    """Parses and validates a profile; raises ProfileError naming the line at fault."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    else:
        raise ProfileError(f"{source}: truncated (no final newline)")

    def fail(n: int, msg: str) -> ProfileError:
        return ProfileError(f"{source}:{n + 1}: {msg}")

    if not lines or lines[0] != f"{MAGIC} {VERSION}":
        head = lines[0][:40] if lines else ""
        raise fail(0, f"not a boot profile v{VERSION} (first line {head!r})")
    fields: dict[str, str] = {}
    for n, key in enumerate(_HEADER, start=1):
        if n >= len(lines):
            raise fail(n, f"truncated: missing {key}")
        k, _, v = lines[n].partition(" ")
        if k != key or not v:
            raise fail(n, f"expected '{key} <value>', got {lines[n][:60]!r}")
        fields[key] = v
    try:
        image_size = int(fields["image-size"])
        gap_scale = float(fields["gap-scale"])
        boot_seconds = float(fields["boot-seconds"])
        count = int(fields["reads"])
    except ValueError as e:
        raise ProfileError(f"{source}: bad header value: {e}") from e
    finite = math.isfinite(gap_scale) and math.isfinite(boot_seconds)
    if image_size <= 0 or count < 0 or gap_scale < 0 or boot_seconds < 0 or not finite:
        raise ProfileError(f"{source}: header values out of range")
    if not re.fullmatch(r"[0-9a-f]{64}", fields["image-sha256"]):
        raise fail(2, "image-sha256 is not 64 hex digits")
    first = len(_HEADER) + 1
    body = lines[first : first + count]
    if len(body) < count or len(lines) != first + count + 1:
        raise ProfileError(
            f"{source}: truncated or padded: header says {count} reads, "
            f"file has {max(0, len(lines) - first - 1)} lines between header and end"
        )
    end = lines[first + count]
    if not end.startswith("end "):
        raise fail(first + count, f"expected 'end <sha256>', got {end[:60]!r}")
    if end[4:] != _records_digest(body):
        raise fail(first + count, "checksum mismatch: the read lines were altered")
    reads = []
    for i, line in enumerate(body):
        parts = line.split(" ")
        # ASCII digits only: str.isdigit() also takes "²", which int() then refuses.
        if len(parts) != 3 or not all(_DIGITS.fullmatch(x) for x in parts):
            raise fail(first + i, f"expected '<offset> <length> <gap_us>', got {line[:60]!r}")
        off, length, gap = (int(x) for x in parts)
        if length <= 0 or off + length > image_size:
            raise fail(first + i, f"read {off}+{length} is outside the image ({image_size})")
        reads.append(Read(off, length, gap))
    return BootProfile(
        image_size=image_size,
        image_sha256=fields["image-sha256"],
        recorded_under=fields["recorded-under"],
        gap_scale=gap_scale,
        boot_seconds=boot_seconds,
        reads=tuple(reads),
    )


def load_profile(path: str | Path) -> BootProfile:
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(f"{path}: cannot read: {e}") from e
    return parse_profile(text, str(path))


_TRACE = re.compile(
    r"^\d+@(\d+)\.(\d+):blk_co_preadv blk \S+ bs \S+ offset (\d+) bytes (\d+) flags"
)


def reads_from_trace(lines: Iterable[str], until_us: int | None = None) -> tuple[Read, ...]:
    """qemu `-trace enable=blk_co_preadv -msg timestamp=on` log lines -> reads (pure)."""
    out: list[Read] = []
    prev: int | None = None
    for line in lines:
        m = _TRACE.match(line)
        if not m:
            continue
        t = int(m[1]) * 1_000_000 + int(m[2])
        if until_us is not None and t > until_us:
            break
        out.append(Read(int(m[3]), int(m[4]), 0 if prev is None else max(0, t - prev)))
        prev = t
    return tuple(out)


def boot_vm(drive: str, serial: Path, *, timeout: float = 600, mem_mib: int = 512,
            extra: Sequence[str] = ()) -> float:
    """Boots a VM under qemu TCG from `drive` (a qemu -drive file=, e.g. a path or
    nbd://host:port) until its console prints BOOT_MARKER; returns that moment (time.time())."""
    serial.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [
            "qemu-system-x86_64", "-accel", "tcg", "-m", str(mem_mib), "-smp", "1",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-serial", f"file:{serial}",
            "-drive", f"file={drive},if=virtio,format=raw", *extra,
        ],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    t0 = time.time()
    try:
        while time.time() - t0 < timeout:
            if BOOT_MARKER in (serial.read_text(errors="replace") if serial.exists() else ""):
                return time.time()
            if proc.poll() is not None:
                break
            time.sleep(0.1)
    finally:
        proc.kill()
        _, err = proc.communicate()
    tail = serial.read_text(errors="replace")[-2000:] if serial.exists() else ""
    raise ProfileError(f"{drive}: no {BOOT_MARKER} within {timeout:.0f}s; serial: {tail}; "
                       f"qemu: {err.decode(errors='replace')[-1000:]}")


def record_boot_profile(
    image: Path, out: Path, timeout: float = 600, mem_mib: int = 512
) -> BootProfile:
    """Boots image under qemu TCG (writes go to a throwaway snapshot) and records its reads."""
    work = out.parent / f".{out.name}.rec"
    work.mkdir(parents=True, exist_ok=True)
    trace, serial = work / "trace.log", work / "serial.log"
    trace.unlink(missing_ok=True)
    t0 = time.time()
    booted_at = boot_vm(f"{image},snapshot=on", serial, timeout=timeout, mem_mib=mem_mib,
                        extra=["-trace", "enable=blk_co_preadv", "-D", str(trace),
                               "-msg", "timestamp=on"])
    reads = reads_from_trace(trace.read_text().splitlines(), until_us=int(booted_at * 1e6))
    h = hashlib.sha256()
    with open(image, "rb") as img:
        while chunk := img.read(1 << 22):
            h.update(chunk)
    p = BootProfile(
        image_size=image.stat().st_size,
        image_sha256=h.hexdigest(),
        recorded_under="tcg",
        gap_scale=1.0,
        boot_seconds=round(booted_at - t0, 3),
        reads=reads,
    )
    tmp = out.with_suffix(".tmp")
    tmp.write_text(dump_profile(p))
    tmp.replace(out)
    for f in (trace, serial):
        f.unlink(missing_ok=True)
    work.rmdir()
    return p


def describe(p: BootProfile) -> str:
    mib = 1 << 20
    return (
        f"{len(p.reads)} reads, {p.bytes_read / mib:.1f} MiB read "
        f"({p.unique_bytes / mib:.1f} MiB unique) of a {p.image_size / mib:.0f} MiB image "
        f"= {100 * p.unique_bytes / p.image_size:.1f}%; boot {p.boot_seconds:.1f}s under "
        f"{p.recorded_under}; gaps sum {p.total_gap_us / 1e6:.1f}s at gap scale {p.gap_scale:g}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vmthunder lab profile", description="boot profiles")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record", help="boot IMAGE under qemu and write its profile to OUT")
    r.add_argument("image", type=Path)
    r.add_argument("out", type=Path)
    r.add_argument("--timeout", type=float, default=600)
    s = sub.add_parser("show", help="validate and summarize a profile")
    s.add_argument("profile", type=Path)
    s.add_argument("--gap-scale", type=float, default=1.0)
    a = ap.parse_args(argv)
    try:
        if a.cmd == "record":
            print(describe(record_boot_profile(a.image, a.out, a.timeout)))
        else:
            print(describe(load_profile(a.profile).scaled(a.gap_scale)))
    except ProfileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
