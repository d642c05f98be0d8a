"""Flows over links, each link shared max-min fairly among the flows crossing it.

A flow's rate changes only when a flow that shares a link with it (directly or through
other flows) starts or ends, so each change re-solves only that connected component.
Deterministic; the caller owns the clock and the event queue.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vmthunder.sim.fairshare import FlowDemand, max_min_rates

_DONE = 1e-6  # bytes: less than this left counts as done (float rounding)


@dataclass
class Flow:
    links: tuple[int, ...]
    remaining: float
    weight: float
    cap: float
    tag: object
    rate: float = 0.0
    since: float = 0.0
    version: int = 0
    size: float = 0.0  # bytes at the start


class Network:
    def __init__(
        self, capacity: Sequence[float], schedule: Callable[[float, int, int], None]
    ) -> None:
        """`schedule(at, flow_id, version)` asks the caller to call `finish` at `at`."""
        self.capacity = list(capacity)
        self.users: list[set[int]] = [set() for _ in self.capacity]
        self.flows: dict[int, Flow] = {}
        self.schedule = schedule
        self._next = 0

    def start(
        self,
        now: float,
        links: tuple[int, ...],
        nbytes: float,
        tag: object,
        weight: float = 1.0,
        cap: float = float("inf"),
    ) -> int:
        self._next += 1
        fid = self._next
        self.flows[fid] = Flow(
            links, float(nbytes), weight, cap, tag, since=now, size=float(nbytes)
        )
        for link in links:
            self.users[link].add(fid)
        self._settle(now, links)
        return fid

    def current(self, fid: int, version: int) -> Flow | None:
        """The flow, if this completion event is still the flow's current one."""
        flow = self.flows.get(fid)
        return flow if flow is not None and flow.version == version else None

    def finish(self, now: float, fid: int, version: int) -> Flow | None:
        """The flow, removed, if this completion is still the flow's current one."""
        flow = self.current(fid, version)
        if flow is not None:
            self._remove(now, fid)
        return flow

    def refill(self, now: float, fid: int, nbytes: float, tag: object) -> None:
        """Gives a flow that just completed its bytes more to send on the same links.

        Nothing else on its links changes, so no rate changes: a busy connection that
        sends item after item costs one event per item, not a re-solve."""
        flow = self.flows[fid]
        flow.remaining = flow.size = float(nbytes)
        flow.since = now
        flow.tag = tag
        flow.version += 1
        if flow.rate > 0:
            self.schedule(now + nbytes / flow.rate, fid, flow.version)

    def cancel(self, now: float, fid: int) -> Flow | None:
        """Stops a flow wherever it is (a dead peer, a new parent)."""
        if fid not in self.flows:
            return None
        flow = self.flows[fid]
        flow.remaining -= flow.rate * (now - flow.since)
        self._remove(now, fid)
        return flow

    def _remove(self, now: float, fid: int) -> None:
        flow = self.flows.pop(fid)
        for link in flow.links:
            self.users[link].discard(fid)
        self._settle(now, flow.links)

    def _settle(self, now: float, links: tuple[int, ...]) -> None:
        comp: list[int] = []
        seen_flows: set[int] = set()
        seen_links = set(links)
        todo = list(links)
        while todo:
            for fid in self.users[todo.pop()]:
                if fid not in seen_flows:
                    seen_flows.add(fid)
                    comp.append(fid)
                    for other in self.flows[fid].links:
                        if other not in seen_links:
                            seen_links.add(other)
                            todo.append(other)
        if not comp:
            return
        comp.sort()  # a deterministic order for the solver
        flows = [self.flows[f] for f in comp]
        for f in flows:
            f.remaining -= f.rate * (now - f.since)
            f.since = now
        rates = max_min_rates(
            [FlowDemand(tuple(f.links), f.weight, f.cap) for f in flows],
            {link: self.capacity[link] for link in seen_links},
        )
        for fid, f, rate in zip(comp, flows, rates, strict=True):
            if rate != f.rate or f.version == 0:
                f.rate = rate
                f.version += 1
                if rate > 0:
                    left = max(f.remaining, 0.0)
                    self.schedule(now + (left / rate if left > _DONE else 0.0), fid, f.version)
