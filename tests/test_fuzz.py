"""Fuzz tests of the pure parts that take outside input: the tree planner (and the
reconciler that feeds it), and boot profiles. Odd input gets a valid answer or a clear
ValueError, never another exception.

tests/test_planner.py pins the planner's promises on well-formed input; here the input is
what a broken or hostile cluster could hold: empty and unicode names, duplicates, the
origin's own name, parents that are unknown, the node itself or a cycle, absurd fan-outs,
every node NotReady. Examples per test: VMT_FUZZ_EXAMPLES (default 150, a few seconds each
on CI); set it to thousands for a thorough run.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmthunder.kube import TIME_FORMAT, parse_time
from vmthunder.lab.profile import BootProfile, ProfileError, dump_profile
from vmthunder.lab.profile import Read as RecordedRead
from vmthunder.lab.profile import parse_profile as parse_recorded
from vmthunder.node.hydrate import Read, parse_profile
from vmthunder.operator.model import CacheSpec, NodeFacts, ReplicaFacts, replica_name
from vmthunder.operator.planner import ORIGIN, NodeState, Placement, plan_tree
from vmthunder.operator.reconcile import ReplicaPlan, plan_replicas

EXAMPLES = int(os.environ.get("VMT_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
NOW = datetime(2026, 1, 1, tzinfo=UTC)


# --- the planner ------------------------------------------------------------------------------

# Few distinct names so that duplicates, self-parents and cycles are common.
odd_names = st.sampled_from(["", " ", "a", "b", "c", "n-1", "n.2", "ü", "\x00", "a" * 300, ORIGIN])
parents = st.none() | st.just(ORIGIN) | odd_names | st.text(max_size=5)
fanouts = st.integers(-2, 6) | st.sampled_from([10**9, 2**63])


@st.composite
def odd_nodes(draw: st.DrawFn) -> list[NodeState]:
    names = draw(st.lists(odd_names | st.text(max_size=8), max_size=30))
    return [
        NodeState(
            name,
            ready=draw(st.booleans()),
            topology=draw(st.none() | st.sampled_from(["", "z1", "z2"]) | st.text(max_size=3)),
            parent=draw(parents | st.sampled_from(names or [""])),
            hydrated=draw(st.booleans()),
        )
        for name in names
    ]


def check_plan(nodes: Sequence[NodeState], fanout: int, origin_fanout: int | None,
               plan: Mapping[str, Placement]) -> None:
    """The planner's structural promises: exactly the ready nodes, each under a node of the
    plan or the origin, depths counting the hops, no node over its fan-out."""
    assert set(plan) == {n.name for n in nodes if n.ready}
    children = Counter(p.parent for p in plan.values())
    assert children[ORIGIN] <= (fanout if origin_fanout is None else origin_fanout)
    for name, placement in plan.items():
        assert placement.parent == ORIGIN or placement.parent in plan
        assert children[name] <= fanout
        at, hops = name, 0
        while at != ORIGIN:
            at = plan[at].parent
            hops += 1
            assert hops <= len(plan), f"cycle through {name!r}"
        assert hops == placement.depth


@FUZZ
@given(odd_nodes(), fanouts, st.none() | fanouts)
def test_planner_gives_a_valid_tree_or_a_value_error_for_any_nodes_and_fanouts(
    nodes: list[NodeState], fanout: int, origin_fanout: int | None
) -> None:
    names = [n.name for n in nodes]
    k0 = fanout if origin_fanout is None else origin_fanout
    bad = fanout < 1 or k0 < 1 or ORIGIN in names or len(set(names)) < len(names)
    try:
        plan = plan_tree(nodes, fanout, origin_fanout)
    except ValueError as e:
        assert bad, f"rejected valid input: {e}"
        assert str(e)
        return
    assert not bad, "accepted a duplicate, the origin's name or a fan-out below 1"
    check_plan(nodes, fanout, origin_fanout, plan)


@FUZZ
@given(st.lists(st.text(max_size=6), unique=True, max_size=25), fanouts, st.data())
def test_planner_places_every_ready_node_whatever_parents_the_input_claims(
    names: list[str], fanout: int, data: st.DataObject
) -> None:
    names = [n for n in names if n != ORIGIN]
    fanout = max(1, fanout)
    nodes = [NodeState(n, ready=data.draw(st.booleans()),
                       parent=data.draw(st.sampled_from([None, ORIGIN, n, "gone", *names])),
                       topology=data.draw(st.sampled_from([None, "z1", "z2"])))
             for n in names]
    check_plan(nodes, fanout, None, plan_tree(nodes, fanout))


def test_planner_with_every_node_not_ready_plans_nothing() -> None:
    nodes = [NodeState(f"n{i}", ready=False, parent=ORIGIN if i == 0 else f"n{i - 1}",
                       hydrated=True) for i in range(50)]
    assert plan_tree(nodes, 3) == {}


def test_planner_breaks_a_claimed_cycle_and_a_self_parent() -> None:
    nodes = [NodeState("a", parent="c"), NodeState("b", parent="a"), NodeState("c", parent="b"),
             NodeState("d", parent="d")]
    plan = plan_tree(nodes, 2)
    check_plan(nodes, 2, None, plan)


def test_planner_handles_huge_fanout_and_a_thousands_wide_star_quickly() -> None:
    # 3,000 nodes all claiming the same parent: the parent keeps fanout of them, the rest move.
    nodes = [NodeState("hub", parent=ORIGIN)] + [
        NodeState(f"n{i:04d}", parent="hub") for i in range(3000)]
    plan = plan_tree(nodes, 10**9, 1)
    check_plan(nodes, 10**9, 1, plan)
    assert {p.parent for n, p in plan.items() if n != "hub"} == {"hub"}
    small = plan_tree(nodes, 4, 2)
    check_plan(nodes, 4, 2, small)


# --- the reconciler: plan_replicas over odd cluster facts --------------------------------------

labels = st.dictionaries(st.sampled_from(["pool", "topology.kubernetes.io/zone", ""]),
                         st.sampled_from(["", "a", "b"]), max_size=2)
# As the API server hands them over: with "Z", an offset, or no zone at all (the CRD's
# date-time format allows it), parsed by ReplicaFacts.from_dict like the informer does.
heartbeats = st.none() | st.builds(
    lambda t, zone: t.isoformat() + zone,
    st.datetimes(min_value=datetime(2025, 12, 31), max_value=datetime(2026, 1, 2)),
    st.sampled_from(["Z", "+02:00", "-05:30", ""]))


@st.composite
def cluster(draw: st.DrawFn) -> tuple[CacheSpec, list[NodeFacts], list[ReplicaFacts], set[str]]:
    names = draw(st.lists(st.sampled_from(["", "a", "b", "c", "d", "e", "ü"]), max_size=10))
    nodes = [NodeFacts(n, draw(st.booleans()), draw(labels)) for n in names]
    replicas = [
        ReplicaFacts.from_dict({
            "metadata": {"name": draw(st.text(max_size=5))},
            "spec": {
                "imageCache": draw(st.sampled_from(["img", "other"])),
                "node": draw(st.sampled_from([*names, "gone", ""])),
                "parent": draw(st.sampled_from([*names, ORIGIN, "gone", ""])),
                "depth": draw(st.integers(-3, 10)),
            },
            "status": {
                "phase": draw(st.sampled_from(["Pending", "Attached", "Hydrated", "Failed", ""])),
                "heartbeat": draw(heartbeats),
            },
        })
        for _ in range(draw(st.integers(0, 10)))
    ]
    spec = CacheSpec(fanout=draw(st.integers(1, 4)),
                     origin_fanout=draw(st.none() | st.integers(1, 4)),
                     node_selector=draw(st.none() | labels))
    volume_nodes = set(draw(st.lists(st.sampled_from([*names, "gone"]), max_size=4)))
    return spec, nodes, replicas, volume_nodes


@FUZZ
@given(cluster())
def test_plan_replicas_over_odd_cluster_facts_writes_a_consistent_tree(
    facts: tuple[CacheSpec, list[NodeFacts], list[ReplicaFacts], set[str]]
) -> None:
    spec, nodes, replicas, volume_nodes = facts
    plan = plan_replicas("img", spec, nodes, replicas, volume_nodes, NOW)
    written = {r.node: r for r in (*plan.create, *plan.update)}
    assert len(written) == len(plan.create) + len(plan.update)  # one write per node
    for node, r in written.items():
        assert r.name == replica_name("img", node) and r.depth >= 1
        assert r.parent == ORIGIN or r.parent in {n.name for n in nodes}
    assert plan.status.node_count >= len(written)
    assert set(plan.delete).isdisjoint(r.name for r in written.values())


def test_every_rfc3339_time_parses_alike_and_anything_else_is_none() -> None:
    """One parser for the times in statuses (heartbeat, holdUntil, prefetchingUntil), which
    the agent, the operator and the CSI node plugin all read."""
    t = datetime(2026, 12, 7, 12, 0, 0, tzinfo=UTC)
    for text in ("2026-12-07T12:00:00Z", "2026-12-07T12:00:00+00:00", "2026-12-07T13:00:00+01:00",
                 "2026-12-07T12:00:00", "2026-12-07T12:00:00.000Z"):
        assert parse_time(text) == t, text
    assert parse_time("2026-12-07T12:00:00.5Z") == t + timedelta(seconds=0.5)
    for junk in (None, "", "soon", 17, "2026-13-07T12:00:00Z", {"a": 1}):
        assert parse_time(junk) is None, junk


@given(st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(9999, 12, 30),
                    timezones=st.timezones()))
def test_a_time_written_as_the_api_writes_it_reads_back_to_the_second(t: datetime) -> None:
    utc = t.astimezone(UTC)
    assert parse_time(utc.strftime(TIME_FORMAT)) == utc.replace(microsecond=0)


def test_a_replica_with_a_heartbeat_that_is_no_time_plans_as_one_without_heartbeat() -> None:
    r = {"metadata": {"name": "img.a"}, "spec": {"imageCache": "img", "node": "a",
                                                  "parent": ORIGIN, "depth": 1},
         "status": {"phase": "Attached", "heartbeat": "yesterday", "holdUntil": "later"}}
    facts = ReplicaFacts.from_dict(r)
    assert facts.heartbeat is None and facts.hold_until is None


def test_a_heartbeat_without_a_timezone_counts_as_utc() -> None:
    beat = {"metadata": {"name": "img.a", "labels": {"vmthunder.io/parent": ""}},
            "spec": {"imageCache": "img", "node": "a", "parent": ORIGIN, "depth": 1},
            "status": {"phase": "Attached", "heartbeat": "2025-12-31T23:59:30"}}
    replica = ReplicaFacts.from_dict(beat)
    assert replica.heartbeat == datetime(2025, 12, 31, 23, 59, 30, tzinfo=UTC)
    stale = ReplicaFacts.from_dict({**beat, "status": {"heartbeat": "2025-12-31T00:00:00"}})
    nodes = [NodeFacts("a", True), NodeFacts("b", True)]
    children = [replica,
                ReplicaFacts("img.b", "img", "b", "a", 2, "Attached", NOW - timedelta(seconds=5))]
    assert not plan_replicas("img", CacheSpec(), nodes, children, {"a", "b"}, NOW).update
    moved = plan_replicas("img", CacheSpec(), nodes, [stale, children[1]], {"a", "b"}, NOW)
    assert [r.parent for r in moved.update] == [ORIGIN]  # b leaves the stale a


def test_a_failed_replica_moves_only_off_a_dead_parent_and_never_keeps_children() -> None:
    beat, dead = NOW - timedelta(seconds=5), NOW - timedelta(minutes=5)
    def replica(node: str, parent: str, phase: str, heartbeat: datetime) -> ReplicaFacts:
        depth = 1 if parent == ORIGIN else 2 if parent == "a" else 3
        return ReplicaFacts(f"img.{node}", "img", node, parent, depth, phase, heartbeat)

    def plan(facts: Sequence[ReplicaFacts]) -> dict[str, tuple[str, int]]:
        nodes = [NodeFacts(f.node, True) for f in facts]
        p = plan_replicas("img", CacheSpec(fanout=2, origin_fanout=1), nodes, facts,
                          {f.node for f in facts}, NOW)
        return {r.node: (r.parent, r.depth) for r in p.update}

    def moves(*facts: ReplicaFacts) -> dict[str, str]:
        first = plan(facts)
        # Stable: planning again over the replicas as written moves nothing more.
        after = [replace(f, parent=first[f.node][0], depth=first[f.node][1])
                 if f.node in first else f for f in facts]
        assert plan(after) == {}, after
        return {node: parent for node, (parent, _) in first.items()}

    # Every replica failing at once (a CHAP secret no agent can read) moves nothing: the
    # tree is there when the cause is fixed, not all of it under the origin.
    assert moves(replica("a", ORIGIN, "Failed", beat), replica("b", "a", "Failed", beat),
                 replica("c", "a", "Failed", beat)) == {}
    # a died (its heartbeat is stale) after admitting b and c; b's login then failed. b is
    # moved, not left retrying a dead parent for ever, and as a leaf: c goes to the origin,
    # which has room, not under the failed b.
    assert moves(replica("a", ORIGIN, "Attached", dead), replica("b", "a", "Failed", beat),
                 replica("c", "a", "Attached", beat)) == {"b": "c", "c": ORIGIN}
    # A failed cache serves nobody: its child moves to its healthy parent.
    assert moves(replica("a", ORIGIN, "Attached", beat), replica("b", "a", "Failed", beat),
                 replica("c", "b", "Attached", beat)) == {"c": "a"}
    # ... unless that parent is full: the failed one still holds its slot there (its session
    # may carry reads), so its child goes one level down (N = 16: three children under a
    # fan-out of 2 while a replica was Failed).
    assert moves(replica("a", ORIGIN, "Attached", beat), replica("b", "a", "Failed", beat),
                 replica("d", "a", "Attached", beat),
                 replica("c", "b", "Attached", beat)) == {"c": "d"}


# --- boot profiles -----------------------------------------------------------------------------

def check_reads(reads: list[Read]) -> None:
    assert all(isinstance(r.offset, int) and isinstance(r.length, int) for r in reads)
    assert all(r.offset >= 0 and r.length > 0 for r in reads)


def parses_or_says_why(text: str | bytes) -> list[Read] | None:
    try:
        reads = parse_profile(text)
    except ValueError as e:
        assert str(e), "a ValueError without a message"
        return None
    check_reads(reads)
    return reads


@FUZZ
@given(st.text() | st.binary() | st.text(alphabet=st.characters(codec=None), max_size=50))
def test_any_text_or_bytes_is_a_valid_profile_or_a_value_error(text: str | bytes) -> None:
    parses_or_says_why(text)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(["offset", "length", "reads", "profile", "gap_s", "x"]),
                      inner, max_size=4),
    max_leaves=20,
)


@FUZZ
@given(json_values)
def test_any_json_is_a_valid_profile_or_a_value_error(value: object) -> None:
    parses_or_says_why(json.dumps(value))


@st.composite
def recorded(draw: st.DrawFn) -> BootProfile:
    size = draw(st.integers(1, 1 << 40))
    reads = []
    for _ in range(draw(st.integers(0, 20))):
        off = draw(st.integers(0, size - 1))
        length, gap = draw(st.integers(1, size - off)), draw(st.integers(0, 10**6))
        reads.append(RecordedRead(off, length, gap))
    return BootProfile(size, "ab" * 32, "tcg", 1.0, draw(st.floats(0, 1e4)), tuple(reads))


@FUZZ
@given(recorded(), st.data())
def test_a_truncated_or_altered_recorded_profile_is_rejected_with_a_clear_error(
    profile: BootProfile, data: st.DataObject
) -> None:
    text = dump_profile(profile)
    assert parse_profile(text) == [Read(r.offset, r.length) for r in profile.reads]
    cut = data.draw(st.integers(0, len(text) - 1))
    with pytest.raises(ValueError, match=r"\S"):  # ProfileError once the magic is whole
        parse_profile(text[:cut])
    # Any change after the header (read lines, the end line) fails the checksum or the count.
    body = text.index(f"\nreads {len(profile.reads)}\n") + 1
    at = data.draw(st.integers(body + len(f"reads {len(profile.reads)}\n"), len(text) - 2))
    new = data.draw(st.characters(codec=None).filter(lambda c: c != text[at]))
    with pytest.raises(ValueError, match=r"\S"):
        parse_recorded(text[:at] + new + text[at + 1:])


@pytest.mark.parametrize("text, why", [
    ("", "neither the recorded format nor JSON"),
    ("{not json", "neither the recorded format nor JSON"),
    ("[" * 100_000, "neither the recorded format nor JSON"),
    ("{}", "needs a 'reads' list"),
    ('{"reads": {"offset": 0, "length": 1}}', "list of reads, not dict"),
    ("[[-1, 4096]]", "offset >= 0"),
    ("[[0, 0]]", "length > 0"),
    ('[{"offset": 0}]', "integer offset"),
    ('[{"offset": "0", "length": "1"}]', "integer offset"),
    ('[[true, 1]]', "integer offset"),
    ("[[0.5, 1]]", "integer offset"),
    ("[[1e400, 1]]", "integer offset"),
    ("[[0, NaN]]", "integer offset"),
    ("[42]", "read 0 of the boot profile is not"),
    ("vmthunder-boot-profile 1\n", "truncated: missing image-size"),
    ("vmthunder-boot-profile 2\n", "not a boot profile v1"),
    (b"\xff\xfe[]", "not UTF-8"),
])
def test_a_bad_profile_gets_a_value_error_saying_what_is_wrong(text: str | bytes, why: str) -> None:
    with pytest.raises(ValueError, match=why.replace("[", r"\[").replace("(", r"\(")):
        parse_profile(text)


def test_recorded_header_with_nan_or_unicode_digits_is_rejected() -> None:
    good = dump_profile(BootProfile(1 << 20, "ab" * 32, "tcg", 1.0, 2.0,
                                    (RecordedRead(0, 4096, 5),)))
    with pytest.raises(ProfileError, match="out of range"):
        parse_recorded(good.replace("gap-scale 1.0", "gap-scale nan"))
    with pytest.raises(ProfileError, match="out of range"):
        parse_recorded(good.replace("boot-seconds 2.000", "boot-seconds inf"))
    # "²" passes str.isdigit() but not int(): a line error, not a bare int() failure.
    lines = good.split("\n")
    lines[7] = "0 4096 5²"
    from vmthunder.lab.profile import _records_digest
    lines[8] = f"end {_records_digest(lines[7:8])}"
    with pytest.raises(ProfileError, match="expected '<offset> <length> <gap_us>'"):
        parse_recorded("\n".join(lines))


def test_a_parent_that_missed_a_heartbeat_while_its_child_lost_it_loses_its_children() -> None:
    spec = CacheSpec(fanout=2, origin_fanout=1, node_selector={})
    nodes = [NodeFacts(n, True) for n in ("a", "b", "c")]

    def replicas(a_beat_ago: float, b_lost: bool) -> list[ReplicaFacts]:
        beat = NOW - timedelta(seconds=5)
        return [ReplicaFacts("img.a", "img", "a", ORIGIN, 1, "Hydrating",
                             NOW - timedelta(seconds=a_beat_ago)),
                ReplicaFacts("img.b", "img", "b", "a", 2, "Hydrating", beat, parent_lost=b_lost),
                ReplicaFacts("img.c", "img", "c", "a", 2, "Hydrating", beat)]

    def moved(plan: ReplicaPlan) -> set[str]:
        return {u.node for u in plan.update}

    # a missed its 15 s heartbeat and b lost its session to it: both children move
    assert moved(plan_replicas("img", spec, nodes, replicas(25, True), set(), NOW)) == {"b", "c"}
    # a heartbeats: b alone cannot reach it, nobody moves (nor on a late heartbeat alone)
    assert moved(plan_replicas("img", spec, nodes, replicas(5, True), set(), NOW)) == set()
    assert moved(plan_replicas("img", spec, nodes, replicas(25, False), set(), NOW)) == set()
    # a heartbeat 5 s ago and b's word: plan again the moment a misses its next one
    early = plan_replicas("img", spec, nodes, replicas(5, True), set(), NOW)
    assert early.recheck_at == NOW + timedelta(seconds=15)
    assert plan_replicas("img", spec, nodes, replicas(5, False), set(), NOW).recheck_at is None
    assert plan_replicas("img", spec, nodes, replicas(25, True), set(), NOW).recheck_at is None


def test_a_parent_its_children_called_gone_takes_no_child_back_until_it_heartbeats() -> None:
    spec = CacheSpec(fanout=2, origin_fanout=1, node_selector={})
    nodes = [NodeFacts(n, True) for n in ("a", "b", "c")]
    dead = NOW - timedelta(seconds=25)  # a's last heartbeat: missed, not yet stale (60 s)
    beat = NOW - timedelta(seconds=5)
    first = plan_replicas("img", spec, nodes, [
        ReplicaFacts("img.a", "img", "a", ORIGIN, 1, "Hydrating", dead),
        ReplicaFacts("img.b", "img", "b", "a", 2, "Hydrating", beat, parent_lost=True),
        ReplicaFacts("img.c", "img", "c", "a", 2, "Hydrating", beat)], set(), NOW)
    assert {u.node: u.parent for u in first.update} == {"b": ORIGIN, "c": "b"}
    assert first.lost == {"a": dead}
    # Moved, b and c no longer report a lost; a has not heartbeat since.
    moved = [ReplicaFacts("img.a", "img", "a", ORIGIN, 1, "Hydrating", dead),
             ReplicaFacts("img.b", "img", "b", ORIGIN, 1, "Hydrating", beat),
             ReplicaFacts("img.c", "img", "c", "b", 2, "Hydrating", beat)]
    later = NOW + timedelta(seconds=10)
    # Without the verdict, a would look healthy and take b back under it (the origin serves
    # one node); with it, nothing moves.
    assert {u.node for u in plan_replicas("img", spec, nodes, moved, set(), later).update} == {
        "b", "c"}
    kept = plan_replicas("img", spec, nodes, moved, set(), later, first.lost)
    assert kept.update == () and kept.lost == {"a": dead}
    # a heartbeats again: the verdict ends, a is a node like the others.
    back = [replace(moved[0], heartbeat=later), *moved[1:]]
    assert plan_replicas("img", spec, nodes, back, set(), later, kept.lost).lost == {}


def test_a_replica_that_passes_reads_through_loses_its_children_and_keeps_its_parent() -> None:
    spec = CacheSpec(fanout=2, origin_fanout=1, node_selector={})
    nodes = [NodeFacts(n, True) for n in ("a", "b", "c")]
    beat = NOW - timedelta(seconds=5)
    full = {"type": "Cached", "status": "False", "reason": "CacheDiskFull"}
    b = ReplicaFacts.from_dict({
        "metadata": {"name": "img.b", "labels": {"vmthunder.io/parent": "a"}},
        "spec": {"imageCache": "img", "node": "b", "parent": "a", "depth": 2},
        "status": {"phase": "Attached", "heartbeat": beat.isoformat(), "conditions": [full]}})
    assert not b.caching
    replicas = [ReplicaFacts("img.a", "img", "a", ORIGIN, 1, "Hydrating", beat), b,
                ReplicaFacts("img.c", "img", "c", "b", 3, "Hydrating", beat)]
    plan = plan_replicas("img", spec, nodes, replicas, set(), NOW)
    assert {(u.node, u.parent) for u in plan.update} == {("c", "a")}


def test_the_caches_status_carries_the_image_size_a_node_found_unless_the_spec_gives_it() -> None:
    nodes = [NodeFacts(n, True) for n in ("a", "b")]
    beat = NOW - timedelta(seconds=5)
    a = ReplicaFacts.from_dict({
        "metadata": {"name": "img.a"},
        "spec": {"imageCache": "img", "node": "a", "parent": ORIGIN, "depth": 1},
        "status": {"phase": "Attached", "heartbeat": beat.isoformat(),
                   "imageSizeBytes": 5 << 20}})
    b = ReplicaFacts("img.b", "img", "b", "a", 2, "Attaching", beat)
    spec = CacheSpec(fanout=2, origin_fanout=1, node_selector={})
    status = plan_replicas("img", spec, nodes, [a, b], set(), NOW).status
    assert status.as_patch(1)["imageSizeBytes"] == 5 << 20
    # Unknown: left out, so a known size is never cleared.
    unknown = plan_replicas("img", spec, nodes, [replace(a, image_size=0), b], set(), NOW)
    assert "imageSizeBytes" not in unknown.status.as_patch(1)
    given_size = replace(spec, size_bytes=6 << 20)
    assert plan_replicas("img", given_size, nodes, [a, b], set(), NOW
                         ).status.image_size_bytes == 6 << 20


def test_a_replica_without_its_parents_label_gets_it_and_nothing_moves() -> None:
    """An older operator's replicas carry no vmthunder.io/parent, by which agents watch their
    children: the next plan writes it (spec unchanged), where it is missing or wrong, also on
    a replica kept out of the plan (its node not ready: it may still read through its parent,
    and a parent lets in only the children it sees)."""
    spec = CacheSpec(fanout=2, origin_fanout=1, node_selector={})
    nodes = [NodeFacts(n, True) for n in ("a", "b", "c", "d", "e")] + [NodeFacts("f", False)]
    beat = NOW - timedelta(seconds=5)

    def replica(node: str, parent: str, depth: int, labels: dict[str, str]) -> ReplicaFacts:
        return ReplicaFacts.from_dict({
            "metadata": {"name": f"img.{node}", "labels": labels},
            "spec": {"imageCache": "img", "node": node, "parent": parent, "depth": depth},
            "status": {"phase": "Hydrating", "heartbeat": beat.isoformat()}})

    replicas = [replica("a", ORIGIN, 1, {}),  # missing: "" under the origin
                replica("b", "a", 2, {}),  # missing
                replica("c", "a", 2, {"vmthunder.io/parent": "b"}),  # wrong
                replica("d", "b", 3, {"vmthunder.io/parent": "b"}),  # right
                replica("e", "b", 3, {"vmthunder.io/parent": "b"}),  # right
                replica("f", "c", 3, {})]  # missing, not ready: kept where it is
    plan = plan_replicas("img", spec, nodes, replicas, set(), NOW)
    assert {(u.node, u.parent, u.label) for u in plan.update} == {
        ("a", ORIGIN, ""), ("b", "a", "a"), ("c", "a", "a")}
    assert [(u.node, u.label) for u in plan.relabel] == [("f", "c")]
    assert plan.reparented == ()
    assert not plan.create and not plan.delete


def test_the_cache_status_gives_the_last_hold_of_the_nodes_still_prefetching() -> None:
    beat, dead = NOW - timedelta(seconds=5), NOW - timedelta(minutes=5)
    soon, later = NOW + timedelta(seconds=20), NOW + timedelta(seconds=50)

    def replica(node: str, phase: str, hold: datetime | str | None,
                heartbeat: datetime = beat) -> ReplicaFacts:
        return ReplicaFacts.from_dict({
            "metadata": {"name": f"img.{node}", "labels": {"vmthunder.io/parent": ""}},
            "spec": {"imageCache": "img", "node": node, "parent": ORIGIN, "depth": 1},
            "status": {"phase": phase, "heartbeat": heartbeat.strftime("%Y-%m-%dT%H:%M:%SZ"),
                       "holdUntil": hold.strftime("%Y-%m-%dT%H:%M:%SZ")
                       if isinstance(hold, datetime) else hold}})

    def until(*facts: ReplicaFacts) -> str | None:
        nodes = [NodeFacts(f.node, True) for f in facts]
        plan = plan_replicas("img", CacheSpec(fanout=8, origin_fanout=8), nodes, facts,
                             {f.node for f in facts}, NOW)
        value = plan.status.as_patch(None)["prefetchingUntil"]
        return None if value is None else str(value)

    assert until(replica("a", "Prefetching", soon), replica("b", "Prefetching", later),
                 replica("c", "Hydrating", None)) == later.strftime("%Y-%m-%dT%H:%M:%SZ")
    # a hold left behind in a status that moved on, or by a node that stopped reporting
    assert until(replica("a", "Hydrating", later), replica("b", "Prefetching", later, dead),
                 replica("c", "Prefetching", soon)) == soon.strftime("%Y-%m-%dT%H:%M:%SZ")
    # a hold written with another offset is given in UTC
    assert until(replica("a", "Prefetching", "2026-01-01T01:00:50+01:00")) == (
        later.strftime("%Y-%m-%dT%H:%M:%SZ"))
    # none prefetches (a hold that is no time counts for none): the field goes (None deletes
    # it in the merge patch)
    assert until(replica("a", "Hydrated", None), replica("b", "Prefetching", "soon")) is None
    # a node its children lost, which missed its heartbeat (20 s) but is not stale yet (60 s)
    missed = replica("a", "Prefetching", later, NOW - timedelta(seconds=30))
    orphan = ReplicaFacts.from_dict({
        "metadata": {"name": "img.b", "labels": {"vmthunder.io/parent": "a"}},
        "spec": {"imageCache": "img", "node": "b", "parent": "a", "depth": 2},
        "status": {"phase": "Prefetching", "heartbeat": beat.strftime(TIME_FORMAT),
                   "holdUntil": soon.strftime(TIME_FORMAT),
                   "parentLostAt": beat.strftime(TIME_FORMAT)}})
    assert until(missed, orphan) == soon.strftime(TIME_FORMAT)
    assert until(replica("a", "Prefetching", later, NOW - timedelta(seconds=30)),
                 replica("b", "Prefetching", soon)) == later.strftime(TIME_FORMAT)
