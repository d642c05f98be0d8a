"""The operator's informer leaves out an object it cannot read instead of stalling every plan
(a unit test of the skip rule; the informer against the real API server runs in
tests/test_operator.py)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, cast

from waiting import wait_for

from vmthunder.kube import Rest
from vmthunder.operator.informer import Informer


class OnePage:
    """The API server's side of a list (one page) and of a watch that ends at once."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def get(self, path: str, params: Mapping[str, Any] | None = None, *,
            timeout: float = 30) -> dict[str, Any]:
        return {"items": self.items, "metadata": {"resourceVersion": "1"}}

    def watch(self, path: str, timeout_seconds: int, params: Mapping[str, Any] | None = None
              ) -> Iterator[dict[str, Any]]:
        return iter(())  # an empty watch: the informer lists again


def test_an_object_that_cannot_be_read_is_skipped_and_the_rest_synced() -> None:
    items = [{"metadata": {"name": "good", "size": 1}}, {"metadata": {"name": "bad"}}]
    seen: list[tuple[Any, Any]] = []
    inf = Informer(cast(Rest, OnePage(items)), "/apis/example.io/v1/things",
                   lambda o: int(o["metadata"]["size"]),
                   lambda old, new: seen.append((old, new))).start()
    try:
        wait_for("a synced informer", inf.synced.is_set, timeout=10)
        assert inf.items == {"good": 1} and seen == [(None, 1)]
        assert inf.name == "things"
    finally:
        inf.stop()
