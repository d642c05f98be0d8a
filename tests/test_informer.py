"""The operator's informer leaves out an object it cannot read instead of stalling every plan
(a unit test of the skip rule; the informer against the real API server runs in
tests/test_operator.py)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from waiting import wait_for

from vmthunder.operator.informer import Informer


class Page:
    def __init__(self, body: Mapping[str, Any]) -> None:
        self.data = json.dumps(body).encode()


def test_an_object_that_cannot_be_read_is_skipped_and_the_rest_synced() -> None:
    items = [{"metadata": {"name": "good", "size": 1}}, {"metadata": {"name": "bad"}}]

    def list_call(**kwargs: Any) -> Any:
        if kwargs.get("watch"):
            return iter(())  # an empty watch: the informer lists again
        return Page({"items": items, "metadata": {"resourceVersion": "1"}})

    seen: list[tuple[Any, Any]] = []
    inf = Informer("things", list_call, lambda o: int(o["metadata"]["size"]),
                   lambda old, new: seen.append((old, new))).start()
    try:
        wait_for("a synced informer", inf.synced.is_set, timeout=10)
        assert inf.items == {"good": 1} and seen == [(None, 1)]
    finally:
        inf.stop()
