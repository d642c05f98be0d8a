"""Kill/restart cycles (issue 10): the agent, the CSI node plugin, the CSI controller and the
operator SIGKILLed at random points while an ImageCache is applied, a volume is created,
staged and published, and the ImageCache is deleted with its volume, in the lab (origin + 2
nodes, a 64 MiB image): every component in each of the three cycles, each at its own random
moment, and restarted at once; then an aimed cycle kills each agent the moment its
teardown of a deleted image removes the image's -src (once a leak: the parent's session
outlived it). Each time the cluster converges from kernel and API state,
and nothing is leaked (vmthunder.lab.killrestart). bench/kill_restart.py runs the long
version (50 cycles, one kill each).

The seed is printed; VMT_KILL_SEED=<n> replays a run's choices (victims' nodes, moments).

Cost: about 6 minutes of 2 cores under TCG on an idle machine (measured 6 min 15 s: lab and
services ~2 min, three cycles of 55-110 s, a check that nothing is left); more when other labs
share the cores."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fault_table import record

from vmthunder.lab.killrestart import (
    COMPONENTS,
    WORK_OF,
    Chaos,
    ReplicaView,
    Vol,
    World,
    api_problems,
    format_summary,
    kill_schedule,
    node_problems,
    parse_census,
    plan_action,
    small_image,
)
from vmthunder.lab.provision import Options, Rig

NODES = ["node-00", "node-01"]
INITIATORS = {n: f"iqn.lab:{n}" for n in NODES}
VID = "a" * 32
GONE = "b" * 32

# What the census command prints on node-00 holding image "kr0" (parent: the origin; child:
# node-01) with one published volume.
CLEAN = f"""@dm
vmt-kr0
vmt-kr0-exp
vmt-kr0-src
vmt-vol-{VID}
vmt-vol-{VID}-base
@src
vmt-kr0-src: 0 131072 multipath 1 queue_if_no_path 0 1 1 round-robin 0 1 1 8:0 1000
@sessions
iqn.2026-11.io.vmthunder.lab9.origin:golden|LOGGED_IN|8:0,
@lio
iqn.2026-11.io.vmthunder:node-00.kr0|lun_0,|iqn.lab:node-01,
@backstores
vmt-kr0
@loops
loop0|/var/lib/vmthunder/volumes/{VID}.cow
@cow
{VID}.cow
@staging
{VID}
@mounts
/var/lib/kubelet/pods/chaos/volumeDevices/kubernetes.io~csi/{VID}
@marks
{VID}|{VID}
@procs
agent|1
csi-node|1
@end
"""


def _world() -> World:
    w = World(images={"kr0": "Never"}, deleted_images={"kr1"}, deleted_volumes={GONE})
    w.volumes[VID] = Vol(VID, "kr0", "node-00", "pvc-1")
    return w


REPLICAS = [ReplicaView("kr0", "node-00", "@origin", "Hydrating", True),
            ReplicaView("kr0", "node-01", "node-00", "Attached", True)]


def _check(text: str, world: World | None = None) -> tuple[list[str], list[str]]:
    p = node_problems(parse_census("node-00", text), world or _world(), REPLICAS, INITIATORS)
    return p.missing, p.leaks


def test_a_node_holding_exactly_what_is_wanted_has_no_problem() -> None:
    c = parse_census("node-00", CLEAN)
    assert c.complete and c.sessions[0].devices == ("8:0",)
    assert c.src_devices == {"vmt-kr0-src": ("8:0",)}
    assert _check(CLEAN) == ([], [])


def test_leftovers_of_a_deleted_image_are_leaks() -> None:
    text = CLEAN.replace("@src\n", "@src\nvmt-kr1-src: 0 8 linear 8:16 0\n").replace(
        "@dm\n", "@dm\nvmt-kr1\nvmt-kr1-src\n").replace(
        "@lio\n", "@lio\niqn.2026-11.io.vmthunder:node-00.kr1|lun_0,|\n").replace(
        "@backstores\n", "@backstores\nvmt-kr1\n").replace(
        "@sessions\n", "@sessions\niqn.2026-11.io.vmthunder:node-01.kr1|LOGGED_IN|8:16,\n")
    missing, leaks = _check(text)
    assert missing == []
    assert len(leaks) == 5 and all("deleted image kr1" in x for x in leaks), leaks


def test_a_session_no_source_reads_is_a_leak() -> None:
    text = CLEAN.replace("8:0,\n", "8:0,\niqn.2026-11.io.vmthunder:node-01.kr0|FAILED|8:32,\n")
    assert _check(text)[1] == ["node-00: iSCSI session to iqn.2026-11.io.vmthunder:node-01.kr0 "
                               "(FAILED, disks 8:32) that no -src reads"]


def test_leftovers_of_a_deleted_volume_are_leaks_and_a_live_one_unstaged_is_missing() -> None:
    text = (CLEAN.replace(f"vmt-vol-{VID}\nvmt-vol-{VID}-base\n", f"vmt-vol-{GONE}\n")
            .replace(f"loop0|/var/lib/vmthunder/volumes/{VID}.cow",
                     f"loop0|/var/lib/vmthunder/volumes/{VID}.cow\n"
                     f"loop1|/var/lib/vmthunder/volumes/{GONE}.cow (deleted)")
            .replace("@cow\n", f"@cow\n{GONE}.cow\n"))
    missing, leaks = _check(text)
    assert missing == [f"node-00: dm vmt-vol-{VID}: none (not staged)"]
    assert len(leaks) == 3 and all(f"deleted volume {GONE}" in x for x in leaks), leaks


def test_a_stale_acl_a_second_agent_and_lost_data_are_problems() -> None:
    text = (CLEAN.replace("|iqn.lab:node-01,", "|iqn.lab:node-01,iqn.lab:node-07,")
            .replace("agent|1", "agent|2").replace(f"{VID}|{VID}", f"{VID}|...."))
    missing, leaks = _check(text)
    assert "node-00: 2 agent processes" in leaks
    assert any("LIO ACL iqn.lab:node-07" in x for x in leaks)
    assert any("reads '....'" in x for x in missing)


def test_an_incomplete_census_is_never_clean() -> None:
    assert _check(CLEAN.replace("@end\n", ""))[0] == ["node-00: census incomplete"]


def test_api_orphans_and_unready_replicas_are_reported() -> None:
    w = _world()
    replicas = [*REPLICAS[:1], ReplicaView("kr0", "node-01", "node-00", "Attaching", False),
                ReplicaView("kr1", "node-00", "@origin", "Detached", True)]
    p = api_problems(w, NODES, ["kr0"], replicas, {VID: "Published", GONE: "Pending"}, 2, 1)
    assert p.missing == ["ImageReplica kr0.node-01: phase Attaching, ready False"]
    assert p.leaks == ["ImageReplica kr1.node-00 of deleted ImageCache kr1",
                       f"ImageVolume {GONE} of a deleted volume (phase Pending)"]
    ok = api_problems(w, NODES, ["kr0"], REPLICAS, {VID: "Published"}, 2, 1)
    assert not ok


def test_every_component_is_killed_twice_and_its_work_is_what_it_takes_part_in() -> None:
    rng = random.Random(3)
    one = [c for (c,) in kill_schedule(9, rng)]
    assert len(one) == 9 and all(one[:8].count(c) == 2 for c in COMPONENTS)
    two = kill_schedule(4, rng, per_cycle=2)
    assert len(two) == 4 and all(sum(c in p for p in two) == 2 for c in COMPONENTS)
    assert all(p[0] in ("agent", "csi-node") for p in two)  # one in a node, one on the host
    assert all(sorted(p) == sorted(COMPONENTS) for p in kill_schedule(3, rng, per_cycle=4))
    w = World()
    assert plan_action(w, NODES, ["csi-controller"], rng).kind == "apply-image"  # nothing else
    assert plan_action(w, NODES, ["agent"], rng, "delete-image").kind == "apply-image"
    w.images["kr0"] = "Never"
    for _ in range(20):
        assert plan_action(w, NODES, ["csi-node"], rng).kind in WORK_OF["csi-node"]
        assert plan_action(w, NODES, ["operator"], rng).kind in WORK_OF["operator"]


# --- in the lab -----------------------------------------------------------------------------

# Every component killed in every cycle, at its own random moment: an ImageCache applied, a
# volume created, staged and published, then the ImageCache deleted with its volume.
WORK = ("apply-image", "create-volume", "delete-image")


@pytest.fixture(scope="module")
def chaos() -> Iterator[tuple[Chaos, dict[str, Any], float]]:
    seed = int(os.environ.get("VMT_KILL_SEED") or time.time_ns() % 100000)
    print(f"\nseed {seed} (VMT_KILL_SEED={seed} replays it)")
    t0 = time.monotonic()
    slot = os.environ.get("VMT_LAB_SLOT")  # a fixed lab slot, beside other engineers' labs
    rig = Rig.start(Options(nodes=2, image=str(small_image()), live=False,
                            slot=int(slot) if slot else None))
    try:
        c = Chaos(rig, seed, converge_timeout=240)
        schedule = kill_schedule(len(WORK), random.Random(seed), per_cycle=len(COMPONENTS))
        for i, (kind, victims) in enumerate(zip(WORK, schedule, strict=True)):
            c.cycle(i, victims, kind)
        c.aimed_cycle(len(WORK))
        c.finish()
        s = c.summary()
        print(format_summary(s))
        if s["converged"] != s["cycles"] or s["leaks"] or c.final:
            print(rig.logs())
        yield c, s, time.monotonic() - t0
    finally:
        rig.close()


@pytest.mark.lab
@pytest.mark.apiserver
def test_every_component_killed_at_random_converges_with_nothing_leaked(
        chaos: tuple[Chaos, dict[str, Any], float]) -> None:
    c, s, wall = chaos
    record(f"SIGKILL of agent/CSI node/CSI controller/operator ({len(WORK)} cycles)",
           injected=sum(s["kills"].values()),
           survived=all(r.error == "" and r.converged for r in c.records),
           bytes_verified=0, leaks=s["leaks"])
    assert all(s["kills"][comp] >= 2 for comp in COMPONENTS), s["kills"]
    aimed = c.records[-1]
    assert all(k.killed for k in aimed.kills), aimed.line()  # each agent died at the moment
    for r in c.records:
        assert r.error == "", r.line()
        assert r.converged, (r.line(), r.missing, r.leaks)
    assert s["leaks"] == 0, s["leak_list"]
    print(f"wall {wall:.0f} s")


@pytest.mark.lab
@pytest.mark.apiserver
def test_after_everything_is_deleted_no_stack_session_export_or_object_is_left(
        chaos: tuple[Chaos, dict[str, Any], float]) -> None:
    c, s, _ = chaos
    assert c.final is not None
    assert not c.final, (c.final.missing, c.final.leaks)
    # The census saw the kinds of state it judges (a check reading nothing would pass).
    for kind in ("sessions with a disk", "-src tables", "LIO targets", "LIO ACLs",
                 "loop devices", "COW files", "published volumes"):
        assert s["seen"].get(kind, 0) > 0, (kind, s["seen"])
