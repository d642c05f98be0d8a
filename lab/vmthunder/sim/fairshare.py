"""Max-min fair sharing of links among flows (progressive filling).

Pure. A flow crosses some links, may have its own rate cap (a throttle), and may stand for
`weight` identical flows (the baselines simulate one node per rack for a whole rack): each
of them gets the returned rate, so it takes weight x rate of every link it crosses.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

_EPS = 1e-9


@dataclass(frozen=True)
class FlowDemand:
    links: tuple[Hashable, ...]
    weight: float = 1.0
    cap: float = float("inf")


def max_min_rates(flows: Sequence[FlowDemand], capacity: Mapping[Hashable, float]) -> list[float]:
    """The max-min fair rate of each flow: no flow can get more without taking from a flow
    that has no more than it. A flow with no link and no cap would be unbounded: rejected."""
    rate = [0.0] * len(flows)
    active = set()
    left: dict[Hashable, float] = {}
    users: dict[Hashable, list[int]] = {}
    for i, f in enumerate(flows):
        if not f.links and f.cap == float("inf"):
            raise ValueError(f"flow {i} crosses no link and has no cap")
        if f.weight <= 0:
            raise ValueError(f"flow {i} has weight {f.weight}")
        if f.cap <= 0:
            continue  # a zero cap: it gets nothing and constrains nobody
        active.add(i)
        for link in f.links:
            left[link] = capacity[link]
            users.setdefault(link, []).append(i)
    while active:
        # Raise every active flow by the same amount until a link fills or a cap is hit.
        step = float("inf")
        for link, idx in users.items():
            w = sum(flows[i].weight for i in idx if i in active)
            if w > 0:
                step = min(step, left[link] / w)
        for i in active:
            step = min(step, flows[i].cap - rate[i])
        step = max(step, 0.0)
        for i in active:
            rate[i] += step
        frozen = set()
        for link, idx in users.items():
            on = [i for i in idx if i in active]
            if not on:
                continue
            left[link] -= step * sum(flows[i].weight for i in on)
            if left[link] <= _EPS * max(1.0, capacity[link]):
                frozen.update(on)
        for i in active:
            if rate[i] >= flows[i].cap - _EPS * max(1.0, flows[i].cap):
                frozen.add(i)
        active -= frozen
    return rate
