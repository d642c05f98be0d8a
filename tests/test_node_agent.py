"""The agent's pure decisions: where to read from, who may read from us, what to report."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from waiting import wait_for

from vmthunder.kube import TIME_FORMAT, ApiError
from vmthunder.node import dm, names, stack
from vmthunder.node.agent import (
    CACHE_CONDITION,
    HEARTBEAT_SECONDS,
    PROGRESS_SECONDS,
    REINSTATE_BACKOFF_MAX,
    RESYNC_SECONDS,
    ROUND_STUCK_SECONDS,
    Agent,
    Converged,
    PeerHold,
    Report,
    children_initiators,
    known_size,
    parent_address,
    parent_admits,
    peers_prefetching,
    plan_beats,
    plan_cache_event,
    plan_failure_status,
    plan_full_round,
    plan_held_paths,
    plan_peer_waits,
    plan_phase,
    plan_reinstated,
    plan_removals,
    plan_status,
    plan_status_write,
    reinstate_backoff,
    session_states,
)
from vmthunder.node.api import INITIATOR_CONDITION, ReplicaGone
from vmthunder.node.cache import CacheState
from vmthunder.node.hydrate import (
    UNLIMITED,
    Hydrator,
    PeerPrefetch,
    Upstream,
    hydration_order,
    peers_waiting,
    upstream_of,
)
from vmthunder.node.iscsi import TargetAddress
from vmthunder.node.stack import Want
from vmthunder.node.transport import Connection
from vmthunder.operator.model import ready_for_vms

CACHE_SPEC = {"source": {"iscsi": {"portal": "10.0.0.2", "iqn": "iqn.2026-11.io.x:gold"}}}


def test_origin_parent_reads_the_image_caches_iscsi_source_with_default_port() -> None:
    a = parent_address({"parent": names.ORIGIN}, CACHE_SPEC, None)
    assert a == TargetAddress("10.0.0.2:3260", "iqn.2026-11.io.x:gold", 0)


def test_node_parent_reads_the_parents_published_export_address() -> None:
    st = {"exportAddress": {"portal": "10.0.0.11:3260", "iqn": "iqn.x:a.img", "lun": 0}}
    assert parent_address({"parent": "a"}, CACHE_SPEC, st) == TargetAddress(
        "10.0.0.11:3260", "iqn.x:a.img", 0)


def test_parent_without_an_export_address_means_wait() -> None:
    assert parent_address({"parent": "a"}, CACHE_SPEC, {"phase": "Attaching"}) is None
    assert parent_address({"parent": "a"}, CACHE_SPEC, None) is None


def test_a_child_logs_in_only_once_its_parents_status_lists_its_initiator() -> None:
    assert parent_admits({"parent": names.ORIGIN}, None, "iqn.x:b")
    addr = {"exportAddress": {"portal": "10.0.0.11:3260", "iqn": "iqn.x:a.img", "lun": 0}}
    for listed in ([], ["iqn.x:c"]):
        assert not parent_admits({"parent": "a"}, {**addr, "exportInitiators": listed},
                                 "iqn.x:b")
    assert parent_admits({"parent": "a"}, {**addr, "exportInitiators": ["iqn.x:b"]}, "iqn.x:b")
    # A parent whose status has no list (an older agent, a CRD that drops the field) says
    # nothing either way: the child logs in as before.
    assert parent_admits({"parent": "a"}, addr, "iqn.x:b")


def test_status_lists_the_exports_initiators_and_an_empty_list_without_an_export() -> None:
    r = report(CacheState("caching", 2, 16), 10)
    now = datetime.now(UTC)
    with_acl = Report(**{**r.__dict__, "admitted": ("iqn.x:c", "iqn.x:d"),
                         "attached_parent": "a"})
    assert plan_status(with_acl, {}, now)["exportInitiators"] == ["iqn.x:c", "iqn.x:d"]
    # Built and exported, but reading from no parent yet: the children are not told to come,
    # as their reads would wait here (the detached cache holds everything: it tells them).
    unread = Report(**{**with_acl.__dict__, "attached_parent": ""})
    assert plan_status(unread, {}, now)["exportInitiators"] == []
    whole = Report(**{**unread.__dict__, "cache": CacheState("detached")})
    assert plan_status(whole, {}, now)["exportInitiators"] == ["iqn.x:c", "iqn.x:d"]
    # Always a list: a child reads a missing one as a parent that does not say.
    assert plan_status(r, {"exportInitiators": ["iqn.x:c"]}, now)["exportInitiators"] == []


def test_a_hold_puts_its_deadline_in_the_status_and_vms_wait_no_longer_than_that() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    until = t0 + timedelta(seconds=60)
    held = Report(**{**report(CacheState("caching", 2, 16), 10).__dict__,
                     "phase": "Prefetching", "hold_until": until})
    st = plan_status(held, {}, t0)
    assert st["holdUntil"] == "2026-01-01T00:01:00Z"
    assert not ready_for_vms(st, t0)
    # The agent died holding: the status stays Prefetching, and the deadline lets VMs start.
    assert ready_for_vms(st, until)
    # A hold that ended drops the field.
    done = plan_status(report(CacheState("caching", 3, 16), 10), st, t0)
    assert done["holdUntil"] is None and ready_for_vms(done, t0)
    assert not ready_for_vms({"phase": "Prefetching"}, until)  # no deadline said: held
    assert not ready_for_vms({"phase": "Attaching", "holdUntil": "2026-01-01T00:00:00Z"}, until)
    assert not ready_for_vms(None, until)


def test_children_are_replicas_naming_this_node_as_parent_with_their_initiators() -> None:
    def rep(parent: str, iqn: str | None) -> dict[str, object]:
        conds = [{"type": INITIATOR_CONDITION, "status": "True", "message": iqn}] if iqn else []
        return {"spec": {"parent": parent}, "status": {"conditions": conds}}

    reps = [rep("a", "iqn.x:b"), rep("a", "iqn.x:c"), rep("b", "iqn.x:d"), rep("a", None)]
    assert children_initiators("a", reps) == ("iqn.x:b", "iqn.x:c")


def test_a_child_whose_first_round_failed_still_tells_its_parent_its_name() -> None:
    # Its parent's export had no ACL for it yet, so the login was refused: the parent adds
    # one only for a name it reads in the child's status (a CI run deadlocked on this).
    now = datetime(2026, 11, 25, tzinfo=UTC)
    first = plan_failure_status({}, "IscsiError: authorization failure", "iqn.x:b", "a", now)
    child = {"spec": {"parent": "a"}, "status": first}
    assert children_initiators("a", [child]) == ("iqn.x:b",)
    assert first["phase"] == "Failed" and first["message"].startswith("IscsiError")
    # Later failures keep what the status held and one Initiator condition.
    held = {"phase": "Attached", "exportAddress": {"iqn": "iqn.x:b.img"},
            "conditions": [{"type": "Ready", "status": "True"}, first["conditions"][0]]}
    again = plan_failure_status(held, "boom", "iqn.x:b", "a", now)
    assert again["exportAddress"] == held["exportAddress"]
    assert [c["type"] for c in again["conditions"]] == ["Ready", INITIATOR_CONDITION]


def test_a_failed_replica_moved_to_a_new_parent_does_not_accuse_it() -> None:
    # Its session to "a" was lost; the operator moved it under "c". The lost mark would tell
    # the operator that "c" died as soon as "c" missed one heartbeat.
    now = datetime(2026, 11, 26, tzinfo=UTC)
    lost = {"phase": "Attached", "attachedParent": "a", "parentLostAt": "2026-11-26T00:00:00Z"}
    assert plan_failure_status(lost, "boom", "iqn.x:b", "a", now)["parentLostAt"] \
        == "2026-11-26T00:00:00Z"
    moved = plan_failure_status(lost, "boom", "iqn.x:b", "c", now)
    assert "parentLostAt" in moved and moved["parentLostAt"] is None  # deleted by the merge


def test_phases_follow_the_cache_layer() -> None:
    assert plan_phase(CacheState("absent"), False, 0, None) == "Pending"
    assert plan_phase(CacheState("absent"), True, 0, None) == "Attaching"
    assert plan_phase(CacheState("caching", 0, 10), True, 0, None) == "Attached"
    assert plan_phase(CacheState("caching", 3, 10), True, 3, None) == "Hydrating"
    assert plan_phase(CacheState("caching", 10, 10), True, 3, None) == "Hydrated"
    assert plan_phase(CacheState("detached"), True, 0, None) == "Detached"
    assert plan_phase(CacheState("caching", 3, 10), True, 3, "boom") == "Failed"
    # While the boot profile is prefetched, volumes wait: the phase says so, and gives way to
    # a complete cache, a failure, or (holding=False) the end of the prefetch or of the hold.
    assert plan_phase(CacheState("caching", 0, 10), True, 0, None, True) == "Prefetching"
    assert plan_phase(CacheState("caching", 3, 10), True, 3, None, True) == "Prefetching"
    assert plan_phase(CacheState("caching", 10, 10), True, 3, None, True) == "Hydrated"
    assert plan_phase(CacheState("caching", 3, 10), True, 3, "boom", True) == "Failed"
    # Built and exported before it reads from a parent: not usable yet.
    assert plan_phase(CacheState("caching", 0, 10), True, 0, None, reading=False) == "Attaching"
    assert plan_phase(CacheState("caching", 0, 10), False, 0, None, reading=False) == "Pending"


def report(cache: CacheState, from_parent: int) -> Report:
    return Report("Detached" if cache.kind == "detached" else "Hydrating", cache, from_parent,
                  7, 5, TargetAddress("10.0.0.12:3260", "iqn.x:b.img"), "", "iqn.x:b", "")


def test_a_child_knows_the_image_size_from_the_spec_its_parent_or_the_caches_status() -> None:
    assert known_size({}, {}, None) == 0  # nobody knows: the node reads it from its parent
    assert known_size({}, {"imageSizeBytes": 7 << 20}, {}) == 7 << 20
    assert known_size({}, {"imageSizeBytes": 7 << 20}, {"imageSizeBytes": 8 << 20}) == 8 << 20
    assert known_size({"sizeBytes": 9 << 20}, {"imageSizeBytes": 7 << 20},
                      {"imageSizeBytes": 8 << 20}) == 9 << 20


def test_status_reports_the_image_size_once_known_and_keeps_it() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    unknown = report(CacheState("caching", 2, 16), 10)
    assert plan_status(unknown, {}, now)["imageSizeBytes"] is None
    found = Report(**{**unknown.__dict__, "image_size": 1 << 20})
    st = plan_status(found, {}, now)
    assert st["imageSizeBytes"] == 1 << 20
    assert plan_status(unknown, st, now)["imageSizeBytes"] == 1 << 20


def test_status_counters_never_go_backwards_after_detach_drops_the_kernel_counter() -> None:
    prev = {"bytesFromParent": 1000, "bytesServed": 50, "totalRegions": 16}
    st = plan_status(report(CacheState("detached"), 0), prev, datetime(2026, 1, 1, tzinfo=UTC))
    assert st["bytesFromParent"] == 1000 and st["bytesServed"] == 50
    assert st["hydratedRegions"] == st["totalRegions"] == 16
    assert st["heartbeat"] == "2026-01-01T00:00:00Z"


def test_status_publishes_export_address_and_initiator_condition() -> None:
    st = plan_status(report(CacheState("caching", 2, 16), 10), {}, datetime.now(UTC))
    assert st["exportAddress"] == {"portal": "10.0.0.12:3260", "iqn": "iqn.x:b.img", "lun": 0}
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds[INITIATOR_CONDITION]["message"] == "iqn.x:b"
    assert conds["Ready"]["status"] == "True"
    assert (st["hydratedRegions"], st["totalRegions"]) == (2, 16)


def test_a_pass_through_is_usable_says_why_in_its_condition_and_warns_once() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    full = Report(**{**report(CacheState("passthrough", size=3 << 30), 0).__dict__,
                     "phase": plan_phase(CacheState("passthrough"), True, 0, None),
                     "cache_dir": "/var/lib/vmthunder"})
    st = plan_status(full, {}, t0)
    conds = {c["type"]: c for c in st["conditions"]}
    assert st["phase"] == "Attached" and conds["Ready"]["status"] == "True"
    assert conds[CACHE_CONDITION]["status"] == "False"
    assert conds[CACHE_CONDITION]["reason"] == "CacheDiskFull"
    assert "no room in /var/lib/vmthunder for this image's cache (3072 MiB" in conds[
        CACHE_CONDITION]["message"]
    warning = plan_cache_event({}, st)
    assert warning is not None and warning[:2] == ("Warning", "CacheDiskFull")
    assert plan_cache_event(st, plan_status(full, st, t0)) is None  # once, not every round
    cached = plan_status(report(CacheState("caching", 0, 16), 0), st, t0)
    assert {c["type"]: c for c in cached["conditions"]}[CACHE_CONDITION]["status"] == "True"
    back = plan_cache_event(st, cached)
    assert back is not None and back[:2] == ("Normal", "CacheBuilt")
    assert plan_cache_event({}, cached) is None  # a cache from the start is no news


def test_images_without_a_replica_are_removed() -> None:
    assert plan_removals({"a", "b"}, {"b", "c"}) == {"a"}


def test_a_converged_image_is_reread_whole_only_on_a_change_or_the_resync() -> None:
    want = Want("img", "n", 1 << 20, 65536, TargetAddress("10.0.0.2:3260", "iqn.x:o"), None,
                "10.0.0.11")
    hydrating = CacheState("caching", 3, 16)
    assert want.parent is not None
    on = session_states([want.parent], ())
    last = Converged(want, "caching", False, on, "@origin", at=100.0)
    assert plan_full_round(None, want, hydrating, on, 100.0)
    assert not plan_full_round(last, want, CacheState("caching", 9, 16), on, 101.0)  # progress
    assert plan_full_round(last, want, CacheState("caching", 16, 16), on, 101.0)  # to detach
    assert plan_full_round(last, want, CacheState("absent"), on, 101.0)  # someone removed it
    assert plan_full_round(last, want, hydrating, frozenset(), 101.0)  # the session went away
    broke = session_states([want.parent], [want.parent])
    assert plan_full_round(last, want, hydrating, broke, 101.0)  # the parent went away...
    down = Converged(want, "caching", False, broke, "@origin", at=100.0)
    assert plan_full_round(down, want, hydrating, on, 101.0)  # ...and came back: reinstate
    moved = Want("img", "n", 1 << 20, 65536, TargetAddress("10.0.0.12:3260", "iqn.x:b.img"),
                 None, "10.0.0.11")
    assert plan_full_round(last, moved, hydrating, on, 101.0)  # re-parented
    assert plan_full_round(last, Want(**{**want.__dict__, "children": ("iqn.x:c",)}),
                           hydrating, on, 101.0)  # a child to let in
    assert plan_full_round(last, want, hydrating, on, 100.0 + RESYNC_SECONDS)


def test_a_lost_parent_is_reported_since_first_seen_and_cleared_once_it_carries_io() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    lost = Report(**{**report(CacheState("caching", 2, 16), 10).__dict__, "parent_lost": True})
    first = plan_status(lost, {}, t0)
    assert first["parentLostAt"] == "2026-01-01T00:00:00Z"
    later = t0 + timedelta(seconds=5)
    assert plan_status(lost, first, later)["parentLostAt"] == first["parentLostAt"]
    back = plan_status(report(CacheState("caching", 2, 16), 10), first, later)
    assert back["parentLostAt"] is None  # deletes the field: the status goes as a merge patch
    assert plan_status_write(first, back, later)
    # None and absent are the same status: no write for that alone
    settled = {k: v for k, v in back.items() if v is not None}
    assert not plan_status_write(settled, plan_status(report(CacheState("caching", 2, 16), 10),
                                                      settled, later), later)


def test_an_unchanged_status_is_not_written_the_pulse_beats_for_it() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    st = plan_status(report(CacheState("caching", 2, 16), 10), {}, t0)
    for seconds in (5, HEARTBEAT_SECONDS, 10 * HEARTBEAT_SECONDS):
        at = t0 + timedelta(seconds=seconds)
        later = plan_status(report(CacheState("caching", 2, 16), 10), st, at)
        assert later["heartbeat"] != st["heartbeat"]  # the stamp alone is no change
        assert not plan_status_write(st, later, at)
    assert plan_status_write({}, st, t0)  # the first status


def test_background_progress_is_written_every_few_seconds_the_prefetchs_at_once() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    st = plan_status(report(CacheState("caching", 2, 16), 10), {}, t0)
    soon, due = t0 + timedelta(seconds=1), t0 + timedelta(seconds=PROGRESS_SECONDS)
    moved = plan_status(report(CacheState("caching", 3, 16), 20), st, soon)
    assert not plan_status_write(st, moved, soon)
    assert plan_status_write(st, plan_status(report(CacheState("caching", 3, 16), 20), st, due),
                             due)
    # anything but progress goes out at once, and the prefetch's progress too
    failed = plan_status(Report(**{**report(CacheState("caching", 3, 16), 20).__dict__,
                                   "phase": "Failed"}), st, soon)
    assert plan_status_write(st, failed, soon)
    prefetching = Report(**{**report(CacheState("caching", 2, 16), 10).__dict__,
                            "phase": "Prefetching"})
    st = plan_status(prefetching, {}, t0)
    ahead = Report(**{**prefetching.__dict__, "hydrated_in_order": 128})
    assert plan_status_write(st, plan_status(ahead, st, soon), soon)


def test_upstream_limits_a_child_to_what_its_parent_holds_in_order() -> None:
    assert upstream_of(True, None) == UNLIMITED
    assert upstream_of(False, {"phase": "Hydrated"}) == UNLIMITED
    assert upstream_of(False, {"phase": "Detached", "hydratedInOrder": 3}) == UNLIMITED
    assert upstream_of(False, {"phase": "Hydrating", "hydratedInOrder": 40}) == Upstream(
        40, False)
    assert upstream_of(False, None) == Upstream(0, False)  # parent not reporting yet: wait


def test_hydration_order_is_the_profile_then_every_other_region_ascending() -> None:
    assert hydration_order([5, 2, 7], 8) == [5, 2, 7, 0, 1, 3, 4, 6]
    assert hydration_order([], 3) == [0, 1, 2]


class RecordingBackend:
    """Records what the hydrator asks of a cache that does not keep its reads (the pacing
    decisions only; the kernel path is tested in the lab, tests/test_stack_lab.py)."""

    name = "recording"
    kernel_background = True
    caches_reads = False

    def __init__(self, total: int) -> None:
        self.total = total
        self.hydrated: list[int] = []
        self.background = threading.Event()

    def observe(self, image: str) -> CacheState:
        return CacheState("caching", 0, self.total, 65536, self.total * 65536)

    def hydrate(self, image: str, regions: Sequence[int], region_bytes: int, size: int,
                queue_depth: int) -> int:
        self.hydrated.extend(regions)
        return len(regions) * region_bytes

    def start_background(self, image: str, threshold: int) -> None:
        self.background.set()


def test_a_non_caching_child_walks_behind_its_parent_and_sweeps_only_once_it_is_complete(
) -> None:
    total = 1000
    be = RecordingBackend(total)
    profile = list(range(300, 100, -1))
    order = hydration_order(profile, total)
    h = Hydrator("img", be, size=total * 65536, region_bytes=65536,  # type: ignore[arg-type]
                 profile=profile, queue_depth=1, throttle=0, upstream=Upstream(0, False))
    h._stats = lambda name: None  # type: ignore[method-assign]  # no dm-stats here
    h.start()
    try:
        # The parent's progress, within the prefetch, across its end, and in the background.
        for parent_has in (0, 70, 350, 900):
            h.upstream = Upstream(parent_has, False)
            wait_for(f"walk to {parent_has}",
                     lambda: h.hydrated_in_order == parent_has, timeout=10)  # noqa: B023
            time.sleep(0.7)  # more than a pacing step: it stays where the parent is
            assert h.hydrated_in_order == parent_has and be.hydrated == order[:parent_has]
        assert not be.background.is_set()
        h.upstream = Upstream(900, True)  # parent complete: the rest, then the kernel's sweep
        wait_for("the kernel's sweep", be.background.is_set, timeout=10)
        assert be.hydrated == order
    finally:
        h.stop()
        h.join(5)


def test_each_prefetch_batch_wakes_the_agent_to_report_what_the_children_may_follow() -> None:
    total = 1000
    be = RecordingBackend(total)
    seen: list[int] = []
    h = Hydrator("img", be, size=total * 65536, region_bytes=65536,  # type: ignore[arg-type]
                 profile=list(range(300)), queue_depth=8, throttle=0,
                 on_progress=lambda: seen.append(h.hydrated_in_order))
    h._stats = lambda name: None  # type: ignore[method-assign]  # no dm-stats here
    h.start()
    try:
        wait_for("the prefetch", lambda: len(seen) == 3, timeout=10)
        assert seen == [128, 256, 300]  # batches of queue depth x 16 regions, then the rest
    finally:
        h.stop()
        h.join(5)


def test_a_walk_that_ends_or_fails_wakes_the_agent_and_one_stopped_does_not() -> None:
    """The agent's rounds without news are seconds apart: a complete cache (to be detached)
    or a failed walk (to be reported and replaced) must not wait for one."""
    class Completing(RecordingBackend):
        def observe(self, image: str) -> CacheState:
            return CacheState("caching", len(self.hydrated), self.total, 65536,
                              self.total * 65536)

    class Failing(RecordingBackend):
        def hydrate(self, image: str, regions: Sequence[int], region_bytes: int, size: int,
                    queue_depth: int) -> int:
            raise OSError(5, "Input/output error")

    for backend, stop, expect_news in ((Completing(10), False, True), (Failing(10), False, True),
                                       (RecordingBackend(10), True, False)):
        woken = threading.Event()
        h = Hydrator("img", backend, size=10 * 65536, region_bytes=65536,  # type: ignore[arg-type]
                     profile=[], queue_depth=1, throttle=0, on_progress=woken.set)
        h._stats = lambda name: None  # type: ignore[method-assign]  # no dm-stats here
        if stop:
            h.stop()
        h.start()
        h.join(10)
        assert not h.is_alive()
        assert woken.is_set() == expect_news, type(backend).__name__
        assert (h.error is not None) == isinstance(backend, Failing)


def test_background_waits_while_a_peer_prefetches_and_goes_on_after() -> None:
    total = 1000
    be = RecordingBackend(total)
    h = Hydrator("img", be, size=total * 65536, region_bytes=65536,  # type: ignore[arg-type]
                 profile=list(range(100)), queue_depth=8, throttle=0)
    h._stats = lambda name: None  # type: ignore[method-assign]  # no dm-stats here
    h.peers = (PeerPrefetch(40, time.monotonic() + 60),)
    h.start()
    try:
        wait_for("the prefetch", lambda: h.hydrated_in_order == 100, timeout=10)
        time.sleep(1.2)  # two pacing steps: the prefetch goes on, the background does not
        assert h.hydrated_in_order == 100 and be.hydrated == list(range(100))
        h.peers = (PeerPrefetch(100, time.monotonic() + 60),)  # it has all we prefetched
        wait_for("the background walk", lambda: h.hydrated_in_order == total, timeout=10)
    finally:
        h.stop()
        h.join(5)


def test_a_peer_holds_the_background_while_behind_us_and_until_its_hold_ends() -> None:
    ahead = PeerPrefetch(40, until=100.0)
    assert peers_waiting([ahead], 100, now=50.0)
    assert not peers_waiting([ahead], 100, now=100.0)  # its hold is over (or it is dead)
    assert not peers_waiting([PeerPrefetch(100, 100.0)], 100, now=50.0)  # caught up
    # a node whose own profile is shorter (none: its ConfigMap could not be read) holds
    # nothing back
    assert not peers_waiting([ahead], 0, now=50.0)
    assert not peers_waiting([], 100, now=50.0)


def test_the_peers_prefetching_are_read_from_their_status_and_capped_at_a_hold() -> None:
    now = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)

    def stamp(t: datetime) -> str:
        return t.strftime(TIME_FORMAT)

    def replica(node: str, phase: str, until: datetime | None, in_order: int = 7
                ) -> dict[str, Any]:
        return {"spec": {"node": node, "parent": "a"}, "status": {
            "phase": phase, "hydratedInOrder": in_order,
            "holdUntil": stamp(until) if until else None}}

    def peers(*replicas: dict[str, Any], gathered: datetime | None = None,
              own: datetime | None = None) -> list[tuple[str, int, float]]:
        cache = {"prefetchingUntil": stamp(gathered)} if gathered else {}
        return [(p.who, p.hydrated_in_order, p.left) for p in peers_prefetching(
            "a", replicas, cache, stamp(own) if own else None, now, 60)]

    later, earlier = now + timedelta(seconds=30), now - timedelta(seconds=1)
    assert peers(replica("b", "Prefetching", later)) == [("b", 7, 30.0)]
    # a peer's clock far ahead: no longer than a hold
    assert peers(replica("b", "Prefetching", now + timedelta(hours=1))) == [("b", 7, 60.0)]
    assert peers(replica("b", "Prefetching", earlier)) == []
    assert peers(replica("a", "Prefetching", later)) == []  # our own
    assert peers(replica("b", "Hydrating", later)) == []
    assert peers(replica("b", "Prefetching", None)) == []
    assert peers({"spec": {"node": "b"}}) == []
    # the nodes this one does not watch, as the operator gathered them: one holding nothing
    storm = now + timedelta(seconds=45)
    assert peers(gathered=storm) == [("", 0, 45.0)]
    assert peers(replica("b", "Prefetching", later), gathered=storm) == [
        ("b", 7, 30.0), ("", 0, 45.0)]
    assert peers(gathered=earlier) == []
    assert peers_prefetching("a", [], {"prefetchingUntil": "soon"}, None, now, 60) == []
    # ... unless the gathered hold is one this node counts itself: a watched node's (a child
    # caught up with us must not hold our walk through it), or our own, which the gathering
    # keeps a moment after our prefetch has ended
    caught_up = replica("b", "Prefetching", storm, in_order=100)
    assert peers(caught_up, gathered=storm) == [("b", 100, 45.0)]
    assert peers(gathered=storm, own=storm) == []


def test_a_hold_is_waited_for_one_hold_at_most_from_when_it_was_first_seen() -> None:
    hold = PeerHold("b", "2026-12-07T12:01:00Z", 7, left=60.0)
    peers, seen = plan_peer_waits([hold], {}, now=100.0, hold_seconds=60)
    assert peers == (PeerPrefetch(7, 160.0),) and seen == {("b", hold.until): 100.0}
    # 50 s later its clock still says a minute to go (it runs ahead, its agent died): the
    # wait ends a hold after it was first seen all the same
    peers, seen = plan_peer_waits([hold], seen, now=150.0, hold_seconds=60)
    assert peers == (PeerPrefetch(7, 160.0),)
    # a hold that ends sooner ends sooner; a new hold is a new sighting; gone ones are dropped
    sooner = replace(hold, until="2026-12-07T12:00:10Z", left=10.0)
    peers, seen = plan_peer_waits([sooner], seen, now=150.0, hold_seconds=60)
    assert peers == (PeerPrefetch(7, 160.0),) and seen == {("b", sooner.until): 150.0}
    assert plan_peer_waits([], seen, now=151.0, hold_seconds=60) == ((), {})


class ProfileKube:
    def __init__(self, text: str | None, error: Exception | None = None) -> None:
        self.text, self.error = text, error

    def profile(self, ref: object) -> str | None:
        if self.error:
            raise self.error
        return self.text


def test_an_unusable_boot_profile_costs_the_prefetch_not_the_replica() -> None:
    def order(kube: ProfileKube) -> tuple[list[int], str | None]:
        agent = Agent("n", kube, None, None, "10.0.0.1",  # type: ignore[arg-type]
                      initiator="iqn.x:n")
        return agent._prefetch_order("img", {"profileConfigMap": {"name": "p"}}, 65536, 1 << 20)

    assert order(ProfileKube('[[0, 4096], [131072, 65536]]')) == ([0, 2], None)
    for kube in (ProfileKube('[[0, "x"]]'), ProfileKube("vmthunder-boot-profile 1\ngarbage"),
                 ProfileKube(None, OSError("no such ConfigMap"))):
        regions, problem = order(kube)
        assert regions == [] and problem and "without prefetch" in problem, problem


def test_the_metrics_collector_renders_each_images_last_status() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from vmthunder.node.metrics import ReplicaCollector

    statuses = {"gold": {"phase": "Hydrating", "hydratedRegions": 3, "totalRegions": 10,
                         "bytesFromParent": 196608, "bytesServed": 65536}}
    registry = CollectorRegistry()
    registry.register(ReplicaCollector(lambda: statuses))
    text = generate_latest(registry).decode()
    for line in ('vmthunder_agent_hydrated_regions{image="gold"} 3.0',
                 'vmthunder_agent_total_regions{image="gold"} 10.0',
                 'vmthunder_agent_bytes_from_parent_total{image="gold"} 196608.0',
                 'vmthunder_agent_bytes_served_total{image="gold"} 65536.0',
                 'vmthunder_agent_replica_phase{image="gold",phase="Hydrating"} 1.0',
                 'vmthunder_agent_replica_phase{image="gold",phase="Hydrated"} 0.0'):
        assert line in text.splitlines(), text
    statuses.clear()  # a replica that went away leaves no series behind
    assert "gold" not in generate_latest(registry).decode()


def test_a_path_failing_after_each_reinstatement_is_retried_with_a_growing_backoff() -> None:
    a = TargetAddress("10.0.0.11:3260", "iqn.x:a.img")
    b = TargetAddress("10.0.0.12:3260", "iqn.x:b.img")
    assert plan_held_paths(None, a, 100.0) == frozenset()
    first = plan_reinstated(None, a, "8:16", 100.0)
    assert first.times == 1
    assert plan_held_paths(first, a, 101.0) == {"8:16"}  # failed again at once: wait 2 s
    assert plan_held_paths(first, b, 101.0) == frozenset()  # a new parent: no wait
    assert plan_held_paths(first, a, 102.0) == frozenset()
    again = plan_reinstated(first, a, "8:16", 102.0)
    assert again.times == 2 and plan_held_paths(again, a, 105.0) == {"8:16"}  # 4 s now
    t, r = 102.0, again
    for _ in range(10):
        t += reinstate_backoff(r.times)
        r = plan_reinstated(r, a, "8:16", t)
    assert reinstate_backoff(r.times) == REINSTATE_BACKOFF_MAX  # capped
    # another parent's disk (even one that reuses the number), or the same one failing long
    # after its last repair: a fresh start
    assert plan_reinstated(r, b, "8:16", t + 1).times == 1
    assert plan_reinstated(first, a, "8:16", 100.0 + 2 + REINSTATE_BACKOFF_MAX).times == 1


class TreeKube:
    """The API objects one replica's round reads: its ImageCache, its parent's replica and
    its siblings (children report their initiators), and the status it writes."""

    def __init__(self, parent_status: dict[str, Any]) -> None:
        self.parent_status = parent_status
        self.siblings: list[dict[str, Any]] = []
        self.written: list[dict[str, Any]] = []

    def cache(self, name: str) -> dict[str, Any]:
        return {"spec": {"sizeBytes": 1 << 20, "prefetch": {"enabled": False}, **CACHE_SPEC}}

    def replica(self, name: str) -> dict[str, Any]:
        return {"status": self.parent_status}

    def chap(self, ref: object) -> None:
        return None

    def replicas(self, labels: object) -> list[dict[str, Any]]:
        return self.siblings

    def patch_status(self, name: str, status: dict[str, Any]) -> None:
        self.written.append(status)


def child(node: str, parent: str) -> dict[str, Any]:
    return {"spec": {"imageCache": "img", "node": node, "parent": parent},
            "status": {"conditions": [{"type": INITIATOR_CONDITION, "message": f"iqn.x:{node}"}]}}


class NoKernel:
    """The cache layer and the transport: `sessions` to parents, and with them a complete
    cache (no hydrator thread to start)."""

    cache_dir = "/var/lib/vmthunder"

    def __init__(self, *sessions: TargetAddress) -> None:
        self.sessions = sessions

    def observe(self, image: str) -> CacheState:
        return CacheState("caching", 16, 16) if self.sessions else CacheState("absent")

    def connections(self) -> dict[TargetAddress, Any]:
        return {a: Connection(f"8:{16 * i}", True) for i, a in enumerate(self.sessions)}


def agent_round(monkeypatch: pytest.MonkeyPatch, kube: TreeKube,
                on_apply: Callable[[Want], None] = lambda w: None,
                kernel: NoKernel | None = None,
                counters: tuple[stack.Counters, stack.Counters] | None = None) -> list[Want]:
    """One round of node b's replica of img under parent a; returns the Wants applied (the
    kernel as `kernel` says, the steps as planned from nothing built, the kernel's byte
    counters `counters` before the steps and after them)."""
    applied: list[Want] = []
    before, after = counters or (stack.Counters(0, 0), stack.Counters(0, 0))

    def apply_image(w: Want, *_: object) -> tuple[stack.Seen, list[stack.Step]]:
        applied.append(w)
        on_apply(w)
        return stack.Seen(None, None), stack.plan_image(w, stack.Seen(None, None))

    monkeypatch.setattr(stack, "apply_image", apply_image)
    monkeypatch.setattr(stack, "reads_from_parent",
                        lambda image: bool(applied and applied[-1].parent))
    monkeypatch.setattr(stack, "let_in", lambda w: applied.append(w) or stack.Export(
        stack.export_spec(w)))
    monkeypatch.setattr(stack, "counters", lambda image: after if applied else before)
    monkeypatch.setattr(dm, "exists", lambda name: True)
    monkeypatch.setattr(dm, "ensure_nodes", lambda *names: None)
    kernel = kernel or NoKernel()
    agent = Agent("b", kube, kernel, kernel, "10.0.0.12",  # type: ignore[arg-type]
                  initiator="iqn.x:b")
    agent._replica({"metadata": {"name": "img.b"},
                    "spec": {"imageCache": "img", "node": "b", "parent": "a"}})
    return applied


A = TargetAddress("10.0.0.11:3260", names.export_iqn("img", "a"), 0)
A_EXPORT = {"exportAddress": {"portal": A.portal, "iqn": A.iqn, "lun": 0}}


def test_a_child_waits_for_its_parents_acl_before_it_logs_in(
        monkeypatch: pytest.MonkeyPatch) -> None:
    kube = TreeKube({**A_EXPORT, "exportInitiators": []})  # exported, no ACL for b yet
    applied = agent_round(monkeypatch, kube)
    assert [w.parent for w in applied] == [None]  # nothing to log in to
    assert "Attach" not in {type(s).__name__ for s in stack.plan_image(
        applied[0], stack.Seen(None, None))}
    assert kube.written[-1]["phase"] == "Attaching"
    assert "admit iqn.x:b" in kube.written[-1]["message"]
    assert kube.written[-1]["exportInitiators"] == []  # exports nothing yet
    kube.parent_status["exportInitiators"] = ["iqn.x:b"]
    assert [w.parent for w in agent_round(monkeypatch, kube)] == [A]


def test_a_node_moved_to_a_parent_that_has_not_let_it_in_keeps_reading_the_old_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    old = TargetAddress("10.0.0.13:3260", names.export_iqn("img", "old"), 0)
    kube = TreeKube({**A_EXPORT, "exportInitiators": ["iqn.x:c"]})
    kube.siblings.append(child("c", "b"))
    applied = agent_round(monkeypatch, kube, kernel=NoKernel(old))
    # The stack keeps its source and session (no logout) and still lets its own child in.
    assert [(w.parent, w.children) for w in applied] == [(old, ("iqn.x:c",))]
    assert "Logout" not in {type(s).__name__ for s in stack.plan_image(
        applied[0], stack.Seen(("8:0",), "multipath", {old: "8:0"}, CacheState("caching", 3, 16),
                               True, None))}
    assert "admit iqn.x:b" in kube.written[-1]["message"]


def test_children_that_report_while_the_stack_is_built_are_let_in_the_same_round(
        monkeypatch: pytest.MonkeyPatch) -> None:
    kube = TreeKube({**A_EXPORT, "exportInitiators": ["iqn.x:b"]})
    late = child("c", "b")
    applied = agent_round(monkeypatch, kube, lambda w: kube.siblings.append(late)
                          if late not in kube.siblings else None, kernel=NoKernel(A))
    assert [w.children for w in applied] == [(), ("iqn.x:c",)]
    assert kube.written[-1]["exportInitiators"] == ["iqn.x:c"]


def test_the_bytes_from_the_parent_are_counted_before_a_detach_removes_their_counter(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The last progress write may be seconds old when the round detaches: -src, and the
    # kernel's count of what came through it, go with the detach.
    kube = TreeKube({**A_EXPORT, "exportInitiators": ["iqn.x:b"]})
    agent_round(monkeypatch, kube, kernel=NoKernel(A),
                counters=(stack.Counters(805, 7), stack.Counters(0, 9)))
    assert (kube.written[-1]["bytesFromParent"], kube.written[-1]["bytesServed"]) == (805, 9)


def test_the_pulse_beats_the_statuses_unwritten_for_a_heartbeat_unless_a_round_is_stuck() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    hb = timedelta(seconds=HEARTBEAT_SECONDS)
    last = {"fresh": t0 + hb, "due": t0, "older": t0 - hb, "unknown": None}
    # between rounds, and during a long one (an attach of a minute under load)
    for busy in (0.0, 60.0, ROUND_STUCK_SECONDS - 1):
        assert plan_beats(last, busy, t0 + hb) == ["due", "older", "unknown"]
    assert plan_beats(last, 0.0, t0 + hb - timedelta(seconds=1)) == ["older", "unknown"]
    assert plan_beats(last, ROUND_STUCK_SECONDS, t0 + 10 * hb) == []  # let it go stale


def test_a_beat_writes_only_the_heartbeat_of_the_nodes_live_replicas_due_one() -> None:
    now = datetime.now(UTC)
    old, fresh = ((now - timedelta(seconds=s)).strftime(TIME_FORMAT)
                  for s in (HEARTBEAT_SECONDS + 2, 2))

    def replica(image: str, status: dict[str, Any] | None, **meta: str) -> dict[str, Any]:
        return {"metadata": {"name": f"{image}.n", **meta}, "spec": {"imageCache": image},
                **({"status": status} if status is not None else {})}

    class NodeKube(TreeKube):
        def __init__(self) -> None:
            super().__init__({})
            self.patched: list[tuple[str, dict[str, Any]]] = []

        def replicas(self, labels: object) -> list[dict[str, Any]]:
            return [replica("a", {"phase": "Attaching", "heartbeat": old}),
                    replica("b", None),  # not reported yet: the round writes first
                    replica("c", {"phase": "Hydrated", "heartbeat": old},
                            deletionTimestamp="2026-12-07T00:00:00Z"),
                    replica("d", {"phase": "Hydrated", "heartbeat": fresh}),
                    # our last write has not come back through the watch yet
                    replica("e", {"phase": "Hydrated", "heartbeat": old})]

        def patch_status(self, name: str, status: dict[str, Any]) -> None:
            self.patched.append((name, status))

    kube = NodeKube()
    agent = Agent("n", kube, None, None, "10.0.0.1",  # type: ignore[arg-type]
                  initiator="iqn.x:n")
    agent.written_at["e"] = now - timedelta(seconds=1)
    agent.beat()
    assert [(name, list(status)) for name, status in kube.patched] == [("a.n", ["heartbeat"])]
    assert agent.written_at["a"] >= now
    kube.patched.clear()
    agent.beat()  # a moment later: written a moment ago
    assert kube.patched == []


@pytest.mark.parametrize(("error", "reported"), [
    (ApiError(0, "PATCH ...: SSLEOFError"), False),  # the API server's hiccups
    (ApiError(503, "Service Unavailable"), False),
    (ReplicaGone("img.b"), False),  # deleted while the round ran
    (ApiError(404, 'secrets "golden-chap" not found'), True),  # a reference to nothing
    (ApiError(422, "status.phase: Unsupported value"), True),  # this agent's own fault
    (OSError(5, "Input/output error"), True),  # the kernel's
])
def test_a_round_reports_failed_for_the_replicas_errors_not_hiccups_or_deletions(
        monkeypatch: pytest.MonkeyPatch, error: Exception, reported: bool) -> None:
    class FlakyKube(TreeKube):
        def replicas(self, labels: object) -> list[dict[str, Any]]:
            return [{"metadata": {"name": "img.b"},
                     "spec": {"imageCache": "img", "node": "b", "parent": "a"}}]

    kube = FlakyKube({})
    agent = Agent("b", kube, NoKernel(), NoKernel(), "10.0.0.12",  # type: ignore[arg-type]
                  initiator="iqn.x:b")

    def round_fails(r: object) -> None:
        raise error

    monkeypatch.setattr(agent, "_replica", round_fails)
    monkeypatch.setattr(dm, "names", lambda: [])
    agent._round()
    assert [w["phase"] for w in kube.written] == (["Failed"] if reported else [])
