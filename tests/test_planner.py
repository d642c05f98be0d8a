"""Property tests of the tree planner: each invariant it promises is one test.

Examples per property: VMT_HYPOTHESIS_EXAMPLES (default 60, enough for CI on 2 cores);
set it to a few thousand for a thorough run.
"""

from __future__ import annotations

import math
import os
import random
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmthunder.operator.planner import (
    ORIGIN,
    NodeState,
    ParentChange,
    Placement,
    optimal_depth,
    plan_changes,
    plan_depth,
    plan_tree,
)

EXAMPLES = int(os.environ.get("VMT_HYPOTHESIS_EXAMPLES", "60"))
PROPERTY = settings(max_examples=EXAMPLES, deadline=None)

DOMAINS = ["rack-a", "rack-b", "rack-c", "rack-d"]


# --- strategies -------------------------------------------------------------------------


@st.composite
def fanouts(draw: st.DrawFn) -> tuple[int, int | None]:
    return draw(st.integers(1, 5)), draw(st.none() | st.integers(1, 5))


@st.composite
def fresh_nodes(draw: st.DrawFn, max_size: int = 60, domains: bool = True) -> list[NodeState]:
    """Nodes with no current parent, some labelled with a domain, some hydrated."""
    n = draw(st.integers(0, max_size))
    topo = st.sampled_from([None, *DOMAINS]) if domains else st.none()
    return [
        NodeState(f"n{i:03d}", topology=draw(topo), hydrated=draw(st.booleans())) for i in range(n)
    ]


@st.composite
def arbitrary_nodes(draw: st.DrawFn) -> list[NodeState]:
    """Anything the API server could say, including stale garbage: parents that are unknown,
    not ready, cycles, over-full parents, members of a domain hanging outside it."""
    n = draw(st.integers(0, 40))
    names = [f"n{i:03d}" for i in range(n)]
    parent = st.none() | st.just(ORIGIN) | st.sampled_from([*names, "gone-1", "gone-2"])
    return [
        NodeState(
            name,
            ready=draw(st.booleans() | st.just(True)),
            topology=draw(st.sampled_from([None, *DOMAINS])),
            parent=draw(parent),
            hydrated=draw(st.booleans()),
        )
        for name in names
    ]


def with_plan(nodes: Sequence[NodeState], plan: Mapping[str, Placement]) -> list[NodeState]:
    """The nodes as the next reconcile sees them: each placed node knows its parent."""
    return [
        NodeState(
            n.name, n.ready, n.topology, plan[n.name].parent if n.name in plan else None, n.hydrated
        )
        for n in nodes
    ]


@st.composite
def churn(draw: st.DrawFn, nodes: list[NodeState]) -> list[NodeState]:
    """Some nodes leave (deleted or not ready), some join, some become hydrated."""
    out = []
    for node in nodes:
        fate = draw(st.sampled_from(["stay", "stay", "stay", "not-ready", "deleted"]))
        if fate == "deleted":
            continue
        hydrated = node.hydrated or draw(st.booleans())
        out.append(NodeState(node.name, fate == "stay", node.topology, node.parent, hydrated))
    for i in range(draw(st.integers(0, 15))):
        out.append(NodeState(f"new{i:02d}", topology=draw(st.sampled_from([None, *DOMAINS]))))
    return out


# --- checks ------------------------------------------------------------------------------


def ready_names(nodes: Sequence[NodeState]) -> set[str]:
    return {n.name for n in nodes if n.ready}


def reaches_origin(plan: Mapping[str, Placement], name: str) -> bool:
    seen = set()
    while name != ORIGIN:
        if name in seen or name not in plan:
            return False
        seen.add(name)
        name = plan[name].parent
    return True


def child_counts(plan: Mapping[str, Placement]) -> Counter[str]:
    return Counter(p.parent for p in plan.values())


def outside_parents(
    nodes: Sequence[NodeState], plan: Mapping[str, Placement]
) -> dict[str, list[str]]:
    """Per domain, its members whose parent is not a member: its entries."""
    topo = {n.name: n.topology for n in nodes}
    entries: dict[str, list[str]] = defaultdict(list)
    for name, placement in plan.items():
        d = topo[name]
        if d is not None and topo.get(placement.parent) != d:
            entries[d].append(name)
    return entries


def spare(plan: Mapping[str, Placement], name: str, fanout: int, origin_fanout: int) -> int:
    cap = origin_fanout if name == ORIGIN else fanout
    return cap - child_counts(plan)[name]


# --- invariants on any input ---------------------------------------------------------------


@PROPERTY
@given(arbitrary_nodes(), fanouts())
def test_every_ready_node_gets_exactly_one_parent_in_the_plan(
    nodes: list[NodeState], k: tuple[int, int | None]
) -> None:
    plan = plan_tree(nodes, *k)
    assert set(plan) == ready_names(nodes)
    for name, placement in plan.items():
        assert placement.parent == ORIGIN or placement.parent in plan
        assert placement.parent != name


@PROPERTY
@given(arbitrary_nodes(), fanouts())
def test_following_parents_always_reaches_origin_and_depths_count_the_hops(
    nodes: list[NodeState], k: tuple[int, int | None]
) -> None:
    plan = plan_tree(nodes, *k)
    for name, placement in plan.items():
        assert reaches_origin(plan, name)
        parent_depth = 0 if placement.parent == ORIGIN else plan[placement.parent].depth
        assert placement.depth == parent_depth + 1


@PROPERTY
@given(arbitrary_nodes(), fanouts())
def test_no_node_and_not_the_origin_exceeds_its_fanout(
    nodes: list[NodeState], k: tuple[int, int | None]
) -> None:
    fanout, origin_fanout = k
    counts = child_counts(plan_tree(nodes, fanout, origin_fanout))
    assert counts[ORIGIN] <= (origin_fanout or fanout)
    assert all(c <= fanout for p, c in counts.items() if p != ORIGIN)


@st.composite
def some_not_serving(draw: st.DrawFn) -> list[NodeState]:
    """Arbitrary nodes, some of which cannot re-export (a full cache disk: pass-through), and
    some kept out of the plan while they still read from their parent (a Failed replica
    whose agent reports: it holds its slot)."""
    return [replace(n, serves=draw(st.booleans()),
                    holds_slot=not n.ready and draw(st.booleans()))
            for n in draw(arbitrary_nodes())]


@PROPERTY
@given(some_not_serving(), fanouts())
def test_a_node_that_does_not_serve_gets_no_children_and_a_held_slot_counts_as_taken(
    nodes: list[NodeState], k: tuple[int, int | None]
) -> None:
    fanout, origin_fanout = k
    plan = plan_tree(nodes, fanout, origin_fanout)
    assert set(plan) == ready_names(nodes)
    counts = child_counts(plan)
    assert all(counts[n.name] == 0 for n in nodes if not n.serves)
    assert all(reaches_origin(plan, name) for name in plan)
    held = Counter(n.parent for n in nodes if n.holds_slot and n.parent != n.name)
    assert all(c <= max(0, fanout - held[p]) for p, c in counts.items() if p != ORIGIN)
    # each node that takes room without adding any may push one node under the origin
    # beyond its fan-out
    leaves = sum(1 for n in nodes if n.ready and not n.serves)
    k0 = origin_fanout or fanout
    assert counts[ORIGIN] <= max(0, k0 - held[ORIGIN]) + leaves + sum(held.values())


@PROPERTY
@given(st.data(), fresh_nodes(), fanouts())
def test_a_plan_with_nodes_that_do_not_serve_is_stable_when_fed_back(
    data: st.DataObject, nodes: list[NodeState], k: tuple[int, int | None]
) -> None:
    nodes = [NodeState(n.name, topology=n.topology, serves=data.draw(st.booleans()))
             for n in nodes]
    plan = plan_tree(nodes, *k)
    again = [NodeState(n.name, topology=n.topology, parent=plan[n.name].parent,
                       serves=n.serves) for n in nodes]
    assert plan_tree(again, *k) == plan


def test_a_node_that_does_not_serve_does_not_take_the_origin_s_last_slot() -> None:
    plan = plan_tree([NodeState("a", serves=False), NodeState("b"), NodeState("c")], 2, 1)
    assert {n: p.parent for n, p in plan.items()} == {"b": ORIGIN, "a": "b", "c": "b"}


def test_the_children_of_a_node_that_stops_serving_move_to_its_parent() -> None:
    nodes = [NodeState("a", parent=ORIGIN), NodeState("b", parent="a", serves=False),
             NodeState("c", parent="b"), NodeState("d", parent="b")]
    plan = plan_tree(nodes, 3, 1)
    assert plan["b"].parent == "a"  # it keeps reading through its own parent
    assert plan["c"].parent == plan["d"].parent == "a"


@PROPERTY
@given(arbitrary_nodes(), fanouts())
def test_each_domain_forms_one_subtree_under_a_single_entry_node(
    nodes: list[NodeState], k: tuple[int, int | None]
) -> None:
    plan = plan_tree(nodes, *k)
    present = {n.topology for n in nodes if n.ready and n.topology is not None}
    entries = outside_parents(nodes, plan)
    assert set(entries) == present
    assert all(len(e) == 1 for e in entries.values()), entries


@PROPERTY
@given(arbitrary_nodes(), fanouts(), st.randoms(use_true_random=False))
def test_same_nodes_in_any_order_give_the_same_plan(
    nodes: list[NodeState], k: tuple[int, int | None], rnd: random.Random
) -> None:
    shuffled = list(nodes)
    rnd.shuffle(shuffled)
    assert plan_tree(shuffled, *k) == plan_tree(nodes, *k)


# --- fresh plans: shallow, balanced, hydrated on top ------------------------------------------


@PROPERTY
@given(fresh_nodes(domains=False), fanouts())
def test_fresh_plan_without_domains_has_the_optimal_depth_within_log_bound(
    nodes: list[NodeState], k: tuple[int, int | None]
) -> None:
    fanout, origin_fanout = k
    n = len(nodes)
    depth = plan_depth(plan_tree(nodes, fanout, origin_fanout))
    assert depth == optimal_depth(n, fanout, origin_fanout)
    if fanout >= 2 and n >= 1:
        assert depth <= math.ceil(math.log(n, fanout) - 1e-9) + 1


def test_optimal_depth_counts_levels_of_a_full_tree() -> None:
    assert [optimal_depth(n, 2) for n in (0, 1, 2, 3, 6, 7, 14, 15)] == [0, 1, 1, 2, 2, 3, 3, 4]
    assert optimal_depth(160, 4) == 4  # 4 + 16 + 64 + 256 >= 160
    assert optimal_depth(10_000, 4, 1) == 8
    assert optimal_depth(5, 1, 2) == 3


@PROPERTY
@given(fresh_nodes(domains=False), fanouts())
def test_fresh_plan_puts_hydrated_nodes_no_deeper_than_unhydrated_ones(
    nodes: list[NodeState], k: tuple[int, int | None]
) -> None:
    plan = plan_tree(nodes, *k)
    hydrated = [plan[n.name].depth for n in nodes if n.hydrated]
    cold = [plan[n.name].depth for n in nodes if not n.hydrated]
    if hydrated and cold:
        assert max(hydrated) <= min(cold)


@st.composite
def zoned_nodes(draw: st.DrawFn) -> list[NodeState]:
    """A fresh cluster of up to 12 zones (and a few unlabelled nodes), up to 150 nodes."""
    zones = [f"zone-{i}" for i in range(draw(st.integers(1, 12)))]
    topo = st.sampled_from(zones) | st.none()
    return [NodeState(f"n{i:03d}", topology=draw(topo)) for i in range(draw(st.integers(0, 150)))]


@PROPERTY
@given(zoned_nodes(), st.integers(2, 6))
def test_fresh_plan_with_domains_is_within_two_levels_of_the_optimum(
    nodes: list[NodeState], fanout: int
) -> None:
    # Domain entries are placed before members, side by side near the top, so keeping each
    # zone one subtree costs at most two levels over the best tree without zones.
    depth = plan_depth(plan_tree(nodes, fanout))
    assert depth <= optimal_depth(len(nodes), fanout) + 2


@PROPERTY
@given(fresh_nodes(), fanouts())
def test_fresh_plan_with_domains_is_no_deeper_than_block_levels_times_tallest_domain(
    nodes: list[NodeState], k: tuple[int, int | None]
) -> None:
    # Each domain (or unlabelled node) is a block; blocks hang in a tree of at least
    # optimal_depth(blocks) levels, each level at most as tall as the tallest block.
    fanout, origin_fanout = k
    sizes = Counter(n.topology for n in nodes if n.topology is not None)
    blocks = len(sizes) + sum(1 for n in nodes if n.topology is None)
    tallest = max([optimal_depth(m, fanout, 1) for m in sizes.values()] + [1])
    depth = plan_depth(plan_tree(nodes, fanout, origin_fanout))
    assert depth <= optimal_depth(blocks, fanout, origin_fanout) * tallest


# --- stability and repair ---------------------------------------------------------------------


def moved_stable_nodes(
    before: Mapping[str, Placement], nodes: Sequence[NodeState], after: Mapping[str, Placement]
) -> list[str]:
    """Ready nodes whose previous parent is still ready and in the plan but that moved."""
    ready = ready_names(nodes)
    moved = []
    for name, placement in before.items():
        if name not in after:
            continue
        parent = placement.parent
        if (parent == ORIGIN or parent in ready) and after[name].parent != parent:
            moved.append(name)
    return moved


@PROPERTY
@given(st.data(), fresh_nodes(), fanouts())
def test_node_with_a_healthy_parent_keeps_it_when_others_join_or_leave(
    data: st.DataObject, nodes: list[NodeState], k: tuple[int, int | None]
) -> None:
    fanout, origin_fanout = k
    before = plan_tree(nodes, fanout, origin_fanout)
    later = data.draw(churn(with_plan(nodes, before)))
    after = plan_tree(later, fanout, origin_fanout)
    topo = {n.name: n.topology for n in later}
    moved = moved_stable_nodes(before, later, after)
    # The one allowed exception: an outsider child of a domain member, moved out because the
    # domain had no other free slot for a member that must join or re-join it.
    for name in moved:
        parent_domain = topo[before[name].parent]
        assert parent_domain is not None and topo[name] != parent_domain, name
    ready = ready_names(later)
    domain_orphans = sum(
        1
        for n in later
        if n.ready
        and n.topology is not None
        and (n.name not in before or (n.parent != ORIGIN and n.parent not in ready))
    )
    assert len(moved) <= domain_orphans


@PROPERTY
@given(st.data(), fresh_nodes(domains=False), fanouts())
def test_without_domains_no_node_with_a_healthy_parent_ever_moves(
    data: st.DataObject, nodes: list[NodeState], k: tuple[int, int | None]
) -> None:
    before = plan_tree(nodes, *k)
    later = [
        NodeState(n.name, n.ready, None, n.parent, n.hydrated)
        for n in data.draw(churn(with_plan(nodes, before)))
    ]
    assert moved_stable_nodes(before, later, plan_tree(later, *k)) == []


@PROPERTY
@given(st.data(), fresh_nodes(domains=False), fanouts())
def test_nodes_only_joining_keep_a_fresh_plan_at_optimal_depth(
    data: st.DataObject, nodes: list[NodeState], k: tuple[int, int | None]
) -> None:
    before = plan_tree(nodes, *k)
    joined = with_plan(nodes, before) + [
        NodeState(f"new{i:02d}") for i in range(data.draw(st.integers(0, 30)))
    ]
    after = plan_tree(joined, *k)
    assert moved_stable_nodes(before, joined, after) == []
    assert plan_depth(after) == optimal_depth(len(joined), *k)


def old_ancestors(nodes: Sequence[NodeState], name: str) -> list[str]:
    by_name = {n.name: n for n in nodes}
    out: list[str] = []
    at = by_name[name].parent
    while at is not None:
        out.append(at)
        if at == ORIGIN or at not in by_name:
            break
        at = by_name[at].parent
    return out


@PROPERTY
@given(st.data(), fresh_nodes(domains=False), fanouts())
def test_orphans_reattach_to_the_nearest_healthy_ancestor_with_spare_fanout(
    data: st.DataObject, nodes: list[NodeState], k: tuple[int, int | None]
) -> None:
    fanout, origin_fanout = k
    before = plan_tree(nodes, fanout, origin_fanout)
    # Departed nodes stay listed as not ready, so the planner knows the previous tree.
    down = data.draw(st.sets(st.sampled_from([n.name for n in nodes]))) if nodes else set()
    later = [
        NodeState(n.name, n.name not in down, None, n.parent, n.hydrated)
        for n in with_plan(nodes, before)
    ]
    after = plan_tree(later, fanout, origin_fanout)
    for n in later:
        if not n.ready or n.parent in after or n.parent == ORIGIN:
            continue
        # an orphan: every healthy ancestor nearer than its new parent is full
        new_parent = after[n.name].parent
        for ancestor in old_ancestors(later, n.name):
            if ancestor == new_parent:
                break
            if ancestor == ORIGIN or ancestor in after:
                assert spare(after, ancestor, fanout, origin_fanout or fanout) == 0, (
                    n.name,
                    ancestor,
                    new_parent,
                )


# --- examples ---------------------------------------------------------------------------


def chain_plan() -> list[NodeState]:
    # origin -> a -> {b, c};  b -> {d, e};  c -> {f}
    parents = {"a": ORIGIN, "b": "a", "c": "a", "d": "b", "e": "b", "f": "c"}
    return [NodeState(name, parent=p) for name, p in parents.items()]


def test_children_of_a_failed_node_move_to_its_parent_then_to_the_shallowest_room() -> None:
    nodes = [NodeState(n.name, n.name != "b", None, n.parent) for n in chain_plan()]
    plan = plan_tree(nodes, fanout=2)
    assert plan["d"] == Placement("a", 2)  # took b's place under a
    assert plan["e"] == Placement(ORIGIN, 1)  # a is full again; the origin has room
    assert plan["c"].parent == "a" and plan["f"].parent == "c"


def test_orphan_prefers_a_hydrated_parent_among_the_equally_shallow() -> None:
    nodes = [
        NodeState("a", parent=ORIGIN),
        NodeState("b", parent=ORIGIN, hydrated=True),
        NodeState("x", parent="gone"),
    ]
    plan = plan_tree(nodes, fanout=2, origin_fanout=2)
    assert plan["x"] == Placement("b", 2)


def test_fresh_plan_places_hydrated_nodes_at_the_top() -> None:
    nodes = [NodeState(f"n{i}", hydrated=(i == 5)) for i in range(7)]
    plan = plan_tree(nodes, fanout=2, origin_fanout=1)
    assert plan["n5"] == Placement(ORIGIN, 1)


def test_a_domain_whose_entry_fails_gets_a_new_entry_and_stays_one_subtree() -> None:
    nodes = [NodeState(f"r{i}", topology="rack-a") for i in range(7)] + [
        NodeState(f"s{i}", topology="rack-b") for i in range(7)
    ]
    before = plan_tree(nodes, fanout=2)
    entries = outside_parents(nodes, before)
    failed = entries["rack-a"][0]
    later = [
        NodeState(n.name, n.name != failed, n.topology, n.parent) for n in with_plan(nodes, before)
    ]
    after = plan_tree(later, fanout=2)
    new_entries = outside_parents(later, after)
    assert len(new_entries["rack-a"]) == 1 and new_entries["rack-a"] != [failed]
    assert new_entries["rack-b"] == entries["rack-b"]


def test_a_cycle_in_the_current_parents_is_cut() -> None:
    nodes = [NodeState("a", parent="b"), NodeState("b", parent="c"), NodeState("c", parent="a")]
    plan = plan_tree(nodes, fanout=2)
    assert all(reaches_origin(plan, n) for n in "abc")
    assert plan["b"].parent == "c" and plan["c"].parent == "a"  # only a's edge was cut


def test_children_beyond_the_fanout_keep_the_first_by_name() -> None:
    nodes = [NodeState("p", parent=ORIGIN)] + [NodeState(c, parent="p") for c in "abc"]
    plan = plan_tree(nodes, fanout=2)
    assert plan["a"].parent == "p" and plan["b"].parent == "p" and plan["c"].parent != "p"


def test_not_ready_nodes_are_left_out_of_the_plan() -> None:
    plan = plan_tree([NodeState("a", ready=False), NodeState("b")], fanout=2)
    assert plan == {"b": Placement(ORIGIN, 1)}


def test_plan_changes_lists_moves_joins_and_leaves_by_name() -> None:
    old = {"a": Placement(ORIGIN, 1), "b": Placement("a", 2), "c": Placement("a", 2)}
    new = {"a": Placement(ORIGIN, 1), "b": Placement(ORIGIN, 1), "d": Placement("a", 2)}
    assert plan_changes(old, new) == [
        ParentChange("b", "a", ORIGIN),
        ParentChange("c", "a", None),
        ParentChange("d", None, "a"),
    ]
    assert plan_depth(old) == 2 and plan_depth({}) == 0


@pytest.mark.parametrize(
    ("nodes", "fanout", "origin_fanout"),
    [
        ([NodeState("a")], 0, None),
        ([NodeState("a")], 2, 0),
        ([NodeState("a"), NodeState("a")], 2, None),
        ([NodeState(ORIGIN)], 2, None),
    ],
)
def test_invalid_input_is_rejected(
    nodes: list[NodeState], fanout: int, origin_fanout: int | None
) -> None:
    with pytest.raises(ValueError):
        plan_tree(nodes, fanout, origin_fanout)


def test_ten_thousand_racked_nodes_plan_balanced() -> None:
    # The speed target lives in bench/planner.py; this pins the shape at the simulator's size.
    nodes = [NodeState(f"n{i:05d}", topology=f"rack{i // 40:03d}") for i in range(10_000)]
    plan = plan_tree(nodes, fanout=4)
    assert len(plan) == 10_000
    assert plan_depth(plan) <= 9
    assert all(len(e) == 1 for e in outside_parents(nodes, plan).values())
