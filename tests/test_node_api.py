"""The agent's watched view of the API server: which changes wake its round (pure pieces)."""

from __future__ import annotations

from typing import Any

from vmthunder.node.api import cache_concerns, concerns
from vmthunder.operator.reconcile import selects


def replica(image: str, node: str, parent: str, **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": f"{image}.{node}", "labels": {"vmthunder.io/node": node,
                                                               "vmthunder.io/image-cache": image}},
            "spec": {"imageCache": image, "parent": parent}, "status": status}


def test_the_watched_replicas_are_filtered_by_all_the_labels_asked_for() -> None:
    labels = {"vmthunder.io/node": "n1", "vmthunder.io/image-cache": "golden"}
    assert selects({"vmthunder.io/node": "n1"}, labels)
    assert selects({"vmthunder.io/node": "n1", "vmthunder.io/image-cache": "golden"}, labels)
    assert not selects({"vmthunder.io/node": "n2"}, labels)
    assert not selects({"vmthunder.io/zone": "a"}, labels)


def test_a_round_wakes_for_its_own_spec_its_children_and_its_parent_not_for_strangers() -> None:
    mine = replica("golden", "n2", "n1")
    index = {"golden.n2": mine}
    # its own replica: created, deleted, re-parented wake it; its own status write does not
    assert concerns("n2", index, None, mine)
    assert concerns("n2", index, mine, None)
    assert concerns("n2", index, mine, replica("golden", "n2", "@origin"))
    assert not concerns("n2", index, mine, replica("golden", "n2", "n1", phase="Hydrating"))
    # the parent's status (export address, progress) and a child's (its initiator name)
    assert concerns("n2", index, None, replica("golden", "n1", "@origin", phase="Attached"))
    assert concerns("n2", index, None, replica("golden", "n3", "n2", phase="Pending"))
    # a sibling, another image's replica on the parent's node, a stranger
    assert not concerns("n2", index, None, replica("golden", "n4", "n1", phase="Attached"))
    assert not concerns("n2", index, None, replica("other", "n1", "@origin", phase="Attached"))
    assert not concerns("n2", index, None, replica("golden", "n9", "n7", phase="Attached"))


def test_a_childs_progress_does_not_wake_its_parent_but_its_initiator_and_prefetch_do() -> None:
    index = {"golden.n2": replica("golden", "n2", "n1")}
    child = replica("golden", "n3", "n2", phase="Hydrating", hydratedRegions=10)
    progressed = replica("golden", "n3", "n2", phase="Hydrating", hydratedRegions=20,
                         bytesFromParent=1 << 20)
    assert not concerns("n2", index, child, progressed)
    initiator = [{"type": "Initiator", "status": "True", "message": "iqn.2026-12.io:n3"}]
    assert concerns("n2", index, child, replica("golden", "n3", "n2", phase="Hydrating",
                                                hydratedRegions=10, conditions=initiator))
    assert concerns("n2", index, child, replica("golden", "n3", "n2", phase="Prefetching",
                                                holdUntil="2026-12-07T12:00:00Z"))
    assert concerns("n2", index, child, None)


def test_an_image_caches_counters_and_prefetch_end_do_not_wake_the_agents() -> None:
    def cache(size: int | None = None, **status: Any) -> dict[str, Any]:
        return {"metadata": {"name": "golden"}, "spec": {"fanout": 2},
                "status": {"imageSizeBytes": size, **status}}

    old = cache(originBytesServed=1, prefetchingUntil="2026-12-07T12:00:00Z")
    assert not cache_concerns(old, cache(originBytesServed=2 << 20, hydratedCount=3))
    assert cache_concerns(old, cache(size=1 << 30, originBytesServed=1))  # the size found
    assert cache_concerns(old, {**old, "spec": {"fanout": 4}})
    assert cache_concerns(old, {**old, "metadata": {"name": "golden",
                                                    "deletionTimestamp": "2026-12-07T12:00:00Z"}})
    assert cache_concerns(None, old) and cache_concerns(old, None)


def test_a_parents_heartbeat_and_counters_do_not_wake_its_child_but_what_it_reads_does() -> None:
    index = {"golden.n2": replica("golden", "n2", "n1")}
    address = {"portal": "10.0.0.1:3260", "iqn": "iqn.2026-12.io.vmthunder:n1.golden"}
    parent = replica("golden", "n1", "@origin", phase="Prefetching", hydratedInOrder=128,
                     heartbeat="2026-12-07T12:00:00Z", bytesFromParent=1 << 20,
                     exportAddress=address, exportInitiators=["iqn.n2"])
    beat = replica("golden", "n1", "@origin", **{**parent["status"],
                                                  "heartbeat": "2026-12-07T12:00:15Z",
                                                  "bytesFromParent": 2 << 20,
                                                  "hydratedRegions": 300})
    assert not concerns("n2", index, parent, beat)
    for field, value in (("hydratedInOrder", 256), ("phase", "Hydrating"),
                         ("exportInitiators", ["iqn.n2", "iqn.n4"]),
                         ("exportAddress", {**address, "portal": "10.0.0.9:3260"}),
                         ("holdUntil", "2026-12-07T12:01:00Z"), ("imageSizeBytes", 1 << 30)):
        moved = replica("golden", "n1", "@origin", **{**parent["status"], field: value})
        assert concerns("n2", index, parent, moved), field
    # a sibling's (another child of n1) does not, whatever moves
    sibling = replica("golden", "n4", "n1", phase="Prefetching", hydratedInOrder=1)
    assert not concerns("n2", index, sibling,
                        replica("golden", "n4", "n1", phase="Hydrating", hydratedInOrder=9))
