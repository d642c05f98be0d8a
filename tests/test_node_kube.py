"""The agent's core-group reads and its events, against the real API server: the CHAP secret,
the boot profile's ConfigMap, a missing one, an event (vmthunder.kube.Rest underneath)."""

from __future__ import annotations

import base64
import uuid

import kubernetes
import pytest

from vmthunder.kube import ApiError
from vmthunder.lab.controlplane import ControlPlane
from vmthunder.node.api import EVENTS_NAMESPACE, Kube
from vmthunder.node.iscsi import Chap


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
