"""The operator against a real kube-apiserver + etcd + kube-controller-manager."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from waiting import wait_for

from vmthunder.lab.controlplane import ControlPlane
from vmthunder.lab.nodes import ZONE_LABEL, register_node, set_node_ready
from vmthunder.operator.model import GROUP, IMAGE_CACHES, IMAGE_REPLICAS, IMAGE_VOLUMES, VERSION
from vmthunder.operator.planner import ORIGIN

pytestmark = pytest.mark.apiserver
# The API server is shared by the session: these tests select only the nodes they register.
MINE = "test.vmthunder.io/operator"




class Cluster:
    """Test-side access to the API server, as a user or a kubelet would write."""

    def __init__(self, cp: ControlPlane, operator_log: Path) -> None:
        self.cp = cp
        self.operator_log = operator_log
        client = kubernetes.config.new_client_from_config(str(cp.kubeconfig))
        self.core = kubernetes.client.CoreV1Api(client)
        self.custom = kubernetes.client.CustomObjectsApi(client)

    def add_node(self, name: str, zone: str | None = None) -> None:
        labels = {MINE: "yes", **({ZONE_LABEL: zone} if zone else {})}
        register_node(self.core, name, labels)

    def set_ready(self, name: str, ready: bool) -> None:
        set_node_ready(self.core, name, ready)

    def replicas(self, cache: str) -> dict[str, dict[str, Any]]:
        items = self.custom.list_cluster_custom_object(
            GROUP, VERSION, IMAGE_REPLICAS, label_selector=f"vmthunder.io/image-cache={cache}"
        )["items"]
        return {r["spec"]["node"]: r for r in items}

    def parents(self, cache: str) -> dict[str, str]:
        return {node: r["spec"]["parent"] for node, r in self.replicas(cache).items()}

    def cache(self, name: str) -> dict[str, Any]:
        obj: dict[str, Any] = self.custom.get_cluster_custom_object(
            GROUP, VERSION, IMAGE_CACHES, name)
        return obj

    def apply(self, manifest: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        return self.cp.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest), check=False)

    def set_replica_status(self, cache: str, node: str, **status: Any) -> None:
        self.custom.patch_cluster_custom_object_status(
            GROUP, VERSION, IMAGE_REPLICAS, f"{cache}.{node}", {"status": status})


def image_cache(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ImageCache",
        "metadata": {"name": name},
        "spec": {"source": {"http": {"url": "http://images.example/golden.raw"}}, **spec},
    }


@pytest.fixture(scope="module")
def cluster(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Cluster]:
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    operator = control_plane.spawn_operator(log, priority=10)
    try:
        yield Cluster(control_plane, log)
    finally:
        operator.terminate()
        operator.wait(timeout=30)
        if os.environ.get("VMT_SHOW_LOGS"):
            print(log.read_text())


def assert_valid_tree(parents: dict[str, str], fanout: int) -> int:
    """Every parent is the origin or a member; no cycles; no fan-out exceeded. Returns depth."""
    children: dict[str, int] = {}
    for node, parent in parents.items():
        assert parent == ORIGIN or parent in parents, f"{node} has unknown parent {parent}"
        children[parent] = children.get(parent, 0) + 1
    assert all(count <= fanout for count in children.values()), children
    depth = 0
    for node in parents:
        seen, hops = set(), 0
        while node != ORIGIN:
            assert node not in seen, f"cycle through {node}"
            seen.add(node)
            node, hops = parents[node], hops + 1
        depth = max(depth, hops)
    return depth


def assert_labeled_with_their_parents(replicas: dict[str, dict[str, Any]]) -> None:
    """Agents watch their children by vmthunder.io/parent ("" under the origin)."""
    for node, r in replicas.items():
        parent = r["spec"]["parent"]
        assert r["metadata"]["labels"].get("vmthunder.io/parent") == (
            "" if parent == ORIGIN else parent), node


def test_every_node_gets_a_replica_with_a_valid_parent(cluster: Cluster) -> None:
    for i in range(50):
        cluster.add_node(f"node-{i:02d}", zone=f"zone-{i % 2}")
    golden = image_cache("golden", fanout=3, nodeSelector={MINE: "yes"})
    assert cluster.apply(golden).returncode == 0

    parents = wait_for("50 replicas",
                       lambda: (p := cluster.parents("golden")) and len(p) == 50 and p)
    depth = assert_valid_tree(parents, fanout=3)
    assert_labeled_with_their_parents(cluster.replicas("golden"))
    status = wait_for("status", lambda: cluster.cache("golden").get("status", {}).get("nodeCount"))
    assert status == 50
    cache = cluster.cache("golden")
    assert cache["status"]["treeDepth"] == depth
    assert cache["status"]["observedGeneration"] == cache["metadata"]["generation"]
    assert cache["status"]["phase"] == "Distributing"
    # each zone is one subtree: only its entry node has a parent outside the zone
    for zone in ("zone-0", "zone-1"):
        members = {f"node-{i:02d}" for i in range(50) if f"zone-{i % 2}" == zone}
        entries = [n for n in members if parents[n] not in members]
        assert len(entries) == 1, entries


def test_notready_nodes_children_are_reparented_and_healthy_subtrees_kept(cluster: Cluster) -> None:
    before = cluster.parents("golden")
    with_children = sorted({p for p in before.values() if p != ORIGIN})
    failing = set(with_children[:5])
    for name in failing:
        cluster.set_ready(name, False)

    def repaired() -> dict[str, str] | None:
        now = cluster.parents("golden")
        return now if not any(p in failing for n, p in now.items() if n not in failing) else None

    after = wait_for("orphans re-parented", repaired)
    assert_valid_tree({n: p for n, p in after.items() if n not in failing}, fanout=3)
    for node, parent in before.items():
        if node not in failing and parent not in failing:
            assert after[node] == parent, f"{node} moved although its parent {parent} is healthy"
    # the label moved with the parent (one write): the new parent's agent sees its child
    assert_labeled_with_their_parents(cluster.replicas("golden"))
    reasons = wait_for("Planned and Reparented events", lambda: (
        r := {e.reason for e in cluster.core.list_namespaced_event(
            "default", field_selector="involvedObject.name=golden").items}
    ) >= {"Planned", "Reparented"} and r)
    assert "Reparented" in reasons
    for name in failing:
        cluster.set_ready(name, True)


def test_failed_or_silent_replica_loses_its_children(cluster: Cluster) -> None:
    parents = cluster.parents("golden")
    parent_nodes = sorted({p for p in parents.values() if p != ORIGIN})
    failed, silent = parent_nodes[0], parent_nodes[1]
    cluster.set_replica_status("golden", failed, phase="Failed", message="cache disk full")
    stale = (datetime.now(UTC) - timedelta(minutes=10)).isoformat().replace("+00:00", "Z")
    cluster.set_replica_status("golden", silent, phase="Hydrating", heartbeat=stale)
    wait_for("children moved off the failed and the silent node",
             lambda: not {failed, silent} & set(cluster.parents("golden").values()))
    assert wait_for("Degraded", lambda: cluster.cache("golden")["status"]["phase"] == "Degraded")
    cluster.set_replica_status("golden", failed, phase="Attached", message="")
    cluster.set_replica_status("golden", silent, heartbeat=datetime.now(UTC).isoformat())


def test_the_image_size_a_node_found_goes_into_the_image_cache_s_status(cluster: Cluster
                                                                        ) -> None:
    # "golden" gives no spec.sizeBytes: CreateVolume sizes volumes by the status's.
    assert "imageSizeBytes" not in cluster.cache("golden")["status"]
    root = sorted(n for n, p in cluster.parents("golden").items() if p == ORIGIN)[0]
    cluster.set_replica_status("golden", root, imageSizeBytes=768 << 20)
    assert wait_for("the ImageCache's imageSizeBytes",
                    lambda: cluster.cache("golden")["status"].get("imageSizeBytes")) == 768 << 20


def _lose_a_parent(cluster: Cluster, beat_ago: float, timeout: float) -> float:
    """A parent whose last heartbeat was `beat_ago` s ago and a child that lost its session to
    it; returns how long its children took to move."""
    parents = cluster.parents("golden")
    parent = sorted({p for p in parents.values() if p != ORIGIN})[2]
    child = sorted(n for n, p in parents.items() if p == parent)[0]
    now = datetime.now(UTC)
    beat = (now - timedelta(seconds=beat_ago)).isoformat().replace("+00:00", "Z")
    cluster.set_replica_status("golden", parent, phase="Hydrating", heartbeat=beat)
    cluster.set_replica_status("golden", child, phase="Hydrating",
                               heartbeat=now.isoformat().replace("+00:00", "Z"),
                               parentLostAt=now.isoformat().replace("+00:00", "Z"))
    t0 = time.monotonic()
    wait_for("children moved off the lost parent",
             lambda: parent not in set(cluster.parents("golden").values()), timeout=timeout)
    took = time.monotonic() - t0
    cluster.set_replica_status("golden", parent, heartbeat=datetime.now(UTC).isoformat())
    cluster.set_replica_status("golden", child, parentLostAt=None)
    return took


def test_a_parent_its_child_lost_and_that_missed_a_heartbeat_loses_its_children(
        cluster: Cluster) -> None:
    _lose_a_parent(cluster, beat_ago=30, timeout=30)  # missed, not yet stale (60 s)


def test_a_lost_parent_s_children_move_when_its_heartbeat_falls_due_not_at_the_resync(
        cluster: Cluster) -> None:
    # The child's word alone changes nothing (its parent still heartbeats); the next plan is
    # due when the heartbeat is missed, 10 s on, well before the 20 s resync.
    took = _lose_a_parent(cluster, beat_ago=10, timeout=17)
    assert took > 8  # not before the heartbeat was missed


def test_node_with_a_volume_gets_a_replica_on_demand(cluster: Cluster) -> None:
    cluster.add_node("lonely", zone="zone-9")
    assert cluster.apply(image_cache("on-demand", fanout=2)).returncode == 0
    time.sleep(1)
    assert cluster.replicas("on-demand") == {}  # no selector: nothing pre-warmed
    cluster.custom.create_cluster_custom_object(GROUP, VERSION, IMAGE_VOLUMES, {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "ImageVolume",
        "metadata": {"name": "vol-1"},
        "spec": {"imageCache": "on-demand", "node": "lonely", "capacityBytes": 1 << 30},
    })
    replica = wait_for("on-demand replica", lambda: cluster.replicas("on-demand").get("lonely"))
    assert replica["spec"]["parent"] == ORIGIN and replica["spec"]["depth"] == 1


def test_deleted_node_loses_its_replica(cluster: Cluster) -> None:
    leaf = next(n for n, p in sorted(cluster.parents("golden").items())
                if n not in cluster.parents("golden").values())
    cluster.core.delete_node(leaf)
    wait_for("replica of deleted node gone", lambda: leaf not in cluster.replicas("golden"))


def test_deleting_the_imagecache_removes_its_replicas(cluster: Cluster) -> None:
    assert cluster.replicas("golden")
    cluster.cp.kubectl("delete", "imagecache", "golden", "--wait=true", "--timeout=60s")
    wait_for("replicas garbage-collected", lambda: cluster.replicas("golden") == {})


def test_only_the_highest_priority_operator_replica_works(cluster: Cluster, tmp_path: Path
                                                         ) -> None:
    log = tmp_path / "leader.log"
    leader = cluster.cp.spawn_operator(log, priority=20)
    try:
        wait_for("the running replica pauses in favour of the new leader",
                 lambda: "Pausing operations in favour of" in cluster.operator_log.read_text())
        paused = image_cache("while-paused", nodeSelector={MINE: "yes"})
        assert cluster.apply(paused).returncode == 0
        wait_for("the leader plans", lambda: len(cluster.replicas("while-paused")) > 0)
    finally:
        leader.terminate()
        leader.wait(timeout=30)
    wait_for("the paused replica resumes when the leader is gone",
             lambda: cluster.operator_log.read_text().count("Resuming operations") >= 2)
    cluster.add_node("late-joiner")
    wait_for("the resumed replica plans again",
             lambda: "late-joiner" in cluster.replicas("while-paused"))


BAD_SPECS = [
    ({"fanout": 0}, "spec.fanout"),
    ({"sizeBytes": -1}, "spec.sizeBytes"),
    ({"detachPolicy": "Sometimes"}, 'supported values: "WhenHydrated", "Never"'),
    ({"source": {}}, "spec.source"),
    ({"source": {"http": {"url": "ftp://x/y"}}}, "must be an http:// or https:// URL"),
    ({"source": {"http": {"url": "http://a/b"}, "pvc": {"name": "a", "namespace": "b"}}},
     "spec.source"),
    ({"source": {"iscsi": {"portal": "10.0.0.1:3260", "iqn": "not-an-iqn"}}},
     "spec.source.iscsi.iqn"),
    ({"regionSizeBytes": 5000}, "spec.regionSizeBytes"),
]


@pytest.mark.parametrize(("spec", "message"), BAD_SPECS)
def test_malformed_imagecache_is_rejected_with_the_schema_message(
    control_plane: ControlPlane, spec: dict[str, Any], message: str
) -> None:
    manifest = image_cache("bad", **spec)
    result = control_plane.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest), check=False)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
