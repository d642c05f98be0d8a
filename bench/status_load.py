"""Load benchmark: node agents' status updates through the real API server, at scale.

A fresh control plane (etcd + kube-apiserver + kube-controller-manager), N Node objects, the
operator as a real process, one ImageCache planned over every node. Then the agents' traffic
is replayed for some minutes: each replica's status patched (heartbeat, hydration progress,
bytes from its parent) at --rate updates per minute in total, as N agents would. Measured:
the rate the API server took, failed updates, the operator's resident memory over time (it
watches every update), its own writes in response, and whether every replica is still there
and still planned (no orphan, no re-plan storm). And what the agents' side reads: the watch
events a few interior nodes' views (vmthunder.node.api.WatchedKube: own, children's, parents'
replicas) receive, against a watch of every replica (what each agent had before) in the
same run; an agent's events times N is the API server's fan-out to the agents.

    python bench/status_load.py [--nodes 500] [--rate 5000] [--minutes 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kubernetes
import yaml
from control_plane import operator_writes

from vmthunder.kube import load_api_client
from vmthunder.lab.controlplane import free_port, start_control_plane
from vmthunder.lab.nodes import ZONE_LABEL, register_nodes
from vmthunder.node.api import Obj, WatchedKube
from vmthunder.operator.informer import Informer
from vmthunder.operator.model import GROUP, IMAGE_CACHES, IMAGE_REPLICAS, VERSION, resource_path
from vmthunder.operator.planner import ORIGIN

TARGET_RATE_PER_MIN = 5000
MEMORY_GROWTH_LIMIT = 1.10  # the last sample against the first one after warm-up


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class CountedView(WatchedKube):
    """An agent's watched view that counts the replica events it receives."""

    events = 0

    def _replica_changed(self, old: Obj | None, new: Obj | None) -> None:
        self.events += 1
        super()._replica_changed(old, new)


def agents_views(cp: Any, replicas: list[dict[str, Any]], k: int = 3
                 ) -> tuple[list[CountedView], Informer[Obj], list[int]]:
    """`k` interior nodes' views (they have a parent and children: the most an agent watches)
    and one watch of every replica, all listed; returns them and the all-replica count box."""
    parents = {r["spec"]["node"]: r["spec"]["parent"] for r in replicas}
    interior = sorted({p for p in parents.values() if p != ORIGIN and parents.get(p) != ORIGIN})
    views = [CountedView(cp.rest(), node) for node in interior[:k]]
    for v in views:
        v.start()
    every = [0]

    def count(old: Obj | None, new: Obj | None) -> None:
        every[0] += 1

    everything = Informer[Obj](cp.rest(), resource_path(IMAGE_REPLICAS), dict, count).start()
    everything.synced.wait(60)
    time.sleep(2)  # the views' parents' watches list too
    for v in views:
        v.events = 0
    every[0] = 0
    return views, everything, every


def status_of(i: int, round_: int, regions: int) -> dict:
    hydrated = min(regions, round_ * 97 + i % 13)
    return {"status": {
        "phase": "Hydrated" if hydrated == regions else "Hydrating",
        "hydratedRegions": hydrated, "totalRegions": regions,
        "bytesFromParent": hydrated * 65536, "bytesServed": 0,
        "heartbeat": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=500)
    p.add_argument("--rate", type=int, default=TARGET_RATE_PER_MIN, help="updates per minute")
    p.add_argument("--minutes", type=float, default=3.0)
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="vmt-bench-load-") as tmp:
        workdir = Path(tmp)
        cp = start_control_plane(workdir / "cp")
        operator = None
        try:
            cp.install_vmthunder_crds()
            os.environ["KUBECONFIG"] = str(cp.kubeconfig)
            client = load_api_client(pool_size=16)  # as many connections as writers
            core = kubernetes.client.CoreV1Api(client)
            custom = kubernetes.client.CustomObjectsApi(client)
            register_nodes(core, ((f"n{i:05d}", {ZONE_LABEL: f"z{i % 4}"})
                                  for i in range(a.nodes)))
            metrics = free_port()
            operator = cp.spawn_operator(workdir / "operator.log", metrics_port=metrics)
            cp.kubectl("apply", "-f", "-", input=yaml.safe_dump({
                "apiVersion": f"{GROUP}/{VERSION}", "kind": "ImageCache",
                "metadata": {"name": "golden"},
                "spec": {"source": {"http": {"url": "http://images.local/golden.raw"}},
                         "fanout": 4, "sizeBytes": 1 << 30,
                         "nodeSelector": {}}}))  # {}: pre-warm every node
            deadline = time.monotonic() + 300
            while (custom.get_cluster_custom_object(GROUP, VERSION, IMAGE_CACHES, "golden")
                   .get("status", {}).get("nodeCount")) != a.nodes:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"not planned; see {workdir / 'operator.log'}")
                time.sleep(0.5)
            names = [r["metadata"]["name"] for r in custom.list_cluster_custom_object(
                GROUP, VERSION, IMAGE_REPLICAS)["items"]]
            parents0 = _parents(custom)
            views, everything, every = agents_views(
                cp, custom.list_cluster_custom_object(GROUP, VERSION, IMAGE_REPLICAS)["items"])
            writes0 = operator_writes(metrics)
            print(f"{a.nodes} replicas planned; replaying {a.rate} status updates a minute "
                  f"for {a.minutes:g} min", flush=True)

            sent = failed = 0
            lock = threading.Lock()
            samples: list[tuple[float, float]] = []
            interval = 60.0 / a.rate
            t0 = time.monotonic()
            end = t0 + a.minutes * 60

            def patch(k: int) -> None:
                nonlocal sent, failed
                i = k % len(names)
                try:
                    custom.patch_cluster_custom_object_status(
                        GROUP, VERSION, IMAGE_REPLICAS, names[i],
                        status_of(i, k // len(names), 16384))
                    with lock:
                        sent += 1
                except Exception:
                    with lock:
                        failed += 1

            with ThreadPoolExecutor(12) as pool:
                k, next_sample = 0, t0
                while (now := time.monotonic()) < end:
                    if now >= next_sample:
                        samples.append((now - t0, rss_mib(operator.pid)))
                        next_sample += 10
                    due = t0 + k * interval
                    if due > now:
                        time.sleep(min(due - now, 0.05))
                        continue
                    pool.submit(patch, k)
                    k += 1
            took = time.monotonic() - t0
            samples.append((took, rss_mib(operator.pid)))
            time.sleep(3)  # let the operator finish what the last updates woke
            scoped = [v.events / took * 60 for v in views]
            unscoped = every[0] / took * 60
            everything.stop()
            writes = operator_writes(metrics) - writes0
            left = custom.list_cluster_custom_object(GROUP, VERSION, IMAGE_REPLICAS)["items"]
            moved = sum(1 for n, par in _parents(custom).items() if parents0.get(n) != par)
            alive = operator.poll() is None
        finally:
            if operator is not None:
                operator.terminate()
                operator.wait(timeout=30)
            cp.stop()

    warm = [m for t, m in samples if t >= 30] or [m for _, m in samples]
    growth = warm[-1] / warm[0]
    rate = sent / took * 60
    print("\n  t s   operator RSS MiB")
    for t, m in samples:
        print(f"{t:5.0f}   {m:8.1f}")
    print(f"\n{'updates':>8} {'failed':>7} {'per min':>8} {'operator writes':>16} "
          f"{'replicas':>9} {'re-parented':>12} {'RSS first':>10} {'RSS last':>9} {'growth':>7}")
    print(f"{sent:>8} {failed:>7} {rate:>8.0f} {writes:>16} {len(left):>9} {moved:>12} "
          f"{warm[0]:>10.1f} {warm[-1]:>9.1f} {growth:>7.3f}")
    print(f"\nwatch events an agent reads per minute: {', '.join(f'{e:.0f}' for e in scoped)} "
          f"(own, children's and parents' replicas; {len(scoped)} interior nodes) against "
          f"{unscoped:.0f} watching every replica; for the {a.nodes} agents "
          f"{a.nodes * max(scoped, default=0):.0f} against {a.nodes * unscoped:.0f} a minute")
    ok = (failed == 0 and rate >= 0.95 * a.rate and len(left) == a.nodes and moved == 0
          and growth <= MEMORY_GROWTH_LIMIT and alive)
    print(f"\ntargets: >= {0.95 * a.rate:.0f} updates/min taken, none failed, every replica kept "
          f"and none re-parented, operator alive with memory flat (last <= "
          f"{MEMORY_GROWTH_LIMIT}x first after 30 s): {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


def _parents(custom: kubernetes.client.CustomObjectsApi) -> dict[str, str]:
    return {r["metadata"]["name"]: r["spec"].get("parent", "")
            for r in custom.list_cluster_custom_object(GROUP, VERSION, IMAGE_REPLICAS)["items"]}


if __name__ == "__main__":
    sys.exit(main())
