"""`vmthunder status`: the tree of an ImageCache with each node's phase and hydration."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import yaml

from vmthunder.lab.controlplane import ControlPlane
from vmthunder.operator.planner import ORIGIN
from vmthunder.operator.status import render_status


def replica(cache: str, node: str, parent: str, depth: int, **status: Any) -> dict[str, Any]:
    return {
        "apiVersion": "vmthunder.io/v1alpha1", "kind": "ImageReplica",
        "metadata": {"name": f"{cache}.{node}",
                     "labels": {"vmthunder.io/image-cache": cache, "vmthunder.io/node": node}},
        "spec": {"imageCache": cache, "node": node, "parent": parent, "depth": depth},
        "status": status,
    }


CACHE = {"metadata": {"name": "golden"}, "status": {"phase": "Distributing", "treeDepth": 2}}
REPLICAS = [
    replica("golden", "node-a", ORIGIN, 1, phase="Hydrated", hydratedRegions=4096,
            totalRegions=4096),
    replica("golden", "node-b", ORIGIN, 1, phase="Hydrating", hydratedRegions=1000,
            totalRegions=4096),
    replica("golden", "node-c", "node-a", 2, phase="Hydrating", hydratedRegions=1520,
            totalRegions=4096, attachedParent="node-b"),
    replica("golden", "node-d", "node-a", 2),
]


def test_status_draws_each_node_under_its_parent_with_phase_and_hydration() -> None:
    text = render_status(CACHE, REPLICAS)
    assert text.splitlines() == [
        "golden  Distributing  nodes 4  hydrated 1/4  depth 2",
        "origin",
        "├── node-a  Hydrated    100%  (4096/4096 regions)",
        "│   ├── node-c  Hydrating    37%  (1520/4096 regions)  reading from node-b",
        "│   └── node-d  Pending        -",
        "└── node-b  Hydrating    24%  (1000/4096 regions)",
    ]


def test_the_longest_phase_keeps_the_hydration_column_aligned() -> None:
    text = render_status(CACHE, [
        replica("golden", "node-a", ORIGIN, 1, phase="Prefetching", hydratedRegions=10,
                totalRegions=4096),
        replica("golden", "node-b", ORIGIN, 1, phase="Hydrating", hydratedRegions=1000,
                totalRegions=4096)])
    a, b = text.splitlines()[2:]
    assert a.index("%") == b.index("%"), text


@pytest.mark.apiserver
def test_status_command_reads_the_tree_from_the_api_server(control_plane: ControlPlane) -> None:
    cp = control_plane
    cp.kubectl("apply", "-f", "-", input=yaml.safe_dump({
        "apiVersion": "vmthunder.io/v1alpha1", "kind": "ImageCache",
        "metadata": {"name": "status-golden"},
        "spec": {"source": {"http": {"url": "http://images.example/golden.raw"}},
                 "nodeSelector": {"vmthunder.io/status-test": "none"}},
    }))
    for r in (replica("status-golden", "s-node-a", ORIGIN, 1),
              replica("status-golden", "s-node-b", "s-node-a", 2)):
        status = {"phase": "Hydrating", "hydratedRegions": 50, "totalRegions": 200}
        cp.kubectl("apply", "-f", "-", input=yaml.safe_dump({**r, "status": {}}))
        cp.kubectl("patch", "imagereplica", r["metadata"]["name"], "--subresource=status",
                   "--type=merge", "-p", yaml.safe_dump({"status": status}))
    result = subprocess.run([sys.executable, "-m", "vmthunder.cli", "status", "status-golden"],
                            env=cp.env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("status-golden ") and "nodes 2" in lines[0]
    assert lines[1:] == [
        "origin",
        "└── s-node-a  Hydrating    25%  (50/200 regions)",
        "    └── s-node-b  Hydrating    25%  (50/200 regions)",
    ]
    missing = subprocess.run([sys.executable, "-m", "vmthunder.cli", "status", "no-such-cache"],
                             env=cp.env(), capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "not found" in missing.stdout
    # Credentials that may not read ImageCaches: the refusal in a line, not a traceback.
    cp.kubectl("create", "serviceaccount", "status-nobody", "-n", "default")
    token = cp.kubectl("create", "token", "status-nobody", "-n", "default").stdout.strip()
    env = {**cp.env(), "KUBECONFIG": str(cp.token_kubeconfig("status-nobody", token))}
    refused = subprocess.run([sys.executable, "-m", "vmthunder.cli", "status", "status-golden"],
                             env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert "cannot read imagecache 'status-golden': (403)" in refused.stderr
