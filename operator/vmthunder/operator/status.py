"""`vmthunder status`: one ImageCache's distribution tree, each node with its phase and hydration.

    $ vmthunder status debian-golden
    debian-golden  Distributing  nodes 5  hydrated 1/5  depth 2
    origin
    ├── node-a  Hydrated    100%  (4096/4096 regions)
    │   └── node-c  Hydrating    37%  (1520/4096 regions)
    ...
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import kubernetes
from kubernetes.client.exceptions import ApiException

from vmthunder.operator.model import (
    GROUP,
    HYDRATED_PHASES,
    IMAGE_CACHES,
    IMAGE_REPLICAS,
    LABEL_IMAGE_CACHE,
    REPLICA_PHASES,
    VERSION,
)
from vmthunder.operator.treeview import render_tree

PHASE_WIDTH = max(map(len, REPLICA_PHASES))


def _hydration(status: Mapping[str, Any]) -> str:
    hydrated, total = status.get("hydratedRegions"), status.get("totalRegions")
    if not isinstance(total, int) or total <= 0 or not isinstance(hydrated, int):
        return "   -"
    # Floor, so 100% means every region is local.
    return f"{hydrated * 100 // total:3d}%  ({hydrated}/{total} regions)"


def render_status(cache: Mapping[str, Any], replicas: Sequence[Mapping[str, Any]]) -> str:
    """The text `vmthunder status` prints, from the ImageCache and its ImageReplicas (pure)."""
    name = cache["metadata"]["name"]
    status = cache.get("status") or {}
    hydrated = sum(1 for r in replicas
                   if (r.get("status") or {}).get("phase") in HYDRATED_PHASES)
    header = (f"{name}  {status.get('phase', 'Unknown')}  nodes {len(replicas)}  "
              f"hydrated {hydrated}/{len(replicas)}  depth {status.get('treeDepth', '-')}")
    parents: dict[str, str] = {}
    notes: dict[str, str] = {}
    for r in replicas:
        node, rstatus = r["spec"]["node"], r.get("status") or {}
        parents[node] = r["spec"]["parent"]
        phase = str(rstatus.get("phase", "Pending"))
        note = f"{phase:<{PHASE_WIDTH}} {_hydration(rstatus)}"
        attached = rstatus.get("attachedParent")
        if attached and attached != r["spec"]["parent"] and phase not in HYDRATED_PHASES:
            note += f"  reading from {attached}"
        notes[node] = note.rstrip()
    return header + "\n" + render_tree(parents, notes)


def fetch_status(api: kubernetes.client.CustomObjectsApi, name: str
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """The ImageCache and its ImageReplicas, or None if there is no such ImageCache."""
    try:
        cache = cast(dict[str, Any], api.get_cluster_custom_object(
            GROUP, VERSION, IMAGE_CACHES, name))
    except ApiException as e:
        if e.status == 404:
            return None
        raise
    replicas = cast(dict[str, Any], api.list_cluster_custom_object(
        GROUP, VERSION, IMAGE_REPLICAS, label_selector=f"{LABEL_IMAGE_CACHE}={name}"))
    return cache, list(replicas.get("items", []))


def run_status(name: str) -> int:
    from vmthunder.kube import load_api_client

    found = fetch_status(kubernetes.client.CustomObjectsApi(load_api_client()), name)
    if found is None:
        print(f"imagecache {name!r} not found")
        return 1
    print(render_status(*found))
    return 0
