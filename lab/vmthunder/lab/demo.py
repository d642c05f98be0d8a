"""The control-plane demo: a real API server, simulated nodes, the operator, one ImageCache.

Prints the tree the operator planned. (The full lab run, with guests booting VMs, builds on it.)
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import kubernetes
import yaml

from vmthunder.lab.controlplane import start_control_plane
from vmthunder.lab.nodes import ZONE_LABEL, register_nodes
from vmthunder.operator.model import GROUP, IMAGE_CACHES, IMAGE_REPLICAS, VERSION
from vmthunder.operator.treeview import render_tree

REPO = Path(__file__).resolve().parents[3]


def run_demo(nodes: int = 24, zones: int = 3, fanout: int = 3) -> int:
    with tempfile.TemporaryDirectory(prefix="vmt-demo-") as tmp:
        t0 = time.monotonic()
        cp = start_control_plane(Path(tmp) / "cp")
        operator = None
        try:
            print(f"control plane up in {time.monotonic() - t0:.1f} s ({cp.url})")
            cp.install_vmthunder_crds()
            client = kubernetes.config.new_client_from_config(str(cp.kubeconfig))
            core = kubernetes.client.CoreV1Api(client)
            custom = kubernetes.client.CustomObjectsApi(client)
            register_nodes(core, ((f"node-{i:02d}", {ZONE_LABEL: f"zone-{chr(97 + i % zones)}",
                                                     "vmthunder.io/prewarm": "true"})
                                  for i in range(nodes)))
            print(f"registered {nodes} nodes in {zones} zones")
            operator = cp.spawn_operator(Path(tmp) / "operator.log")
            manifest = yaml.safe_load((REPO / "deploy/examples/imagecache.yaml").read_text())
            manifest["spec"]["fanout"] = fanout
            t1 = time.monotonic()
            cp.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))
            name = manifest["metadata"]["name"]
            while (custom.get_cluster_custom_object(GROUP, VERSION, IMAGE_CACHES, name)
                   .get("status", {}).get("nodeCount") != nodes):
                if operator.poll() is not None or time.monotonic() - t1 > 120:
                    print((Path(tmp) / "operator.log").read_text()[-3000:], file=sys.stderr)
                    return 1
                time.sleep(0.1)
            print(f"planned in {time.monotonic() - t1:.2f} s after kubectl apply\n")
            replicas = custom.list_cluster_custom_object(GROUP, VERSION, IMAGE_REPLICAS)["items"]
            zone_of = {n.metadata.name: n.metadata.labels.get(ZONE_LABEL)
                       for n in core.list_node().items}
            parents = {r["spec"]["node"]: r["spec"]["parent"] for r in replicas}
            notes = {r["spec"]["node"]: f"depth {r['spec']['depth']}  {zone_of[r['spec']['node']]}"
                     for r in replicas}
            print(render_tree(parents, notes, root_label=f"origin ({name})"))
            print()
            print(cp.kubectl("get", "imagecaches").stdout)
            return 0
        finally:
            if operator is not None:
                operator.terminate()
                operator.wait(timeout=30)
            cp.stop()
