"""Prefetch in boot-profile order, hydration of what is read, background hydration.

Every node walks the same order (the profile's regions, then the rest), so a parent stays
ahead of its children. The background part yields to this node's VMs and to whatever else
reads from its parent: while they read, it waits, since in a boot storm the CPU and the
parent's link are what the boots need. It does not yield to children reading what it holds
(over its link to them, not its link to its parent): yielding to them made a tree hydrate in
lock-step (a batch here, then the children's pull of it, then 2 s of quiet). It does yield
while any node of the image is prefetching, its volumes held until then (a boot storm): the
walk's bytes cross its parent's link, and its ancestors' while they are not complete, that
the prefetches share, and at N = 8 the walks moved as much as all the prefetches together
before the last VM booted. Each such wait is bounded by the holds it waits for.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vmthunder.node import blockdev, dm, names, stack
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


def plan_read_regions(areas: Sequence[dm.AreaCounters], region_bytes: int,
                      held: Callable[[int], bool] = lambda region: False) -> list[int]:
    """Regions that saw reads but no writes since the last look, and are not `held` yet (the
    agent's own hydration writes back what it reads, so reads without writes are the VMs' and
    the children's; a region already local needs nothing, however often children read it)."""
    return [r for a in areas if a.reads > 0 and a.writes == 0
            and not held(r := a.start * 512 // region_bytes)]


def background_threshold(throttle_bytes_per_second: int, region_bytes: int) -> int:
    """dm-clone throttles by regions in flight, not by rate: about 50 ms worth of the limit."""
    if throttle_bytes_per_second <= 0:
        return 64
    return max(1, min(256, throttle_bytes_per_second // 20 // region_bytes))


def hydration_order(profile: Sequence[int], total: int) -> list[int]:
    """The order every node hydrates in: the boot profile's regions, then the rest ascending.
    One order for all, so "the first k regions" means the same bytes on every node."""
    seen = set(profile)
    return [*profile, *(r for r in range(total) if r not in seen)]


@dataclass(frozen=True)
class MissCount:
    upstream: int  # bytes read through -src, the walk's and every miss here
    own: int  # bytes the walk read


def plan_missed(last: MissCount | None, now: MissCount) -> bool:
    """Whether something other than the walk (a VM, a child) read a region not held here since
    `last`: its read went on to the parent, so -src counted more than the walk read."""
    return last is None or now.upstream - last.upstream > now.own - last.own


@dataclass
class QuietGate:
    """Whether background hydration may go on: for `idle_seconds`, this node's VMs have read
    nothing, and nothing but our own walk has read from the parent. Fed the read counters of
    the cache device, the export (the children's reads) and -src (what went upstream), and
    the bytes the walk itself read. So a child's read of what this node holds does not stop
    the walk; a child's read that misses here, like a VM's read, does. Each figure is compared
    with its highest so far: two counters read one after the other can dip. Pure: the caller
    supplies the clock."""

    idle_seconds: float
    _seen: tuple[int, int] | None = field(default=None, init=False)
    _busy_at: float | None = field(default=None, init=False)

    def open(self, now: float, device_bytes_read: int, own_bytes_read: int,
             children_bytes_read: int = 0, upstream_bytes_read: int | None = None) -> bool:
        vms = device_bytes_read - own_bytes_read - children_bytes_read
        misses = (upstream_bytes_read - own_bytes_read if upstream_bytes_read is not None
                  else 0)
        if self._seen is not None and (vms > self._seen[0] or misses > self._seen[1]):
            self._busy_at = now
        self._seen = ((vms, misses) if self._seen is None
                      else (max(vms, self._seen[0]), max(misses, self._seen[1])))
        return self._busy_at is None or now - self._busy_at >= self.idle_seconds


@dataclass(frozen=True)
class Upstream:
    """What the parent holds, as its replica's status last said. A cache that does not keep
    what it reads (dm-clone) must not read ahead of its parent: such a read passes through the
    parent to the origin, and the region crosses the origin's link once more."""

    hydrated_in_order: int | None = None  # the parent holds order[:n]; None: no limit
    complete: bool = True  # the parent holds the whole image (or is the origin)


UNLIMITED = Upstream()


@dataclass(frozen=True)
class PeerPrefetch:
    """Another node prefetching the image, its volumes held until `until` (time.monotonic()'s
    clock), as its replica's status last said."""

    hydrated_in_order: int  # the peer holds order[:n]
    until: float


def peers_waiting(peers: Sequence[PeerPrefetch], profile_held: int, now: float) -> bool:
    """Whether the background walk should wait for another node's prefetch: one still held
    that holds less of the boot profile than the `profile_held` regions we hold in order. A
    peer as far as we are needs nothing we could make way for (a child caught up with us
    waits for our walk, which must then not wait for it: the agent leaves its hold out of
    the other nodes' gathered one), and a node without a profile (its ConfigMap unread)
    holds nothing back."""
    return any(p.until > now and p.hydrated_in_order < profile_held for p in peers)


def upstream_of(parent_is_origin: bool, parent_status: Mapping[str, Any] | None) -> Upstream:
    if parent_is_origin:
        return UNLIMITED
    st = parent_status or {}
    if st.get("phase") in ("Hydrated", "Detached"):
        return UNLIMITED
    return Upstream(int(st.get("hydratedInOrder", 0)), False)


class Hydrator(threading.Thread):
    """One image: walk the hydration order (prefetch, then background), keep read regions local.

    The walk publishes its progress (`hydrated_in_order`); `upstream` (kept current by the
    agent from the parent's status) holds a backend that does not cache reads behind its
    parent, so a tree hydrates as a pipeline, each region crossing each link once. dm-clone's
    own background hydration sweeps up at the end whatever a restart skipped."""

    def __init__(self, image: str, backend: CacheBackend, *, size: int, region_bytes: int,
                 profile: Sequence[int], queue_depth: int, throttle: int,
                 idle_seconds: float = 0.0, hold_until: float = 0.0,
                 upstream: Upstream = UNLIMITED,
                 on_progress: Callable[[], None] = lambda: None) -> None:
        super().__init__(name=f"hydrate-{image}", daemon=True)
        self.image = image
        self.backend = backend
        self.size = size
        self.region_bytes = region_bytes
        self.profile = list(profile)
        self.queue_depth = queue_depth
        self.throttle = throttle
        self.upstream = upstream
        # Kept current by the agent: the image's other nodes prefetching, their volumes waiting.
        self.peers: tuple[PeerPrefetch, ...] = ()
        self.quiet = QuietGate(idle_seconds)
        self.hold_until = hold_until  # time.monotonic()'s clock
        # After each prefetch batch and at the walk's end: the agent reports at once, as the
        # children follow what this node holds and the volumes wait for the end of the
        # prefetch; a complete cache is detached.
        self.on_progress = on_progress
        self.bytes_read = 0  # through vmt-<image>, by this walk: not the VMs' or children's
        self.hydrated_in_order = 0
        self.prefetch_seconds = 0.0
        self.background_started = False
        self.error: str | None = None
        self.stopping = threading.Event()
        self._misses: MissCount | None = None

    def stop(self) -> None:
        self.stopping.set()

    def holding(self) -> bool:
        """Whether volumes should still wait for the boot profile to be local: it is being
        prefetched, until `hold_until` at most. A VM that starts earlier overtakes the prefetch,
        and a dm-clone cache passes its reads through uncached, so those regions cross the
        links twice and the boot reads at the tree's pace instead of the local disk's."""
        return (self.error is None and self.hydrated_in_order < len(self.profile)
                and time.monotonic() < self.hold_until)

    def run(self) -> None:
        try:
            self._run()
        except Exception as e:  # the agent reports it and starts a new hydrator next round
            log.exception("hydration of %s failed", self.image)
            self.error = f"{type(e).__name__}: {e}"
        finally:
            # The cache complete (to be detached) or the walk failed: a round now, not at the
            # next tick of the agent's interval.
            if not self.stopping.is_set():
                self.on_progress()

    def _limit(self) -> int | None:
        up = self.upstream
        return None if self.backend.caches_reads or up.complete else up.hydrated_in_order

    def _run(self) -> None:
        name = names.cache_dev(self.image)
        stats_id = self._stats(name)
        order = hydration_order(self.profile, -(-self.size // self.region_bytes))
        self.hydrated_in_order = start = self._resume(len(order))
        position = {r: i for i, r in enumerate(order)}
        kept: set[int] = set()  # made local because something read them, out of order

        def held(r: int) -> bool:  # what a resumed walk skipped may be remote: not held
            return start <= position.get(r, len(order)) < self.hydrated_in_order or r in kept

        t0 = time.monotonic()
        looked = 0.0
        while not self.stopping.is_set():
            # Looking at the device costs dmsetup calls (slow in a TCG guest): every few seconds.
            if time.monotonic() - looked > 5:
                st = self.backend.observe(self.image)
                if st.kind != "caching" or st.complete:
                    return
                looked = time.monotonic()
                # While volumes wait for the prefetch, the look is skipped (children read what
                # this node holds): its counters are kept for the next look. So it is while
                # nothing but this walk read from the parent: a read of a region held here
                # needs nothing, and parsing a large image's areas costs seconds of a guest.
                if stats_id is not None and not self.holding() and self._missed():
                    hot = plan_read_regions(dm.stats_print(name, stats_id, clear_after=True),
                                            self.region_bytes, held)
                    if hot:
                        self.bytes_read += self.backend.hydrate(
                            self.image, hot, self.region_bytes, self.size, self.queue_depth)
                        kept.update(hot)
            done = self.hydrated_in_order
            prefetching = done < len(self.profile)
            quiet = self._quiet(name)  # looked at while prefetching too, to know the reads then
            if not prefetching and (not quiet or peers_waiting(
                    self.peers, min(done, len(self.profile)), time.monotonic())):
                self.stopping.wait(0.5)
                continue
            if done >= len(order):
                self._sweep()
                self.stopping.wait(0.5)
                continue
            # Background batches stay small (4 MiB) so a read arriving mid-batch waits little.
            batch = (max(self.queue_depth * 16, 64) if prefetching
                     else max(1, self.throttle // self.region_bytes) if self.throttle else 64)
            limit = self._limit()
            end = min(len(order), done + batch, len(self.profile) if prefetching else len(order),
                      len(order) if limit is None else limit)
            if end <= done:
                self.stopping.wait(0.5)  # the parent is behind: its next report moves us on
                continue
            self.bytes_read += self.backend.hydrate(self.image, order[done:end],
                                                    self.region_bytes, self.size, self.queue_depth)
            self.hydrated_in_order = end
            if prefetching and end >= len(self.profile):
                self.prefetch_seconds = time.monotonic() - t0
                log.info("%s: boot profile prefetched, %d regions in %.1f s", self.image,
                         len(self.profile), self.prefetch_seconds)
            if prefetching:
                self.on_progress()
            if not prefetching and self.throttle:
                self.stopping.wait(1.0)

    def _missed(self) -> bool:
        """Whether reads other than this walk's went on to the parent since the last call."""
        now = MissCount(stack.counters(self.image).bytes_from_parent, self.bytes_read)
        last, self._misses = self._misses, now
        return plan_missed(last, now)

    def _quiet(self, name: str) -> bool:
        if self.quiet.idle_seconds <= 0:
            return True
        served = blockdev.iostat(dm.mapper_path(name)).bytes_read
        # A device that is not there reads 0 (the export comes after the cache, -src may be
        # reloaded): below its high mark, so no read.
        c = stack.counters(self.image)
        return self.quiet.open(time.monotonic(), served, self.bytes_read, c.bytes_served,
                               c.bytes_from_parent)

    def _resume(self, total: int) -> int:
        """Where a new walk starts. From scratch unless the kernel already holds more than the
        profile (an agent restart): then at the count it holds. What that skips (regions held
        out of order) dm-clone's own sweep hydrates at the end."""
        if not self.backend.kernel_background:
            return 0
        held = self.backend.observe(self.image).hydrated
        return min(held, total) if held > len(self.profile) else 0

    def _sweep(self) -> None:
        if (self.backend.kernel_background and not self.background_started
                and self._limit() is None):
            self.backend.start_background(
                self.image, background_threshold(self.throttle, self.region_bytes))
            self.background_started = True

    def _stats(self, name: str) -> int | None:
        if self.backend.name != "dm-clone":
            return None  # copy-on-read caches what is read by itself
        for rid, prog in dm.stats_list(name, PROGRAM_ID):
            if prog == PROGRAM_ID:
                return rid
        return dm.stats_create(name, self.region_bytes // 512, PROGRAM_ID)
