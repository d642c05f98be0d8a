"""Node objects without kubelets: the control-plane lab registers nodes the way a kubelet would."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import kubernetes

ZONE_LABEL = "topology.kubernetes.io/zone"


def register_node(core: kubernetes.client.CoreV1Api, name: str,
                  labels: Mapping[str, str] | None = None, ready: bool = True) -> None:
    core.create_node({"metadata": {"name": name, "labels": dict(labels or {})}},  # type: ignore[arg-type]
                     _preload_content=False)
    set_node_ready(core, name, ready)


def set_node_ready(core: kubernetes.client.CoreV1Api, name: str, ready: bool) -> None:
    condition = {
        "type": "Ready",
        "status": "True" if ready else "False",
        "reason": "KubeletReady" if ready else "KubeletNotReady",
        "lastHeartbeatTime": datetime.now(UTC).isoformat(),
    }
    core.patch_node_status(name, {"status": {"conditions": [condition]}}, _preload_content=False)


def register_nodes(
    core: kubernetes.client.CoreV1Api,
    nodes: Iterable[tuple[str, Mapping[str, str]]],
    parallel: int = 16,
) -> None:
    """Registers many ready nodes at once (a thousand in a few seconds)."""
    with ThreadPoolExecutor(parallel) as pool:
        for future in [pool.submit(register_node, core, name, labels) for name, labels in nodes]:
            future.result()
