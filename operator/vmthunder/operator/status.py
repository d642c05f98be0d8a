"""`vmthunder status`: one ImageCache's distribution tree, each node with its phase and hydration.

    $ vmthunder status debian-golden
    debian-golden  Distributing  nodes 5  hydrated 1/5  depth 2
    origin
    ├── node-a  Hydrated    100%  (4096/4096 regions)
    │   └── node-c  Hydrating    37%  (1520/4096 regions)
    ...
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

from vmthunder.kube import ApiError, Rest
from vmthunder.operator.model import (
    HYDRATED_PHASES,
    IMAGE_CACHES,
    IMAGE_REPLICAS,
    LABEL_IMAGE_CACHE,
    REPLICA_PHASES,
    resource_path,
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


def fetch_status(rest: Rest, name: str
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """The ImageCache and its ImageReplicas, or None if there is no such ImageCache."""
    cache = rest.find(resource_path(IMAGE_CACHES, name))
    if cache is None:
        return None
    replicas = rest.get(resource_path(IMAGE_REPLICAS),
                        {"labelSelector": f"{LABEL_IMAGE_CACHE}={name}"})
    return cache, list(replicas.get("items", []))


def run_status(name: str) -> int:
    import kubernetes

    from vmthunder.kube import load_api_client

    try:  # the kubeconfig read as kubectl reads it, credential plugins included
        rest = Rest.from_api_client(load_api_client())
        found = fetch_status(rest, name)
    except (ApiError, kubernetes.config.ConfigException) as e:
        print(f"vmthunder status: cannot read imagecache {name!r}: {e}", file=sys.stderr)
        return 1
    if found is None:
        print(f"imagecache {name!r} not found")
        return 1
    print(render_status(*found))
    return 0
