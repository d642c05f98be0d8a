"""The CSI driver's pure decisions: capacity, placement, paging, COW sizing and tables."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmthunder.csi.controller import incompatibility, plan_capacity, plan_node, plan_page
from vmthunder.csi.cow import CHUNK_SECTORS, cow_file_size, plan_tables
from vmthunder.csi.errors import CsiError
from vmthunder.csi.kube import NodeInfo, Volume
from vmthunder.csi.names import is_volume_id, volume_id_for

MiB = 1 << 20


def code(call: object) -> grpc.StatusCode:
    with pytest.raises(CsiError) as info:
        call()  # type: ignore[operator]
    return info.value.code


@given(st.integers(0, 1 << 40), st.integers(0, 1 << 40), st.integers(1, 1 << 40))
def test_capacity_covers_request_and_image_in_whole_sectors_or_fails_with_the_spec_code(
    required: int, limit: int, image: int
) -> None:
    try:
        size = plan_capacity(required, limit, image)
    except CsiError as e:
        assert e.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE)
        return
    assert size >= required and size >= image and size % 512 == 0
    assert size - max(required, image) < 512
    assert not limit or size <= limit


def test_capacity_below_the_image_is_out_of_range_and_a_reversed_range_invalid() -> None:
    assert code(lambda: plan_capacity(MiB, 2 * MiB, 64 * MiB)) == grpc.StatusCode.OUT_OF_RANGE
    assert code(lambda: plan_capacity(4 * MiB, 2 * MiB, MiB)) == grpc.StatusCode.INVALID_ARGUMENT
    assert code(lambda: plan_capacity(-1, 0, MiB)) == grpc.StatusCode.INVALID_ARGUMENT


NODES = {n: NodeInfo(n, ready=n != "down") for n in ("a", "b", "c", "down")}


def test_preferred_node_wins_even_when_another_holds_the_image() -> None:
    assert plan_node(["c", "a"], ["a", "c"], NODES, {"a": "Hydrated"}, {}) == "c"


def test_preferred_nodes_outside_requisite_or_unknown_are_passed_over() -> None:
    assert plan_node(["zz", "b"], ["a", "b"], NODES, {}, {}) == "b"
    assert plan_node(["c"], ["a", "b"], NODES, {}, {}) in ("a", "b")


def test_without_preference_a_ready_node_with_a_usable_replica_is_chosen_then_the_least_busy(
) -> None:
    phases = {"b": "Attached", "c": "Pending", "down": "Hydrated"}
    assert plan_node([], [], NODES, phases, {"b": 9}) == "b"
    assert plan_node([], [], NODES, {"c": "Pending"}, {}) == "c"
    # a cache still prefetching is as warm as an attached one (its volumes wait a little)
    assert plan_node([], [], NODES, {"b": "Prefetching", "c": "Pending"}, {"b": 9}) == "b"
    assert plan_node([], [], NODES, {}, {"a": 2, "b": 1, "c": 3}) == "b"
    assert plan_node([], ["zz"], NODES, {}, {}) is None
    assert plan_node([], [], {"down": NODES["down"]}, {}, {}) is None


def test_an_existing_volume_conflicts_on_image_capacity_and_node() -> None:
    v = Volume("x" * 32, "pvc-1", "img", "a", 100 * MiB, "Block")
    assert incompatibility(v, "pvc-1", "img", 100 * MiB, 0, []) is None
    assert incompatibility(v, "pvc-1", "img", 50 * MiB, 200 * MiB, ["a", "b"]) is None
    assert incompatibility(v, "pvc-1", "other", 0, 0, [])
    assert incompatibility(v, "pvc-1", "img", 200 * MiB, 0, [])
    assert incompatibility(v, "pvc-1", "img", 0, 50 * MiB, [])
    assert incompatibility(v, "pvc-1", "img", 0, 0, ["b"])
    assert incompatibility(v, "pvc-2", "img", 0, 0, [])


def test_pages_cover_every_volume_once_even_when_listed_ones_are_deleted_between_pages() -> None:
    ids = sorted(volume_id_for(f"pvc-{i}") for i in range(7))
    page, token = plan_page(ids, "", 3)
    assert page == ids[:3] and token == ids[3]
    rest = [v for v in ids if v not in page]
    page2, token2 = plan_page(rest, token, 3)
    assert page2 == ids[3:6]
    page3, token3 = plan_page(rest[1:], token2, 3)  # the next page's first id was deleted
    assert page3 == ids[6:] and token3 == ""
    assert code(lambda: plan_page(ids, "invalid-token", 0)) == grpc.StatusCode.ABORTED
    assert code(lambda: plan_page(ids, "", -1)) == grpc.StatusCode.INVALID_ARGUMENT


def test_volume_ids_are_deterministic_short_hex() -> None:
    name = "pvc-" + "x" * 200
    assert volume_id_for(name) == volume_id_for(name) != volume_id_for(name + "y")
    assert is_volume_id(volume_id_for(name)) and not is_volume_id("invalid-token")


@given(st.integers(1, 1 << 44))
def test_the_cow_file_holds_every_chunk_and_its_metadata(capacity: int) -> None:
    chunk = CHUNK_SECTORS * 512
    chunks = -(-capacity // chunk)
    size = cow_file_size(capacity)
    assert size % chunk == 0
    # header + one metadata chunk per 256 exceptions + every data chunk
    assert size // chunk >= 1 + chunks + -(-chunks // 256)


def test_tables_pad_the_image_with_zeros_up_to_the_capacity() -> None:
    t = plan_tables("/dev/mapper/vmt-img", 1000, 3000, "/dev/mapper/base", "/dev/loop3")
    assert [x.line() for x in t.base] == ["0 1000 linear /dev/mapper/vmt-img 0",
                                          "1000 2000 zero"]
    assert [x.line() for x in t.top] == ["0 3000 snapshot /dev/mapper/base /dev/loop3 P 8"]
    same = plan_tables("253:0", 1000, 1000, "253:1", "7:0")
    assert len(same.base) == 1 and same.top[0].length == 1000
