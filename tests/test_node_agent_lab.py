"""The node agent end to end: real kube-apiserver on the host, agents in lab guests.

O (a node guest standing in for the origin: 32 MiB image over LIO with CHAP) -> A -> B. The
test writes the ImageCache, the CHAP Secret, the boot-profile ConfigMap and the two
ImageReplicas (as the operator would); `vmthunder agent` on A and B does the rest. B's agent
is killed mid-hydration and restarted: it converges to the same stack and both nodes end
Detached, B serving the image's exact bytes, each within 1.1x bytes-from-parent/cached.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmthunder.lab.controlplane import ControlPlane, start_control_plane
from vmthunder.lab.lab import Guest, Lab
from vmthunder.node import labdrive as ld
from vmthunder.node import names

pytestmark = pytest.mark.lab

SIZE = 32 << 20
REGION = 65536
IMG = "golden"
CHAP = {"username": "vmthunder", "password": "agentsecret123"}


def agent_cmd(g: Guest, cp: ControlPlane) -> str:
    env = (f"KUBECONFIG={cp.kubeconfig} PYTHONPATH={ld.REPO}/node:{ld.REPO}/lab:"
           f"{ld.REPO}/operator")
    return (f"{env} {ld.VENV_PY} -m vmthunder.node.cli --node {g.name} --export-ip {g.ip} "
            f"--interval 1 >> /tmp/agent.log 2>&1")


def start_agent(g: Guest, cp: ControlPlane) -> None:
    g.start_background(["/bin/sh", "-c", f"exec {agent_cmd(g, cp)}"], log="/tmp/agent.out")


def stop_agent(g: Guest) -> None:
    ld.retry_run(g, "pkill -9 -f 'vmthunder.node.cli' ; sleep 0.5")


def replica(cp: ControlPlane, node: str) -> dict[str, Any]:
    out = cp.kubectl("get", "imagereplica", f"{IMG}.{node}", "-o", "json").stdout
    r: dict[str, Any] = json.loads(out)
    return r


def wait_phase(cp: ControlPlane, node: str, phases: set[str], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        st = replica(cp, node).get("status") or {}
        if st.get("phase") in phases:
            return st
        assert st.get("phase") != "Failed", st
        assert time.monotonic() < deadline, f"{node}: {st}"
        time.sleep(2)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, ControlPlane]]:
    image = ld.golden_image(SIZE)
    with Lab.up(nodes=3, origin=False, rate_mbit=0) as lab:
        workdir = Path(tmp_path_factory.mktemp("agent-cp"))
        cp = start_control_plane(workdir / "cp", bind_address=lab.host_ip,
                                 controller_manager=False)
        try:
            cp.install_vmthunder_crds()
            yield lab, cp
        finally:
            cp.stop()
        _ = image


def test_agents_build_the_tree_survive_a_restart_and_detach(
        world: tuple[Lab, ControlPlane]) -> None:
    lab, cp = world
    o, a, b = lab.nodes[:3]
    image = ld.golden_image(SIZE)
    for g in (o, a, b):
        ld.prepare_node(g)
    loop = o.run(f"losetup -f --show -r {image}", check=True).stdout.strip()
    origin_iqn = f"{names.IQN_BASE}:origin.{IMG}"
    ld.local(o, "export", {"image": IMG, "iqn": origin_iqn, "device": loop, "ip": o.ip,
                           "chap": CHAP, "initiators": [a.iqn]})
    profile = json.dumps(ld.synthetic_profile(SIZE))
    docs = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "vmthunder"}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "chap",
                                                            "namespace": "vmthunder"},
         "data": {k: base64.b64encode(v.encode()).decode() for k, v in CHAP.items()}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "profile",
                                                               "namespace": "vmthunder"},
         "data": {"profile": profile}},
        {"apiVersion": "vmthunder.io/v1alpha1", "kind": "ImageCache", "metadata": {"name": IMG},
         "spec": {"source": {"iscsi": {"portal": f"{o.ip}:3260", "iqn": origin_iqn}},
                  "sizeBytes": SIZE, "regionSizeBytes": REGION, "fanout": 3,
                  "chapSecretRef": {"name": "chap", "namespace": "vmthunder"},
                  "prefetch": {"profileConfigMap": {"name": "profile",
                                                    "namespace": "vmthunder"}},
                  # slow enough that the restart below lands mid-hydration
                  "hydration": {"throttleBytesPerSecond": 1 << 20}}},
    ]
    for node, parent, depth in ((a.name, "@origin", 1), (b.name, a.name, 2)):
        docs.append({"apiVersion": "vmthunder.io/v1alpha1", "kind": "ImageReplica",
                     "metadata": {"name": f"{IMG}.{node}",
                                  "labels": {"vmthunder.io/image-cache": IMG,
                                             "vmthunder.io/node": node}},
                     "spec": {"imageCache": IMG, "node": node, "parent": parent,
                              "depth": depth}})
    cp.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(d) for d in docs))

    start_agent(a, cp)
    start_agent(b, cp)
    st_b = wait_phase(cp, b.name, {"Hydrating"}, 900)  # agent start-up is minutes under TCG
    assert st_b["exportAddress"]["iqn"] == names.export_iqn(IMG, b.name)
    assert st_b["attachedParent"] == a.name and st_b["heartbeat"]

    # Kill B's agent mid-hydration, restart it: same devices and sessions, hydration goes on.
    stop_agent(b)
    before = ld.retry_run(b, "dmsetup ls | sort; iscsiadm -m session | sort").stdout
    h0 = (replica(cp, b.name)["status"]).get("hydratedRegions", 0)
    start_agent(b, cp)
    time.sleep(8)
    after = ld.retry_run(b, "dmsetup ls | sort; iscsiadm -m session | sort").stdout
    if "Detached" not in json.dumps(replica(cp, b.name)["status"]["phase"]):
        assert before == after
    assert before.count(f"vmt-{IMG}\t") == 1 and before.count("tcp:") == 1, before

    for g in (a, b):
        st = wait_phase(cp, g.name, {"Detached"}, 900)
        assert st["hydratedRegions"] == st["totalRegions"] == SIZE // REGION
        assert st["attachedParent"] == ""
        assert st["bytesFromParent"] <= 1.1 * SIZE, st
        print(f"{g.name}: {st['bytesFromParent']} B from parent, served {st['bytesServed']} B")
    assert replica(cp, b.name)["status"]["hydratedRegions"] >= h0
    assert ld.retry_run(b, "iscsiadm -m session").rc != 0  # detached from A
    dev = f"/dev/mapper/{names.cache_dev(IMG)}"
    assert ld.guest_sha256(b, dev, SIZE) == ld.sha256_file(image)
    assert ld.guest_sha256(a, dev, SIZE) == ld.sha256_file(image)
    for g in (a, b):
        stop_agent(g)
