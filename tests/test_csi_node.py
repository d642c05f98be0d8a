"""The whole CSI driver (identity, controller, node) in a qemu guest with device-mapper, the
API server and the operator on the host: the official csi-sanity suite, and the driver driven
the way kubelet drives it, checking the bytes a VM would read.

Until the node agent runs in the lab, the test stands in for it on the node: the image device
vmt-<image> is a read-only dm-linear over the image (the agent's dm-clone gives the same
bytes), and the test reports the node's ImageReplica Attached.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import kubernetes
import pytest
from kubernetes.client.exceptions import ApiException

from vmthunder.csi.names import GROUP, IMAGE_CACHES, IMAGE_REPLICAS, IMAGE_VOLUMES, VERSION
from vmthunder.lab.controlplane import ControlPlane, start_control_plane
from vmthunder.lab.lab import Guest, Lab
from vmthunder.lab.nodes import register_node
from vmthunder.node import labdrive as ld

pytestmark = [pytest.mark.lab, pytest.mark.apiserver]

REPO = Path(__file__).resolve().parent.parent
SANITY = Path.home() / ".cache" / "vmthunder" / "bin" / "csi-sanity"
IMAGE = "golden"
IMAGE_SIZE = 64 << 20
STATE = "/var/lib/vmthunder"
SOCKET = "/run/csi/csi.sock"
# Skips csi-sanity makes for capabilities the driver does not advertise, and only those.
UNADVERTISED_SKIP = re.compile(r"not supported|does not have single node multi writer")


@dataclass
class Rig:
    lab: Lab
    node: Guest
    cp: ControlPlane
    custom: kubernetes.client.CustomObjectsApi
    image: Path
    image_sha256: str
    workdir: Path

    # The lab's exec channel can lose an answer: anything long or not idempotent runs
    # detached and is polled (labdrive's helpers); quick idempotent reads are retried.

    def shell(self, script: str, timeout: float = 300, stdin: str = "") -> str:
        tag = f"vmt-csi-{time.monotonic_ns()}"
        ld.start_shell(self.node, script, tag, stdin=stdin)
        return ld.wait_shell(self.node, tag, timeout)

    def read(self, cmd: str) -> Any:
        return ld.retry_run(self.node, cmd)

    def start_driver(self) -> None:
        """The node plugin (with controller) as the DaemonSet runs it, and waits for Probe."""
        self.node.start_background(
            f"echo $$ > /tmp/csi-driver.pid; cd {REPO} && exec {sys.executable} -m vmthunder.cli "
            f"csi --mode all --endpoint unix://{SOCKET} --node-id {self.node.name} "
            f"--state-dir {STATE}/volumes",
            log="/tmp/csi-driver.log",
            env={"KUBECONFIG": str(self.cp.kubeconfig), "PYTHONUNBUFFERED": "1"},
        )
        self.guest_python(PROBE, timeout=180)

    def stop_driver(self) -> None:
        self.shell("pid=$(cat /tmp/csi-driver.pid); kill $pid; "
                   "while kill -0 $pid 2>/dev/null; do sleep 0.2; done", timeout=60)

    def guest_python(self, script: str, timeout: float = 300, args: tuple[str, ...] = ()) -> Any:
        """Runs a Python script in the guest with the project's venv; returns its JSON output."""
        out = self.shell(f"KUBECONFIG={self.cp.kubeconfig} {sys.executable} - {' '.join(args)}",
                         timeout=timeout, stdin=script)
        return json.loads(out.strip().splitlines()[-1])

    def driver_log(self) -> str:
        return str(self.read("tail -c 20000 /tmp/csi-driver.log").stdout)


def _wait(what: str, check: Any, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    work = tmp_path_factory.mktemp("csi-lab")
    image = work / "golden.raw"
    image.write_bytes(random.Random(5).randbytes(IMAGE_SIZE))
    sha = hashlib.sha256(image.read_bytes()).hexdigest()
    lab = Lab.up(nodes=1, origin=False)
    cp: ControlPlane | None = None
    operator = None
    try:
        # The API server listens on the lab bridge so the guest's driver reaches it.
        cp = start_control_plane(work / "cp", bind_address=lab.host_ip)
        cp.install_vmthunder_crds()
        node = lab.nodes[0]
        api = kubernetes.config.new_client_from_config(  # type: ignore[no-untyped-call]
            str(cp.kubeconfig))
        custom = kubernetes.client.CustomObjectsApi(api)
        register_node(kubernetes.client.CoreV1Api(api), node.name)
        custom.create_cluster_custom_object(GROUP, VERSION, IMAGE_CACHES, {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "ImageCache",
            "metadata": {"name": IMAGE},
            "spec": {"source": {"http": {"url": "http://images.example/golden.raw"}},
                     "sizeBytes": IMAGE_SIZE, "nodeSelector": {}},
        })
        operator = cp.spawn_operator(work / "operator.log", priority=100)
        replica = f"{IMAGE}.{node.name}"
        _wait("the operator to plan the node's replica", lambda: _exists(custom, replica))

        # Stand-in for the node agent: the image device on the node's cache disk, Attached.
        rig = Rig(lab, node, cp, custom, image, sha, work)
        rig.shell(f"""set -e
            modprobe loop && modprobe dm_snapshot && modprobe dm_zero
            mkfs.ext4 -q -F {node.cache_disk}
            mkdir -p {STATE} && mount {node.cache_disk} {STATE}
            mkdir -p {STATE}/images {STATE}/volumes /run/csi
            cp {image} {STATE}/images/{IMAGE}.raw
            dev=$(losetup --find --show --read-only {STATE}/images/{IMAGE}.raw)
            dmsetup create vmt-{IMAGE} --noudevsync --readonly \\
                --table "0 {IMAGE_SIZE // 512} linear $dev 0"
            dmsetup mknodes
        """, timeout=300)
        custom.patch_cluster_custom_object_status(
            GROUP, VERSION, IMAGE_REPLICAS, replica, {"status": {"phase": "Attached"}})

        rig.start_driver()
        yield rig
    finally:
        if operator is not None:
            operator.terminate()
            operator.wait(15)
        if cp is not None:
            cp.stop()
        lab.down()


def _exists(custom: kubernetes.client.CustomObjectsApi, replica: str) -> bool:
    try:
        custom.get_cluster_custom_object(GROUP, VERSION, IMAGE_REPLICAS, replica)
    except ApiException as e:
        if e.status == 404:
            return False
        raise
    return True


PROBE = f"""
import json, time
from vmthunder.csi.client import connect
from vmthunder.csi.proto import csi_pb2
deadline = time.monotonic() + 150
while True:
    try:
        c = connect("unix://{SOCKET}")
        if c.identity.Probe(csi_pb2.ProbeRequest(), timeout=10).ready.value:
            break
    except Exception as e:
        if time.monotonic() > deadline:
            raise
    time.sleep(0.5)
print(json.dumps({{"ready": True}}))
"""


@pytest.mark.parametrize("access_type", ["block", "mount"])
def test_csi_sanity_passes_against_the_driver_with_its_device_mapper_backend(
    rig: Rig, access_type: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # csi-sanity's exit code is in its report; the shell always succeeds so its output is kept.
    output = rig.shell(
        f"printf 'imageCache: {IMAGE}\\n' > /tmp/sanity-params.yaml; "
        f"timeout 1500 {SANITY} --csi.endpoint unix://{SOCKET} "
        "--csi.stagingdir /tmp/csi-staging --csi.mountdir /tmp/csi-mount "
        "--csi.testvolumeparameters /tmp/sanity-params.yaml "
        f"--csi.testvolumeaccesstype {access_type} "
        f"--ginkgo.junit-report /tmp/sanity-{access_type}.xml --ginkgo.no-color 2>&1; "
        "echo sanity-rc=$?", timeout=1600)
    report = str(rig.read(f"cat /tmp/sanity-{access_type}.xml").stdout)
    (rig.workdir / f"sanity-{access_type}.xml").write_text(report)
    (rig.workdir / f"sanity-{access_type}.out").write_text(output)
    cases = ET.fromstring(report).iter("testcase")
    passed, failed, skipped, pending = [], [], [], []
    for case in cases:
        name = case.get("name", "")
        if name.startswith("[BeforeSuite]") or name.startswith("[AfterSuite]"):
            continue
        status = case.get("status", "")
        if status == "passed":
            passed.append(name)
        elif status == "pending":
            pending.append(name)
        elif status == "skipped":
            node = case.find("skipped")
            skipped.append((name, node.get("message", "") if node is not None else ""))
        else:
            failed.append(name)
    with capsys.disabled():
        print(f"\ncsi-sanity ({access_type}): {len(passed)} passed, {len(failed)} failed, "
              f"{len(skipped)} skipped (capabilities not advertised), {len(pending)} pending")
    assert not failed, f"failed: {failed}\n{output[-6000:]}\n{rig.driver_log()}"
    unexpected = [(n, m) for n, m in skipped if not UNADVERTISED_SKIP.search(m)]
    assert not unexpected, f"skipped for other reasons than capabilities: {unexpected}"
    assert "sanity-rc=0" in output and len(passed) >= 40


# What each script run in the guest starts with: the plugin's client and a block capability.
GUEST_CLIENT = """
import hashlib, json, os, subprocess, sys, threading, time
from vmthunder.csi.client import connect
from vmthunder.csi.proto import csi_pb2
block = csi_pb2.VolumeCapability(
    block=csi_pb2.VolumeCapability.BlockVolume(),
    access_mode=csi_pb2.VolumeCapability.AccessMode(
        mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))
"""

KUBELET = GUEST_CLIENT + """
SOCKET, NODE, IMAGE, SIZE = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
GROW = 32 << 20
c = connect("unix://" + SOCKET)
here = csi_pb2.Topology(segments={"topology.vmthunder.io/node": NODE})
# external-provisioner with WaitForFirstConsumer: the scheduled node first in `preferred`.
vol = c.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
    name="pvc-0d6e3c1e-kubelet", parameters={"imageCache": IMAGE}, volume_capabilities=[block],
    capacity_range=csi_pb2.CapacityRange(required_bytes=SIZE),
    accessibility_requirements=csi_pb2.TopologyRequirement(requisite=[here], preferred=[here]),
), timeout=120).volume
vid = vol.volume_id
pod = "/var/lib/kubelet/pods/7f3a/volumeDevices/kubernetes.io~csi"
staging = "/var/lib/kubelet/plugins/kubernetes.io/csi/volumeDevices/staging/pvc-x"
target = pod + "/pvc-x"
os.makedirs(staging, exist_ok=True)
os.makedirs(pod, exist_ok=True)

def sha(path, size=SIZE):
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        left = size
        while left:
            chunk = f.read(min(left, 1 << 20))
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()

rounds = []
written = bytes(range(256)) * 4096  # 1 MiB the VM writes
for round_ in range(2):
    for _ in range(2):  # kubelet retries: every call must be idempotent
        c.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=vid, staging_target_path=staging, volume_capability=block,
            volume_context=vol.volume_context), timeout=120)
    for _ in range(2):
        c.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=vid, staging_target_path=staging, target_path=target,
            volume_capability=block, volume_context=vol.volume_context), timeout=60)
    info = {"target_is_block": __import__("stat").S_ISBLK(os.stat(target).st_mode),
            "sha256": sha(target), "first_mib_is_written": False}
    with open(target, "rb", buffering=0) as f:
        info["first_mib_is_written"] = f.read(1 << 20) == written
    stats = c.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
        volume_id=vid, volume_path=target))
    info["stats_total"] = stats.usage[0].total
    if round_ == 0:  # the VM writes to its own copy-on-write layer, not to the image
        fd = os.open(target, os.O_WRONLY)
        os.pwrite(fd, written, 0)
        os.fsync(fd)
        os.close(fd)
    else:  # grow the disk under the published device, as external-resizer + kubelet do
        grown = c.controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
            volume_id=vid, capacity_range=csi_pb2.CapacityRange(required_bytes=SIZE + GROW)))
        node = c.node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
            volume_id=vid, volume_path=target, capacity_range=csi_pb2.CapacityRange(
                required_bytes=SIZE + GROW)))
        with open(target, "rb", buffering=0) as f:
            info["grown_size"] = f.seek(0, 2)
            f.seek(SIZE)
            info["tail_is_zero"] = f.read(GROW) == bytes(GROW)
        info["grown_sha256_of_old_size"] = sha(target)
        info["expand_replies"] = [grown.capacity_bytes, node.capacity_bytes]
    for _ in range(2):
        c.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=vid, target_path=target), timeout=60)
    info["target_gone"] = not os.path.exists(target)
    for _ in range(2):
        c.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=vid, staging_target_path=staging), timeout=60)
    info["device_gone"] = not os.path.exists("/dev/mapper/vmt-vol-" + vid)
    rounds.append(info)
image_sha = sha("/dev/mapper/vmt-" + IMAGE)
c.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid), timeout=60)
print(json.dumps({"volume_id": vid, "capacity": vol.capacity_bytes,
                  "topology": dict(vol.accessible_topology[0].segments),
                  "rounds": rounds, "image_sha256_after": image_sha}))
"""


def test_a_volume_driven_like_kubelet_reads_the_image_and_keeps_its_writes(rig: Rig) -> None:
    out = rig.guest_python(KUBELET, timeout=600,
                           args=(SOCKET, rig.node.name, IMAGE, str(IMAGE_SIZE)))
    assert out["capacity"] == IMAGE_SIZE
    assert out["topology"] == {"topology.vmthunder.io/node": rig.node.name}
    first, second = out["rounds"]
    # Freshly staged, the block device at the pod's path reads exactly the image.
    assert first["target_is_block"] and first["sha256"] == rig.image_sha256
    assert first["stats_total"] == IMAGE_SIZE
    # Restaged, it reads the VM's write over the image: the COW data survived unstage.
    written = bytes(range(256)) * 4096
    expected = hashlib.sha256(written + rig.image.read_bytes()[len(written):]).hexdigest()
    assert second["first_mib_is_written"] and second["sha256"] == expected
    # Grown online: the same bytes, then zeros up to the new size.
    grown = IMAGE_SIZE + (32 << 20)
    assert second["expand_replies"] == [grown, grown] and second["grown_size"] == grown
    assert second["tail_is_zero"] and second["grown_sha256_of_old_size"] == expected
    for r in (first, second):
        assert r["target_gone"] and r["device_gone"]
    # The image itself is untouched.
    assert out["image_sha256_after"] == rig.image_sha256
    # DeleteVolume: the node frees the COW data, then the record goes.
    vid = out["volume_id"]
    _wait("the ImageVolume to go", lambda: _volume_gone(rig.custom, vid), timeout=60)
    assert rig.read(f"test -e {STATE}/volumes/{vid}.cow").rc != 0


def _volume_gone(custom: kubernetes.client.CustomObjectsApi, vid: str) -> bool:
    try:
        cast(dict[str, Any], custom.get_cluster_custom_object(GROUP, VERSION, IMAGE_VOLUMES, vid))
    except ApiException as e:
        if e.status == 404:
            return True
        raise
    return False


RESTART_BEFORE = GUEST_CLIENT + """
c = connect("unix://%(socket)s")
vol = c.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
    name="pvc-restart", parameters={"imageCache": "%(image)s"}, volume_capabilities=[block]),
    timeout=120).volume
os.makedirs("/tmp/restart/staging", exist_ok=True)
c.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
    volume_id=vol.volume_id, staging_target_path="/tmp/restart/staging",
    volume_capability=block), timeout=120)
c.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
    volume_id=vol.volume_id, staging_target_path="/tmp/restart/staging",
    target_path="/tmp/restart/target", volume_capability=block), timeout=60)
fd = os.open("/tmp/restart/target", os.O_WRONLY)
os.pwrite(fd, b"written before the restart", 4096)
os.fsync(fd)
os.close(fd)
print(json.dumps({"volume_id": vol.volume_id}))
"""

RESTART_AFTER = GUEST_CLIENT + """
c = connect("unix://%(socket)s")
vid = "%(vid)s"
# kubelet re-issues stage and publish after a plugin restart: both must find the kernel state.
c.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
    volume_id=vid, staging_target_path="/tmp/restart/staging", volume_capability=block),
    timeout=120)
c.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
    volume_id=vid, staging_target_path="/tmp/restart/staging",
    target_path="/tmp/restart/target", volume_capability=block), timeout=60)
with open("/tmp/restart/target", "rb", buffering=0) as f:
    f.seek(4096)
    kept = f.read(26) == b"written before the restart"
c.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
    volume_id=vid, target_path="/tmp/restart/target"), timeout=60)
c.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
    volume_id=vid, staging_target_path="/tmp/restart/staging"), timeout=60)
c.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid), timeout=60)
print(json.dumps({"kept": kept, "device_gone": not os.path.exists("/dev/mapper/vmt-vol-" + vid),
                  "target_gone": not os.path.exists("/tmp/restart/target")}))
"""


def test_a_restarted_node_plugin_finds_its_volumes_in_the_kernel(rig: Rig) -> None:
    before = rig.guest_python(RESTART_BEFORE % {"socket": SOCKET, "image": IMAGE})
    vid = before["volume_id"]
    rig.stop_driver()
    # What the new process knows comes from device-mapper and the API server, nothing else.
    assert rig.read(f"dmsetup info vmt-vol-{vid}").ok
    rig.start_driver()
    after = rig.guest_python(RESTART_AFTER % {"socket": SOCKET, "vid": vid})
    assert after == {"kept": True, "device_gone": True, "target_gone": True}
    _wait("the ImageVolume to go", lambda: _volume_gone(rig.custom, vid), timeout=60)


HELD = GUEST_CLIENT + """
import kubernetes

REPLICA = "%(replica)s"
custom = kubernetes.client.CustomObjectsApi(kubernetes.config.new_client_from_config())

def phase(p):
    custom.patch_cluster_custom_object_status(
        "vmthunder.io", "v1alpha1", "imagereplicas", REPLICA, {"status": {"phase": p}})

c = connect("unix://%(socket)s")
vid = c.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
    name="pvc-held", parameters={"imageCache": "%(image)s"}, volume_capabilities=[block]),
    timeout=120).volume.volume_id
outcome = {}

def stage():
    try:
        c.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=vid, staging_target_path="/tmp/held", volume_capability=block),
            timeout=120)
        outcome["ok"] = time.monotonic()
    except Exception as e:
        outcome["error"] = str(e)

phase("Prefetching")
try:
    t = threading.Thread(target=stage)
    t.start()
    cow = "/dev/mapper/vmt-vol-" + vid
    deadline = time.monotonic() + 50
    while not os.path.exists(cow) and time.monotonic() < deadline:
        time.sleep(0.2)
    built_while_held = os.path.exists(cow)
    time.sleep(3)
    returned_while_held = dict(outcome)
    released = time.monotonic()
    phase("Hydrating")
    t.join()
finally:  # the module's other tests find the replica as the rig left it
    phase("Attached")
c.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
    volume_id=vid, staging_target_path="/tmp/held"), timeout=60)
c.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid), timeout=60)
print(json.dumps({"built_while_held": built_while_held,
                  "returned_while_held": returned_while_held,
                  "staged_after_release_s": outcome["ok"] - released if "ok" in outcome else None,
                  "error": outcome.get("error")}))
"""


def test_stage_builds_the_volume_but_holds_it_while_the_boot_set_is_prefetched(rig: Rig) -> None:
    out = rig.guest_python(HELD % {"socket": SOCKET, "image": IMAGE,
                                   "replica": f"{IMAGE}.{rig.node.name}"}, timeout=300)
    # The copy-on-write device is built at once; NodeStage returns only when the agent
    # reports the boot profile local (here: the phase moves on), within a watch's latency.
    assert out["built_while_held"], out
    assert out["returned_while_held"] == {}, out
    assert out["error"] is None and out["staged_after_release_s"] < 10, out


NODES = """
import json, os
from vmthunder.node import dm

def rdev(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return "%d:%d" % (os.major(st.st_rdev), os.minor(st.st_rdev))

def kernel_dev(name):
    for e in os.listdir("/sys/block"):
        if e.startswith("dm-") and open(f"/sys/block/{e}/dm/name").read().strip() == name:
            return open(f"/sys/block/{e}/dev").read().strip()

dm.create("vmt-nodes-a", [dm.zero(8)])
dm.create("vmt-nodes-b", [dm.zero(8)])
try:
    a, b = dm.mapper_path("vmt-nodes-a"), dm.mapper_path("vmt-nodes-b")
    # A killed remove + create can leave a's path naming another device; a killed create none.
    os.unlink(a)
    major, minor = map(int, kernel_dev("vmt-nodes-b").split(":"))
    os.mknod(a, 0o600 | 0o060000, os.makedev(major, minor))
    os.unlink(b)
    stale = {"a": rdev(a), "b": rdev(b)}
    dm.ensure_nodes("vmt-nodes-a", "vmt-nodes-b", "vmt-nodes-absent")
    print(json.dumps({"stale": stale, "a": rdev(a), "b": rdev(b),
                      "kernel_a": kernel_dev("vmt-nodes-a"),
                      "kernel_b": kernel_dev("vmt-nodes-b"),
                      "absent": os.path.exists(dm.mapper_path("vmt-nodes-absent"))}))
finally:
    dm.remove("vmt-nodes-a")
    dm.remove("vmt-nodes-b")
"""


def test_device_nodes_missing_or_naming_another_device_are_made_right(rig: Rig) -> None:
    out = rig.guest_python(NODES)
    assert out["stale"] == {"a": out["kernel_b"], "b": None}  # the damage the test made
    assert (out["a"], out["b"]) == (out["kernel_a"], out["kernel_b"])
    assert out["absent"] is False  # no node for a device the kernel lacks
