"""Pure parts of the dmsetup wrapper: table lines and status parsing."""

from __future__ import annotations

from vmthunder.node import dm


def test_clone_table_line_disables_hydration_and_discard_passdown_by_default() -> None:
    t = dm.clone(2048, dm.CloneArgs("/dev/m", "/dev/d", "/dev/mapper/vmt-x-src", 128))
    assert t.line() == ("0 2048 clone /dev/m /dev/d /dev/mapper/vmt-x-src 128 "
                        "2 no_hydration no_discard_passdown")


def test_clone_table_line_carries_core_args() -> None:
    t = dm.clone(8, dm.CloneArgs("m", "d", "s", 8, hydration=True, hydration_threshold=64,
                                 hydration_batch_size=32, discard_passdown=True))
    assert t.line() == "0 8 clone m d s 8 0 4 hydration_threshold 64 hydration_batch_size 32"


def test_target_line_round_trips() -> None:
    line = "0 131072 linear 8:0 0"
    assert dm.Target.parse(line).line() == line


def test_clone_status_parses_counts_features_and_core_args() -> None:
    fields = ("8", "72/4096", "128", "10/512", "2", "1", "no_hydration",
              "4", "hydration_threshold", "1", "hydration_batch_size", "1", "rw")
    st = dm.CloneStatus.parse(fields)
    assert (st.hydrated, st.total, st.hydrating, st.region_sectors) == (10, 512, 2, 128)
    assert st.features == ("no_hydration",)
    assert st.core == {"hydration_threshold": "1", "hydration_batch_size": "1"}
    assert not st.complete and not st.failed


def test_clone_status_fail_is_failed_not_complete() -> None:
    st = dm.CloneStatus.parse(("Fail",))
    assert st.failed and not st.complete


def test_multipath_table_queues_when_no_path() -> None:
    t = dm.multipath(100, ["8:0"])
    assert t.line() == "0 100 multipath 1 queue_if_no_path 0 1 1 round-robin 0 1 1 8:0 1"
    # without a path yet: no priority group at all (an empty one is refused by the kernel)
    assert dm.multipath(100, []).line() == "0 100 multipath 1 queue_if_no_path 0 0 0"


def test_snapshot_table_is_persistent_by_default() -> None:
    assert dm.snapshot(10, "/dev/mapper/vmt-img", "/dev/loop1").line() == (
        "0 10 snapshot /dev/mapper/vmt-img /dev/loop1 P 16")


def test_multipath_status_names_the_failed_paths() -> None:
    def failed(status: str) -> frozenset[str]:
        return dm.multipath_failed_paths(status.split())

    # features (2 values), no handler, one group (active, round-robin: no status), two paths
    # with no selector info: 8:0 active, 8:16 failed twice
    assert failed("2 1 0 0 1 1 A 0 2 0 8:0 A 0 8:16 F 2") == frozenset({"8:16"})
    # queue-length selector: one info value per path; two groups
    assert failed("2 0 0 0 2 1 A 0 1 1 8:0 F 1 0 E 0 1 1 8:32 A 0 3") == frozenset({"8:0"})
    assert failed("2 0 0 0 1 1 A 0 1 0 8:0 A 0") == frozenset()
    assert failed("2 1 0 0 0 0") == frozenset()  # no group: no path yet


def test_stats_keep_only_the_areas_that_saw_io() -> None:
    out = ("0+128 0 0 0 0 0 0 0 0 0 0 0 0 0\n"
           "128+128 3 0 24 1 0 0 0 0 0 2 2 0 0\n"
           "256+128 0 0 0 0 0 0 0 0 0 0 0 0 0\n"
           "384+128 1 0 8 0 2 0 16 1 0 1 1 0 0\n")
    assert dm.parse_stats(out) == [dm.AreaCounters(128, 128, 3, 24, 0, 0),
                                   dm.AreaCounters(384, 128, 1, 8, 2, 16)]
