"""The kopf operator: thin handlers around the pure planning in `reconcile`.

Nodes, ImageReplicas and ImageVolumes are held in kopf indexes (kept small: only the facts
the planner needs). Each ImageCache has one daemon that re-plans its tree whenever something
it depends on changes, at most once per DEBOUNCE, and at least once per RESYNC (to notice
stale heartbeats).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import kopf

from vmthunder.operator.model import (
    GROUP,
    IMAGE_CACHES,
    IMAGE_REPLICAS,
    IMAGE_VOLUMES,
    VERSION,
    CacheSpec,
    NodeFacts,
    ReplicaFacts,
)
from vmthunder.operator.reconcile import ReplicaPlan, plan_replicas
from vmthunder.operator.writer import ReplicaWriter, load_kube_config

DEBOUNCE = 0.3
RESYNC = 20.0
REPARENT_EVENTS_MAX = 20  # beyond this, one summary Event instead of one per node


@dataclass
class Memo:
    """Operator-wide state: per-cache triggers and the writes the indexes have not shown yet."""

    writer: ReplicaWriter
    triggers: dict[str, asyncio.Event] = field(default_factory=dict)
    # node -> (parent, depth) this operator wrote, until the watch shows it (per cache).
    written: dict[str, dict[str, tuple[str, int]]] = field(
        default_factory=lambda: defaultdict(dict))
    deleted: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))

    def trigger(self, cache: str | None = None) -> None:
        for name, event in self.triggers.items():
            if cache is None or name == cache:
                event.set()


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.peering.name = "vmthunder"
    settings.peering.mandatory = True
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 300
    memo["state"] = Memo(ReplicaWriter(load_kube_config()))


def _state(memo: kopf.Memo) -> Memo:
    state: Memo = memo["state"]
    return state


# --- indexes: the facts the planner needs, nothing more ------------------------------------

@kopf.index("", "v1", "nodes")
def node_facts(name: str, labels: Any, status: Any, **_: Any) -> dict[str, NodeFacts]:
    return {name: NodeFacts.from_node(name, labels, status)}


@kopf.index(GROUP, VERSION, IMAGE_REPLICAS)
def replica_facts(name: str, spec: Any, status: Any, **_: Any) -> dict[str, ReplicaFacts]:
    facts = ReplicaFacts.from_object(name, spec, status)
    return {facts.image_cache: facts}


@kopf.index(GROUP, VERSION, IMAGE_VOLUMES)
def volume_nodes(spec: Any, **_: Any) -> dict[str, str]:
    return {str(spec.get("imageCache")): str(spec.get("node"))}


# --- triggers -------------------------------------------------------------------------------

@kopf.on.event("", "v1", "nodes")
def node_changed(memo: kopf.Memo, **_: Any) -> None:
    _state(memo).trigger()


@kopf.on.event(GROUP, VERSION, IMAGE_REPLICAS)
@kopf.on.event(GROUP, VERSION, IMAGE_VOLUMES)
def member_changed(spec: Any, memo: kopf.Memo, **_: Any) -> None:
    _state(memo).trigger(str(spec.get("imageCache")))


# --- the per-cache reconciler ---------------------------------------------------------------

@kopf.daemon(GROUP, VERSION, IMAGE_CACHES, cancellation_timeout=10)
async def distribute(
    name: str,
    body: kopf.Body,
    memo: kopf.Memo,
    logger: kopf.Logger,
    node_facts: kopf.Index[str, NodeFacts],
    replica_facts: kopf.Index[str, ReplicaFacts],
    volume_nodes: kopf.Index[str, str],
    **_: Any,
) -> None:
    state = _state(memo)
    trigger = state.triggers.setdefault(name, asyncio.Event())
    trigger.set()
    last_phase: str | None = None
    try:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(trigger.wait(), RESYNC)
            await asyncio.sleep(DEBOUNCE)  # fold a burst of changes into one pass
            trigger.clear()
            replicas = _replicas_as_written(state, name, replica_facts.get(name, []))
            plan = plan_replicas(
                name,
                CacheSpec.from_spec(body.spec),
                (facts for store in node_facts.values() for facts in store),
                replicas,
                set(volume_nodes.get(name, [])),
                datetime.now(UTC),
            )
            try:
                await state.writer.apply(plan, body)
            except Exception as e:  # keep the daemon alive; the next pass retries
                logger.error(f"applying the plan failed: {e}")
                kopf.warn(body, reason="PlanFailed", message=str(e)[:500])
                trigger.set()
                await asyncio.sleep(2)
                continue
            _remember(state, name, plan)
            last_phase = await _report(state, name, body, plan, last_phase, logger)
    finally:
        state.triggers.pop(name, None)
        state.written.pop(name, None)
        state.deleted.pop(name, None)


def _replicas_as_written(
    state: Memo, cache: str, indexed: Any
) -> list[ReplicaFacts]:
    """The index, corrected by this operator's own writes that its watch has not shown yet."""
    written, deleted = state.written[cache], state.deleted[cache]
    seen_deleted = set(deleted)
    result = []
    for r in indexed:
        if r.name in deleted:
            seen_deleted.discard(r.name)
            continue
        mine = written.get(r.node)
        if mine is not None:
            if (r.parent, r.depth) == mine:
                del written[r.node]  # the watch caught up
            else:
                r = replace(r, parent=mine[0], depth=mine[1])
        result.append(r)
    deleted -= seen_deleted  # gone from the index: the deletion is seen
    present = {r.node for r in result}
    for node, (parent, depth) in written.items():
        if node not in present:  # created, not yet seen
            result.append(ReplicaFacts(f"{cache}.{node}", cache, node, parent, depth))
    return result


def _remember(state: Memo, cache: str, plan: ReplicaPlan) -> None:
    for r in (*plan.create, *plan.update):
        state.written[cache][r.node] = (r.parent, r.depth)
    state.deleted[cache].update(plan.delete)


async def _report(
    state: Memo,
    name: str,
    body: kopf.Body,
    plan: ReplicaPlan,
    last_phase: str | None,
    logger: kopf.Logger,
) -> str:
    generation = body.metadata.get("generation")
    desired = plan.status.as_patch(generation)
    current = {k: body.status.get(k) for k in desired}
    if current != desired:
        await state.writer.patch_cache_status(name, desired)
    if plan.create:
        kopf.info(body, reason="Planned",
                  message=f"{len(plan.create)} new replicas, tree depth {plan.status.tree_depth}")
    if plan.reparented:
        if len(plan.reparented) <= REPARENT_EVENTS_MAX:
            for move in plan.reparented:
                kopf.info(body, reason="Reparented",
                          message=f"{move.node}: {move.old_parent} -> {move.new_parent}")
        else:
            kopf.info(body, reason="Reparented",
                      message=f"{len(plan.reparented)} nodes moved to new parents")
    if plan.status.phase != last_phase and last_phase is not None:
        kopf.event(body, type="Warning" if plan.status.phase == "Degraded" else "Normal",
                   reason=plan.status.phase,
                   message=f"{plan.status.hydrated_count}/{plan.status.node_count} nodes hydrated, "
                           f"tree depth {plan.status.tree_depth}")
    return plan.status.phase
