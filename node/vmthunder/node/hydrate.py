"""Prefetch in boot-profile order, hydration of what is read, background hydration.

Every node replays the same profile in the same order, so a parent stays ahead of its children.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vmthunder.node import dm, names
from vmthunder.node.cache import CacheBackend

log = logging.getLogger(__name__)
PROGRAM_ID = "vmthunder"


@dataclass(frozen=True)
class Read:
    offset: int
    length: int


def parse_profile(text: str | bytes) -> list[Read]:
    """A boot profile: the recorded format of vmthunder.lab.profile ("vmthunder-boot-profile 1",
    checksummed), or JSON, a list of reads or {"reads": [...]}, a read being
    {"offset", "length", ...} or [offset, length, ...]. Gaps are ignored: prefetch runs ahead.
    Anything else (corrupt, truncated, wrong types) raises ValueError saying what is wrong."""
    if isinstance(text, bytes):
        try:
            text = text.decode()
        except UnicodeDecodeError as e:
            raise ValueError(f"boot profile is not UTF-8 text: {e}") from None
    if text.startswith("vmthunder-boot-profile"):
        from vmthunder.lab.profile import parse_profile as parse_recorded

        return [Read(r.offset, r.length) for r in parse_recorded(text).reads]
    try:
        data: Any = json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly nested JSON
        raise ValueError(f"boot profile is neither the recorded format nor JSON: {e}") from None
    if isinstance(data, dict):
        key = next((k for k in ("reads", "profile") if k in data), None)
        if key is None:
            raise ValueError("a JSON boot profile object needs a 'reads' list")
        data = data[key]
    if not isinstance(data, list):
        raise ValueError(f"a boot profile is a list of reads, not {type(data).__name__}")

    def integer(v: Any) -> int | None:  # JSON tools may write 4096.0; true is not 1
        if isinstance(v, bool) or not isinstance(v, int | float):
            return None
        return int(v) if isinstance(v, int) or v.is_integer() else None

    out = []
    for i, r in enumerate(data):
        if isinstance(r, dict):
            off, length = integer(r.get("offset")), integer(r.get("length"))
        elif isinstance(r, list) and len(r) >= 2:
            off, length = integer(r[0]), integer(r[1])
        else:
            raise ValueError(f"read {i} of the boot profile is not {{offset, length, ...}} or "
                             f"[offset, length, ...]: {str(r)[:80]}")
        if off is None or length is None or off < 0 or length <= 0:
            raise ValueError(f"read {i} of the boot profile needs an integer offset >= 0 and "
                             f"length > 0: {str(r)[:80]}")
        out.append(Read(off, length))
    return out


def plan_prefetch(reads: Iterable[Read], region_bytes: int, size: int) -> list[int]:
    """Regions the profile touches, in order of first touch, each once, within the image."""
    seen: set[int] = set()
    order: list[int] = []
    total = -(-size // region_bytes)
    for r in reads:
        first = r.offset // region_bytes
        last = (r.offset + r.length - 1) // region_bytes
        for reg in range(first, min(last, total - 1) + 1):
            if reg not in seen:
                seen.add(reg)
                order.append(reg)
    return order


def plan_read_regions(areas: Sequence[dm.AreaCounters], region_bytes: int) -> list[int]:
    """Regions that saw reads but no writes since the last look (the agent's own hydration
    writes back what it reads, so reads without writes are the VMs' and the children's)."""
    return [a.start * 512 // region_bytes for a in areas if a.reads > 0 and a.writes == 0]


def background_threshold(throttle_bytes_per_second: int, region_bytes: int) -> int:
    """dm-clone throttles by regions in flight, not by rate: about 50 ms worth of the limit."""
    if throttle_bytes_per_second <= 0:
        return 64
    return max(1, min(256, throttle_bytes_per_second // 20 // region_bytes))


@dataclass(frozen=True)
class Upstream:
    """What the parent holds, as its replica's status last said. A cache that does not keep
    what it reads (dm-clone) must not read ahead of its parent: such a read passes through the
    parent to the origin, and the region crosses the origin's link once more."""

    prefetched: int | None = None  # profile regions the parent has; None: no limit
    complete: bool = True  # the parent holds the whole image (or is the origin)


UNLIMITED = Upstream()


def upstream_of(parent_is_origin: bool, parent_status: Mapping[str, Any] | None) -> Upstream:
    if parent_is_origin:
        return UNLIMITED
    st = parent_status or {}
    if st.get("phase") in ("Hydrated", "Detached"):
        return UNLIMITED
    return Upstream(int(st.get("prefetchedRegions", 0)), False)


class Hydrator(threading.Thread):
    """One image: prefetch the profile, then keep read regions local, then the background.

    Every node prefetches the same regions in the same order; `upstream` (kept current by the
    agent) holds a non-caching backend behind its parent: prefetch no further than the parent
    has, background hydration only once the parent is complete."""

    def __init__(self, image: str, backend: CacheBackend, *, size: int, region_bytes: int,
                 profile: Sequence[int], queue_depth: int, throttle: int,
                 upstream: Upstream = UNLIMITED) -> None:
        super().__init__(name=f"hydrate-{image}", daemon=True)
        self.image = image
        self.backend = backend
        self.size = size
        self.region_bytes = region_bytes
        self.profile = list(profile)
        self.queue_depth = queue_depth
        self.throttle = throttle
        self.upstream = upstream
        self.prefetched = 0
        self.prefetch_seconds = 0.0
        self.background_started = False
        self.error: str | None = None
        self.stopping = threading.Event()

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        try:
            self._run()
        except Exception as e:  # the agent reports it and starts a new hydrator next round
            log.exception("hydration of %s failed", self.image)
            self.error = f"{type(e).__name__}: {e}"

    def _limit(self) -> Upstream:
        return UNLIMITED if self.backend.caches_reads else self.upstream

    def _run(self) -> None:
        name = names.cache_dev(self.image)
        stats_id = self._stats(name)
        if not self._prefetch():
            return
        next_region = 0
        total = -(-self.size // self.region_bytes)
        while not self.stopping.is_set():
            st = self.backend.observe(self.image)
            if st.kind != "caching" or st.complete:
                return
            if stats_id is not None:
                areas = dm.stats_print(name, stats_id, clear_after=True)
                hot = plan_read_regions(areas, self.region_bytes)
                if hot:
                    self.backend.hydrate(self.image, hot, self.region_bytes, self.size,
                                         self.queue_depth)
            if not self._limit().complete:
                self.stopping.wait(0.5)
                continue
            if self.backend.kernel_background:
                if not self.background_started:
                    self.backend.start_background(
                        self.image, background_threshold(self.throttle, self.region_bytes))
                    self.background_started = True
            elif next_region < total:
                # The agent is the background: a slice per round, within the throttle.
                per_round = (max(1, self.throttle // self.region_bytes) if self.throttle
                             else 256)
                chunk = list(range(next_region, min(total, next_region + per_round)))
                self.backend.hydrate(self.image, chunk, self.region_bytes, self.size,
                                     self.queue_depth)
                next_region += len(chunk)
                self.background_started = True
                if self.throttle:
                    self.stopping.wait(1.0)
                continue
            self.stopping.wait(0.5)

    def _prefetch(self) -> bool:
        """Hydrates the profile in order, in batches, never past the parent. False: stop."""
        t0 = time.monotonic()
        batch = max(self.queue_depth * 16, 64)
        checked = 0.0
        while self.prefetched < len(self.profile):
            if self.stopping.is_set():
                return False
            # Looking at the device costs dmsetup calls (slow in a TCG guest): every few seconds.
            if time.monotonic() - checked > 5:
                if self.backend.observe(self.image).kind != "caching":
                    return False
                checked = time.monotonic()
            limit = self._limit()
            up = None if limit.complete else limit.prefetched
            end = min(len(self.profile), self.prefetched + batch,
                      len(self.profile) if up is None else up)
            if end <= self.prefetched:
                self.stopping.wait(0.5)  # the parent is behind: its next report moves us on
                continue
            chunk = self.profile[self.prefetched:end]
            self.backend.hydrate(self.image, chunk, self.region_bytes, self.size,
                                 self.queue_depth)
            self.prefetched = end
        self.prefetch_seconds = time.monotonic() - t0
        return True

    def _stats(self, name: str) -> int | None:
        if self.backend.name != "dm-clone":
            return None  # copy-on-read caches what is read by itself
        for rid, prog in dm.stats_list(name, PROGRAM_ID):
            if prog == PROGRAM_ID:
                return rid
        return dm.stats_create(name, self.region_bytes // 512, PROGRAM_ID)
