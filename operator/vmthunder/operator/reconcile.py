"""Pure reconciliation: from what the API server holds to the replicas that should exist.

No I/O and no clock: the caller passes `now` and applies the returned plan.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from vmthunder.kube import TIME_FORMAT
from vmthunder.operator.model import (
    CacheSpec,
    NodeFacts,
    ReplicaFacts,
    parent_label,
    replica_name,
)
from vmthunder.operator.planner import ORIGIN, NodeState, Placement, plan_tree

# A replica whose agent has not reported for this long is treated as unhealthy: its children
# move elsewhere, and it gets no new children until it reports again.
HEARTBEAT_STALE_AFTER = timedelta(seconds=60)
# Agents heartbeat every 15 s (vmthunder.node.agent.HEARTBEAT_SECONDS): one missed, and a
# child that lost the session to it, is enough to call a parent gone.
HEARTBEAT_MISSED_AFTER = timedelta(seconds=20)


@dataclass(frozen=True)
class ReplicaSpec:
    name: str
    node: str
    parent: str
    depth: int

    @property
    def label(self) -> str:
        """Its LABEL_PARENT."""
        return parent_label(self.parent)


@dataclass(frozen=True)
class Reparent:
    node: str
    old_parent: str
    new_parent: str


@dataclass(frozen=True)
class CacheStatus:
    phase: str
    node_count: int
    hydrated_count: int
    tree_depth: int
    origin_bytes_served: int
    failed_nodes: tuple[str, ...] = ()
    image_size_bytes: int = 0  # 0: not known yet (left out of the patch, never cleared)
    # The last hold of the nodes still prefetching (None: none is): every node's background
    # hydration waits for it, so a boot storm's prefetches have the tree's links to themselves.
    prefetching_until: datetime | None = None

    def as_patch(self, generation: int | None) -> dict[str, Any]:
        patch: dict[str, Any] = {
            "phase": self.phase,
            "nodeCount": self.node_count,
            "hydratedCount": self.hydrated_count,
            "treeDepth": self.tree_depth,
            "originBytesServed": self.origin_bytes_served,
            # None deletes the field (a merge patch)
            "prefetchingUntil": (self.prefetching_until.astimezone(UTC).strftime(TIME_FORMAT)
                                 if self.prefetching_until else None),
        }
        if self.image_size_bytes:
            patch["imageSizeBytes"] = self.image_size_bytes
        if generation is not None:
            patch["observedGeneration"] = generation
        return patch


@dataclass(frozen=True)
class ReplicaPlan:
    create: tuple[ReplicaSpec, ...] = ()
    update: tuple[ReplicaSpec, ...] = ()
    delete: tuple[str, ...] = ()
    reparented: tuple[Reparent, ...] = ()
    status: CacheStatus = field(default_factory=lambda: CacheStatus("Pending", 0, 0, 0, 0))
    # When the plan changes with no event: a parent a child lost misses its heartbeat then.
    recheck_at: datetime | None = None
    # Nodes judged gone (node -> their heartbeat then), for the next plan: see plan_replicas.
    lost: Mapping[str, datetime | None] = field(default_factory=dict)
    # Replicas kept out of the plan that lack their vmthunder.io/parent: only labeled.
    relabel: tuple[ReplicaSpec, ...] = ()

    @property
    def writes(self) -> int:
        return len(self.create) + len(self.update) + len(self.delete) + len(self.relabel)


def selects(selector: Mapping[str, str] | None, labels: Mapping[str, str]) -> bool:
    """A missing selector selects nothing (on demand only); an empty one selects every node."""
    if selector is None:
        return False
    return all(labels.get(k) == v for k, v in selector.items())


def is_reporting(replica: ReplicaFacts | None, now: datetime) -> bool:
    """Whether its agent reports (a Failed replica's does: it retries every round)."""
    if replica is None:
        return True  # not created yet: nothing says it is unhealthy
    return replica.heartbeat is None or now - replica.heartbeat <= HEARTBEAT_STALE_AFTER


def is_placeable(replica: ReplicaFacts | None, parent_reporting: bool) -> bool:
    """Whether the plan may place it. A Failed replica keeps its place out of the plan, so a
    failure everywhere at once (a CHAP secret nobody can read) moves nothing, unless its
    parent is gone: one that died between admitting it and its login would otherwise be
    retried for ever. It then moves as a leaf (`can_serve`)."""
    return (replica is None or replica.phase != "Failed"
            or (replica.parent != ORIGIN and not parent_reporting))


def can_serve(replica: ReplicaFacts | None) -> bool:
    """Whether it may have children: a cache that works (not Failed, not passing through)."""
    return replica is None or (replica.caching and replica.phase != "Failed")


def lost_by_children(replica: ReplicaFacts | None, children: Iterable[ReplicaFacts],
                     now: datetime) -> bool:
    """A parent that missed its heartbeat while a child lost its session to it is gone: a
    dead node is known in ~20 s, not after the 60 s of staleness. A live parent that merely
    cannot reach one child still heartbeats and keeps its place."""
    if replica is None or (replica.heartbeat is not None
                           and now - replica.heartbeat <= HEARTBEAT_MISSED_AFTER):
        return False
    return any(c.parent_lost for c in children)


def lost_parent_deadline(replica: ReplicaFacts | None, children: Iterable[ReplicaFacts],
                         now: datetime) -> datetime | None:
    """When `lost_by_children` turns true for a parent a child lost but that has not missed
    its heartbeat yet: planning again then moves its children without waiting for a resync."""
    if replica is None or replica.heartbeat is None or not any(c.parent_lost for c in children):
        return None
    due = replica.heartbeat + HEARTBEAT_MISSED_AFTER
    return due if due > now else None


def plan_replicas(
    cache_name: str,
    spec: CacheSpec,
    nodes: Iterable[NodeFacts],
    replicas: Iterable[ReplicaFacts],
    volume_nodes: Collection[str],
    now: datetime,
    lost: Mapping[str, datetime | None] | None = None,
) -> ReplicaPlan:
    """Decides which replicas to create, re-parent and delete, and the cache's status.

    `lost` is the previous plan's: a node its children called gone stays gone until it
    heartbeats again. Once they are moved, nobody reports it lost any more, and a dead node
    would otherwise look healthy until its heartbeat is stale and take children back."""
    lost = lost or {}
    nodes_by_name = {n.name: n for n in nodes}
    current = {r.node: r for r in replicas if r.image_cache == cache_name}
    children: dict[str, list[ReplicaFacts]] = {}
    for r in current.values():
        children.setdefault(r.parent, []).append(r)
    members = sorted(
        name
        for name, node in nodes_by_name.items()
        if name in volume_nodes or selects(spec.node_selector, node.labels)
    )

    deadlines = []
    still_lost: dict[str, datetime | None] = {}
    for name in members:
        replica = current.get(name)
        due = lost_parent_deadline(replica, children.get(name, ()), now)
        if due is not None:
            deadlines.append(due)
        if replica is not None and (
                lost_by_children(replica, children.get(name, ()), now)
                or (name in lost and replica.heartbeat == lost[name])):
            still_lost[name] = replica.heartbeat
    reporting = {name: nodes_by_name[name].ready and is_reporting(current.get(name), now)
                 and name not in still_lost for name in members}
    states = []
    for name in members:
        node = nodes_by_name[name]
        replica = current.get(name)
        parent_reporting = replica is not None and reporting.get(replica.parent, False)
        placeable = is_placeable(replica, parent_reporting)
        states.append(
            NodeState(
                name=name,
                ready=reporting[name] and placeable,
                topology=node.labels.get(spec.topology_key),
                parent=replica.parent if replica else None,
                hydrated=replica.hydrated if replica else False,
                serves=can_serve(replica),
                # Failed, kept where it is, and alive: its session to its parent may carry
                # reads, so its slot is not handed to another child (seen at N = 16: three
                # children under a fan-out of 2).
                holds_slot=reporting[name] and not placeable,
            )
        )
    placements = plan_tree(states, spec.fanout, spec.origin_fanout)

    create, update, reparented, relabel = [], [], [], []
    for name in members:
        placement = placements.get(name)
        replica = current.get(name)
        if placement is None:
            # Not ready or unhealthy: its replica stays as it is until it recovers, but gets
            # its label (it may still read through its parent, who lets in labeled children).
            if replica is not None and not replica.labeled:
                relabel.append(ReplicaSpec(replica.name, name, replica.parent, replica.depth))
            continue
        desired = ReplicaSpec(
            replica_name(cache_name, name), name, placement.parent, placement.depth)
        if replica is None:
            create.append(desired)
        elif ((replica.parent, replica.depth) != (placement.parent, placement.depth)
              or not replica.labeled):
            update.append(desired)  # a replica of an older operator gets its label too
            if replica.parent != placement.parent:
                reparented.append(Reparent(name, replica.parent, placement.parent))
    member_set = set(members)
    delete = sorted(r.name for node, r in current.items() if node not in member_set)

    status = aggregate_status(
        [r for n, r in current.items() if n in member_set], placements, len(members),
        spec.size_bytes, now, lost=still_lost.keys(),
    )
    return ReplicaPlan(tuple(create), tuple(update), tuple(delete), tuple(reparented), status,
                       min(deadlines, default=None), still_lost, tuple(relabel))


def aggregate_status(
    replicas: Iterable[ReplicaFacts], placements: Mapping[str, Placement], node_count: int,
    spec_size: int, now: datetime, lost: Collection[str] = (),
) -> CacheStatus:
    """The ImageCache's status. Its image size is the spec's, else the one the nodes found
    (the CSI controller sizes volumes by it): every node reads the same image. A node that no
    longer reports (its agent died while prefetching), or that its children lost (`lost`),
    holds no one's background hydration."""
    replicas = list(replicas)
    size = spec_size or max((r.image_size for r in replicas), default=0)
    hydrated = sum(1 for r in replicas if r.hydrated)
    failed = tuple(sorted(r.node for r in replicas if r.phase == "Failed"))
    origin_bytes = sum(r.bytes_from_parent for r in replicas if r.parent == ORIGIN)
    depth = max((p.depth for p in placements.values()), default=0)
    if node_count == 0:
        phase = "Pending"
    elif failed:
        phase = "Degraded"
    elif hydrated == node_count:
        phase = "Ready"
    else:
        phase = "Distributing"
    holds = [r.hold_until for r in replicas if r.phase == "Prefetching" and r.hold_until
             and is_reporting(r, now) and r.node not in lost]
    return CacheStatus(phase, node_count, hydrated, depth, origin_bytes, failed, size,
                       max(holds, default=None))
