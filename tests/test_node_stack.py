"""The stack planner and the prefetch planner: pure functions, no kernel."""

from __future__ import annotations

from pathlib import Path

from vmthunder.node import lio, names, stack
from vmthunder.node.cache import CacheState, io_runs, runs
from vmthunder.node.hydrate import (
    Hydrator,
    MissCount,
    QuietGate,
    Read,
    background_threshold,
    parse_profile,
    plan_missed,
    plan_prefetch,
    plan_read_regions,
)
from vmthunder.node.iscsi import TargetAddress

ORIGIN = TargetAddress("10.0.0.2:3260", "iqn.2026-11.io.example:golden")
A = TargetAddress("10.0.0.11:3260", names.export_iqn("img", "a"))
MIB = 1 << 20
DATA = Path(__file__).resolve().parent / "data"


def want(parent: TargetAddress | None = ORIGIN, **kw: object) -> stack.Want:
    base: dict[str, object] = dict(image="img", node="b", size=64 * MIB, region_bytes=65536,
                                   parent=parent, parent_chap=None, export_ip="10.0.0.12")
    base.update(kw)
    return stack.Want(**base)  # type: ignore[arg-type]


def exported(w: stack.Want) -> lio.ExportInfo:
    spec = stack.export_spec(w)
    return lio.ExportInfo(spec.iqn, spec.backstore, spec.device, (f"{spec.ip}:{spec.port}",),
                          spec.initiators)


def built(w: stack.Want, parent: TargetAddress, cache: CacheState) -> stack.Seen:
    return stack.Seen(src_table=("8:0",), src_kind="multipath", sessions={parent: "8:0"},
                      cache=cache, export_dev=True, export=exported(w))


def kinds(steps: list[stack.Step]) -> list[str]:
    return [type(s).__name__ for s in steps]


def serving(w: stack.Want, cache: CacheState) -> stack.Seen:
    """Built and exported, -src without a path: reads wait for a parent."""
    return stack.Seen(src_table=(), src_kind="multipath", cache=cache, export_dev=True,
                      export=exported(w))


def test_fresh_node_attaches_builds_source_cache_and_export_in_order() -> None:
    steps = stack.plan_image(want(), stack.Seen(None, None))
    assert kinds(steps) == ["Attach", "SetSource", "BuildCache", "BuildExportDev", "Export"]


def test_a_node_built_before_its_parent_let_it_in_only_logs_in_and_loads_the_path() -> None:
    w = want()
    assert stack.plan_image(w, serving(w, CacheState("caching", 0, 1024))) == [
        stack.Attach(ORIGIN), stack.SetSource(ORIGIN)]


def test_a_dm_linear_source_needs_its_parent_before_anything_is_built() -> None:
    assert stack.plan_image(want(parent=None, multipath=False), stack.Seen(None, None)) == []


def test_converged_stack_plans_nothing() -> None:
    w = want()
    assert stack.plan_image(w, built(w, ORIGIN, CacheState("caching", 3, 1024))) == []


def test_without_a_parent_export_the_stack_is_built_and_exported_but_reads_nowhere() -> None:
    w = want(parent=None)
    steps = stack.plan_image(w, stack.Seen(None, None))
    assert steps == [stack.SetSource(None), stack.BuildCache(), stack.BuildExportDev(),
                     stack.Export(stack.export_spec(w))]
    assert stack.plan_image(w, serving(w, CacheState("caching", 0, 1024))) == []


def test_without_room_for_a_cache_the_image_passes_through_to_the_parent() -> None:
    steps = stack.plan_image(want(), stack.Seen(None, None, cache_space_missing=MIB))
    assert kinds(steps) == ["Attach", "SetSource", "PassThrough", "BuildExportDev", "Export"]


def test_a_pass_through_becomes_a_cache_once_there_is_room_and_never_detaches_before() -> None:
    w = want()
    full = built(w, ORIGIN, CacheState("passthrough", size=64 * MIB))
    assert stack.plan_image(w, stack.Seen(**{**full.__dict__, "cache_space_missing": 1})) == []
    assert stack.plan_image(w, full) == [stack.BuildCache()]
    # not while the parent is away: the reload would wait on the reads queued for it
    away = stack.Seen(**{**full.__dict__, "broken": frozenset({ORIGIN})})
    assert stack.plan_image(w, away) == []
    failed = stack.Seen(**{**full.__dict__, "failed_paths": frozenset({"8:0"})})
    assert stack.BuildCache() not in stack.plan_image(w, failed)


def test_reparent_logs_in_reloads_source_then_logs_out_of_old_parent() -> None:
    w = want(parent=A)
    seen = built(w, ORIGIN, CacheState("caching", 3, 1024))
    assert stack.plan_image(w, seen) == [stack.Attach(A), stack.SetSource(A), stack.Logout(ORIGIN)]


def test_a_failed_path_is_reinstated_once_its_session_carries_io_again() -> None:
    w = want()
    seen = built(w, ORIGIN, CacheState("caching", 3, 1024))
    outage = stack.Seen(**{**seen.__dict__, "failed_paths": frozenset({"8:0"}),
                           "broken": frozenset({ORIGIN})})
    assert stack.plan_image(w, outage) == []  # still down: reads keep queuing
    back = stack.Seen(**{**outage.__dict__, "broken": frozenset()})
    assert stack.plan_image(w, back) == [stack.ReinstatePath("8:0")]


def test_a_session_another_image_reads_through_is_never_logged_out() -> None:
    # Two caches of one source share the origin's session: the complete one lets it be.
    w = want(shared=frozenset({ORIGIN}))
    steps = stack.plan_image(w, built(w, ORIGIN, CacheState("caching", 1024, 1024)))
    assert kinds(steps) == ["DetachCache", "RemoveSource"]
    moved = want(parent=A, shared=frozenset({ORIGIN}))
    seen = built(moved, ORIGIN, CacheState("caching", 3, 1024))
    assert stack.plan_image(moved, seen) == [stack.Attach(A), stack.SetSource(A)]


def test_hydrated_cache_detaches_removes_source_and_logs_out() -> None:
    w = want()
    steps = stack.plan_image(w, built(w, ORIGIN, CacheState("caching", 1024, 1024)))
    assert kinds(steps) == ["DetachCache", "RemoveSource", "Logout"]


def test_hydrated_cache_with_detach_never_keeps_its_parent() -> None:
    w = want(detach_when_hydrated=False)
    assert stack.plan_image(w, built(w, ORIGIN, CacheState("caching", 1024, 1024))) == []


def test_detached_cache_keeps_serving_and_ignores_parent_changes() -> None:
    w = want(parent=A)
    seen = stack.Seen(None, None, {}, CacheState("detached"), True, exported(w))
    assert stack.plan_image(w, seen) == []


def test_a_detached_qemu_cor_cache_keeps_its_error_source_and_plans_nothing() -> None:
    w = want()
    seen = stack.Seen(("error",), "error", {}, CacheState("detached"), True, exported(w))
    assert stack.plan_image(w, seen) == []  # was: RemoveSource (a reload) on every round


def test_new_child_changes_the_export_acl() -> None:
    w = want()
    seen = built(w, ORIGIN, CacheState("caching", 3, 1024))
    w2 = want(children=("iqn.2026-11.io.example:c",))
    assert kinds(stack.plan_image(w2, seen)) == ["Export"]


def test_the_export_reports_whom_it_lets_in_only_once_it_exists() -> None:
    c = "iqn.2026-11.io.example:c"
    w = want(children=(c,))
    fresh = stack.Seen(None, None)
    assert stack.exported_to(w, fresh, stack.plan_image(w, fresh)) == (c,)
    # No parent to read from yet: built and exported all the same, the child let in.
    idle = want(parent=None, children=(c,))
    assert stack.exported_to(idle, fresh, stack.plan_image(idle, fresh)) == (c,)
    # A dm-linear -src cannot be built without a parent: nothing is, nobody is let in.
    linear = want(parent=None, children=(c,), multipath=False)
    assert stack.exported_to(linear, fresh, stack.plan_image(linear, fresh)) is None
    # Converged: the kernel's export already matches, no step.
    seen = built(w, ORIGIN, CacheState("caching", 3, 1024))
    assert stack.exported_to(w, seen, []) == (c,)
    # An export with yesterday's ACLs and no step to change them says nothing.
    assert stack.exported_to(want(children=(c, "iqn.x:d")), seen, []) is None


def test_sessions_of_image_are_the_origin_and_node_exports_of_that_image() -> None:
    other = TargetAddress("10.0.0.13:3260", names.export_iqn("other", "x"))
    got = stack.sessions_of_image("img", ORIGIN.iqn, {ORIGIN: "8:0", A: "8:16", other: "8:32"})
    assert set(got) == {ORIGIN, A}


def test_prefetch_order_is_first_touch_order_without_duplicates() -> None:
    reads = [Read(5 * 65536 + 10, 100), Read(0, 65536 * 2), Read(5 * 65536, 4096)]
    assert plan_prefetch(reads, 65536, 64 * MIB) == [5, 0, 1]


def test_prefetch_ignores_reads_past_the_end_of_the_image() -> None:
    assert plan_prefetch([Read(65536 * 3, 65536 * 4)], 65536, 4 * 65536) == [3]


def test_profile_parses_lists_and_dicts() -> None:
    assert parse_profile('[[0, 4096, 0.1], {"offset": 8192, "length": 512}]') == [
        Read(0, 4096), Read(8192, 512)]
    assert parse_profile('{"reads": [[1, 2]]}') == [Read(1, 2)]


def test_corrupt_profile_is_rejected() -> None:
    import pytest

    for bad in ('{"reads": 3}', '[[0, -1]]', '[["x"]]'):
        with pytest.raises((ValueError, KeyError)):
            parse_profile(bad)


def test_runs_group_consecutive_regions_up_to_a_limit() -> None:
    assert runs([1, 2, 3, 7, 8, 4], 2) == [(1, 2), (3, 1), (7, 2), (4, 1)]
    # One hydrate call's reads run in parallel: sorted first, its neighbours merge.
    assert io_runs([7, 2, 3, 8, 1, 4, 2], 3) == [(1, 3), (4, 1), (7, 2)]


def test_a_boot_profile_batch_needs_far_fewer_reads_sorted() -> None:
    profile = plan_prefetch(parse_profile((DATA / "golden-small.boot.profile").read_text()),
                            65536, 1 << 40)
    batches = [profile[i:i + 128] for i in range(0, len(profile), 128)]
    in_order = sum(len(runs(b, 16)) for b in batches)
    assert sum(len(io_runs(b)) for b in batches) < 0.7 * in_order


def test_background_threshold_follows_the_throttle() -> None:
    assert background_threshold(0, 65536) == 64
    assert background_threshold(20 * MIB, 65536) == 16
    assert background_threshold(1, 65536) == 1


def test_background_waits_until_no_read_but_its_own_for_the_idle_time() -> None:
    gate = QuietGate(idle_seconds=2.0)
    assert gate.open(0.0, device_bytes_read=0, own_bytes_read=0)  # nothing seen yet
    assert gate.open(1.0, 4 * MIB, 4 * MIB)  # only the hydrator's own reads
    assert not gate.open(2.0, 5 * MIB, 4 * MIB)  # a VM (or a child) read 1 MiB
    assert not gate.open(3.5, 5 * MIB, 4 * MIB)  # quiet, but not for 2 s yet
    assert gate.open(4.0, 5 * MIB, 4 * MIB)
    assert not gate.open(4.5, 9 * MIB, 4 * MIB)  # reads again: shut again


def test_background_does_not_wait_for_children_reading_what_it_holds_but_for_their_misses(
        ) -> None:
    gate = QuietGate(idle_seconds=2.0)
    # (now, cache device, own walk, export = the children, -src = upstream)
    assert gate.open(0.0, 4 * MIB, 4 * MIB, 0, 4 * MIB)
    # the children pulled 8 MiB this node holds: nothing more went upstream, still open
    assert gate.open(1.0, 12 * MIB, 4 * MIB, 8 * MIB, 4 * MIB)
    # a child's read of 1 MiB missed here and went on to the parent: shut
    assert not gate.open(1.5, 13 * MIB, 4 * MIB, 9 * MIB, 5 * MIB)
    assert gate.open(3.5, 21 * MIB, 4 * MIB, 17 * MIB, 5 * MIB)  # 2 s on: only held reads
    assert not gate.open(4.0, 22 * MIB, 4 * MIB, 17 * MIB, 5 * MIB)  # a VM here read 1 MiB
    # the walk's own reads go upstream too; the export's counter read late (a dip) is no read
    assert gate.open(6.5, 30 * MIB, 12 * MIB, 17 * MIB, 13 * MIB)
    assert gate.open(7.0, 31 * MIB, 12 * MIB, 19 * MIB, 13 * MIB)  # vms dipped by 1 MiB
    assert gate.open(7.5, 32 * MIB, 12 * MIB, 19 * MIB, 13 * MIB)  # back to the high mark


def test_only_regions_read_and_not_yet_local_are_hydrated_for_their_reads() -> None:
    from vmthunder.node.dm import AreaCounters

    areas = [AreaCounters(0, 128, 2, 16, 0, 0),  # region 0: read, held already
             AreaCounters(128, 128, 1, 8, 0, 0),  # region 1: read by a VM, not held
             AreaCounters(256, 128, 1, 128, 1, 128)]  # region 2: our own read + write-back
    assert plan_read_regions(areas, 65536) == [0, 1]
    assert plan_read_regions(areas, 65536, held=lambda r: r == 0) == [1]


def test_volumes_are_held_while_the_profile_is_prefetched_until_the_hold_ends() -> None:
    import time
    from typing import Any, cast

    def hydrator(hold_until: float) -> Hydrator:  # not started: only its bookkeeping
        return Hydrator("img", cast(Any, None), size=10 * MIB, region_bytes=MIB,
                        profile=[4, 1, 7], queue_depth=8, throttle=0, hold_until=hold_until)

    h = hydrator(time.monotonic() + 60)
    assert h.holding()
    h.hydrated_in_order = 2
    assert h.holding()  # part of the profile is still remote
    h.hydrated_in_order = 3
    assert not h.holding()  # the boot set is local
    assert not hydrator(time.monotonic() - 1).holding()  # the hold has run out
    failed = hydrator(time.monotonic() + 60)
    failed.error = "OSError: parent gone"
    assert not failed.holding()


def test_recorded_lab_profile_format_is_read_and_its_checksum_enforced() -> None:
    import pytest

    from vmthunder.lab.profile import BootProfile, ProfileError, dump_profile
    from vmthunder.lab.profile import Read as LabRead

    p = BootProfile(1 << 20, "0" * 64, "tcg", 1.0, 1.0, (LabRead(4096, 512, 10),))
    text = dump_profile(p)
    assert parse_profile(text) == [Read(4096, 512)]
    with pytest.raises(ProfileError):
        parse_profile(text.replace("4096 512", "4096 1024"))


def test_a_held_failed_path_is_not_reinstated_until_its_backoff_ends() -> None:
    w = want(held_paths=frozenset({"8:0"}))
    seen = stack.Seen(**{**built(w, ORIGIN, CacheState("caching", 3, 1024)).__dict__,
                         "failed_paths": frozenset({"8:0"})})
    assert stack.plan_image(w, seen) == []
    assert stack.plan_image(want(), seen) == [stack.ReinstatePath("8:0")]


def test_read_regions_are_looked_for_only_after_a_read_missed_here() -> None:
    assert plan_missed(None, MissCount(0, 0))  # the first look
    # the walk's own reads went upstream, nothing else: no look
    assert not plan_missed(MissCount(100, 100), MissCount(900, 900))
    # children read only what is held here: -src sees nothing of it
    assert not plan_missed(MissCount(900, 900), MissCount(900, 900))
    # a VM's (or a child's) read of a region not held went on to the parent
    assert plan_missed(MissCount(900, 900), MissCount(1700, 1600))
