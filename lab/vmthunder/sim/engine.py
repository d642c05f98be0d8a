"""One boot storm, simulated: VMThunder on the planner's tree, or a baseline.

VMThunder: every node attaches to its parent (the planner's tree), its VM replays the boot
profile step by step; a region the VM needs and the node lacks is fetched on demand from the
parent, which fetches it from its own parent if it lacks it too (one fetch per region per
node: later requests wait for it), keeps it and serves it to its children. Prefetch replays
the profile's regions in first-touch order with a bounded number in flight; background
hydration then copies the rest of the image in the same order on every node, throttled, from
a parent that already has it; a node that holds the whole image is detached (it needs no
parent, and keeps serving its children). Parent failures: the node dies with its VM; after
`detect_s` the planner re-plans; each moved node logs in to its new parent after
`reattach_s` and re-asks what it was waiting for.

Baselines, on the same links: copy-first (each node copies the whole image from the origin,
then boots from local disk), one storage server (each VM reads what it reads straight from
the origin, nothing cached), local warm disk (the floor). All VMs start together and run the
same profile, so the baselines simulate one node per rack standing for all its nodes (flow
weight = rack size): exact by symmetry, and cheap at 10,000 nodes.

Timing per hop: a request that the parent can serve at once costs a round trip plus the
per-request overhead before its bytes flow; a request the parent must first fetch is served
one latency plus overhead after the parent has the region. Bytes flow at the max-min fair rate
of every link they cross (sender's uplink, rack uplinks when crossing racks, receiver's
downlink).
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import cast

from vmthunder.operator.planner import ORIGIN, NodeState, plan_depth, plan_tree
from vmthunder.sim.calibration import Calibration, local_read_s, with_host_link
from vmthunder.sim.events import EventQueue
from vmthunder.sim.network import Network
from vmthunder.sim.profile import BootProfile, StepPlan, plan_steps


class Mode(Enum):
    VMTHUNDER = "vmthunder"
    COPY_FIRST = "copy-first"
    ONE_SERVER = "one-server"
    LOCAL = "local"


@dataclass(frozen=True)
class Failure:
    at_s: float  # when, after the storm starts
    fraction: float  # of the interior nodes (those with children) that die then
    seed: int = 1


@dataclass(frozen=True)
class Scenario:
    name: str
    nodes: int
    mode: Mode = Mode.VMTHUNDER
    fanout: int = 4
    origin_fanout: int | None = None
    rack_size: int | None = None  # None: one flat network
    prefetch: bool = True
    hydrate: bool = True  # background hydration after the working set
    until_hydrated: bool = False  # run until every node is detached, not just booted
    failure: Failure | None = None


@dataclass
class Result:
    scenario: Scenario
    boot_s: list[float]  # per VM that booted, from the start of the storm
    dead: int = 0
    origin_bytes: float = 0.0
    hydrated_s: list[float] = field(default_factory=list)
    depth: int = 0
    reparented: int = 0
    events: int = 0
    wall_s: float = 0.0
    end_s: float = 0.0

    @property
    def all_booted_s(self) -> float:
        return max(self.boot_s, default=math.nan)

    @property
    def mean_boot_s(self) -> float:
        return sum(self.boot_s) / len(self.boot_s) if self.boot_s else math.nan


def local_boot_s(steps: StepPlan, cal: Calibration) -> float:
    """A boot with every block on the local disk: compute plus local reads."""
    return sum(s.gap_s + local_read_s(s.bytes, s.reads, cal) for s in steps.steps) + steps.tail_s


def simulate(sc: Scenario, profile: BootProfile, cal: Calibration) -> Result:
    started = time.perf_counter()
    steps = plan_steps(profile, cal.region_bytes, cal.merge_gap_s)
    if sc.mode is Mode.VMTHUNDER:
        result = _Storm(sc, profile, steps, cal).run()
    else:
        result = _baseline(sc, profile, steps, cal)
    result.wall_s = time.perf_counter() - started
    return result


# --- baselines ----------------------------------------------------------------------------


def _groups(sc: Scenario) -> list[int]:
    """Sizes of the groups of identical nodes: one per rack, or one for a flat network."""
    if sc.rack_size is None:
        return [sc.nodes]
    full, rest = divmod(sc.nodes, sc.rack_size)
    return [sc.rack_size] * full + ([rest] if rest else [])


def _baseline(sc: Scenario, profile: BootProfile, steps: StepPlan, cal: Calibration) -> Result:
    floor = local_boot_s(steps, cal)
    if sc.mode is Mode.LOCAL:
        boot = cal.attach_s + floor
        return Result(sc, [boot] * sc.nodes, end_s=boot)
    groups = _groups(sc)
    racked = sc.rack_size is not None
    # links: 0 the origin's uplink, 1+g rack g's downlink (shared by the group: weighted);
    # each member's own NIC is a cap on its flow, not a link the group shares
    capacity = [cal.origin_bps] + [cal.rack_uplink_bps if racked else math.inf] * len(groups)
    host = with_host_link(capacity, cal)
    queue: EventQueue[tuple[str, int, int]] = EventQueue()

    def schedule(at: float, fid: int, version: int) -> None:
        queue.push(at, ("flow", fid, version))

    net = Network(capacity, schedule)
    res = Result(sc, [])
    step_of = [0] * len(groups)

    def links(g: int) -> tuple[int, ...]:
        own = (0, 1 + g) if racked else (0,)
        return own if host is None else (*own, host)

    for g, size in enumerate(groups):
        if sc.mode is Mode.COPY_FIRST:
            net.start(0.0, links(g), profile.image_bytes, g, weight=size, cap=cal.node_bps)
        elif steps.steps:
            queue.push(cal.attach_s + steps.steps[0].gap_s, ("issue", g, 0))
        else:
            res.boot_s += [cal.attach_s + steps.tail_s] * size
    while (item := queue.pop()) is not None:
        now, (kind, a, b) = item
        res.events += 1
        if kind == "issue":  # a step's reads go out; bytes flow after one round trip
            queue.push(now + cal.hop_delay(), ("read", a, 0))
        elif kind == "read":
            nbytes = steps.steps[step_of[a]].bytes
            net.start(now, links(a), nbytes, a, weight=groups[a], cap=cal.node_bps)
        else:
            flow = net.finish(now, a, b)
            if flow is None:
                continue
            res.origin_bytes += flow.size * flow.weight
            g = int(flow.tag)  # type: ignore[call-overload]
            if sc.mode is Mode.COPY_FIRST:
                res.boot_s += [now + cal.attach_s + floor] * groups[g]
                continue
            done = now + steps.steps[step_of[g]].reads * cal.local_request_s  # node's own stack
            s = step_of[g] = step_of[g] + 1
            if s == len(steps.steps):
                res.boot_s += [done + steps.tail_s] * groups[g]
            else:
                queue.push(done + steps.steps[s].gap_s, ("issue", g, 0))
    res.end_s = max(res.boot_s, default=0.0)
    return res


# --- VMThunder ------------------------------------------------------------------------------

_VM = -1  # a waiter that is the node's own VM (children are waiters by index)
_ORIGIN = -1  # parent index of the origin's children


@dataclass(frozen=True)
class _Units:
    """The working set in simulation units: runs of regions consecutive in first-touch order
    (every node fetches in that order), so a unit is fetched, cached and served as one."""

    sizes: tuple[int, ...]  # bytes of each unit
    steps: tuple[tuple[int, ...], ...]  # units each step waits for
    local_s: tuple[float, ...]  # each step's reads served by the node itself
    gaps: tuple[float, ...]


def _units(steps: StepPlan, cal: Calibration) -> _Units:
    per = max(1, cal.sim_unit_bytes // cal.region_bytes)
    count = math.ceil(steps.working_set_regions / per)
    sizes = tuple(
        min(per, steps.working_set_regions - u * per) * cal.region_bytes for u in range(count)
    )
    unit_steps = []
    for st in steps.steps:
        seen: dict[int, None] = {}
        for r in st.regions:
            seen.setdefault(r // per)
        unit_steps.append(tuple(seen))
    return _Units(
        sizes,
        tuple(unit_steps),
        tuple(local_read_s(st.bytes, st.reads, cal) for st in steps.steps),
        tuple(st.gap_s for st in steps.steps),
    )


class _Storm:
    def __init__(
        self, sc: Scenario, profile: BootProfile, steps: StepPlan, cal: Calibration
    ) -> None:
        self.sc, self.cal, self.tail_s = sc, cal, steps.tail_s
        self.units = _units(steps, cal)
        n = self.n = sc.nodes
        self.names = [f"node-{i:05d}" for i in range(n)]
        self.index = {name: i for i, name in enumerate(self.names)}
        self.rack = [i // sc.rack_size if sc.rack_size else -1 for i in range(n)]
        racks = max(self.rack) + 1 if sc.rack_size and n else 0
        # links: 0 origin up; node i: 1+2i up, 2+2i down; rack r: base+2r up, base+2r+1 down
        self.rack_base = 1 + 2 * n
        capacity = [cal.origin_bps] + [cal.node_bps] * (2 * n)
        capacity += [cal.rack_uplink_bps] * (2 * racks)
        self.host_link = with_host_link(capacity, cal)
        self.queue: EventQueue[tuple[str, int, int, int, int]] = EventQueue()
        self.net = Network(capacity, self._flow_due)
        plan = plan_tree(self._states(), sc.fanout, sc.origin_fanout)
        self.depth = plan_depth(plan)
        self.parent = [self._idx(plan[name].parent) for name in self.names]
        self.children_count = [0] * n
        for p in self.parent:
            if p != _ORIGIN:
                self.children_count[p] += 1
        w = self.w = len(self.units.sizes)
        self.have = [bytearray(w) for _ in range(n)]
        self.have_count = [0] * n
        self.inflight: list[dict[int, list[int]]] = [{} for _ in range(n)]
        self.epoch = [0] * n
        self.dead = [False] * n
        # the connection from the parent: units ready to send, in order, over one flow
        self.pipe_q: list[deque[int]] = [deque() for _ in range(n)]
        self.pipe_fid = [0] * n
        self.pipe_unit = [0] * n
        self.serving: list[set[int]] = [set() for _ in range(n)]  # children with a pipe flow
        # prefetch
        self.pf_next = [0] * n
        self.pf_out = [0] * n
        self.pf_issued: list[set[int]] = [set() for _ in range(n)]
        # background hydration: the rest of the image, in bulk units, in order
        rest = max(0, profile.image_bytes - sum(self.units.sizes))
        self.bulk_sizes = [
            min(cal.bulk_bytes, rest - k * cal.bulk_bytes)
            for k in range(math.ceil(rest / cal.bulk_bytes))
        ]
        self.bulk_have = [0] * n
        self.bulk_started = [False] * n
        self.bulk_fid = [0] * n  # 0: no bulk flow; a bulk event or flow may still be pending
        self.bulk_pending = [False] * n
        self.bulk_wait: list[list[int]] = [[] for _ in range(n)]
        # the VM
        self.step = [0] * n
        self.missing = [0] * n
        self.booted: list[float | None] = [None] * n
        self.hydrated: list[float | None] = [None] * n
        self.result = Result(sc, [], depth=self.depth)
        self.open_vms = n
        self.open_nodes = n

    def _states(self) -> list[NodeState]:
        return [NodeState(name, topology=self._topology(i)) for i, name in enumerate(self.names)]

    def _topology(self, i: int) -> str | None:
        return f"rack-{self.rack[i]:04d}" if self.sc.rack_size else None

    def _idx(self, parent: str) -> int:
        return _ORIGIN if parent == ORIGIN else self.index[parent]

    # --- plumbing ---------------------------------------------------------------------------

    def _flow_due(self, at: float, fid: int, version: int) -> None:
        self.queue.push(at, ("flow", fid, version, 0, 0))

    def _links(self, src: int, dst: int) -> tuple[int, ...]:
        hops = self._hops(src, dst)
        return hops if self.host_link is None else (*hops, self.host_link)

    def _hops(self, src: int, dst: int) -> tuple[int, ...]:
        up = 0 if src == _ORIGIN else 1 + 2 * src
        down = 2 + 2 * dst
        rd = self.rack[dst]
        rs = -1 if src == _ORIGIN else self.rack[src]
        if rd < 0 or rs == rd:
            return (up, down)
        rack_down = self.rack_base + 2 * rd + 1
        if rs < 0:
            return (up, rack_down, down)
        return (up, self.rack_base + 2 * rs, rack_down, down)

    # --- the run ------------------------------------------------------------------------------

    def run(self) -> Result:
        cal, q = self.cal, self.queue
        for i in range(self.n):
            q.push(cal.attach_s, ("attach", i, 0, 0, 0))
        if self.sc.failure is not None:
            q.push(self.sc.failure.at_s, ("fail", 0, 0, 0, 0))
        res = self.result
        while self.open_vms > 0 or (self.sc.until_hydrated and self.open_nodes > 0):
            item = q.pop()
            if item is None:
                raise RuntimeError(f"{self.sc.name}: stalled with {self.open_vms} VMs unbooted")
            now, (kind, a, b, c, d) = item
            res.events += 1
            if kind == "flow":
                self._flow_done(a, b)
            elif kind == "ready":  # (src, dst, unit, epoch of dst): the parent can send it
                if self._still_parent(a, b, d) and not self.have[b][c]:
                    self._pipe_add(b, c)
            elif kind == "bulk":  # (src, dst, bulk unit, epoch of dst)
                if self._still_parent(a, b, d) and self.bulk_have[b] == c:
                    self.bulk_fid[b] = self.net.start(
                        now,
                        self._links(a, b),
                        self.bulk_sizes[c],
                        ("bulk", a, b, c),
                        cap=cal.hydrate_bps,
                    )
            elif kind == "step":
                self._vm_step(a)
            elif kind == "booted":
                if not self.dead[a]:
                    self.booted[a] = now
                    res.boot_s.append(now)
                    self.open_vms -= 1
            elif kind == "attach":
                self._attach(a)
            elif kind == "fail":
                self._fail()
            elif kind == "replan":
                self._replan()
            elif kind == "reparent":
                self._reparent(a, b)
        res.hydrated_s = [t for t in self.hydrated if t is not None]
        res.end_s = q.now
        return res

    def _still_parent(self, src: int, dst: int, epoch: int) -> bool:
        return (
            not self.dead[dst]
            and self.epoch[dst] == epoch
            and (src == _ORIGIN or not self.dead[src])
        )

    def _attach(self, i: int) -> None:
        if self.dead[i]:
            return
        now = self.queue.now
        if self.units.steps:
            self.queue.push(now + self.units.gaps[0], ("step", i, 0, 0, 0))
        else:
            self.queue.push(now + self.tail_s, ("booted", i, 0, 0, 0))
        if self.sc.prefetch:
            self._prefetch(i)
        if self.w == 0:
            self._bulk_start(i)

    # --- on-demand fetch, cache, re-export -------------------------------------------------------

    def _want(self, i: int, u: int, waiter: int) -> None:
        waiting = self.inflight[i].get(u)
        if waiting is None:
            self.inflight[i][u] = [waiter]
            self._ask(i, u)
        else:
            waiting.append(waiter)

    def _ask(self, i: int, u: int) -> None:
        p = self.parent[i]
        if p == _ORIGIN or self.have[p][u]:
            if self.pipe_fid[i]:
                # The connection is busy: with several requests in flight the round trip
                # hides behind the transfer ahead of this one (a pipelined queue).
                self.pipe_q[i].append(u)
            else:
                at = self.queue.now + self.cal.hop_delay()
                self.queue.push(at, ("ready", p, i, u, self.epoch[i]))
        elif not self.dead[p]:
            self._want(p, u, i)  # the parent fetches it first, then serves this child
        # a dead parent: the request waits for the re-parenting, which asks again

    def _pipe_add(self, i: int, u: int) -> None:
        if self.pipe_fid[i]:
            self.pipe_q[i].append(u)
            return
        p = self.parent[i]
        self.pipe_unit[i] = u
        self.pipe_fid[i] = self.net.start(
            self.queue.now, self._links(p, i), self.units.sizes[u], ("pipe", p, i, u)
        )
        if p != _ORIGIN:
            self.serving[p].add(i)

    def _flow_done(self, fid: int, version: int) -> None:
        flow = self.net.current(fid, version)
        if flow is None:
            return
        kind, src, dst, item = cast(tuple[str, int, int, int], flow.tag)
        if src == _ORIGIN:
            self.result.origin_bytes += flow.size
        now = self.queue.now
        if kind == "bulk":
            self.net.finish(now, fid, version)
            self.bulk_fid[dst] = 0
            self._bulk_arrived(dst, item)
            return
        self._unit_arrived(dst, item)
        if self.pipe_fid[dst] != fid:
            return  # the delivery re-parented or killed it (cannot happen today; cheap)
        q, have = self.pipe_q[dst], self.have[dst]
        while q and have[q[0]]:
            q.popleft()
        if q:
            u = q.popleft()
            self.pipe_unit[dst] = u
            self.net.refill(now, fid, self.units.sizes[u], ("pipe", src, dst, u))
        else:
            self.net.finish(now, fid, self.net.flows[fid].version)
            self.pipe_fid[dst] = 0
            if src != _ORIGIN:
                self.serving[src].discard(dst)

    def _unit_arrived(self, i: int, u: int) -> None:
        if self.have[i][u]:
            return
        self.have[i][u] = 1
        self.have_count[i] += 1
        at = self.queue.now + self.cal.latency_s + self.cal.request_overhead_s
        for waiter in self.inflight[i].pop(u, ()):
            if waiter == _VM:
                self.missing[i] -= 1
                if self.missing[i] == 0:
                    self._vm_step_done(i)
            elif self.parent[waiter] == i and not self.dead[waiter]:
                if self.pipe_fid[waiter]:
                    self.pipe_q[waiter].append(u)  # pipelined behind the current transfer
                else:
                    self.queue.push(at, ("ready", i, waiter, u, self.epoch[waiter]))
        if u in self.pf_issued[i]:
            self.pf_issued[i].discard(u)
            self.pf_out[i] -= 1
            self._prefetch(i)
        if self.have_count[i] == self.w:
            self._bulk_start(i)

    def _prefetch(self, i: int) -> None:
        have, inflight, depth = self.have[i], self.inflight[i], self.cal.prefetch_depth
        while self.pf_out[i] < depth and self.pf_next[i] < self.w:
            u = self.pf_next[i]
            self.pf_next[i] = u + 1
            if have[u] or u in inflight:
                continue
            self.pf_issued[i].add(u)
            self.pf_out[i] += 1
            inflight[u] = []
            self._ask(i, u)

    # --- the VM ---------------------------------------------------------------------------------

    def _vm_step(self, i: int) -> None:
        if self.dead[i]:
            return
        missing = 0
        have = self.have[i]
        for u in self.units.steps[self.step[i]]:
            if not have[u]:
                missing += 1
                self._want(i, u, _VM)
        self.missing[i] = missing
        if missing == 0:
            self._vm_step_done(i)

    def _vm_step_done(self, i: int) -> None:
        """Reads the step's bytes locally, computes, and goes on. Steps whose units are all
        local already run on without an event each (they stay local: nothing is evicted)."""
        units, have = self.units, self.have[i]
        s = self.step[i]
        at = self.queue.now + units.local_s[s]
        s += 1
        while s < len(units.steps) and all(have[u] for u in units.steps[s]):
            at += units.gaps[s] + units.local_s[s]
            s += 1
        self.step[i] = s
        if s == len(units.steps):
            self.queue.push(at + self.tail_s, ("booted", i, 0, 0, 0))
        else:
            self.queue.push(at + units.gaps[s], ("step", i, 0, 0, 0))

    # --- background hydration and detach -----------------------------------------------------

    def _bulk_start(self, i: int) -> None:
        if not self.sc.hydrate or self.bulk_started[i]:
            return
        self.bulk_started[i] = True
        self._bulk_next(i)

    def _bulk_next(self, i: int) -> None:
        if self.bulk_pending[i]:
            return
        k = self.bulk_have[i]
        if k == len(self.bulk_sizes):
            self._detach(i)
            return
        p = self.parent[i]
        if p == _ORIGIN or self.bulk_have[p] > k:
            self.bulk_pending[i] = True
            at = self.queue.now + self.cal.hop_delay()
            self.queue.push(at, ("bulk", p, i, k, self.epoch[i]))
        elif not self.dead[p]:
            self.bulk_wait[p].append(i)  # the parent is behind: follow it

    def _bulk_arrived(self, i: int, k: int) -> None:
        if self.bulk_have[i] != k:
            return
        self.bulk_pending[i] = False
        self.bulk_have[i] = k + 1
        waiting, self.bulk_wait[i] = self.bulk_wait[i], []
        for child in waiting:
            if self.parent[child] == i and not self.dead[child]:
                self._bulk_next(child)
        self._bulk_next(i)

    def _detach(self, i: int) -> None:
        if self.hydrated[i] is None and self.have_count[i] == self.w:
            self.hydrated[i] = self.queue.now
            self.open_nodes -= 1

    # --- failures and re-parenting ---------------------------------------------------------------

    def _drop_incoming(self, i: int) -> None:
        now = self.queue.now
        if self.pipe_fid[i]:
            self.net.cancel(now, self.pipe_fid[i])
            self.pipe_fid[i] = 0
        self.pipe_q[i].clear()
        if self.bulk_fid[i]:
            self.net.cancel(now, self.bulk_fid[i])
            self.bulk_fid[i] = 0
        self.bulk_pending[i] = False

    def _fail(self) -> None:
        failure = self.sc.failure
        assert failure is not None
        interior = [i for i in range(self.n) if self.children_count[i] > 0 and not self.dead[i]]
        count = min(len(interior), max(1, round(failure.fraction * len(interior))))
        victims = sorted(random.Random(failure.seed).sample(interior, count))
        for v in victims:
            self.dead[v] = True
            self.result.dead += 1
            if self.booted[v] is None:
                self.open_vms -= 1
            if self.hydrated[v] is None:
                self.open_nodes -= 1
            self._drop_incoming(v)
            for child in sorted(self.serving[v]):
                if self.pipe_fid[child]:
                    self.net.cancel(self.queue.now, self.pipe_fid[child])
                    self.pipe_fid[child] = 0
                self.pipe_q[child].clear()
        for i in range(self.n):  # bulk flows from the dead
            if self.bulk_fid[i] and self.parent[i] != _ORIGIN and self.dead[self.parent[i]]:
                self.net.cancel(self.queue.now, self.bulk_fid[i])
                self.bulk_fid[i] = 0
        self.queue.push(self.queue.now + self.cal.detect_s, ("replan", 0, 0, 0, 0))

    def _replan(self) -> None:
        states = [
            NodeState(
                name,
                ready=not self.dead[i],
                topology=self._topology(i),
                parent=ORIGIN if self.parent[i] == _ORIGIN else self.names[self.parent[i]],
                hydrated=self.hydrated[i] is not None,
            )
            for i, name in enumerate(self.names)
        ]
        plan = plan_tree(states, self.sc.fanout, self.sc.origin_fanout)
        self.result.depth = max(self.result.depth, plan_depth(plan))
        at = self.queue.now + self.cal.reattach_s
        for name, placement in sorted(plan.items()):
            i, p = self.index[name], self._idx(placement.parent)
            if p != self.parent[i]:
                self.result.reparented += 1
                self.queue.push(at, ("reparent", i, p, 0, 0))

    def _reparent(self, i: int, p: int) -> None:
        if self.dead[i] or (p != _ORIGIN and self.dead[p]):
            return
        old = self.parent[i]
        self._drop_incoming(i)
        if old != _ORIGIN:
            self.children_count[old] -= 1
            self.serving[old].discard(i)
        if p != _ORIGIN:
            self.children_count[p] += 1
        self.parent[i] = p
        self.epoch[i] += 1
        for u in sorted(self.inflight[i]):
            self._ask(i, u)
        if self.bulk_started[i] and self.hydrated[i] is None:
            self._bulk_next(i)


def predict_all_booted(
    nodes: int,
    profile: BootProfile,
    cal: Calibration,
    fanout: int = 4,
    origin_fanout: int | None = None,
    prefetch: bool = True,
) -> float:
    """The calibration check's entry point: the simulator's all-booted time for the lab's run
    (its node count and fan-out, its recorded profile, its measured figures), to compare with
    the time the lab measured."""
    sc = Scenario("lab", nodes, fanout=fanout, origin_fanout=origin_fanout, prefetch=prefetch)
    return simulate(sc, profile, cal).all_booted_s
