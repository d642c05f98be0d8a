"""The agent's reads and events, against the real API server: the CHAP secret, the boot
profile's ConfigMap, a missing one, an event, the watched replicas (vmthunder.kube.Rest
underneath)."""

from __future__ import annotations

import base64
import uuid

import kubernetes
import pytest
from waiting import wait_for

from vmthunder.kube import ApiError
from vmthunder.lab.controlplane import ControlPlane
from vmthunder.node.api import EVENTS_NAMESPACE, Kube, WatchedKube
from vmthunder.node.iscsi import Chap
from vmthunder.operator.model import (
    API_VERSION,
    IMAGE_REPLICAS,
    LABEL_IMAGE_CACHE,
    LABEL_NODE,
    LABEL_PARENT,
    replica_name,
    resource_path,
)
from vmthunder.operator.planner import ORIGIN


@pytest.fixture
def clients(control_plane: ControlPlane) -> tuple[Kube, kubernetes.client.CoreV1Api, str]:
    api = kubernetes.config.new_client_from_config(str(control_plane.kubeconfig))
    core = kubernetes.client.CoreV1Api(api)
    ns = f"kube-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": ns}})  # type: ignore[arg-type]
    return Kube(control_plane.rest()), core, ns


def test_chap_secret_and_profile_config_map_are_read(
        clients: tuple[Kube, kubernetes.client.CoreV1Api, str]) -> None:
    kube, core, ns = clients
    b64 = lambda s: base64.b64encode(s.encode()).decode()  # noqa: E731
    core.create_namespaced_secret(ns, {  # type: ignore[arg-type]
        "metadata": {"name": "golden-chap"},
        "data": {"username": b64("vmt"), "password": b64("p4ss/wörd")}})
    core.create_namespaced_config_map(ns, {  # type: ignore[arg-type]
        "metadata": {"name": "golden-boot-profile"}, "data": {"profile": "[[0, 4096]]"}})
    core.create_namespaced_config_map(ns, {  # type: ignore[arg-type]
        "metadata": {"name": "empty"}, "data": {}})

    assert kube.chap({"name": "golden-chap", "namespace": ns}) == Chap("vmt", "p4ss/wörd")
    assert kube.profile({"name": "golden-boot-profile", "namespace": ns}) == "[[0, 4096]]"
    assert kube.profile({"name": "empty", "namespace": ns}) is None
    assert kube.chap(None) is None and kube.profile(None) is None


def test_a_missing_secret_raises_the_api_servers_not_found(
        clients: tuple[Kube, kubernetes.client.CoreV1Api, str]) -> None:
    kube, _, ns = clients
    with pytest.raises(ApiError) as e:
        kube.chap({"name": "nowhere", "namespace": ns})
    assert e.value.status == 404
    assert "nowhere" in (e.value.body or "")


def test_an_event_about_a_replica_is_recorded(
        clients: tuple[Kube, kubernetes.client.CoreV1Api, str]) -> None:
    kube, core, _ = clients
    name = f"golden-{uuid.uuid4().hex[:8]}"
    replica = {"metadata": {"name": name, "uid": str(uuid.uuid4())}}
    kube.event(replica, "Warning", "AttachFailed", "parent node-01 unreachable", "node-02")
    events = core.list_namespaced_event(
        EVENTS_NAMESPACE, field_selector=f"involvedObject.name={name}").items
    assert [(e.type, e.reason, e.message, e.source.host) for e in events] == [
        ("Warning", "AttachFailed", "parent node-01 unreachable", "node-02")]
    assert events[0].first_timestamp is not None


def test_the_watched_view_holds_the_nodes_own_its_childrens_and_its_parents_replicas_only(
        control_plane: ControlPlane) -> None:
    """An agent watches by label, not every replica: what it sees follows a re-parent, and an
    older operator's replica (no vmthunder.io/parent) is seen until it is labeled."""
    rest = control_plane.rest()
    image = f"w{uuid.uuid4().hex[:8]}"

    def put(node: str, parent: str, labeled: bool = True) -> None:
        labels = {LABEL_IMAGE_CACHE: image, LABEL_NODE: node,
                  **({LABEL_PARENT: "" if parent == ORIGIN else parent} if labeled else {})}
        rest.create(resource_path(IMAGE_REPLICAS), {
            "apiVersion": API_VERSION, "kind": "ImageReplica",
            "metadata": {"name": replica_name(image, node), "labels": labels},
            "spec": {"imageCache": image, "node": node, "parent": parent, "depth": 1}})

    for node, parent in [("n1", ORIGIN), ("n2", "n1"), ("n3", "n2"), ("n4", "n1"),
                         ("n9", "n7")]:
        put(node, parent)
    put("n5", "n2", labeled=False)  # an older operator's child
    view = WatchedKube(rest, "n2").start()
    try:
        def seen() -> set[str]:
            return {r["spec"]["node"] for r in view.replicas({LABEL_IMAGE_CACHE: image})}

        # its own, its children n3 and n5, its parent n1; not its sibling n4 nor the stranger
        assert wait_for("the parent's replica", lambda: seen() == {"n1", "n2", "n3", "n5"})
        assert view.replica(replica_name(image, "n1")) is not None

        rest.patch(resource_path(IMAGE_REPLICAS, replica_name(image, "n2")), {
            "metadata": {"labels": {LABEL_PARENT: "n4"}}, "spec": {"parent": "n4"}})
        rest.patch(resource_path(IMAGE_REPLICAS, replica_name(image, "n5")), {
            "metadata": {"labels": {LABEL_PARENT: "n2"}}})  # the operator labels it
        assert wait_for("the new parent's replica", lambda: seen() == {"n2", "n3", "n4", "n5"})
        assert view.replica(replica_name(image, "n4")) is not None
        # the new parent's progress wakes the round (its children follow it batch by batch)
        view.wake.clear()
        rest.patch(resource_path(IMAGE_REPLICAS, replica_name(image, "n4"), "status"),
                   {"status": {"hydratedInOrder": 64}})
        assert wait_for("a wake", view.wake.is_set)
        n4 = view.replica(replica_name(image, "n4"))
        assert n4 is not None and n4["status"]["hydratedInOrder"] == 64
    finally:
        view.stop()
