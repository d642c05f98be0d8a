"""Boot profiles: what a booting VM reads, in order, and how long it computes in between.

Pure (the loader only parses text it is given; `find_lab_profile` only looks for a path).
The lab records a real boot as a small JSON file of ordered reads; until it exists the
simulator uses a synthetic profile whose parameters are stated in `SyntheticProfile`.

Accepted JSON (the lab's format, and the node agent's `parse_profile` reads the same reads):
    {"image_bytes": 2147483648, "tail_s": 0.8,
     "reads": [{"offset": 0, "length": 4096, "gap_s": 0.002}, ...]}
or a bare list of reads. A read is an object or a list [offset, length, gap_s]. The gap is
the compute time before the read is issued (time since the previous read completed). If the
reads carry issue times "t" instead (seconds since boot start), the gaps are the differences
of those times minus the recorded read latency "lat_s" where present.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class Read:
    offset: int
    length: int
    gap_s: float = 0.0  # compute before this read is issued


@dataclass(frozen=True)
class BootProfile:
    image_bytes: int
    reads: tuple[Read, ...]
    tail_s: float = 0.0  # compute after the last read until the guest counts as booted
    source: str = "synthetic"

    @property
    def read_bytes(self) -> int:
        return sum(r.length for r in self.reads)

    @property
    def compute_s(self) -> float:
        return sum(r.gap_s for r in self.reads) + self.tail_s


@dataclass(frozen=True)
class Step:
    """Reads issued together (no compute between them): the VM waits for all of them."""

    gap_s: float  # compute before the step
    regions: tuple[int, ...]  # ranks (see plan_steps) of the regions the step reads
    bytes: int  # bytes the step reads
    reads: int = 1  # read requests the step issues


@dataclass(frozen=True)
class StepPlan:
    steps: tuple[Step, ...]
    order: tuple[int, ...]  # image region index of each rank: the first-touch order
    region_bytes: int
    tail_s: float

    @property
    def working_set_regions(self) -> int:
        return len(self.order)


def plan_steps(profile: BootProfile, region_bytes: int, merge_gap_s: float = 0.001) -> StepPlan:
    """Groups the profile's reads into steps and numbers the regions they touch by first
    touch (rank 0 is read first). Reads less than `merge_gap_s` apart join one step: they
    would be in flight together, and fewer steps make a faster simulation."""
    rank: dict[int, int] = {}
    order: list[int] = []
    steps: list[Step] = []
    cur_gap, cur_bytes, cur_reads = 0.0, 0, 0
    cur_regions: list[int] = []
    seen_in_step: set[int] = set()
    for i, r in enumerate(profile.reads):
        if i > 0 and r.gap_s >= merge_gap_s:
            steps.append(Step(cur_gap, tuple(cur_regions), cur_bytes, cur_reads))
            cur_gap, cur_regions, cur_bytes, cur_reads = r.gap_s, [], 0, 0
            seen_in_step = set()
        elif i == 0:
            cur_gap = r.gap_s
        else:
            cur_gap += r.gap_s
        first = r.offset // region_bytes
        last = (r.offset + r.length - 1) // region_bytes
        for reg in range(first, last + 1):
            if reg not in rank:
                rank[reg] = len(order)
                order.append(reg)
            k = rank[reg]
            if k not in seen_in_step:
                seen_in_step.add(k)
                cur_regions.append(k)
        cur_bytes += r.length
        cur_reads += 1
    if profile.reads:
        steps.append(Step(cur_gap, tuple(cur_regions), cur_bytes, cur_reads))
    return StepPlan(tuple(steps), tuple(order), region_bytes, profile.tail_s)


def parse_profile(text: str, source: str = "file", image_bytes: int | None = None) -> BootProfile:
    data: Any = json.loads(text)
    tail = 0.0
    if isinstance(data, dict):
        image_bytes = int(data.get("image_bytes", image_bytes or 0)) or image_bytes
        tail = float(data.get("tail_s", 0.0))
        data = data.get("reads", [])
    if not isinstance(data, list):
        raise ValueError("a boot profile is a list of reads")
    reads: list[Read] = []
    prev_t: float | None = None
    prev_lat = 0.0
    for r in data:
        if isinstance(r, dict):
            off, length = int(r["offset"]), int(r["length"])
            if "gap_s" in r:
                gap = float(r["gap_s"])
            elif "t" in r:
                t = float(r["t"])
                gap = 0.0 if prev_t is None else max(0.0, t - prev_t - prev_lat)
                prev_t, prev_lat = t, float(r.get("lat_s", 0.0))
            else:
                gap = 0.0
        elif isinstance(r, list | tuple) and len(r) >= 2:
            off, length = int(r[0]), int(r[1])
            gap = float(r[2]) if len(r) > 2 else 0.0
        else:
            raise ValueError(f"bad read in boot profile: {r!r}")
        if off < 0 or length <= 0 or gap < 0:
            raise ValueError(f"bad read in boot profile: {r!r}")
        reads.append(Read(off, length, gap))
    end = max((r.offset + r.length for r in reads), default=0)
    size = image_bytes if image_bytes else end
    if end > size:
        raise ValueError(f"profile reads up to {end} past the image's {size} bytes")
    return BootProfile(size, tuple(reads), tail, source)


def find_lab_profile(lab_dir: Path) -> Path | None:
    """The lab's recorded boot profile, if the lab has produced one."""
    found = sorted(p for p in lab_dir.rglob("*profile*.json") if p.is_file())
    return found[0] if found else None


@dataclass(frozen=True)
class SyntheticProfile:
    """A boot-like profile with stated parameters, used until the lab's real one exists.

    Defaults describe the seed's case as we model it: a 10 GiB image of which a boot reads
    about 2 % (clustered, mostly small reads, like a Linux boot), with about 12 s of compute
    and local reads on a warm local disk."""

    image_bytes: int = 10 * GiB
    read_bytes: int = 200 * MiB
    reads: int = 4000
    compute_s: float = 12.0
    tail_s: float = 1.0  # part of compute_s, after the last read
    cluster_bytes: int = 8 * MiB  # files read at boot sit in clusters of this extent
    seed: int = 1

    def build(self) -> BootProfile:
        rnd = random.Random(self.seed)
        sizes = [4096, 8192, 16384, 32768, 65536, 131072]
        lengths = [rnd.choice(sizes) for _ in range(self.reads)]
        scale = self.read_bytes / sum(lengths)
        lengths = [max(4096, int(n * scale) // 4096 * 4096) for n in lengths]
        offsets: list[int] = []
        base = pos = 0
        for length in lengths:
            if not offsets or rnd.random() < 0.08:  # jump to another cluster of files
                base = rnd.randrange(0, self.image_bytes - self.cluster_bytes) // 4096 * 4096
                pos = base
            elif rnd.random() < 0.3:  # a nearby file in the same cluster
                pos = base + rnd.randrange(0, self.cluster_bytes - length) // 4096 * 4096
            offsets.append(pos)
            pos = min(pos + length, base + self.cluster_bytes - length)
        # Compute gaps: many tiny ones, a few long pauses (service start-ups).
        raw = [rnd.expovariate(1.0) ** 3 for _ in range(self.reads)]
        budget = self.compute_s - self.tail_s
        total = sum(raw)
        gaps = [budget * g / total for g in raw]
        reads = tuple(Read(o, n, g) for o, n, g in zip(offsets, lengths, gaps, strict=True))
        return BootProfile(self.image_bytes, reads, self.tail_s, f"synthetic {self}")


def describe(profile: BootProfile) -> str:
    return (
        f"{len(profile.reads)} reads, {profile.read_bytes / MiB:.0f} MiB read of a "
        f"{profile.image_bytes / GiB:.1f} GiB image, {profile.compute_s:.1f} s compute"
    )
