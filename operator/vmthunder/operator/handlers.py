"""The kopf operator: thin handlers around the pure planning in `reconcile`.

kopf runs one daemon per ImageCache, which re-plans that cache's tree whenever something it
depends on changes (at most once per DEBOUNCE, at least once per RESYNC, to notice stale
heartbeats). Nodes, ImageReplicas and ImageVolumes are watched by lean informers rather than
kopf handlers: thousands of them report often, and only planning-relevant changes wake a
daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import kopf

from vmthunder.kube import Rest, core_path
from vmthunder.operator.informer import Informer
from vmthunder.operator.model import (
    GROUP,
    IMAGE_CACHES,
    IMAGE_REPLICAS,
    IMAGE_VOLUMES,
    VERSION,
    CacheSpec,
    NodeFacts,
    ReplicaFacts,
    VolumeFacts,
    resource_path,
)
from vmthunder.operator.reconcile import ReplicaPlan, plan_replicas
from vmthunder.operator.writer import ReplicaWriter, load_kube_config

DEBOUNCE = 0.3
RESYNC = 20.0
REPARENT_EVENTS_MAX = 20  # beyond this, one summary Event instead of one per node


@dataclass
class Memo:
    """Operator-wide state: the informers, per-cache triggers, writes not yet seen."""

    writer: ReplicaWriter
    nodes: Informer[NodeFacts]
    replicas: Informer[ReplicaFacts]
    volumes: Informer[VolumeFacts]
    triggers: dict[str, asyncio.Event] = field(default_factory=dict)
    # node -> (parent, depth) this operator wrote, until the watch shows it (per cache).
    written: dict[str, dict[str, tuple[str, int]]] = field(
        default_factory=lambda: defaultdict(dict))
    deleted: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    lost: dict[str, Mapping[str, datetime | None]] = field(default_factory=dict)  # per cache

    def trigger(self, cache: str | None = None) -> None:
        for name, event in self.triggers.items():
            if cache is None or name == cache:
                event.set()

    def synced(self) -> bool:
        return all(i.synced.is_set() for i in (self.nodes, self.replicas, self.volumes))


def _planning_key(r: ReplicaFacts) -> tuple[Any, ...]:
    """What of a replica the plan and the cache's status depend on (not its byte counters or
    each heartbeat)."""
    return (r.image_cache, r.parent, r.depth, r.phase, r.parent_lost, r.caching, r.image_size,
            r.hold_until)


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.peering.name = "vmthunder"
    settings.peering.mandatory = True
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 300
    loop = asyncio.get_running_loop()
    api_client = load_kube_config()
    rest = Rest.from_api_client(api_client)  # the same login

    def wake(cache: str | None = None) -> None:
        loop.call_soon_threadsafe(memo["state"].trigger, cache)

    def on_node(old: NodeFacts | None, new: NodeFacts | None) -> None:
        wake()

    def on_replica(old: ReplicaFacts | None, new: ReplicaFacts | None) -> None:
        if old is None or new is None or _planning_key(old) != _planning_key(new):
            wake((new or old).image_cache)  # type: ignore[union-attr]

    def on_volume(old: VolumeFacts | None, new: VolumeFacts | None) -> None:
        wake((new or old).image_cache)  # type: ignore[union-attr]

    memo["state"] = Memo(
        writer=ReplicaWriter(api_client),
        nodes=Informer(rest, core_path("nodes"), NodeFacts.from_object, on_node).start(),
        replicas=Informer(rest, resource_path(IMAGE_REPLICAS),
                          ReplicaFacts.from_dict, on_replica).start(),
        volumes=Informer(rest, resource_path(IMAGE_VOLUMES),
                         VolumeFacts.from_dict, on_volume).start(),
    )


@kopf.on.cleanup()
def stop_informers(memo: kopf.Memo, **_: Any) -> None:
    state = _state(memo)
    for informer in (state.nodes, state.replicas, state.volumes):
        informer.stop()


def _state(memo: kopf.Memo) -> Memo:
    state: Memo = memo["state"]
    return state


@kopf.daemon(GROUP, VERSION, IMAGE_CACHES, cancellation_timeout=10)
async def distribute(
    name: str, body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any
) -> None:
    state = _state(memo)
    trigger = state.triggers.setdefault(name, asyncio.Event())
    trigger.set()
    while not state.synced():  # plan only from complete lists
        await asyncio.sleep(0.1)
    last_phase: str | None = None
    wait = RESYNC
    try:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(trigger.wait(), wait)
            await asyncio.sleep(DEBOUNCE)  # fold a burst of changes into one pass
            trigger.clear()
            wait = RESYNC
            indexed = [r for r in state.replicas.values() if r.image_cache == name]
            try:
                plan = plan_replicas(
                    name,
                    CacheSpec.from_spec(body.spec),
                    state.nodes.values(),
                    _replicas_as_written(state, name, indexed),
                    {v.node for v in state.volumes.values() if v.image_cache == name},
                    datetime.now(UTC),
                    state.lost.get(name),
                )
            except ValueError as e:  # a spec the schema should have refused: say so, wait
                logger.error(f"cannot plan: {e}")
                kopf.warn(body, reason="InvalidSpec", message=str(e)[:500])
                continue
            try:
                await state.writer.apply(plan, body)
            except Exception as e:  # keep the daemon alive; the next pass retries
                logger.error(f"applying the plan failed: {e}")
                kopf.warn(body, reason="PlanFailed", message=str(e)[:500])
                trigger.set()
                await asyncio.sleep(2)
                continue
            _remember(state, name, plan)
            state.lost[name] = plan.lost
            last_phase = await _report(state, name, body, plan, last_phase)
            if plan.recheck_at is not None:  # a lost parent's heartbeat falls due sooner
                due = (plan.recheck_at - datetime.now(UTC)).total_seconds()
                wait = min(RESYNC, max(0.0, due - DEBOUNCE) + 0.5)
    finally:
        state.triggers.pop(name, None)
        state.written.pop(name, None)
        state.deleted.pop(name, None)
        state.lost.pop(name, None)


def _replicas_as_written(
    state: Memo, cache: str, indexed: list[ReplicaFacts]
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
                r = replace(r, parent=mine[0], depth=mine[1], labeled=True)  # one write
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
