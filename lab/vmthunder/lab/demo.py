"""`vmthunder demo`: the main job, N VMs provisioned end to end in the qemu lab
(vmthunder.lab.provision); `--control-plane-only`: the API server, simulated nodes, the
operator and one ImageCache, printing the tree the operator planned (no guests).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

from vmthunder.operator.model import GROUP, IMAGE_CACHES, IMAGE_REPLICAS, VERSION

REPO = Path(__file__).resolve().parents[3]
# The largest N whose whole run (boot, provision, hydrate, tear down) stays under 5 minutes on
# 2 cores under TCG: 197 s at N = 2, 317 s at N = 3, 384 s at N = 4 (2026-12-04).
DEFAULT_NODES = 2


def run_demo(args: argparse.Namespace) -> int:
    if args.control_plane_only:
        return run_control_plane_demo(nodes=args.nodes or 24, zones=args.zones,
                                      fanout=args.fanout or 3)
    from vmthunder.lab.lab import LabError
    from vmthunder.lab.provision import Options, run_provision

    options = Options(
        nodes=args.nodes or DEFAULT_NODES, image=args.image, fanout=args.fanout or 2,
        origin_fanout=args.origin_fanout, gap_scale=args.gap_scale,
        prefetch=not args.no_prefetch, hold_seconds=args.hold_seconds, real_boot=args.real_boot,
        rate_mbit=args.rate_mbit, hydrate_timeout=args.hydrate_timeout, results=Path(args.results),
    )
    try:
        return run_provision(options)
    except LabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    from vmthunder.lab.lab import DEFAULT_RATE_MBIT
    from vmthunder.lab.replay import DEFAULT_GAP_SCALE

    p.add_argument("--nodes", type=int, default=0,
                   help=f"node guests, one VM each (default {DEFAULT_NODES}; "
                        "24 with --control-plane-only)")
    p.add_argument("--image", default="small", help="golden image: small, large or a path")
    p.add_argument("--fanout", type=int, default=0, help="children per node (default 2)")
    p.add_argument("--origin-fanout", type=int, default=1,
                   help="nodes the origin serves directly")
    p.add_argument("--gap-scale", type=float, default=DEFAULT_GAP_SCALE,
                   help="factor on the recorded (TCG) compute gaps of the replayed boot")
    p.add_argument("--no-prefetch", action="store_true", help="on demand only")
    p.add_argument("--hold-seconds", type=int, default=None,
                   help="how long volumes wait for their node's boot-profile prefetch "
                        "(ImageCache spec.prefetch.holdSeconds; default the CRD's, 60; 0: none)")
    p.add_argument("--real-boot", action="store_true",
                   help="boot the golden image for real (qemu TCG on the host, disk = the "
                        "node's published volume over NBD) instead of replaying its recorded "
                        "boot; for small N")
    p.add_argument("--rate-mbit", type=int, default=DEFAULT_RATE_MBIT,
                   help="lab link rate standing for 1 Gbit/s")
    p.add_argument("--hydrate-timeout", type=float, default=240,
                   help="seconds to wait after the boots for every cache to be complete")
    p.add_argument("--results", default=str(REPO / "results"), help="where JSON + PNG go")
    p.add_argument("--control-plane-only", action="store_true",
                   help="the old demo: plan a tree over simulated Node objects, no guests")
    p.add_argument("--zones", type=int, default=3, help="(--control-plane-only) zones")


def run_control_plane_demo(nodes: int = 24, zones: int = 3, fanout: int = 3) -> int:
    # Here, not at the top: every `vmthunder` command builds the demo's arguments, and the node
    # agent and CSI plugin start in guests where each import costs seconds.
    import kubernetes
    import yaml

    from vmthunder.lab.controlplane import start_control_plane
    from vmthunder.lab.nodes import ZONE_LABEL, register_nodes
    from vmthunder.operator.treeview import render_tree

    with tempfile.TemporaryDirectory(prefix="vmt-demo-") as tmp:
        t0 = time.monotonic()
        cp = start_control_plane(Path(tmp) / "cp")
        operator = None
        try:
            print(f"control plane up in {time.monotonic() - t0:.1f} s ({cp.url})")
            cp.install_vmthunder_crds()
            client = kubernetes.config.new_client_from_config(  # type: ignore[no-untyped-call]
                str(cp.kubeconfig))
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

            def node_count() -> object:
                ic = cast(dict[str, Any], custom.get_cluster_custom_object(
                    GROUP, VERSION, IMAGE_CACHES, name))
                return (ic.get("status") or {}).get("nodeCount")

            while node_count() != nodes:
                if operator.poll() is not None or time.monotonic() - t1 > 120:
                    print((Path(tmp) / "operator.log").read_text()[-3000:], file=sys.stderr)
                    return 1
                time.sleep(0.1)
            print(f"planned in {time.monotonic() - t1:.2f} s after kubectl apply\n")
            replicas = cast(dict[str, Any], custom.list_cluster_custom_object(
                GROUP, VERSION, IMAGE_REPLICAS))["items"]
            zone_of = {n.metadata.name: (n.metadata.labels or {}).get(ZONE_LABEL)
                       for n in core.list_node().items if n.metadata is not None}
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
