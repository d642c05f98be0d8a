"""The simulator's pure pieces, with exact expected values, and small exact storms."""

from __future__ import annotations

import json

import pytest

from vmthunder.sim.calibration import Calibration, calibrated
from vmthunder.sim.engine import (
    Failure,
    Mode,
    Scenario,
    local_boot_s,
    predict_all_booted,
    simulate,
)
from vmthunder.sim.events import EventQueue
from vmthunder.sim.fairshare import FlowDemand, max_min_rates
from vmthunder.sim.network import Network
from vmthunder.sim.profile import BootProfile, Read, SyntheticProfile, parse_profile, plan_steps

MiB = 1 << 20

# --- max-min fair sharing --------------------------------------------------------------------


def test_one_link_is_split_equally() -> None:
    rates = max_min_rates([FlowDemand(("a",))] * 4, {"a": 10.0})
    assert rates == [2.5] * 4


def test_a_flow_held_back_elsewhere_leaves_its_share_to_the_others() -> None:
    # f1 crosses A only, f2 crosses A and B, f3 crosses B only; B is the tighter link.
    flows = [FlowDemand(("A",)), FlowDemand(("A", "B")), FlowDemand(("B",))]
    assert max_min_rates(flows, {"A": 10.0, "B": 6.0}) == [7.0, 3.0, 3.0]


def test_a_capped_flow_gets_its_cap_and_the_rest_goes_to_the_others() -> None:
    flows = [FlowDemand(("a",), cap=1.0), FlowDemand(("a",)), FlowDemand(("a",))]
    assert max_min_rates(flows, {"a": 10.0}) == [1.0, 4.5, 4.5]


def test_a_weighted_flow_takes_weight_times_its_rate() -> None:
    flows = [FlowDemand(("up",), weight=4), FlowDemand(("up",))]
    assert max_min_rates(flows, {"up": 10.0}) == [2.0, 2.0]
    # each member of the weight-4 group is held to 1 (its own NIC: a cap, not a shared
    # link): the single flow gets the rest
    flows = [FlowDemand(("up",), weight=4, cap=1.0), FlowDemand(("up",))]
    assert max_min_rates(flows, {"up": 10.0}) == [1.0, 6.0]


def test_a_flow_with_neither_link_nor_cap_is_rejected() -> None:
    with pytest.raises(ValueError):
        max_min_rates([FlowDemand(())], {})


# --- event ordering -----------------------------------------------------------------------------


def test_events_come_out_by_time_and_equal_times_in_insertion_order() -> None:
    q: EventQueue[str] = EventQueue()
    for at, name in [(2.0, "c"), (1.0, "a"), (2.0, "d"), (1.0, "b"), (0.5, "first")]:
        q.push(at, name)
    out = []
    while (item := q.pop()) is not None:
        out.append(item)
    assert out == [(0.5, "first"), (1.0, "a"), (1.0, "b"), (2.0, "c"), (2.0, "d")]
    assert q.now == 2.0


def test_a_cancelled_event_never_comes_out_and_the_past_is_closed() -> None:
    q: EventQueue[str] = EventQueue()
    keep = q.push(1.0, "keep")
    drop = q.push(1.0, "drop")
    q.cancel(drop)
    assert keep != drop
    assert q.pop() == (1.0, "keep")
    assert q.pop() is None
    with pytest.raises(ValueError):
        q.push(0.5, "too late")


# --- flows over time ----------------------------------------------------------------------------


def _push(q: EventQueue[tuple[int, int]], at: float, fid: int, version: int) -> None:
    q.push(at, (fid, version))


def test_a_second_flow_halves_the_first_and_it_speeds_up_again_when_the_first_ends() -> None:
    q: EventQueue[tuple[int, int]] = EventQueue()
    net = Network([10.0], lambda at, fid, ver: _push(q, at, fid, ver))
    first = net.start(0.0, (0,), 10.0, "first")  # alone: 10 bytes at 10/s, done at 1.0
    q.push(0.5, (0, 0))  # the second starts at 0.5
    done: dict[object, float] = {}
    while (item := q.pop()) is not None:
        now, (fid, ver) = item
        if fid == 0:
            net.start(now, (0,), 10.0, "second")
            continue
        flow = net.finish(now, fid, ver)
        if flow is not None:
            done[flow.tag] = now
    # first: 5 bytes by 0.5, then 5 at 5/s: 1.5; second: 5 bytes by 1.5, then 5 at 10/s: 2.0
    assert done == {"first": 1.5, "second": 2.0}
    assert first not in net.flows


def test_refilling_a_busy_flow_keeps_its_rate() -> None:
    q: EventQueue[tuple[int, int]] = EventQueue()
    net = Network([8.0], lambda at, fid, ver: _push(q, at, fid, ver))
    a = net.start(0.0, (0,), 4.0, "a1")  # alone for an instant: its first event goes stale
    net.start(0.0, (0,), 100.0, "b")

    def next_current() -> tuple[float, int]:
        while (item := q.pop()) is not None:
            at, (fid, ver) = item
            if net.current(fid, ver) is not None:
                return at, fid
        raise AssertionError("no current event")

    assert next_current() == (1.0, a)  # 4 bytes at 4/s
    net.refill(1.0, a, 8.0, "a2")
    assert next_current() == (3.0, a)  # 8 more at the same 4/s, no re-solve


# --- profiles -----------------------------------------------------------------------------------


def test_steps_merge_close_reads_and_number_regions_by_first_touch() -> None:
    profile = BootProfile(
        16 * MiB,
        (
            Read(5 * MiB, 4096, gap_s=0.5),
            Read(1 * MiB, 2 * MiB, gap_s=0.0),  # no gap: same step
            Read(5 * MiB + 4096, 4096, gap_s=1.0),
        ),
        tail_s=0.25,
    )
    plan = plan_steps(profile, region_bytes=1 * MiB)
    assert plan.order == (5, 1, 2)
    assert [(s.gap_s, s.regions, s.bytes) for s in plan.steps] == [
        (0.5, (0, 1, 2), 4096 + 2 * MiB),
        (1.0, (0,), 4096),
    ]


def test_profiles_load_in_the_labs_formats() -> None:
    as_objects = json.dumps(
        {"image_bytes": 8192, "tail_s": 1.5, "reads": [{"offset": 0, "length": 4096, "gap_s": 0.1}]}
    )
    p = parse_profile(as_objects)
    assert (p.image_bytes, p.tail_s, p.reads) == (8192, 1.5, (Read(0, 4096, 0.1),))
    assert parse_profile("[[0, 4096, 0.2], [4096, 4096]]").reads == (
        Read(0, 4096, 0.2),
        Read(4096, 4096, 0.0),
    )
    timed = json.dumps(
        [
            {"offset": 0, "length": 512, "t": 1.0, "lat_s": 0.25},
            {"offset": 0, "length": 512, "t": 3.0},
        ]
    )
    assert [r.gap_s for r in parse_profile(timed).reads] == [0.0, 1.75]
    with pytest.raises(ValueError):
        parse_profile(json.dumps({"image_bytes": 100, "reads": [[0, 4096]]}))


def test_synthetic_profile_has_its_stated_size_and_compute() -> None:
    spec = SyntheticProfile(reads=500, read_bytes=20 * MiB, compute_s=5.0, tail_s=0.5)
    p = spec.build()
    assert len(p.reads) == 500
    assert p.compute_s == pytest.approx(5.0)
    assert abs(p.read_bytes - 20 * MiB) < 0.05 * 20 * MiB
    assert p == spec.build()  # seeded: the same every time


def test_calibration_takes_only_known_figures() -> None:
    assert calibrated(attach_s=2.5).attach_s == 2.5
    with pytest.raises(ValueError):
        calibrated(no_such_figure=1.0)


# --- small storms with exact boot times ----------------------------------------------------------

EXACT = Calibration(
    node_bps=1e6,
    origin_bps=1e6,
    latency_s=0.0,
    request_overhead_s=0.0,
    local_read_bps=1e6,
    region_bytes=1 * MiB,
    sim_unit_bytes=1 * MiB,
    attach_s=1.0,
)
ONE_READ = BootProfile(4 * MiB, (Read(0, 500_000, gap_s=2.0),), tail_s=0.5)


def test_one_node_on_demand_boot_waits_for_its_region_from_the_origin() -> None:
    r = simulate(Scenario("one", 1, prefetch=False, hydrate=False), ONE_READ, EXACT)
    # attach 1 + compute 2 + 1 MiB at 1 MB/s + local read 0.5 + tail 0.5
    assert r.boot_s == [pytest.approx(1 + 2 + MiB / 1e6 + 0.5 + 0.5)]
    assert r.origin_bytes == MiB


def test_prefetch_hides_the_fetch_behind_the_compute() -> None:
    r = simulate(Scenario("one", 1, prefetch=True, hydrate=False), ONE_READ, EXACT)
    assert r.boot_s == [pytest.approx(1 + 2 + 0.5 + 0.5)]  # the region came during compute


def test_two_children_of_one_parent_share_its_uplink() -> None:
    # origin fan-out 1: node 0 under the origin, nodes 1 and 2 under node 0
    sc = Scenario("three", 3, fanout=2, origin_fanout=1, prefetch=False, hydrate=False)
    r = simulate(sc, ONE_READ, EXACT)
    first = 1 + 2 + MiB / 1e6  # node 0 has the region
    assert sorted(r.boot_s) == [
        pytest.approx(first + 1.0),
        pytest.approx(first + 2 * MiB / 1e6 + 1.0),  # both at half rate
        pytest.approx(first + 2 * MiB / 1e6 + 1.0),
    ]
    assert r.origin_bytes == MiB  # the origin served one copy


def test_baselines_floor_copy_first_and_one_server() -> None:
    steps = plan_steps(ONE_READ, EXACT.region_bytes)
    floor = local_boot_s(steps, EXACT)
    assert floor == pytest.approx(2 + 0.5 + 0.5)
    local = simulate(Scenario("l", 5, mode=Mode.LOCAL), ONE_READ, EXACT)
    assert local.boot_s == [pytest.approx(1 + floor)] * 5
    copy = simulate(Scenario("c", 5, mode=Mode.COPY_FIRST), ONE_READ, EXACT)
    assert copy.boot_s == [pytest.approx(5 * 4 * MiB / 1e6 + 1 + floor)] * 5
    one = simulate(Scenario("o", 5, mode=Mode.ONE_SERVER), ONE_READ, EXACT)
    assert one.boot_s == [pytest.approx(1 + 2 + 5 * 500_000 / 1e6 + 0.5)] * 5
    assert one.origin_bytes == 5 * 500_000


def test_a_bounded_host_link_is_crossed_by_every_transfer() -> None:
    # the lab's host at half the origin's rate: it, not the origin, paces the single copy
    host = calibrated(EXACT, host_bps=0.5e6)
    one = simulate(Scenario("one", 1, prefetch=False, hydrate=False), ONE_READ, host)
    assert one.boot_s == [pytest.approx(1 + 2 + MiB / 0.5e6 + 0.5 + 0.5)]
    # copy first on two nodes: both copies from the origin share it
    copy = simulate(Scenario("c", 2, mode=Mode.COPY_FIRST), ONE_READ, host)
    assert copy.boot_s == [pytest.approx(2 * 4 * MiB / 0.5e6 + 1 + 3)] * 2  # + attach, floor


def test_a_reads_own_cost_on_the_node_is_paid_hit_or_miss() -> None:
    cal = calibrated(EXACT, local_request_s=0.25)
    two = BootProfile(4 * MiB, (Read(0, 500_000, 2.0), Read(0, 500_000, 0.0)), tail_s=0.5)
    steps = plan_steps(two, cal.region_bytes, merge_gap_s=0.0)
    assert [s.reads for s in steps.steps] == [1, 1]
    # compute 2 + tail 0.5 + two reads of 0.5 MB at 1 MB/s, each 0.25 on top
    assert local_boot_s(steps, cal) == pytest.approx(2 + 0.5 + 2 * (0.5 + 0.25))


def test_a_parent_failure_reparents_its_children_and_everyone_else_boots() -> None:
    sc = Scenario("f", 40, fanout=2, prefetch=False, hydrate=False, failure=Failure(2.5, 0.1))
    r = simulate(sc, ONE_READ, EXACT)
    assert r.dead >= 1 and r.reparented >= r.dead
    assert len(r.boot_s) == 40 - r.dead


def test_the_calibration_entry_point_predicts_the_storms_all_booted_time() -> None:
    assert predict_all_booted(1, ONE_READ, EXACT, prefetch=False) == pytest.approx(
        1 + 2 + MiB / 1e6 + 0.5 + 0.5
    )
