"""NodeStage's wait for the node's replica, on a real API server: it returns when the agent
reports the replica usable (a watch, not a poll), when a hold's deadline passes with no
change at all, and gives up at its deadline."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import kubernetes
import pytest

from vmthunder.csi.kube import KubeState, phase_of
from vmthunder.csi.names import USABLE_REPLICA_PHASES, ready_for_vms
from vmthunder.lab.controlplane import ControlPlane
from vmthunder.operator.model import GROUP, IMAGE_REPLICAS, VERSION, replica_name

pytestmark = pytest.mark.apiserver
IMAGE, NODE = "stage-wait-golden", "stage-wait-node"


@pytest.fixture()
def api(control_plane: ControlPlane) -> Iterator[Any]:
    client = kubernetes.config.new_client_from_config(  # type: ignore[no-untyped-call]
        str(control_plane.kubeconfig))
    yield kubernetes.client.CustomObjectsApi(client), KubeState(control_plane.rest())
    try:
        kubernetes.client.CustomObjectsApi(client).delete_cluster_custom_object(
            GROUP, VERSION, IMAGE_REPLICAS, replica_name(IMAGE, NODE))
    except kubernetes.client.exceptions.ApiException as e:
        assert e.status == 404


def usable(status: dict[str, Any] | None) -> bool:
    return phase_of(status) in USABLE_REPLICA_PHASES


def create_replica(custom: Any) -> None:
    custom.create_cluster_custom_object(GROUP, VERSION, IMAGE_REPLICAS, {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "ImageReplica",
        "metadata": {"name": replica_name(IMAGE, NODE),
                     "labels": {"vmthunder.io/image-cache": IMAGE, "vmthunder.io/node": NODE}},
        "spec": {"imageCache": IMAGE, "node": NODE, "parent": "@origin", "depth": 1}})


def set_phase(custom: Any, phase: str, **more: str) -> None:
    custom.patch_cluster_custom_object_status(GROUP, VERSION, IMAGE_REPLICAS,
                                              replica_name(IMAGE, NODE),
                                              {"status": {"phase": phase, **more}})


def test_the_wait_returns_when_the_replica_turns_usable_and_not_at_its_deadline(
        api: tuple[Any, KubeState]) -> None:
    custom, state = api
    create_replica(custom)  # no status yet: Pending
    timer = threading.Timer(1.0, set_phase, (custom, "Attached"))
    timer.start()
    t0 = time.monotonic()
    try:
        ok, status = state.wait_replica(IMAGE, NODE, usable, 60)
    finally:
        timer.cancel()
    assert ok and phase_of(status) == "Attached"
    assert time.monotonic() - t0 < 30  # woken by the change, long before the 60 s deadline


def test_a_hold_whose_agent_died_ends_at_its_deadline_with_no_change_to_wake_the_wait(
        api: tuple[Any, KubeState]) -> None:
    custom, state = api
    create_replica(custom)
    until = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=4)
    set_phase(custom, "Prefetching", holdUntil=until.strftime("%Y-%m-%dT%H:%M:%SZ"))
    ok, status = state.wait_replica(IMAGE, NODE, lambda s: ready_for_vms(s, datetime.now(UTC)),
                                    60, recheck=1)
    assert ok and phase_of(status) == "Prefetching"  # nobody wrote: the deadline let it go
    assert until <= datetime.now(UTC) < until + timedelta(seconds=20)


def test_the_wait_gives_up_at_its_deadline_with_the_phase_it_last_saw(
        api: tuple[Any, KubeState]) -> None:
    custom, state = api
    assert state.wait_replica(IMAGE, NODE, usable, 1) == (False, None)  # no replica
    create_replica(custom)
    set_phase(custom, "Attaching")
    ok, status = state.wait_replica(IMAGE, NODE, usable, 2)
    assert not ok and phase_of(status) == "Attaching"
