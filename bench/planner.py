"""How fast the tree planner plans, and how deep its trees are, at the operator's and the
simulator's sizes. Prints a table. Target: 10,000 nodes well under a second.

    $(./scripts/setup-python.sh)/bin/python bench/planner.py
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from functools import partial

from vmthunder.operator.planner import (
    NodeState,
    Placement,
    optimal_depth,
    plan_changes,
    plan_depth,
    plan_tree,
)

RACK = 40  # nodes per rack in the racked cases


def timed(
    fn: Callable[[], dict[str, Placement]], repeat: int = 3
) -> tuple[float, dict[str, Placement]]:
    best, plan = float("inf"), {}
    for _ in range(repeat):
        start = time.perf_counter()
        plan = fn()
        best = min(best, time.perf_counter() - start)
    return best, plan


def nodes_for(n: int, racked: bool) -> list[NodeState]:
    return [
        NodeState(f"node-{i:05d}", topology=f"rack-{i // RACK:03d}" if racked else None)
        for i in range(n)
    ]


def replan(
    nodes: Sequence[NodeState], plan: dict[str, Placement], fail: float, join: int
) -> list[NodeState]:
    rnd = random.Random(7)
    out = [
        NodeState(n.name, rnd.random() >= fail, n.topology, plan[n.name].parent, n.hydrated)
        for n in nodes
    ]
    out += [NodeState(f"new-{i:05d}", topology=None) for i in range(join)]
    return out


def main() -> None:
    fanout = 4
    print(f"fan-out {fanout}, racks of {RACK}; time = best of 3, single thread")
    print(f"{'nodes':>6} {'case':<26} {'plan ms':>8} {'depth':>6} {'optimum':>8} {'moved':>6}")
    for n in (1_000, 5_000, 10_000):
        for racked in (False, True):
            nodes = nodes_for(n, racked)
            label = "racked" if racked else "flat"
            t, plan = timed(partial(plan_tree, nodes, fanout))
            opt = optimal_depth(n, fanout)
            print(
                f"{n:>6} {'fresh ' + label:<26} {t * 1e3:>8.1f} {plan_depth(plan):>6} "
                f"{opt:>8} {'':>6}"
            )
            later = replan(nodes, plan, fail=0.05, join=n // 20)
            t2, plan2 = timed(partial(plan_tree, later, fanout))
            moved = sum(1 for c in plan_changes(plan, plan2) if c.old and c.new)
            print(
                f"{n:>6} {'5% fail + 5% join ' + label:<26} {t2 * 1e3:>8.1f} "
                f"{plan_depth(plan2):>6} {optimal_depth(len(plan2), fanout):>8} {moved:>6}"
            )


if __name__ == "__main__":
    main()
