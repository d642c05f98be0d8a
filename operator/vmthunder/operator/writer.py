"""Applies a ReplicaPlan to the API server: the operator's only writes.

Writes run in a small thread pool so thousands of replicas are created in parallel; every
write is counted (the control-plane benchmark reads the count from the metrics endpoint).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException
from prometheus_client import Counter

from vmthunder.kube import load_api_client
from vmthunder.operator.model import (
    API_VERSION,
    GROUP,
    IMAGE_CACHES,
    IMAGE_REPLICAS,
    LABEL_IMAGE_CACHE,
    LABEL_NODE,
    LABEL_PARENT,
    VERSION,
)
from vmthunder.operator.reconcile import ReplicaPlan, ReplicaSpec

API_WRITES = Counter(
    "vmthunder_operator_api_writes", "Writes the operator sent to the API server", ["verb"]
)
PARALLEL_WRITES = 16


def load_kube_config() -> kubernetes.client.ApiClient:
    """An API client with room for the operator's parallel writes."""
    return load_api_client(pool_size=PARALLEL_WRITES)


class ReplicaWriter:
    def __init__(self, api_client: kubernetes.client.ApiClient) -> None:
        self.api = kubernetes.client.CustomObjectsApi(api_client)
        self.pool = ThreadPoolExecutor(PARALLEL_WRITES, thread_name_prefix="kube-write")

    async def _run(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn)

    async def apply(self, plan: ReplicaPlan, owner: Mapping[str, Any]) -> None:
        cache = owner["metadata"]["name"]
        owner_ref = {
            "apiVersion": API_VERSION,
            "kind": "ImageCache",
            "name": cache,
            "uid": owner["metadata"]["uid"],
            "controller": True,
        }
        jobs = [self._create(cache, r, owner_ref) for r in plan.create]
        jobs += [self._set_parent(r) for r in plan.update]
        jobs += [self._label(r) for r in plan.relabel]
        jobs += [self._delete(name) for name in plan.delete]
        await asyncio.gather(*jobs)

    async def _create(self, cache: str, r: ReplicaSpec, owner_ref: dict[str, Any]) -> None:
        body = {
            "apiVersion": API_VERSION,
            "kind": "ImageReplica",
            "metadata": {
                "name": r.name,
                "labels": {LABEL_IMAGE_CACHE: cache, LABEL_NODE: r.node, LABEL_PARENT: r.label},
                "ownerReferences": [owner_ref],
            },
            "spec": {"imageCache": cache, "node": r.node, "parent": r.parent, "depth": r.depth},
        }
        API_WRITES.labels("create").inc()
        try:
            await self._run(
                lambda: self.api.create_cluster_custom_object(
                    GROUP, VERSION, IMAGE_REPLICAS, body, _preload_content=False
                )
            )
        except ApiException as e:
            if e.status != 409:  # already there: a watch event not yet seen; the next pass fixes it
                raise

    async def _set_parent(self, r: ReplicaSpec) -> None:
        await self._patch(r.name, {"metadata": {"labels": {LABEL_PARENT: r.label}},
                                   "spec": {"parent": r.parent, "depth": r.depth}})

    async def _label(self, r: ReplicaSpec) -> None:
        await self._patch(r.name, {"metadata": {"labels": {LABEL_PARENT: r.label}}})

    async def _patch(self, name: str, body: dict[str, Any]) -> None:
        API_WRITES.labels("patch").inc()
        await self._run(
            lambda: self.api.patch_cluster_custom_object(
                GROUP, VERSION, IMAGE_REPLICAS, name, body, _preload_content=False,
            )
        )

    async def _delete(self, name: str) -> None:
        API_WRITES.labels("delete").inc()
        try:
            await self._run(
                lambda: self.api.delete_cluster_custom_object(
                    GROUP, VERSION, IMAGE_REPLICAS, name, _preload_content=False
                )
            )
        except ApiException as e:
            if e.status != 404:
                raise

    async def patch_cache_status(self, name: str, status: Mapping[str, Any]) -> None:
        API_WRITES.labels("status").inc()
        await self._run(
            lambda: self.api.patch_cluster_custom_object_status(
                GROUP, VERSION, IMAGE_CACHES, name, {"status": dict(status)},
                _preload_content=False,
            )
        )
