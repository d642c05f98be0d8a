"""The node agent: reconciles its node's ImageReplicas into the kernel block stack and reports.

Every round: read the API as the watches of vmthunder.node.api hold it (replicas of this node,
their ImageCaches, parents' export addresses, children's initiator names; the CHAP secret),
decide with pure plan_* functions, apply with stack.apply_image, start a hydrator where a cache
layer is caching, and write each replica's status. Nothing private needs to survive: after a
restart the round reads the kernel (dmsetup, iscsi sessions in sysfs, configfs) and converges.

A round runs when the watches or the hydrators bring news for this node, or every --interval
(ROUND_INTERVAL: what only a look at the kernel finds, a session to the parent broken or back, is
found that late). It is cheap once an image has converged: while what is wanted and the cache
layer's state stay as the last full round left them, it reads only the cache layer's progress
(one dmsetup call; a whole-stack read is about ten, ~1 s of a TCG lab guest's CPU), re-reading
the whole stack every RESYNC_SECONDS; and it writes a status only when it changed. The
heartbeats are the pulse's (plan_beats), a thread beside the rounds, so a long round or a long
wait between rounds never lets one lapse.

A node publishes its iSCSI initiator name in a status condition of type "Initiator" of its
replicas, so a parent can give it an ACL; the CRD has no dedicated field for it.

A cache filesystem without room for an image's cache makes the stack pass reads through to
the parent uncached: the replica stays usable (phase Attached), its condition "Cached" turns
False with reason CacheDiskFull, and a Warning Event says so once. The cache is built, under
the volumes, at the first full round (at most RESYNC_SECONDS apart) that finds room.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import start_http_server

from vmthunder.kube import TIME_FORMAT, ApiError, parse_time
from vmthunder.node import blockdev, dm, iscsi, lio, metrics, names, stack
from vmthunder.node import transport as transports
from vmthunder.node.api import (
    INITIATOR_CONDITION,
    Kube,
    ReplicaGone,
    WatchedKube,
    initiators_of,
)
from vmthunder.node.cache import VOLUME_HEADROOM, CacheBackend, CacheState, make_backend
from vmthunder.node.hydrate import (
    Hydrator,
    PeerPrefetch,
    Upstream,
    parse_profile,
    plan_prefetch,
    upstream_of,
)
from vmthunder.node.iscsi import Chap, TargetAddress
from vmthunder.node.transport import IscsiTransport, Transport
from vmthunder.operator.model import (
    CACHE_CONDITION,
    LABEL_IMAGE_CACHE,
    LABEL_NODE,
    USABLE_REPLICA_PHASES,
    replica_name,
)

log = logging.getLogger("vmthunder.agent")
DEFAULT_REGION = 65536
MIN_ROUND_GAP = 0.5  # seconds from one round's start to the next
# Seconds between rounds without news. Two in three of an agent's rounds in an N = 8 lab's boot
# storm had none at 2 s; at 5 s the storm ended 17-25% sooner. The heartbeats do not hang on
# it: the pulse writes them (plan_beats).
ROUND_INTERVAL = 5.0
DEFAULT_IDLE_SECONDS = 2.0  # the CRD's default for spec.hydration.idleSeconds
DEFAULT_HOLD_SECONDS = 60.0  # the CRD's default for spec.prefetch.holdSeconds
RESYNC_SECONDS = 30.0  # a converged image's whole stack is re-read at least this often
HEARTBEAT_SECONDS = 15.0  # a status unwritten this long gets a heartbeat (stale after 60 s)
ROUND_STUCK_SECONDS = 300.0  # a round running longer no longer vouches for the node (plan_beats)
PULSE_CHECK_SECONDS = 1.0  # the operator calls a node lost 20 s after its last heartbeat
PROGRESS_SECONDS = 5.0  # progress alone is written at most this often (see plan_status_write)
PROGRESS_FIELDS = frozenset({"hydratedRegions", "hydratedInOrder", "bytesFromParent",
                             "bytesServed"})
REINSTATE_BACKOFF_MAX = 60.0


# --- pure decisions ---------------------------------------------------------------------------

def parent_address(replica_spec: Mapping[str, Any], cache_spec: Mapping[str, Any],
                   parent_status: Mapping[str, Any] | None) -> TargetAddress | None:
    """The export this replica must read from: the origin's iSCSI source or the parent
    replica's exportAddress. None while the parent has not published one."""
    if replica_spec.get("parent") == names.ORIGIN:
        src = (cache_spec.get("source") or {}).get("iscsi")
        if not src:
            return None
        portal = str(src["portal"])
        return TargetAddress(portal if ":" in portal else f"{portal}:3260", str(src["iqn"]),
                             int(src.get("lun", 0)))
    addr = (parent_status or {}).get("exportAddress")
    if not addr or not addr.get("portal") or not addr.get("iqn"):
        return None
    return TargetAddress(str(addr["portal"]), str(addr["iqn"]), int(addr.get("lun", 0)))


def parent_admits(replica_spec: Mapping[str, Any], parent_status: Mapping[str, Any] | None,
                  initiator: str) -> bool:
    """Whether the parent's export has an ACL for `initiator` yet (the origin's always does).
    A login before that is refused, and a refused login costs seconds in iscsiadm and a
    Failed round: a child logs in only once its parent's status lists it. A status without
    the list (a parent agent from before it, a CRD not upgraded) says nothing: log in."""
    if replica_spec.get("parent") == names.ORIGIN:
        return True
    listed = (parent_status or {}).get("exportInitiators")
    return listed is None or initiator in listed


def source_while_awaiting(sessions: Collection[TargetAddress]) -> TargetAddress | None:
    """What the stack reads while its new parent has not let it in yet: the session it has
    (its old parent's), so nothing is logged out and its export, ACLs and detach still
    converge; None with no session (nothing built from a parent yet, or detached)."""
    return next(iter(sessions)) if len(sessions) == 1 else None


def children_initiators(node: str, replicas: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
    """Initiator names of the replicas (of one image) whose parent is `node`."""
    return tuple(sorted({name for r in replicas if (r.get("spec") or {}).get("parent") == node
                         for name in initiators_of(r)}))


@dataclass(frozen=True)
class PeerHold:
    """Another node's prefetch hold, as a status gave it."""

    who: str  # the node; "" for the operator's gathering of the image's nodes
    until: str  # its holdUntil as written
    hydrated_in_order: int  # the regions it holds in order (0: not known)
    left: float  # seconds to its end by our clock, capped at a hold


def peers_prefetching(node: str, replicas: Sequence[Mapping[str, Any]],
                      cache_status: Mapping[str, Any], own_hold: str | None, now: datetime,
                      hold_seconds: float) -> list[PeerHold]:
    """The image's other nodes holding their volumes for their prefetch. Those this node
    watches (its parents and children) as their statuses say. The others through the last
    hold the operator gathered in the ImageCache's status, unless that hold is one of those
    or this node's own (`own_hold`, which the gathering lags behind): a child caught up with
    us waits for our walk, and must not hold it through the gathering. A hold's end is
    another clock's: capped at `hold_seconds`."""
    holds = []
    known = {own_hold}
    for r in replicas:
        st = r.get("status") or {}
        known.add(st.get("holdUntil"))
        if (r.get("spec") or {}).get("node") != node and st.get("phase") == "Prefetching":
            holds.append((str(r["spec"]["node"]), st.get("holdUntil"),
                          int(st.get("hydratedInOrder") or 0)))
    gathered = cache_status.get("prefetchingUntil")
    if gathered not in known:
        holds.append(("", gathered, 0))
    out = []
    for who, until, in_order in holds:
        end = parse_time(until)
        if end is None:
            continue
        left = min((end - now).total_seconds(), hold_seconds)
        if left > 0:
            out.append(PeerHold(who, str(until), in_order, left))
    return out


def plan_peer_waits(holds: Sequence[PeerHold], first_seen: Mapping[tuple[str, str], float],
                    now: float, hold_seconds: float
                    ) -> tuple[tuple[PeerPrefetch, ...], dict[tuple[str, str], float]]:
    """Each hold as a deadline on our monotonic clock (`now`), at most `hold_seconds` after we
    first saw it: a node whose clock runs ahead, and whose agent then died while prefetching,
    holds us one hold, not until its clock's deadline. Returns the deadlines and the first
    sightings to keep (those of the holds still there)."""
    seen = {(h.who, h.until): first_seen.get((h.who, h.until), now) for h in holds}
    return (tuple(PeerPrefetch(h.hydrated_in_order,
                               min(now + h.left, seen[h.who, h.until] + hold_seconds))
                  for h in holds), seen)


def hold_seconds(cspec: Mapping[str, Any]) -> float:
    """How long an image's volumes wait at most for its prefetch (spec.prefetch.holdSeconds)."""
    return float((cspec.get("prefetch") or {}).get("holdSeconds", DEFAULT_HOLD_SECONDS))


def plan_phase(cache: CacheState, has_parent: bool, hydrated_in_order: int,
               error: str | None, holding: bool = False, reading: bool = True) -> str:
    """`holding`: the boot profile is still being prefetched and volumes wait for it.
    `reading`: the stack reads from a parent (a stack built before its parent let it in, or
    before its own login, reads from nowhere yet)."""
    if error:
        return "Failed"
    if cache.kind == "detached":
        return "Detached"
    if cache.kind == "absent" or not reading:
        return "Attaching" if has_parent else "Pending"
    if cache.kind == "passthrough":
        return "Attached"  # usable: reads go to the parent
    if cache.complete:
        return "Hydrated"
    if holding:
        return "Prefetching"
    if cache.hydrated == 0 and hydrated_in_order == 0:
        return "Attached"
    return "Hydrating"


@dataclass(frozen=True)
class Report:
    phase: str
    cache: CacheState
    bytes_from_parent: int
    bytes_served: int
    hydrated_in_order: int
    export: TargetAddress
    attached_parent: str
    initiator: str
    message: str
    parent_lost: bool = False  # the session to the wanted parent carries no I/O
    cache_dir: str = ""
    admitted: tuple[str, ...] = ()  # the initiators our export's ACLs let in
    hold_until: datetime | None = None  # while volumes wait for the prefetch: until when
    image_size: int = 0  # bytes, once known (0: not yet)


def initiator_condition(initiator: str) -> dict[str, str]:
    """How a child tells its parent its initiator name (the parent's ACL for it)."""
    return {"type": INITIATOR_CONDITION, "status": "True", "reason": "InitiatorName",
            "message": initiator}


def plan_failure_status(previous: Mapping[str, Any], error: str, initiator: str,
                        parent: str, now: datetime) -> dict[str, Any]:
    """The status of a replica whose round failed. It carries the initiator name too: a child
    whose first login is refused (its parent's export has no ACL for it yet) is let in only
    once the parent reads that name, so a failure must not withhold it. A lost session is
    kept only while `parent` (the wanted one) is still the parent it was lost to: carried onto
    a new parent, it would have that one judged gone after a single missed heartbeat."""
    conditions = [c for c in previous.get("conditions") or []
                  if c.get("type") != INITIATOR_CONDITION]
    conditions.append(initiator_condition(initiator))
    lost_at = previous.get("parentLostAt") if previous.get("attachedParent") == parent else None
    return {**previous, "phase": "Failed", "message": error[:4000], "parentLostAt": lost_at,
            "heartbeat": now.strftime(TIME_FORMAT), "conditions": conditions}


def plan_status(r: Report, previous: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    """The replica's new status. Byte counters never go backwards: the kernel's counters vanish
    with -src at detach, the status keeps the last value."""
    prev_from = int(previous.get("bytesFromParent", 0))
    prev_served = int(previous.get("bytesServed", 0))
    stamp = now.strftime(TIME_FORMAT)
    conditions = [c for c in previous.get("conditions") or []
                  if c.get("type") not in (INITIATOR_CONDITION, "Ready", CACHE_CONDITION)]
    conditions.append(initiator_condition(r.initiator))
    cached = cache_condition(r)
    if cached is not None:
        conditions.append(cached)
    ready = r.phase in USABLE_REPLICA_PHASES
    conditions.append({"type": "Ready", "status": "True" if ready else "False",
                       "reason": r.phase, "message": r.message[:1000]})
    total = r.cache.total
    hydrated = total if r.cache.kind == "detached" and total else r.cache.hydrated
    if r.cache.kind == "detached":
        total = int(previous.get("totalRegions", 0)) or total
        hydrated = total
    return {
        # None deletes the field (the status is sent as a merge patch)
        "parentLostAt": (previous.get("parentLostAt") or stamp) if r.parent_lost else None,
        "phase": r.phase,
        "hydratedRegions": hydrated,
        "totalRegions": total,
        # What the node found (or was told): its children and the operator take it from here.
        "imageSizeBytes": r.image_size or previous.get("imageSizeBytes"),
        "bytesFromParent": max(prev_from, r.bytes_from_parent),
        "bytesServed": max(prev_served, r.bytes_served),
        "hydratedInOrder": r.hydrated_in_order,
        "exportAddress": {"portal": r.export.portal, "iqn": r.export.iqn, "lun": r.export.lun},
        # Children are told to log in only once this node reads from its parent (or holds the
        # whole image): before, their reads, the kernel's partition scan of the new disk among
        # them, would wait here, and their agents with them.
        "exportInitiators": (list(r.admitted) if r.attached_parent or r.cache.kind == "detached"
                             else []),
        "holdUntil": r.hold_until.strftime(TIME_FORMAT) if r.hold_until else None,
        "attachedParent": r.attached_parent,
        "heartbeat": stamp,
        "message": r.message[:4000],
        "conditions": conditions,
    }


def known_size(cspec: Mapping[str, Any], cache_status: Mapping[str, Any],
               parent_status: Mapping[str, Any] | None) -> int:
    """The image's size in bytes without reading the parent (0: unknown): the spec's, else
    what a node reported, its parent's own report first (the operator's copy in the
    ImageCache's status comes a hop later). Known, a child builds its stack before it can
    read, so the tree's levels attach at once."""
    for size in (cspec.get("sizeBytes"), (parent_status or {}).get("imageSizeBytes"),
                 cache_status.get("imageSizeBytes")):
        if size:
            return int(size)
    return 0


def cache_condition(r: Report) -> dict[str, str] | None:
    """Whether the node caches the image, and if not, why; None before the stack is built."""
    if r.cache.kind in ("caching", "detached"):
        return {"type": CACHE_CONDITION, "status": "True", "reason": "Caching",
                "message": f"the image is cached in {r.cache_dir}"}
    if r.cache.kind == "passthrough":
        # Fixed words: a figure that moves with every write on the disk would rewrite the
        # status every round.
        return {"type": CACHE_CONDITION, "status": "False", "reason": "CacheDiskFull",
                "message": f"no room in {r.cache_dir} for this image's cache "
                           f"({_mib(r.cache.size)}, keeping {VOLUME_HEADROOM:.0%} of the "
                           "filesystem free for volumes): reads pass through to the parent "
                           "uncached until there is room"}
    return None


def _mib(n: int) -> str:
    return f"{-(-n // (1 << 20))} MiB"


def plan_cache_event(previous: Mapping[str, Any], status: Mapping[str, Any]
                     ) -> tuple[str, str, str] | None:
    """(type, reason, message) of the Event a change of the Cached condition deserves."""
    def cached(s: Mapping[str, Any]) -> Mapping[str, Any]:
        return next((c for c in s.get("conditions") or [] if c.get("type") == CACHE_CONDITION),
                    {})

    before, now = cached(previous), cached(status)
    if now.get("status") == before.get("status"):
        return None
    if now.get("status") == "False":
        return "Warning", str(now["reason"]), str(now["message"])
    if now.get("status") == "True" and before.get("status") == "False":
        return "Normal", "CacheBuilt", "room for the cache again: the image is now cached"
    return None


@dataclass(frozen=True)
class Reinstated:
    """The last reinstatement of an image's path to its parent."""

    parent: TargetAddress
    device: str  # "8:0"
    times: int  # reinstated this often in a row, each failing again
    at: float  # monotonic seconds
    failing: bool = False  # the last full round found it failed again


def reinstate_backoff(times: int) -> float:
    """How long a path that failed again after `times` reinstatements waits for the next."""
    return min(REINSTATE_BACKOFF_MAX, 2.0 ** times)


def plan_held_paths(last: Reinstated | None, parent: TargetAddress | None,
                    now: float) -> frozenset[str]:
    """The path not to reinstate yet: a reload that keeps failing it (a parent whose disk
    refuses the queued requests) must not cost a full round and a kernel message every
    second."""
    if (last is None or last.parent != parent
            or now - last.at >= reinstate_backoff(last.times)):
        return frozenset()
    return frozenset({last.device})


def plan_reinstated(last: Reinstated | None, parent: TargetAddress, device: str,
                    now: float) -> Reinstated:
    """The record after reinstating `device`: one more in a row if the previous one, of the
    same parent's disk, failed within a backoff's reach; else the first."""
    if (last is not None and (last.parent, last.device) == (parent, device)
            and now - last.at < reinstate_backoff(last.times) + REINSTATE_BACKOFF_MAX):
        return Reinstated(parent, device, last.times + 1, now)
    return Reinstated(parent, device, 1, now)


def plan_removals(kernel_images: set[str], wanted: set[str]) -> set[str]:
    return kernel_images - wanted


@dataclass(frozen=True)
class Converged:
    """What an image's last full round wanted and saw, having had nothing to change."""

    want: stack.Want
    cache_kind: str
    cache_complete: bool
    # The image's iSCSI sessions, each with whether it carries I/O (sysfs: cheap to read)
    sessions: frozenset[tuple[TargetAddress, bool]]
    attached_parent: str
    at: float  # monotonic seconds
    admitted: tuple[str, ...] | None = None


def session_states(sessions: Iterable[TargetAddress],
                   broken: Collection[TargetAddress]) -> frozenset[tuple[TargetAddress, bool]]:
    return frozenset((a, a not in broken) for a in sessions)


def plan_full_round(last: Converged | None, want: stack.Want, cache: CacheState,
                    sessions: frozenset[tuple[TargetAddress, bool]], now: float) -> bool:
    """Whether the round must read the whole stack and plan: something wanted changed, the
    cache layer changed state (completion is when it detaches), a session came, went, broke
    or recovered, or the resync is due (a pass-through looks for room for its cache then: a
    build that finds none after all costs a reservation tried and undone, not every round)."""
    return (last is None or last.want != want or last.cache_kind != cache.kind
            or last.cache_complete != cache.complete or last.sessions != sessions
            or now - last.at >= RESYNC_SECONDS)


def plan_beats(last_written: Mapping[str, datetime | None], round_busy: float,
               now: datetime) -> list[str]:
    """The images whose replica's heartbeat the pulse writes now: those whose status was last
    written (by a round or a beat; None: never that we know) HEARTBEAT_SECONDS ago. The pulse owns
    the heartbeats, not the rounds: under load a round takes minutes (an attach of 60 s, then
    the export), and the rounds without news are seconds apart, so a heartbeat written at a
    round's end can come more than the 20 s late that, once a child has lost its session,
    has the operator call this node lost and move its children (N = 16, 2026-12-07). A round
    busy for ROUND_STUCK_SECONDS looks stuck: the node is left to go stale."""
    if round_busy >= ROUND_STUCK_SECONDS:
        return []
    return [image for image, at in last_written.items()
            if at is None or (now - at).total_seconds() >= HEARTBEAT_SECONDS]


def plan_status_write(previous: Mapping[str, Any], status: Mapping[str, Any],
                      now: datetime) -> bool:
    """A changed status is written at once, but progress alone (counters moving while the
    cache hydrates in the background) at most every PROGRESS_SECONDS: a write is the agent's
    largest cost per round in a lab guest, and every agent watching replicas reads each one.
    The prefetch's progress goes out at once: the children follow it batch by batch, and the
    volumes wait for its end. An unchanged status is not written: the pulse beats for it."""
    def content(s: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in s.items() if k != "heartbeat" and v is not None}

    before, after = content(previous), content(status)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    if changed - PROGRESS_FIELDS or (status.get("phase") == "Prefetching" and changed):
        return True
    beat = parse_time(previous.get("heartbeat"))
    if beat is None:
        return True
    return bool(changed) and (now - beat).total_seconds() >= PROGRESS_SECONDS


# --- the loop ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Hold:
    """Until when an image's volumes wait for its prefetch: one deadline for all the image's
    hydrators, so a failing one cannot hold volumes back for ever."""

    until: float  # time.monotonic()
    wall: datetime  # the same deadline (rounded up) in the status, for the CSI node plugin

    @staticmethod
    def lasting(seconds: float) -> Hold:
        return Hold(time.monotonic() + seconds,
                    datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=seconds + 1))


class Agent:
    def __init__(self, node: str, kube: Kube, backend: CacheBackend, transport: Transport,
                 export_ip: str, *, initiator: str | None = None, multipath: bool = True,
                 profile_file: str | None = None,
                 news: Callable[[], None] = lambda: None) -> None:
        self.node = node
        self.kube = kube
        self.backend = backend
        self.transport = transport
        self.export_ip = export_ip
        self.initiator = initiator or iscsi.initiator_name()
        self.multipath = multipath
        self.profile_file = profile_file
        self.news = news  # wakes the loop for a round now (the prefetch's progress)
        self.hydrators: dict[str, Hydrator] = {}
        self.holds: dict[str, Hold] = {}  # per image
        # per image: when each other node's hold was first seen (plan_peer_waits)
        self.peer_holds: dict[str, dict[tuple[str, str], float]] = {}
        self.notes: dict[str, str] = {}  # per image: what went wrong without stopping it
        self.statuses: dict[str, dict[str, Any]] = {}  # per image: the status last written
        self.written_at: dict[str, datetime] = {}  # per image: our last write of its status
        self.converged: dict[str, Converged] = {}
        self.reinstated: dict[str, Reinstated] = {}
        self.wanted: set[str] | None = None  # the images of the last sweep for removals
        self.swept_at = 0.0
        self.round_started: float | None = None  # monotonic, while a round runs (plan_beats)

    def round(self) -> None:
        self.round_started = time.monotonic()
        try:
            with metrics.ROUND_SECONDS.time():
                self._round()
        finally:
            self.round_started = None

    def beat(self) -> None:
        """Writes the heartbeat, and only that, of this node's replicas that have a status and
        are due one (plan_beats). Never raises: the next beat tries again."""
        started = self.round_started
        busy = 0.0 if started is None else time.monotonic() - started
        now = datetime.now(UTC)
        live = {str(r["spec"]["imageCache"]): r for r in self.kube.replicas({LABEL_NODE: self.node})
                if r.get("status") and not r["metadata"].get("deletionTimestamp")}
        # Our own last write may not have come back through the watch yet: the later of the two.
        last = {image: max(filter(None, (parse_time(r["status"].get("heartbeat")),
                                         self.written_at.get(image))), default=None)
                for image, r in live.items()}
        for image in plan_beats(last, busy, now):
            name = live[image]["metadata"]["name"]
            try:
                self.kube.patch_status(name, {"heartbeat": now.strftime(TIME_FORMAT)})
                self.written_at[image] = now
            except Exception as e:  # gone meanwhile, or the API server away
                log.warning("heartbeat of %s: %s", name, e)

    def pulse(self) -> None:
        """Runs for ever beside the rounds (a daemon thread): see plan_beats."""
        while True:
            time.sleep(PULSE_CHECK_SECONDS)
            try:
                self.beat()
            except Exception:  # the watch's cache mid-change: the next second tries again
                log.exception("pulse")

    def _round(self) -> None:
        mine = self.kube.replicas({LABEL_NODE: self.node})
        wanted: set[str] = set()
        for r in mine:
            image = str(r["spec"]["imageCache"])
            wanted.add(image)
            try:
                self._replica(r)
            except Exception as e:  # one replica's failure must not stop the others
                if isinstance(e, ApiError) and e.transient:
                    # The API server's hiccup (a dropped connection, a 5xx), not the replica's:
                    # reported as Failed, it had the operator move the node's children away and
                    # back (N = 16, 2026-12-07). The next round, seconds away, writes it.
                    log.warning("replica %s: %s; again next round", r["metadata"]["name"], e)
                    continue
                if isinstance(e, ReplicaGone):
                    # Deleted while the round ran (its ImageCache went): no status to write,
                    # and the next round's sweep removes its stack.
                    log.info("replica %s deleted meanwhile", r["metadata"]["name"])
                    continue
                log.exception("replica %s", r["metadata"]["name"])
                self._report_failure(r, e)
        now = time.monotonic()
        if wanted != self.wanted or now - self.swept_at >= RESYNC_SECONDS:
            kept = [image for image in plan_removals(self._kernel_images(), wanted)
                    if not self._remove(image)]
            self.wanted = None if kept else wanted  # kept ones: try again next round
            self.swept_at = now
        for per_image in (self.statuses, self.written_at, self.converged, self.reinstated,
                          self.peer_holds):
            for image in set(per_image) - wanted:
                del per_image[image]

    def _kernel_images(self) -> set[str]:
        out = set()
        for n in dm.names():
            img = names.image_of(n)
            if img is not None:
                out.add(img)
        return out

    def _remove(self, image: str) -> bool:
        """Removes the image's stack unless volumes still use it; says whether it did."""
        path = dm.mapper_path(names.cache_dev(image))
        exp = dm.info(names.export_dev(image))
        try:
            users = [h for h in blockdev.holders(path)
                     if exp is None or h != f"dm-{exp.minor}"]
        except (OSError, blockdev.BlockDevError):
            users = []
        if users:
            log.info("keeping %s: volumes still use it (%s)", image, users)
            return False
        self.holds.pop(image, None)
        h = self.hydrators.pop(image, None)
        if h:
            h.stop()
            stack.fail_queued_reads(image)  # a read waiting on a departed parent lets go
            h.join(10)
        log.info("removing the stack of %s", image)
        stack.remove_image(image, self.node, self.backend, self.transport, None)
        return True

    def _replica(self, r: Mapping[str, Any]) -> None:
        spec = r["spec"]
        image = str(spec["imageCache"])
        ic = self.kube.cache(image)
        if ic is None:
            return
        cspec = ic.get("spec") or {}
        parent_status = None
        if spec.get("parent") != names.ORIGIN:
            pr = self.kube.replica(replica_name(image, str(spec["parent"])))
            parent_status = (pr or {}).get("status")
        parent = parent_address(spec, cspec, parent_status)
        chap = self.kube.chap(cspec.get("chapSecretRef"))
        siblings = self.kube.replicas({LABEL_IMAGE_CACHE: image})
        children = children_initiators(self.node, siblings)
        region = int(cspec.get("regionSizeBytes", DEFAULT_REGION))
        origin_iqn = ((cspec.get("source") or {}).get("iscsi") or {}).get("iqn")
        connections = self.transport.connections()  # one walk of the sessions in sysfs
        image_sessions = stack.sessions_of_image(image, origin_iqn, transports.devices(connections))
        # A session made already stays whatever the parent's status says now.
        awaiting_acl = (parent is not None and parent not in image_sessions
                        and not parent_admits(spec, parent_status, self.initiator))
        source = source_while_awaiting(image_sessions) if awaiting_acl else parent
        size = known_size(cspec, ic.get("status") or {}, parent_status)
        if not size:
            size = self._probe_size(image, source, chap)
        w = stack.Want(
            image=image, node=self.node, size=size, region_bytes=region, parent=source,
            parent_chap=chap, export_ip=self.export_ip, children=children, children_chap=chap,
            detach_when_hydrated=cspec.get("detachPolicy", "WhenHydrated") == "WhenHydrated",
            multipath=self.multipath,
            held_paths=plan_held_paths(self.reinstated.get(image), source, time.monotonic()),
        )
        message = ""
        previous = r.get("status") or {}
        # While awaiting its new parent the node still reads from the old one.
        attached = str(previous.get("attachedParent") or "") if awaiting_acl else ""
        cache = self.backend.observe(image)
        # Unchanged unless a full round looks; nothing is exported without a stack.
        admitted: tuple[str, ...] | None = (
            tuple(previous.get("exportInitiators") or ()) if cache.kind != "absent" else None)
        sessions = session_states(image_sessions, transports.broken(connections))
        last = self.converged.pop(image, None)  # kept below only if this round changes nothing
        counted: stack.Counters | None = None
        now = time.monotonic()
        if awaiting_acl and len(image_sessions) > 1:
            pass  # which one -src reads is for a round after the new parent lets us in
        elif not size:
            message = "waiting for the parent's export"
        elif last is not None and not plan_full_round(last, w, cache, sessions, now):
            attached = last.attached_parent
            admitted = last.admitted
            self.converged[image] = last
        else:
            # The counters as the kernel has them before the steps: a detach removes -src, and
            # with it the count of what came from the parent since the last status write.
            counted = stack.counters(image)
            seen, steps = stack.apply_image(w, self.backend, self.transport, origin_iqn)
            w, admitted = self._let_in_late(w, stack.exported_to(w, seen, steps), steps)
            self._note_reinstated(w, seen, steps, source, now)
            if steps:
                message = "applied: " + ", ".join(type(s).__name__ for s in steps)
                log.info("%s: %s", image, message)
                cache = self.backend.observe(image)
                on_parent = stack.reads_from_parent(image)
            else:
                on_parent = bool(seen.src_table)
            # A pass-through reads from its parent too (uncached): it has one, and may lose it.
            if (cache.kind in ("caching", "passthrough") and parent is not None and on_parent
                    and not awaiting_acl):
                attached = str(spec["parent"])
            if not steps:
                self.converged[image] = Converged(
                    w, cache.kind, cache.complete, session_states(seen.sessions, seen.broken),
                    attached, now, admitted)
        if awaiting_acl:
            message = f"waiting for {spec['parent']}'s export to admit {self.initiator}"
        held = self.reinstated.get(image)
        if w.held_paths and held is not None and held.failing:
            message = (f"the path to the parent failed again right after being reinstated, "
                       f"{held.times} times in a row: retrying with a backoff")
        upstream = upstream_of(spec.get("parent") == names.ORIGIN, parent_status)
        # The prefetch (and the volumes' hold with it) starts once there is a parent to read.
        h = self._hydrator(image, cache, cspec, size, region, bool(attached), upstream)
        if h is not None:
            own, cap = self.holds.get(image), hold_seconds(cspec)
            holds = peers_prefetching(
                self.node, siblings, ic.get("status") or {},
                own.wall.strftime(TIME_FORMAT) if own else None, datetime.now(UTC), cap)
            h.peers, self.peer_holds[image] = plan_peer_waits(
                holds, self.peer_holds.get(image, {}), time.monotonic(), cap)
        c = stack.counters(image)
        if counted is not None:
            c = stack.Counters(max(c.bytes_from_parent, counted.bytes_from_parent),
                               max(c.bytes_served, counted.bytes_served))
        phase = plan_phase(cache, parent is not None, h.hydrated_in_order if h else 0,
                           h.error if h else None, h is not None and h.holding(),
                           reading=bool(attached))
        hold = self.holds.get(image)
        rep = Report(
            phase=phase,
            cache=cache, bytes_from_parent=c.bytes_from_parent, bytes_served=c.bytes_served,
            hydrated_in_order=h.hydrated_in_order if h else 0,
            export=TargetAddress(f"{self.export_ip}:3260", names.export_iqn(image, self.node)),
            attached_parent=attached, initiator=self.initiator,
            parent_lost=parent is not None and (parent, False) in sessions,
            cache_dir=self.backend.cache_dir,
            message=(h.error if h and h.error else self.notes.get(image) or message),
            admitted=admitted or (),
            hold_until=hold.wall if phase == "Prefetching" and hold is not None else None,
            image_size=size,
        )
        self.statuses[image] = self._write_status(r, rep)
        if attached and previous.get("attachedParent") not in ("", None, attached):
            metrics.REPARENTS.labels(image).inc()
        if h is not None and h.error:
            self.hydrators.pop(image, None)  # a fresh one next round

    def _write_status(self, r: Mapping[str, Any], rep: Report) -> dict[str, Any]:
        """Writes the replica's status if it changed (plan_status_write), with an Event when
        the cache's condition turns; returns the status."""
        previous = r.get("status") or {}
        stamp = datetime.now(UTC)
        status = plan_status(rep, previous, stamp)
        if plan_status_write(previous, status, stamp):
            self.kube.patch_status(r["metadata"]["name"], status)
            self.written_at[str(r["spec"]["imageCache"])] = stamp
            event = plan_cache_event(previous, status)
            if event is not None:
                log.warning("%s: %s: %s", r["spec"]["imageCache"], event[1], event[2])
                try:
                    self.kube.event(r, *event, source=self.node)
                except Exception:  # the condition says it too: an Event lost is no failure
                    log.exception("event for %s", r["metadata"]["name"])
        return status

    def _let_in_late(self, w: stack.Want, admitted: tuple[str, ...] | None,
                     steps: list[stack.Step]) -> tuple[stack.Want, tuple[str, ...] | None]:
        """Lets in the children that reported while the stack was built (seconds) now, not a
        round later: each level of the tree waits for its parent's ACLs. Returns the want and
        the initiators admitted after it; `steps` gets the Export it took."""
        if not steps or admitted is None:
            return w, admitted
        late = children_initiators(self.node, self.kube.replicas({LABEL_IMAGE_CACHE: w.image}))
        if late == w.children:
            return w, admitted
        try:
            acls = stack.let_in(replace(w, children=late))
        except Exception:  # the stack is built: the next round tries again
            log.exception("%s: letting in %s", w.image, late)
            return w, admitted
        steps.append(acls)
        return replace(w, children=late), acls.spec.initiators

    def _note_reinstated(self, w: stack.Want, seen: stack.Seen, steps: Sequence[stack.Step],
                         source: TargetAddress | None, now: float) -> None:
        """Records a path to the parent reinstated in this round, and whether the one held
        back since the last reinstatement failed again (plan_held_paths backs off on it)."""
        held = self.reinstated.get(w.image)
        if held is not None and w.held_paths:
            self.reinstated[w.image] = replace(held, failing=held.device in seen.failed_paths)
        for step in steps:
            if isinstance(step, stack.ReinstatePath) and source is not None:
                self.reinstated[w.image] = plan_reinstated(
                    self.reinstated.get(w.image), source, step.device, now)

    def _probe_size(self, image: str, parent: TargetAddress | None, chap: Chap | None) -> int:
        # An agent killed inside dm.create leaves a device without its node (dm.ensure_nodes),
        # and the cache device is read by its path. A full round's look (stack.observe) makes
        # the nodes right too: a light round needs none of them.
        dm.ensure_nodes(names.cache_dev(image))
        if dm.exists(names.cache_dev(image)):
            return blockdev.size_bytes(dm.mapper_path(names.cache_dev(image)))
        if parent is None:
            return 0
        return blockdev.size_bytes(self.transport.attach(parent, chap))

    def _hydrator(self, image: str, cache: CacheState, cspec: Mapping[str, Any], size: int,
                  region: int, has_parent: bool, upstream: Upstream) -> Hydrator | None:
        h = self.hydrators.get(image)
        if h is not None:
            h.upstream = upstream
            if h.is_alive() or h.error:
                return h
        if cache.kind != "caching" or cache.complete or not has_parent or not size:
            return h
        prefetch = cspec.get("prefetch") or {}
        order, problem = self._prefetch_order(image, prefetch, region, size)
        if problem:
            self.notes[image] = problem
        else:
            self.notes.pop(image, None)
        hydration = cspec.get("hydration") or {}
        h = Hydrator(image, self.backend, size=size, region_bytes=region, profile=order,
                     queue_depth=int(prefetch.get("queueDepth", 8)),
                     throttle=int(hydration.get("throttleBytesPerSecond", 0)),
                     idle_seconds=float(hydration.get("idleSeconds", DEFAULT_IDLE_SECONDS)),
                     # a cache already holding as much as the profile (an agent restart) is
                     # not held again
                     hold_until=self.holds.setdefault(image, Hold.lasting(
                         0.0 if cache.hydrated >= len(order) else
                         hold_seconds(cspec))).until,
                     upstream=upstream, on_progress=self.news)
        h.start()
        self.hydrators[image] = h
        return h

    def _prefetch_order(self, image: str, prefetch: Mapping[str, Any], region: int,
                        size: int) -> tuple[list[int], str | None]:
        """The profile's regions in order, or none and why: a profile that cannot be read or
        parsed costs the prefetch, not the replica (it still attaches and hydrates)."""
        if not prefetch.get("enabled", True):
            return [], None
        try:
            if self.profile_file:
                with open(self.profile_file) as f:
                    text: str | None = f.read()
            else:
                text = self.kube.profile(prefetch.get("profileConfigMap"))
            return (plan_prefetch(parse_profile(text), region, size) if text else []), None
        except Exception as e:  # ValueError (corrupt), OSError, ApiError (no ConfigMap)
            log.warning("%s: boot profile unusable, hydrating without prefetch: %s", image, e)
            return [], f"boot profile unusable, hydrating without prefetch: {e}"[:1000]

    def _report_failure(self, r: Mapping[str, Any], e: Exception) -> None:
        status = plan_failure_status(r.get("status") or {}, f"{type(e).__name__}: {e}",
                                     self.initiator, str((r.get("spec") or {}).get("parent", "")),
                                     datetime.now(UTC))
        try:
            self.kube.patch_status(r["metadata"]["name"], status)
        except Exception:
            log.exception("status of %s", r["metadata"]["name"])


def run_agent(node: str, *, export_ip: str, cache_dir: str = "/var/lib/vmthunder",
              backend: str = "dm-clone", interval: float | None = None, multipath: bool = True,
              replacement_timeout: int | None = None, profile_file: str | None = None,
              once: bool = False, metrics_port: int = 0) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from vmthunder.kube import Rest

    interval = ROUND_INTERVAL if interval is None else interval

    # With multipath, a dead session must fail fast so dm-multipath queues the I/O itself
    # (queue_if_no_path) until a new parent's path is loaded; without it the SCSI layer queues.
    tmo = replacement_timeout if replacement_timeout is not None else (5 if multipath else 600)
    transport = IscsiTransport(tmo)
    # Modules, iscsid and rtslib's import take seconds in a small guest: paid here, not by
    # the first attach and export, which each level of the tree waits for.
    for prepare in (transport.prepare, lio.prepare):
        try:
            prepare()
        except Exception:  # the first round tries again and reports what fails
            log.exception("preparing the kernel side")
    kube = WatchedKube(Rest.from_environment(), node).start()
    agent = Agent(node, kube, make_backend(backend, cache_dir), transport, export_ip,
                  multipath=multipath, profile_file=profile_file, news=kube.wake.set)
    if metrics_port:
        metrics.register(lambda: dict(agent.statuses))
        start_http_server(metrics_port)
    threading.Thread(target=agent.pulse, name="pulse", daemon=True).start()
    while True:
        t0 = time.monotonic()
        kube.wake.clear()  # before the round: news that comes during it makes another
        try:
            agent.round()
        except Exception:
            log.exception("round failed")
        if once:
            return 0
        # The next round when something this node acts on changes, or after `interval` (the
        # hydration's progress, the kernel's state); never closer than MIN_ROUND_GAP, so a burst
        # of news (children reporting at once) makes one round, not one each.
        time.sleep(max(0.0, MIN_ROUND_GAP - (time.monotonic() - t0)))
        kube.wake.wait(max(0.0, t0 + interval - time.monotonic()))
