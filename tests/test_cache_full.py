"""A node whose cache disk is full, in the lab: the real control plane, operator, CSI driver
and agent (vmthunder.lab.provision), origin -> node-00.

1. The cache filesystem is filled before the ImageCache exists: the node passes reads through
   to its parent uncached. Its VM boots and reads the image's exact bytes; the replica is
   usable and says why it does not cache (condition Cached=False, CacheDiskFull) and a
   Warning Event says it once.
2. The room comes back: the agent turns the pass-through into a cache under the live volume,
   the volume still reads the image, and the filesystem is filled to the last block while the
   cache hydrates. The cache reserved its blocks when it was built, so it completes, detaches
   and holds the image's exact bytes.

Cost: about 9 minutes of 2 cores under TCG.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fault_table import record
from waiting import wait_for

from vmthunder.lab.provision import CACHE_DIR, Options, Rig, Run
from vmthunder.node import labdrive, names
from vmthunder.node.agent import CACHE_CONDITION
from vmthunder.node.api import EVENTS_NAMESPACE
from vmthunder.operator.model import GROUP, VERSION, replica_name

IMAGE = "full"
FILLER = f"{CACHE_DIR}/filler"
LEFT_FREE = 256 << 20  # room for the volume's sparse COW file, far from the image's 768 MiB


def _replica(rig: Rig, node: str) -> dict[str, Any]:
    return rig.custom().get_cluster_custom_object(  # type: ignore[no-any-return]
        GROUP, VERSION, "imagereplicas", replica_name(IMAGE, node))


def _cached(replica: dict[str, Any]) -> dict[str, Any]:
    conds = (replica.get("status") or {}).get("conditions") or []
    return next((c for c in conds if c["type"] == CACHE_CONDITION), {})


def _events(rig: Rig, node: str) -> list[tuple[str, str, str]]:
    import kubernetes

    res = kubernetes.client.CoreV1Api(rig.api).list_namespaced_event(
        EVENTS_NAMESPACE, field_selector=f"involvedObject.name={replica_name(IMAGE, node)}")
    return [(str(e.type), str(e.reason), str(e.message)) for e in res.items]


@pytest.fixture(scope="module")
def full() -> Iterator[tuple[Rig, Run]]:
    rig = Rig.start(Options(nodes=1, live=False))
    try:
        g = rig.lab.nodes[0]
        fs = g.run(f"stat -f -c %T {CACHE_DIR}", check=True).stdout.strip()
        assert fs == "ext2/ext3", fs  # the node's own cache disk, as on a real node
        g.run(f"avail=$(df -B1 --output=avail {CACHE_DIR} | tail -1); "
              f"fallocate -l $((avail - {LEFT_FREE})) {FILLER}", timeout=60, check=True)
        yield rig, rig.provision(IMAGE, wait_hydrated=False)
    finally:
        rig.close()


@pytest.mark.lab
@pytest.mark.apiserver
def test_a_node_without_room_passes_reads_through_and_says_why(full: tuple[Rig, Run]) -> None:
    rig, run = full
    g = rig.lab.nodes[0]
    [n] = run.nodes
    record("cache disk full before the image came", survived=n.read_error is None and n.sha_ok,
           bytes_verified=rig.profile.bytes_read)
    assert n.read_error is None and n.sha_ok, (n, rig.logs())  # the VM booted the exact image
    r = _replica(rig, g.name)
    assert r["status"]["phase"] == "Attached", r["status"]
    # It reads from its parent, uncached: a failed round keeps a lost session's mark by this.
    assert r["status"]["attachedParent"] == r["spec"]["parent"], r["status"]
    cond = _cached(r)
    assert (cond.get("status"), cond.get("reason")) == ("False", "CacheDiskFull"), r["status"]
    assert CACHE_DIR in cond["message"] and "MiB" in cond["message"]
    warnings = [e for e in _events(rig, g.name) if e[1] == "CacheDiskFull"]
    assert len(warnings) == 1 and warnings[0][0] == "Warning", _events(rig, g.name)
    table = g.run(f"dmsetup table {names.cache_dev(IMAGE)}", check=True).stdout.split()
    src = g.run(f"dmsetup info -c --noheadings -o major,minor --separator : "
                f"{names.src_dev(IMAGE)}", check=True).stdout.strip()
    assert table[2:4] == ["linear", src], table  # straight over -src: nothing cached
    assert not g.run(f"ls {CACHE_DIR}/{IMAGE}/data", timeout=20).ok  # no cache file


@pytest.mark.lab
@pytest.mark.apiserver
def test_with_room_again_the_cache_is_built_under_the_volume_and_survives_a_full_disk(
        full: tuple[Rig, Run]) -> None:
    rig, _ = full
    g = rig.lab.nodes[0]
    image_sha = labdrive.sha256_file(rig.disk)
    size = rig.profile.image_size
    g.run(f"rm -f {FILLER}", check=True)
    wait_for("the cache is built",
             lambda: _cached(_replica(rig, g.name)).get("status") == "True", 120, 1)
    # Fill the filesystem to the last block while the cache hydrates.
    g.run(f"fallocate -l $(df -B1 --output=avail {CACHE_DIR} | tail -1) {FILLER}",
          timeout=60, check=True)
    assert g.run(f"df -B1 --output=avail {CACHE_DIR} | tail -1").stdout.strip() == "0"
    events = [e[:2] for e in _events(rig, g.name)]
    assert ("Normal", "CacheBuilt") in events, events
    volume = g.run("ls /dev/mapper | grep '^vmt-vol-' | grep -v -- '-base$'",
                   check=True).stdout.split()
    assert len(volume) == 1, volume
    assert labdrive.guest_sha256(g, f"/dev/mapper/{volume[0]}", size) == image_sha
    wait_for("the cache detaches",
             lambda: (_replica(rig, g.name).get("status") or {}).get("phase") == "Detached",
             600, 2)
    cached = labdrive.guest_sha256(g, f"/dev/mapper/{names.cache_dev(IMAGE)}", size)
    errors = g.run("dmesg | grep -e 'I/O error' -e 'device-mapper: clone' || true").stdout
    record("cache disk filled while hydrating", survived=cached == image_sha and not errors,
           bytes_verified=2 * size)
    assert cached == image_sha
    assert not errors.strip(), errors
