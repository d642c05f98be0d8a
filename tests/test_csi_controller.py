"""The CSI driver's Identity and Controller services against a real kube-apiserver, with the
real operator planning the replicas that CreateVolume waits for."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
import kubernetes
import pytest
from kubernetes.client.exceptions import ApiException

from vmthunder.csi.client import Client, connect
from vmthunder.csi.names import (
    FINALIZER_COW_DATA,
    GROUP,
    IMAGE_CACHES,
    IMAGE_REPLICAS,
    IMAGE_VOLUMES,
    TOPOLOGY_KEY,
    VERSION,
    volume_id_for,
)
from vmthunder.csi.proto import csi_pb2
from vmthunder.lab.controlplane import ControlPlane, free_port
from vmthunder.lab.nodes import register_node

pytestmark = pytest.mark.apiserver

IMAGE = "csi-golden"
IMAGE_SIZE = 64 << 20
NODES = ("csi-node-a", "csi-node-b", "csi-node-c")
MiB = 1 << 20

BLOCK = csi_pb2.VolumeCapability(
    block=csi_pb2.VolumeCapability.BlockVolume(),
    access_mode=csi_pb2.VolumeCapability.AccessMode(
        mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER),
)


@dataclass
class Env:
    cp: ControlPlane
    custom: kubernetes.client.CustomObjectsApi
    identity: Any
    controller: Any
    driver_log: Path
    metrics_url: str

    def volume(self, volume_id: str) -> dict[str, Any] | None:
        try:
            obj = cast(dict[str, Any], self.custom.get_cluster_custom_object(
                GROUP, VERSION, IMAGE_VOLUMES, volume_id))
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return obj

    def create(self, name: str, image: str = IMAGE, **kwargs: Any) -> Any:
        kwargs.setdefault("volume_capabilities", [BLOCK])
        return self.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
            name=name, parameters={"imageCache": image}, **kwargs), timeout=60)


def topology(node: str) -> csi_pb2.Topology:
    return csi_pb2.Topology(segments={TOPOLOGY_KEY: node})


def code_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    code: grpc.StatusCode = info.value.code()
    return code


def spawn_driver(cp: ControlPlane, workdir: Path, mode: str, *extra: str
                 ) -> tuple[subprocess.Popen[bytes], str, Path]:
    socket_path = workdir / f"csi-{mode}.sock"
    log = workdir / f"csi-{mode}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vmthunder.cli", "csi", "--mode", mode,
             "--endpoint", f"unix://{socket_path}", *extra],
            env={**cp.env(), "PYTHONUNBUFFERED": "1"}, stdout=out, stderr=subprocess.STDOUT,
        )
    return proc, f"unix://{socket_path}", log


def wait_ready(client: Client, proc: subprocess.Popen[bytes], log: Path,
               timeout: float = 60) -> None:
    identity = client.identity
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"driver exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(grpc.RpcError):
            if identity.Probe(csi_pb2.ProbeRequest(), timeout=5).ready.value:
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"driver not ready:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def env(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    work = tmp_path_factory.mktemp("csi-controller")
    api = kubernetes.config.new_client_from_config(  # type: ignore[no-untyped-call]
        str(control_plane.kubeconfig))
    core = kubernetes.client.CoreV1Api(api)
    custom = kubernetes.client.CustomObjectsApi(api)
    for node in NODES:
        register_node(core, node)
    custom.create_cluster_custom_object(GROUP, VERSION, IMAGE_CACHES, {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "ImageCache", "metadata": {"name": IMAGE},
        "spec": {"source": {"http": {"url": "http://images.example/golden.raw"}},
                 "sizeBytes": IMAGE_SIZE},
    })
    # Highest priority: a stale peering record of another test's operator must not pause it.
    operator = control_plane.spawn_operator(work / "operator.log", priority=100)
    metrics_port = free_port()
    driver, endpoint, log = spawn_driver(control_plane, work, "controller", "--replica-wait", "30",
                                         "--metrics-port", str(metrics_port))
    client = connect(endpoint)
    try:
        wait_ready(client, driver, log)
        yield Env(control_plane, custom, client.identity, client.controller, log,
                  f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        client.close()
        for proc in (driver, operator):
            proc.terminate()
            proc.wait(15)
        # Leave the shared API server as we found it: other modules count nodes and caches.
        volumes = cast(dict[str, Any], custom.list_cluster_custom_object(
            GROUP, VERSION, IMAGE_VOLUMES))
        for iv in volumes["items"]:
            if iv["spec"]["imageCache"] == IMAGE:
                custom.patch_cluster_custom_object(GROUP, VERSION, IMAGE_VOLUMES,
                                                   iv["metadata"]["name"],
                                                   {"metadata": {"finalizers": None}})
                with contextlib.suppress(ApiException):  # gone once its finalizer went
                    custom.delete_cluster_custom_object(GROUP, VERSION, IMAGE_VOLUMES,
                                                        iv["metadata"]["name"])
        custom.delete_cluster_custom_object(GROUP, VERSION, IMAGE_CACHES, IMAGE)
        for node in NODES:
            core.delete_node(node)


def test_identity_names_the_driver_and_offers_controller_and_topology(env: Env) -> None:
    info = env.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    assert info.name == "csi.vmthunder.io" and info.vendor_version
    caps = env.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    services = {c.service.type for c in caps.capabilities if c.HasField("service")}
    Service = csi_pb2.PluginCapability.Service
    assert services == {Service.CONTROLLER_SERVICE, Service.VOLUME_ACCESSIBILITY_CONSTRAINTS}


def test_probe_reports_not_ready_while_the_api_server_is_unreachable(
    env: Env, tmp_path: Path
) -> None:
    bad = tmp_path / "unreachable.kubeconfig"
    bad.write_text(env.cp.kubeconfig.read_text().replace(env.cp.url, "https://127.0.0.1:1"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmthunder.cli", "csi", "--mode", "controller",
         "--endpoint", f"unix://{tmp_path}/csi.sock"],
        env={**env.cp.env(), "KUBECONFIG": str(bad)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        client = connect(f"unix://{tmp_path}/csi.sock")
        grpc.channel_ready_future(client.channel).result(timeout=30)
        probe = client.identity.Probe(csi_pb2.ProbeRequest(), timeout=20)
        assert probe.ready.value is False
        assert env.identity.Probe(csi_pb2.ProbeRequest()).ready.value is True
        client.close()
    finally:
        proc.terminate()
        proc.wait(15)


def test_create_volume_places_the_volume_on_the_preferred_node_once_its_replica_exists(
    env: Env,
) -> None:
    reqs = csi_pb2.TopologyRequirement(
        requisite=[topology("csi-node-a"), topology("csi-node-b")],
        preferred=[topology("csi-node-b"), topology("csi-node-a")],
    )
    volume = env.create("pvc-preferred", accessibility_requirements=reqs).volume
    assert volume.volume_id == volume_id_for("pvc-preferred")
    assert [dict(t.segments) for t in volume.accessible_topology] == [
        {TOPOLOGY_KEY: "csi-node-b"}]
    assert volume.capacity_bytes == IMAGE_SIZE
    record = env.volume(volume.volume_id)
    assert record is not None
    assert record["spec"]["node"] == "csi-node-b"
    assert record["spec"]["imageCache"] == IMAGE
    assert record["spec"]["csiName"] == "pvc-preferred"
    # The operator (not the test) planned the node's replica before CreateVolume returned.
    replica = cast(dict[str, Any], env.custom.get_cluster_custom_object(
        GROUP, VERSION, IMAGE_REPLICAS, f"{IMAGE}.csi-node-b"))
    assert replica["spec"]["node"] == "csi-node-b"


def test_create_volume_without_topology_prefers_a_node_that_holds_the_image(env: Env) -> None:
    env.create("pvc-warm-1", accessibility_requirements=csi_pb2.TopologyRequirement(
        preferred=[topology("csi-node-c")]))
    volume = env.create("pvc-warm-2").volume
    # csi-node-b and -c hold replicas (earlier volumes); b comes first by name among equals
    # only if it has no more volumes than c.
    node = volume.accessible_topology[0].segments[TOPOLOGY_KEY]
    assert node in ("csi-node-b", "csi-node-c")


def test_create_volume_is_idempotent_and_rejects_an_incompatible_repeat(env: Env) -> None:
    first = env.create("pvc-twice", capacity_range=csi_pb2.CapacityRange(
        required_bytes=100 * MiB)).volume
    again = env.create("pvc-twice", capacity_range=csi_pb2.CapacityRange(
        required_bytes=100 * MiB)).volume
    assert again == first
    assert code_of(lambda: env.create("pvc-twice", capacity_range=csi_pb2.CapacityRange(
        required_bytes=200 * MiB))) == grpc.StatusCode.ALREADY_EXISTS


def test_capacity_is_at_least_the_image_and_out_of_range_below_it(env: Env) -> None:
    small = env.create("pvc-small", capacity_range=csi_pb2.CapacityRange(required_bytes=MiB))
    assert small.volume.capacity_bytes == IMAGE_SIZE
    odd = env.create("pvc-odd", capacity_range=csi_pb2.CapacityRange(
        required_bytes=IMAGE_SIZE + 1))
    assert odd.volume.capacity_bytes == IMAGE_SIZE + 512
    assert code_of(lambda: env.create("pvc-tiny", capacity_range=csi_pb2.CapacityRange(
        required_bytes=MiB, limit_bytes=2 * MiB))) == grpc.StatusCode.OUT_OF_RANGE


def test_create_volume_answers_bad_requests_with_the_spec_codes(env: Env) -> None:
    assert code_of(lambda: env.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
        volume_capabilities=[BLOCK], parameters={"imageCache": IMAGE}))
    ) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: env.create("pvc-nocaps", volume_capabilities=[])
                   ) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: env.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
        name="pvc-noparam", volume_capabilities=[BLOCK]))) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: env.create("pvc-noimage", image="no-such-image")
                   ) == grpc.StatusCode.NOT_FOUND
    multi = csi_pb2.VolumeCapability(
        block=csi_pb2.VolumeCapability.BlockVolume(),
        access_mode=csi_pb2.VolumeCapability.AccessMode(
            mode=csi_pb2.VolumeCapability.AccessMode.MULTI_NODE_MULTI_WRITER))
    assert code_of(lambda: env.create("pvc-rwx", volume_capabilities=[multi])
                   ) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: env.create("pvc-nowhere", accessibility_requirements=(
        csi_pb2.TopologyRequirement(requisite=[topology("no-such-node")])))
    ) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_list_volumes_pages_and_survives_deletion_of_listed_volumes(env: Env) -> None:
    for i in range(5):
        env.create(f"pvc-list-{i}")
    everything = env.controller.ListVolumes(csi_pb2.ListVolumesRequest())
    ids = [e.volume.volume_id for e in everything.entries]
    assert ids == sorted(ids) and not everything.next_token
    page = env.controller.ListVolumes(csi_pb2.ListVolumesRequest(max_entries=2))
    assert [e.volume.volume_id for e in page.entries] == ids[:2]
    for entry in page.entries:
        env.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(
            volume_id=entry.volume.volume_id))
    rest = env.controller.ListVolumes(csi_pb2.ListVolumesRequest(
        starting_token=page.next_token))
    assert [e.volume.volume_id for e in rest.entries] == ids[2:]
    assert code_of(lambda: env.controller.ListVolumes(csi_pb2.ListVolumesRequest(
        starting_token="not-a-token"))) == grpc.StatusCode.ABORTED


def test_delete_volume_is_idempotent_and_waits_for_the_nodes_finalizer(env: Env) -> None:
    volume = env.create("pvc-delete").volume
    env.custom.patch_cluster_custom_object(GROUP, VERSION, IMAGE_VOLUMES, volume.volume_id,
                                           {"metadata": {"finalizers": [FINALIZER_COW_DATA]}})
    env.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))
    env.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))
    record = env.volume(volume.volume_id)
    assert record is not None and record["metadata"].get("deletionTimestamp")
    listed = env.controller.ListVolumes(csi_pb2.ListVolumesRequest())
    assert volume.volume_id not in {e.volume.volume_id for e in listed.entries}
    # A retried CreateVolume of a volume whose node data is still being freed must wait.
    assert code_of(lambda: env.create("pvc-delete")) == grpc.StatusCode.ABORTED
    env.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="0" * 32))
    assert code_of(lambda: env.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest())
                   ) == grpc.StatusCode.INVALID_ARGUMENT


def test_validate_volume_capabilities_confirms_single_node_block_and_mount(env: Env) -> None:
    volume = env.create("pvc-validate").volume
    mount = csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"),
        access_mode=csi_pb2.VolumeCapability.AccessMode(
            mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))
    ok = env.controller.ValidateVolumeCapabilities(csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id=volume.volume_id, volume_capabilities=[BLOCK, mount]))
    assert list(ok.confirmed.volume_capabilities) == [BLOCK, mount]
    rwx = csi_pb2.VolumeCapability(
        block=csi_pb2.VolumeCapability.BlockVolume(),
        access_mode=csi_pb2.VolumeCapability.AccessMode(
            mode=csi_pb2.VolumeCapability.AccessMode.MULTI_NODE_MULTI_WRITER))
    no = env.controller.ValidateVolumeCapabilities(csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id=volume.volume_id, volume_capabilities=[rwx]))
    assert not no.HasField("confirmed") and no.message
    assert code_of(lambda: env.controller.ValidateVolumeCapabilities(
        csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id="f" * 32,
                                                  volume_capabilities=[BLOCK]))
    ) == grpc.StatusCode.NOT_FOUND


def test_controller_expand_records_the_new_capacity_and_asks_the_node_to_grow(env: Env) -> None:
    volume = env.create("pvc-expand").volume
    grown = env.controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
        volume_id=volume.volume_id, capacity_range=csi_pb2.CapacityRange(
            required_bytes=256 * MiB)))
    assert grown.capacity_bytes == 256 * MiB and grown.node_expansion_required
    record = env.volume(volume.volume_id)
    assert record is not None and record["spec"]["capacityBytes"] == 256 * MiB
    assert code_of(lambda: env.controller.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(volume_id="e" * 32, capacity_range=(
            csi_pb2.CapacityRange(required_bytes=MiB))))) == grpc.StatusCode.NOT_FOUND


def test_every_call_leaves_one_structured_log_line_with_its_duration(env: Env) -> None:
    env.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    lines = [line for line in env.driver_log.read_text().splitlines()
             if '"call": "GetPluginInfo"' in line]
    assert lines and '"code": "OK"' in lines[-1] and '"ms": ' in lines[-1]


def test_call_latencies_are_exported_per_method_and_code(env: Env) -> None:
    env.create("pvc-metrics")
    with urllib.request.urlopen(env.metrics_url, timeout=10) as response:
        text = response.read().decode()
    assert 'vmthunder_csi_call_seconds_count{code="OK",method="CreateVolume"}' in text
    assert 'vmthunder_csi_call_seconds_count{code="NOT_FOUND",method="CreateVolume"}' in text
