"""The simulator's event queue: events come out by time, equal times in insertion order.

Pure and deterministic: no clock, the same pushes give the same pops. An event can be
cancelled by its handle (lazily: it is skipped when it reaches the front).
"""

from __future__ import annotations

import heapq
from typing import Generic, TypeVar

T = TypeVar("T")


class EventQueue(Generic[T]):
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, T]] = []
        self._seq = 0
        self._cancelled: set[int] = set()
        self.now = 0.0

    def push(self, at: float, event: T) -> int:
        """Schedules `event` at time `at` (not before now); returns a handle for cancel()."""
        if at < self.now:
            raise ValueError(f"event at {at} is in the past (now {self.now})")
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, event))
        return self._seq

    def cancel(self, handle: int) -> None:
        self._cancelled.add(handle)

    def pop(self) -> tuple[float, T] | None:
        """The next event and its time (the clock moves there), or None when empty."""
        while self._heap:
            at, seq, event = heapq.heappop(self._heap)
            if seq in self._cancelled:
                self._cancelled.discard(seq)
                continue
            self.now = at
            return at, event
        return None

    def __len__(self) -> int:
        return len(self._heap) - len(self._cancelled)
