"""Control-plane benchmark: `kubectl apply` of an ImageCache to all replicas planned.

For each size, a fresh real control plane (etcd + kube-apiserver + kube-controller-manager),
N registered Node objects in 8 zones, the operator as a real process. Measures the time from
the apply to the ImageCache reporting every node planned (its replicas are written before its
status), the operator's API writes (from its metrics endpoint) and its peak memory.

    python bench/control_plane.py [--sizes 100,1000,5000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import kubernetes
import yaml

from vmthunder.lab.controlplane import ControlPlane, free_port, start_control_plane
from vmthunder.lab.nodes import ZONE_LABEL, register_nodes
from vmthunder.operator.model import GROUP, IMAGE_CACHES, IMAGE_REPLICAS, VERSION

REPO = Path(__file__).resolve().parent.parent
TARGET_SECONDS_AT_5000 = 30.0
TARGET_WRITES_RATIO = 1.2
TARGET_MEMORY_MIB = 300


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process: comparable even on a loaded machine."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def operator_writes(port: int) -> int:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return int(sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("vmthunder_operator_api_writes_total")))


def run_size(n: int, workdir: Path) -> dict[str, float]:
    cp: ControlPlane = start_control_plane(workdir)
    operator = None
    try:
        cp.install_vmthunder_crds()
        client = kubernetes.config.new_client_from_config(str(cp.kubeconfig))
        core = kubernetes.client.CoreV1Api(client)
        custom = kubernetes.client.CustomObjectsApi(client)
        t = time.monotonic()
        register_nodes(core, ((f"n{i:05d}", {ZONE_LABEL: f"z{i % 8}"}) for i in range(n)))
        register_s = time.monotonic() - t

        metrics = free_port()
        operator = subprocess.Popen(
            [sys.executable, "-m", "vmthunder.cli", "operator", "--metrics-port", str(metrics)],
            env=cp.env(), stdout=open(workdir / "operator.log", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        time.sleep(3)  # let the operator list the nodes and take the lead

        manifest = {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "ImageCache",
            "metadata": {"name": "golden"},
            "spec": {"source": {"http": {"url": "http://images.local/golden.raw"}},
                     "fanout": 4, "nodeSelector": {}},
        }
        api_pid = cp.processes["kube-apiserver"].pid
        cpu0 = {"op": cpu_seconds(operator.pid), "api": cpu_seconds(api_pid)}
        t0 = time.monotonic()
        cp.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))
        while True:
            status = custom.get_cluster_custom_object(GROUP, VERSION, IMAGE_CACHES, "golden")
            if status.get("status", {}).get("nodeCount") == n:
                break
            if time.monotonic() - t0 > 600 or operator.poll() is not None:
                raise RuntimeError(f"not planned; see {workdir / 'operator.log'}")
            time.sleep(0.1)
        planned_s = time.monotonic() - t0
        op_cpu = cpu_seconds(operator.pid) - cpu0["op"]
        api_cpu = cpu_seconds(api_pid) - cpu0["api"]
        time.sleep(2)  # let follow-up passes (watch echoes of its own writes) run
        replicas = custom.list_cluster_custom_object(GROUP, VERSION, IMAGE_REPLICAS)["items"]
        return {
            "nodes": n, "register_s": register_s, "planned_s": planned_s,
            "replicas": len(replicas), "depth": status["status"]["treeDepth"],
            "writes": operator_writes(metrics), "rss_mib": peak_rss_mib(operator.pid),
            "operator_cpu_s": op_cpu, "apiserver_cpu_s": api_cpu, "load": os.getloadavg()[0],
        }
    finally:
        if operator is not None:
            operator.terminate()
            operator.wait(timeout=30)
        cp.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="100,1000,5000")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="vmt-bench-cp-") as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            rows.append(run_size(n, Path(tmp) / f"n{n}"))
            r = rows[-1]
            print(f"  {n} nodes: planned in {r['planned_s']:.1f} s", file=sys.stderr)
    print(f"\n{'nodes':>6} {'planned s':>10} {'replicas':>9} {'depth':>6} {'writes':>7} "
          f"{'writes/replica':>15} {'operator MiB':>13} {'operator CPU s':>15} "
          f"{'apiserver CPU s':>16} {'load':>5}")
    ok = True
    for r in rows:
        ratio = r["writes"] / max(r["replicas"], 1)
        print(f"{r['nodes']:>6} {r['planned_s']:>10.1f} {r['replicas']:>9} {r['depth']:>6} "
              f"{r['writes']:>7} {ratio:>15.3f} {r['rss_mib']:>13.0f} {r['operator_cpu_s']:>15.1f} "
              f"{r['apiserver_cpu_s']:>16.1f} {r['load']:>5.1f}")
        ok &= r["replicas"] == r["nodes"] and ratio <= TARGET_WRITES_RATIO
        ok &= r["rss_mib"] <= TARGET_MEMORY_MIB
        if r["nodes"] >= 5000:
            ok &= r["planned_s"] <= TARGET_SECONDS_AT_5000
    print(f"\ntargets: 5,000 nodes planned < {TARGET_SECONDS_AT_5000:.0f} s, writes <= "
          f"{TARGET_WRITES_RATIO}x replicas, operator < {TARGET_MEMORY_MIB} MiB: "
          f"{'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
