"""The agent's reads and writes of the API server.

`Kube` asks the server each time. `WatchedKube` answers the reads from watches (the
ImageReplicas of this node, its children and its parents; all ImageCaches; raw JSON) and sets
`wake` when something this node acts on changes, so the agent's round runs when there is news
rather than polling: in a TCG guest, a poll's few HTTPS calls cost a third of the vCPU the VMs
boot on.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from vmthunder.kube import TIME_FORMAT, ApiError, Rest, core_path
from vmthunder.node.iscsi import Chap
from vmthunder.operator.informer import Informer
from vmthunder.operator.model import (
    API_VERSION,
    IMAGE_CACHES,
    IMAGE_REPLICAS,
    LABEL_NODE,
    LABEL_PARENT,
    resource_path,
)
from vmthunder.operator.planner import ORIGIN
from vmthunder.operator.reconcile import selects

EVENTS_NAMESPACE = "default"  # where Events about cluster-scoped ImageReplicas live
SECRET_TTL_SECONDS = 30.0  # a rotated CHAP secret is picked up within this
Obj = dict[str, Any]
# The condition in which a replica names its node's iSCSI initiator (its parent lets it in).
INITIATOR_CONDITION = "Initiator"
log = logging.getLogger("vmthunder.agent")


class ReplicaGone(Exception):
    """The replica whose status was written no longer exists (its ImageCache or node went)."""


class Kube:
    """The few reads and the one write the agent does."""

    def __init__(self, rest: Rest) -> None:
        self.rest = rest

    def _get(self, plural: str, name: str) -> Obj | None:
        return self.rest.find(resource_path(plural, name))

    def replicas(self, labels: Mapping[str, str]) -> list[Obj]:
        """The replicas carrying all of `labels`."""
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        res = self.rest.get(resource_path(IMAGE_REPLICAS),
                            {"labelSelector": selector})
        return list(res.get("items", []))

    def replica(self, name: str) -> Obj | None:
        return self._get(IMAGE_REPLICAS, name)

    def cache(self, name: str) -> Obj | None:
        return self._get(IMAGE_CACHES, name)

    def chap(self, ref: Mapping[str, Any] | None) -> Chap | None:
        if not ref:
            return None
        s = self.rest.get(core_path("secrets", ref["name"], ref["namespace"]))
        data = {k: base64.b64decode(v).decode() for k, v in (s.get("data") or {}).items()}
        return Chap(data["username"], data["password"], data.get("mutualUsername"),
                    data.get("mutualPassword"))

    def profile(self, ref: Mapping[str, Any] | None) -> str | None:
        if not ref:
            return None
        cm = self.rest.get(core_path("configmaps", ref["name"], ref["namespace"]))
        return str((cm.get("data") or {}).get("profile", "")) or None

    def patch_status(self, name: str, status: Mapping[str, Any]) -> None:
        try:
            self.rest.patch(resource_path(IMAGE_REPLICAS, name, "status"),
                            {"status": dict(status)})
        except ApiError as e:
            if e.status == 404:
                raise ReplicaGone(name) from e
            raise

    def event(self, replica: Mapping[str, Any], kind: str, reason: str, message: str,
              source: str) -> None:
        meta = replica["metadata"]
        stamp = datetime.now(UTC).strftime(TIME_FORMAT)
        self.rest.create(core_path("events", namespace=EVENTS_NAMESPACE), {
            "metadata": {"generateName": f"{meta['name']}."},
            "involvedObject": {"apiVersion": API_VERSION, "kind": "ImageReplica",
                               "name": meta["name"], "uid": meta.get("uid")},
            "type": kind, "reason": reason, "message": message[:1000],
            "source": {"component": "vmthunder-agent", "host": source},
            "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1})


# --- pure pieces ------------------------------------------------------------------------------

def image_and_node(replica: Mapping[str, Any]) -> tuple[str, str]:
    spec = replica.get("spec") or {}
    labels = (replica.get("metadata") or {}).get("labels") or {}
    return str(spec.get("imageCache", "")), str(labels.get(LABEL_NODE, ""))


def concerns(node: str, mine: Mapping[str, Obj], old: Obj | None, new: Obj | None) -> bool:
    """Whether a change of a replica is news to `node`'s agent: one of its own, but not its
    status (the agent writes that itself), a child's place, initiator name (it goes into our
    ACLs) or prefetch (our background walk waits for it), but not a child's progress (a
    round for each would cost a parent a round per child every few seconds), or its
    parent's export, size, phase and prefetch (the walk follows it), but not the parent's
    heartbeat or byte counters (written every few seconds; a round costs a lab guest's agent
    a tenth of a second of its CPU)."""
    replica = new or old
    if replica is None:
        return False
    image, owner = image_and_node(replica)
    if owner == node:
        return old is None or new is None or _wanted(old) != _wanted(new)
    if (replica.get("spec") or {}).get("parent") == node:
        return old is None or new is None or _as_child(old) != _as_child(new)
    return (any(image_and_node(m)[0] == image and (m.get("spec") or {}).get("parent") == owner
                for m in mine.values())
            and (old is None or new is None or _as_parent(old) != _as_parent(new)))


def cache_concerns(old: Obj | None, new: Obj | None) -> bool:
    """Whether a change of an ImageCache is news to the agents: its spec, its deletion or the
    image size the nodes found, but not its counters (the origin's bytes move with every batch
    the tree's root reads, and every agent watches every ImageCache) nor the prefetches' last
    hold (prefetchingUntil: the hydrators take it at the next round, a few seconds away)."""
    if old is None or new is None:
        return True
    return _wanted(old) != _wanted(new) or (
        (old.get("status") or {}).get("imageSizeBytes")
        != (new.get("status") or {}).get("imageSizeBytes"))


def _wanted(replica: Mapping[str, Any]) -> tuple[Any, ...]:
    meta = replica.get("metadata") or {}
    return replica.get("spec"), meta.get("labels"), meta.get("deletionTimestamp")


def initiators_of(replica: Mapping[str, Any]) -> list[str]:
    """The initiator names a replica's status gives for its node (its parent lets them in)."""
    return [str(c["message"]) for c in (replica.get("status") or {}).get("conditions") or []
            if c.get("type") == INITIATOR_CONDITION and c.get("message")]


def _as_child(replica: Mapping[str, Any]) -> tuple[Any, ...]:
    status = replica.get("status") or {}
    return _wanted(replica), initiators_of(replica), status.get("phase"), status.get("holdUntil")


# What a child's round reads of its parent's status (vmthunder.node.agent: parent_address,
# parent_admits, known_size, upstream_of, peers_prefetching).
PARENT_FIELDS = ("exportAddress", "exportInitiators", "imageSizeBytes", "phase",
                 "hydratedInOrder", "holdUntil")


def _as_parent(replica: Mapping[str, Any]) -> tuple[Any, ...]:
    status = replica.get("status") or {}
    return _wanted(replica), *(status.get(k) for k in PARENT_FIELDS)


# --- the watched view ---------------------------------------------------------------------------

class WatchedKube(Kube):
    """The replicas this node acts on, each kind watched by its labels: its own
    (vmthunder.io/node), its children's (vmthunder.io/parent) and its parents' (their nodes',
    re-watched when its parents change). Watching every replica instead had each of N agents
    read every other's status writes: N² events for N nodes' work. Replicas without
    vmthunder.io/parent (an older operator's, until the operator labels them) are watched
    apart: a child missing from the view would lose its ACL, and with it its session."""

    def __init__(self, rest: Rest, node: str) -> None:
        super().__init__(rest)
        self.node = node
        self.wake = threading.Event()
        self._mine: dict[str, Obj] = {}  # this node's replicas, for `concerns` (few)
        self._secrets: dict[tuple[str, str], tuple[float, Chap | None]] = {}
        self._own = self._replicas_labeled(f"{LABEL_NODE}={node}")
        self._children = self._replicas_labeled(f"{LABEL_PARENT}={node}")
        self._unlabeled = self._replicas_labeled(f"!{LABEL_PARENT}")
        # The parents' nodes and the watch of their replicas, swapped together.
        self._parents: tuple[frozenset[str], Informer[Obj] | None] = (frozenset(), None)
        self._parents_lock = threading.Lock()
        self._caches = Informer[Obj](rest, resource_path(IMAGE_CACHES), dict,
                                     self._cache_changed)

    def _replicas_labeled(self, selector: str) -> Informer[Obj]:
        return Informer[Obj](self.rest, resource_path(IMAGE_REPLICAS), dict,
                             self._replica_changed, selector=selector)

    def start(self) -> WatchedKube:
        """Starts the watches and returns once they have listed. Never sooner: a round on
        empty lists would take this node's replicas for deleted and tear their stacks down."""
        fixed = (self._own, self._children, self._unlabeled, self._caches)
        for inf in fixed:
            inf.start()
        for inf in fixed:
            while not inf.synced.wait(30):
                log.warning("still waiting for the first listing of %s", inf.name)
        self._follow_parents()
        return self

    def stop(self) -> None:
        for inf in (self._own, self._children, self._unlabeled, self._caches, self._parents[1]):
            if inf is not None:
                inf.stop()

    def _replica_changed(self, old: Obj | None, new: Obj | None) -> None:
        obj = new or old
        if obj is None:
            return
        name = str(obj["metadata"]["name"])
        if image_and_node(obj)[1] == self.node:
            if new is None:
                self._mine.pop(name, None)
            else:
                self._mine[name] = new
            if self._own.synced.is_set():  # the first listing: once, from start()
                self._follow_parents()
        # A copy: the own watch's thread changes _mine while the others' read it here.
        if concerns(self.node, dict(self._mine), old, new):
            self.wake.set()

    def _cache_changed(self, old: Obj | None, new: Obj | None) -> None:
        if cache_concerns(old, new):
            self.wake.set()

    def _follow_parents(self) -> None:
        """Watches the replicas of this node's parents' nodes, anew when that set changes."""
        wanted = frozenset(str(p) for r in list(self._mine.values())
                           if (p := (r.get("spec") or {}).get("parent")) not in (None, ORIGIN))
        with self._parents_lock:
            nodes, old = self._parents
            if wanted == nodes:
                return
            selector = f"{LABEL_NODE} in ({','.join(sorted(wanted))})"
            self._parents = (wanted,
                             self._replicas_labeled(selector).start() if wanted else None)
        if old is not None:
            old.stop()  # its items are no longer read; its thread ends with its watch

    def _watched(self) -> list[Informer[Obj]]:
        parents = self._parents[1]
        return [self._own, self._children, self._unlabeled,
                *([parents] if parents is not None else [])]

    def replicas(self, labels: Mapping[str, str]) -> list[Obj]:
        found: dict[str, Obj] = {}
        for inf in self._watched():
            found.update((r["metadata"]["name"], r) for r in inf.values())
        return [r for r in found.values()
                if selects(labels, (r.get("metadata") or {}).get("labels") or {})]

    def replica(self, name: str) -> Obj | None:
        """A parent's replica. Not in the view, it is asked for: right after a re-parent the
        new parent's watch may not have listed yet, and a round that took the new parent for
        one without an export would log out of the old one before it has a new one."""
        for inf in self._watched():
            hit = inf.items.get(name)
            if hit is not None:
                return hit
        return super().replica(name)

    def cache(self, name: str) -> Obj | None:
        return self._caches.items.get(name)

    def chap(self, ref: Mapping[str, Any] | None) -> Chap | None:
        if not ref:
            return None
        key = (str(ref["namespace"]), str(ref["name"]))
        hit = self._secrets.get(key)
        if hit is not None and time.monotonic() - hit[0] < SECRET_TTL_SECONDS:
            return hit[1]
        chap = super().chap(ref)
        self._secrets[key] = (time.monotonic(), chap)
        return chap
