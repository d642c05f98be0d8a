"""Fuzz of the CSI driver's request handling: requests that break the CSI spec get the gRPC
code the spec names (INVALID_ARGUMENT, NOT_FOUND, OUT_OF_RANGE ...), never INTERNAL or
UNKNOWN, and the server keeps answering.

The driver's real gRPC server (build_server: the services, the error-mapping interceptor) runs
in the test process over a unix socket, against the real kube-apiserver of the session. The
host kernel has no device-mapper, so only what the services decide before touching the kernel
is fuzzed: the controller entirely (it never touches the kernel), and in the node service the
request validation and the volume lookup in the API server (missing ids and paths, bad
capabilities, unknown or malformed volume ids, a volume of another node); NodeUnstage,
NodeUnpublish, NodeGetVolumeStats and NodeExpand only with requests that fail validation.
Each request is checked against an independent statement of what the spec answers.

VolumeCapability's block and mount are one protobuf oneof: a request cannot carry both (on
the wire the last one wins), so "both set" is a request with the last one.

Examples per test: VMT_FUZZ_CSI_EXAMPLES (default 60; each is a gRPC call, most reach the
API server).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import kubernetes
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmthunder.csi import capabilities
from vmthunder.csi.client import Client, connect
from vmthunder.csi.kube import KubeState, Volume
from vmthunder.csi.names import (
    GROUP,
    IMAGE_CACHES,
    PARAM_RESERVED_PREFIX,
    TOPOLOGY_KEY,
    VERSION,
    volume_id_for,
)
from vmthunder.csi.proto import csi_pb2
from vmthunder.csi.server import Options, build_server
from vmthunder.lab.controlplane import ControlPlane

pytestmark = pytest.mark.apiserver

EXAMPLES = int(os.environ.get("VMT_FUZZ_CSI_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
Code = grpc.StatusCode
IMAGE = "fuzz-golden"
IMAGE_SIZE = 64 << 20
NODE = "csi-fuzz-node"
ELSEWHERE_VOLUME = "pvc-fuzz-elsewhere"
Cap = csi_pb2.VolumeCapability
Mode = Cap.AccessMode.Mode


@dataclass
class Driver:
    client: Client
    state: KubeState


@pytest.fixture(scope="module")
def driver(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Driver]:
    work = tmp_path_factory.mktemp("csi-fuzz")
    api = kubernetes.config.new_client_from_config(  # type: ignore[no-untyped-call]
        str(control_plane.kubeconfig))
    custom = kubernetes.client.CustomObjectsApi(api)
    state = KubeState(control_plane.rest())
    custom.create_cluster_custom_object(GROUP, VERSION, IMAGE_CACHES, {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "ImageCache", "metadata": {"name": IMAGE},
        "spec": {"source": {"http": {"url": "http://images.example/golden.raw"}},
                 "sizeBytes": IMAGE_SIZE},
    })
    # A volume that lives on another node: the node service must refuse it before any kernel work.
    elsewhere = Volume(volume_id_for(ELSEWHERE_VOLUME), ELSEWHERE_VOLUME, IMAGE, "csi-fuzz-other",
                       IMAGE_SIZE, "Block")
    assert state.create_volume(elsewhere)
    endpoint = f"unix://{work}/csi.sock"
    server, stop = build_server(Options("all", endpoint, node_id=NODE, state_dir=work / "vol",
                                        replica_wait=1, stage_wait=1, workers=4), state)
    server.start()
    client = connect(endpoint)
    try:
        yield Driver(client, state)
    finally:
        client.close()
        stop()
        server.stop(5).wait()
        state.delete_volume(elsewhere.volume_id)
        custom.delete_cluster_custom_object(GROUP, VERSION, IMAGE_CACHES, IMAGE)


def code_of(call: Callable[[], Any]) -> Code:
    try:
        call()
    except grpc.RpcError as e:
        code: Code = e.code()
        return code
    return Code.OK


# --- strategies -------------------------------------------------------------------------------

odd_text = (st.sampled_from(["", ".", "..", "a/b", "../x", "%2e%2e", "A_B", " ", "x" * 300,
                             "\x00", "é", "default", "0" * 32])
            | st.text(max_size=40))
volume_ids = st.sampled_from(["", volume_id_for("never-created"), "f" * 32, "F" * 32]) | odd_text


@st.composite
def volume_capabilities(draw: st.DrawFn) -> Cap:
    cap = Cap()
    kind = draw(st.sampled_from(["block", "mount", "none", "both"]))
    if kind in ("block", "both"):
        cap.block.SetInParent()
    if kind in ("mount", "both"):  # a oneof: mount replaces block
        cap.mount.fs_type = draw(st.sampled_from(["", "ext4", "xfs", "ntfs"]) | odd_text)
        cap.mount.mount_flags.extend(draw(st.lists(odd_text, max_size=2)))
    if draw(st.booleans()):
        # Values past the enum's end are legal on the wire (proto3 enums are open).
        cap.access_mode.mode = draw(st.sampled_from(list(Mode.values()))  # type: ignore[assignment]
                                    | st.integers(-5, 100) | st.just(2**31 - 1))
    return cap


def bad_capability(cap: Cap) -> bool:
    """Independent of capabilities.unsupported_reason: what the driver serves."""
    if cap.WhichOneof("access_type") is None or not cap.HasField("access_mode"):
        return True
    single = {Mode.SINGLE_NODE_WRITER, Mode.SINGLE_NODE_READER_ONLY,
              Mode.SINGLE_NODE_SINGLE_WRITER}
    if cap.access_mode.mode not in single:
        return True
    return cap.HasField("mount") and cap.mount.fs_type not in ("", "ext4", "ext3", "xfs")


topologies = st.lists(st.builds(
    lambda segs: csi_pb2.Topology(segments=segs),
    st.dictionaries(st.sampled_from([TOPOLOGY_KEY, "zone", ""]), odd_text, max_size=2)),
    max_size=2)
capacities = st.sampled_from([0, 1, -1, IMAGE_SIZE - 1, IMAGE_SIZE, 1 << 50, 2**63 - 1]) \
    | st.integers(-(2**63), 2**63 - 1)


@st.composite
def create_requests(draw: st.DrawFn) -> csi_pb2.CreateVolumeRequest:
    params = draw(st.dictionaries(
        st.sampled_from(["imageCache", "bogus", f"{PARAM_RESERVED_PREFIX}fstype", ""]) | odd_text,
        odd_text, max_size=3))
    if draw(st.booleans()):
        params["imageCache"] = draw(st.sampled_from([IMAGE, "no-such-image"]) | odd_text)
    req = csi_pb2.CreateVolumeRequest(
        name=draw(st.sampled_from(["", "pvc-fuzz"]) | odd_text),
        volume_capabilities=draw(st.lists(volume_capabilities(), max_size=3)),
        parameters=params,
        capacity_range=csi_pb2.CapacityRange(required_bytes=draw(capacities),
                                             limit_bytes=draw(capacities)),
        accessibility_requirements=csi_pb2.TopologyRequirement(
            requisite=draw(topologies), preferred=draw(topologies)),
    )
    if draw(st.integers(0, 9)) == 0:
        req.volume_content_source.snapshot.snapshot_id = "snap-1"
    if draw(st.integers(0, 9)) == 0:
        req.mutable_parameters["iops"] = "100"
    return req


# --- the oracle -------------------------------------------------------------------------------

def expected_create(req: csi_pb2.CreateVolumeRequest) -> Code | None:
    """The spec's answer to a bad CreateVolume; None if the request is well-formed."""
    r, lim = req.capacity_range.required_bytes, req.capacity_range.limit_bytes
    reqs = req.accessibility_requirements
    segments = [t.segments.get(TOPOLOGY_KEY) for t in (*reqs.preferred, *reqs.requisite)]
    image = req.parameters.get("imageCache", "")
    unknown = [k for k in req.parameters
               if k != "imageCache" and not k.startswith(PARAM_RESERVED_PREFIX)]
    if (not req.name or not req.volume_capabilities
            or any(bad_capability(c) for c in req.volume_capabilities)
            or not image or unknown or req.HasField("volume_content_source")
            or req.mutable_parameters or r < 0 or lim < 0 or (lim and r > lim)
            or (segments and not any(segments))):
        return Code.INVALID_ARGUMENT
    return None


# --- controller -------------------------------------------------------------------------------

@FUZZ
@given(create_requests())
def test_create_volume_answers_any_bad_request_with_the_spec_code(
    driver: Driver, req: csi_pb2.CreateVolumeRequest
) -> None:
    expected = expected_create(req)
    if expected is None and req.parameters["imageCache"] == IMAGE:
        # Well-formed for an existing image: keep it from creating anything (no operator
        # plans replicas here) with a limit below the image's size.
        req.capacity_range.CopyFrom(csi_pb2.CapacityRange(limit_bytes=IMAGE_SIZE // 2))
        expected = Code.OUT_OF_RANGE
    got = code_of(lambda: driver.client.controller.CreateVolume(req, timeout=30))
    if expected is None:  # a well-formed request for an image that does not exist
        assert got in (Code.NOT_FOUND, Code.INVALID_ARGUMENT), got
    else:
        assert got == expected


@FUZZ
@given(volume_ids, st.lists(volume_capabilities(), max_size=2), capacities, capacities)
def test_volume_calls_with_bad_or_unknown_ids_get_invalid_argument_or_not_found(
    driver: Driver, volume_id: str, caps: list[Cap], required: int, limit: int
) -> None:
    c = driver.client.controller
    bad_id = Code.INVALID_ARGUMENT if not volume_id else None
    # Deleting what does not exist is success.
    assert code_of(lambda: c.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id))
                   ) == (bad_id or Code.OK)
    got = code_of(lambda: c.ValidateVolumeCapabilities(csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id=volume_id, volume_capabilities=caps)))
    assert got == (bad_id or (Code.INVALID_ARGUMENT if not caps else Code.NOT_FOUND))
    got = code_of(lambda: c.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
        volume_id=volume_id, capacity_range=csi_pb2.CapacityRange(
            required_bytes=required, limit_bytes=limit))))
    assert got == (bad_id or Code.NOT_FOUND)
    # "." or ".." in an API path names the collection: a delete must not have reached it.
    other = driver.state.get_volume(volume_id_for(ELSEWHERE_VOLUME))
    assert other is not None and not other.deleting


@FUZZ
@given(odd_text, st.integers(-(2**31), 2**31 - 1))
def test_list_volumes_with_a_bad_token_or_count_is_aborted_or_invalid(
    driver: Driver, token: str, max_entries: int
) -> None:
    got = code_of(lambda: driver.client.controller.ListVolumes(csi_pb2.ListVolumesRequest(
        starting_token=token, max_entries=max_entries)))
    if max_entries < 0:
        assert got == Code.INVALID_ARGUMENT
    elif token and not (len(token) == 32 and set(token) <= set("0123456789abcdef")):
        assert got == Code.ABORTED  # the spec's code for a token the plugin did not issue
    else:
        assert got == Code.OK


# --- node (validation and lookup only: nothing here reaches the kernel) -----------------------

@FUZZ
@given(volume_ids, st.sampled_from(["", "/tmp/vmt-fuzz/stage"]) | odd_text,
       st.none() | volume_capabilities())
def test_node_stage_and_publish_of_bad_or_unknown_volumes_get_the_spec_code(
    driver: Driver, volume_id: str, path: str, cap: Cap | None
) -> None:
    n = driver.client.node
    stage = csi_pb2.NodeStageVolumeRequest(volume_id=volume_id, staging_target_path=path)
    publish = csi_pb2.NodePublishVolumeRequest(volume_id=volume_id, target_path=path,
                                               staging_target_path=path)
    if cap is not None:
        stage.volume_capability.CopyFrom(cap)
        publish.volume_capability.CopyFrom(cap)
    invalid = not volume_id or not path or cap is None or bad_capability(cap)
    # Past validation, an unknown volume (the ids here never exist) is NOT_FOUND.
    want = Code.INVALID_ARGUMENT if invalid else Code.NOT_FOUND
    assert code_of(lambda: n.NodeStageVolume(stage)) == want
    assert code_of(lambda: n.NodePublishVolume(publish)) == want


def test_node_stage_of_a_volume_of_another_node_is_a_failed_precondition(driver: Driver) -> None:
    cap = Cap(block=Cap.BlockVolume(), access_mode=Cap.AccessMode(mode=Mode.SINGLE_NODE_WRITER))
    req = csi_pb2.NodeStageVolumeRequest(volume_id=volume_id_for(ELSEWHERE_VOLUME),
                                         staging_target_path="/tmp/vmt-fuzz/s",
                                         volume_capability=cap)
    assert code_of(lambda: driver.client.node.NodeStageVolume(req)) == Code.FAILED_PRECONDITION


@FUZZ
@given(st.sampled_from(["", "vol"]), st.sampled_from(["", "/p"]))
def test_node_unstage_unpublish_stats_and_expand_without_an_id_or_path_are_invalid(
    driver: Driver, volume_id: str, path: str
) -> None:
    if volume_id and path:
        volume_id = ""  # with both set these calls would reach the kernel
    n = driver.client.node
    for call in (
        lambda: n.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=volume_id, staging_target_path=path)),
        lambda: n.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=volume_id, target_path=path)),
        lambda: n.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=volume_id, volume_path=path)),
        lambda: n.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
            volume_id=volume_id, volume_path=path)),
    ):
        assert code_of(call) == Code.INVALID_ARGUMENT


# --- identity and garbage on the wire ---------------------------------------------------------

@FUZZ
@given(st.binary(max_size=200), st.sampled_from([
    "/csi.v1.Identity/GetPluginInfo", "/csi.v1.Identity/Probe",
    "/csi.v1.Controller/CreateVolume", "/csi.v1.Node/NodeStageVolume"]))
def test_garbage_bytes_never_take_the_server_down(
    driver: Driver, payload: bytes, method: str
) -> None:
    raw: Any = driver.client.channel.unary_unary(method)
    try:
        raw(payload, timeout=30)
    except grpc.RpcError as e:
        # Bytes that are no protobuf message fail in grpc's deserializer (INTERNAL, before
        # our code); bytes that are one get the services' answer, never UNKNOWN.
        assert e.code() != Code.UNKNOWN
    info = driver.client.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=30)
    assert info.name == "csi.vmthunder.io"


def test_unknown_access_mode_is_named_by_number_not_a_crash() -> None:
    cap = Cap(block=Cap.BlockVolume(), access_mode=Cap.AccessMode(mode=99))  # type: ignore[arg-type]
    assert capabilities.unsupported_reason(cap) == "access mode 99 is not supported: " \
        "a volume lives on one node"
