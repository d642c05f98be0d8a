"""A lean list+watch cache for high-volume resources (Nodes, ImageReplicas, ImageVolumes).

kopf runs its full per-object handler machinery on every event; at thousands of nodes whose
agents report every few seconds that machinery, not the API server, becomes the bottleneck.
An Informer keeps only the facts the planner needs (`extract`), reads raw JSON (`Rest`, no
client models), and calls `on_change` only when those facts change.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from vmthunder.kube import ApiError, Rest

T = TypeVar("T")
log = logging.getLogger(__name__)

WATCH_SECONDS = 240  # the server ends a watch after this; the informer watches on from there
Extract = Callable[[Mapping[str, Any]], T]
OnChange = Callable[[T | None, T | None], None]


class Informer(Generic[T]):
    def __init__(self, rest: Rest, path: str, extract: Extract[T], on_change: OnChange[T],
                 page_size: int = 1000, selector: str | None = None) -> None:
        """`path`: the collection, e.g. /api/v1/nodes; `selector`: a label selector."""
        self.name = path.rsplit("/", 1)[-1] + (f"[{selector}]" if selector else "")
        self.rest = rest
        self.path = path
        self.selector = selector
        self.extract = extract
        self.on_change = on_change
        self.page_size = page_size
        self.items: dict[str, T] = {}
        self.synced = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"informer-{self.name}", daemon=True)

    def start(self) -> Informer[T]:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def values(self) -> list[T]:
        return list(self.items.values())  # a copy: the watch thread replaces entries

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                version = self._relist()
                self.synced.set()
                while not self._stop.is_set():
                    version = self._watch(version)
            except _Expired:
                continue  # the watch fell too far behind: list again
            except Exception as e:
                log.warning(f"{self.name} informer: {e}; retrying")
                time.sleep(1)

    def _relist(self) -> str:
        fresh: dict[str, T] = {}
        token: str | None = None
        while True:
            page = self.rest.get(self.path, {"limit": self.page_size, "continue": token,
                                             "labelSelector": self.selector})
            for obj in page.get("items", []):
                item = self._extract(obj)
                if item is not None:
                    fresh[obj["metadata"]["name"]] = item
            token = page["metadata"].get("continue")
            if not token:
                break
        old, self.items = self.items, fresh
        for key in old.keys() | fresh.keys():
            if old.get(key) != fresh.get(key):
                self.on_change(old.get(key), fresh.get(key))
        return str(page["metadata"]["resourceVersion"])

    def _extract(self, obj: Mapping[str, Any]) -> T | None:
        """One object that cannot be read is left out (and logged), not a reason to stall
        every plan behind a relist that fails forever."""
        try:
            return self.extract(obj)
        except (KeyError, TypeError, ValueError) as e:
            name = (obj.get("metadata") or {}).get("name")
            log.warning(f"{self.name} informer: skipping {name}: {type(e).__name__}: {e}")
            return None

    def _watch(self, version: str) -> str:
        events = self.rest.watch(self.path, WATCH_SECONDS, {
            "resourceVersion": version, "allowWatchBookmarks": True,
            "labelSelector": self.selector})
        try:
            for event in events:
                if self._stop.is_set():
                    break
                version = self._apply(event)
        except ApiError as e:
            if e.status == 410:
                raise _Expired from e
            raise
        return version

    def _apply(self, event: Mapping[str, Any]) -> str:
        """One watch event into `items`; returns the resource version it brings."""
        obj = event["object"]
        version = str(obj["metadata"]["resourceVersion"])
        if event["type"] == "BOOKMARK":
            return version
        name = obj["metadata"]["name"]
        old = self.items.get(name)
        new = None if event["type"] == "DELETED" else self._extract(obj)
        if new is None:
            self.items.pop(name, None)
        else:
            self.items[name] = new
        if old != new:
            self.on_change(old, new)
        return version


class _Expired(Exception):
    """The API server no longer has the resource version the watch asked for (410 Gone)."""
