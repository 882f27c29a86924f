"""Deadlines of running backend calls, for the gateway's one timer.

A heap of (deadline, seq, request id). An entry may be earlier than its call's real
deadline (output that came since moved it on: the gateway pushes it again when it
comes due) or stale (the call ended), never later. Entries are not removed when a
call ends, which would cost a search; instead the heap is rebuilt from the live calls
whenever stale entries outnumber them, so its size stays proportional to the calls
in flight and every operation is O(log n) amortized.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Container, Iterator

__all__ = ["CallTimers"]


class CallTimers:
    __slots__ = ("_heap", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str]] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self._heap)

    def next_deadline(self) -> float:
        return self._heap[0][0] if self._heap else math.inf

    def push(self, deadline: float, request_id: str, live: Container[str], in_flight: int) -> None:
        """Add an entry; ``live`` tells which request ids still count (``in_flight``
        of them), for the compaction."""
        heap = self._heap
        if len(heap) > 2 * in_flight + 64:
            heap[:] = [entry for entry in heap if entry[2] in live]
            heapq.heapify(heap)
        self._seq += 1
        heapq.heappush(heap, (deadline, self._seq, request_id))

    def due(self, now: float) -> Iterator[str]:
        """Pop and yield the request ids whose entries are due at ``now``."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            yield heapq.heappop(heap)[2]
