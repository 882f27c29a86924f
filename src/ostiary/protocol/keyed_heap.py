"""A min-heap of distinct items whose keys change, with lazy deletion.

The schedulers keep several orders over things that come and go: queued tickets by
deadline, principals by virtual time, priority classes by age. :class:`KeyedHeap`
holds each item at most once *logically*: pushing an item again re-keys it, and
:meth:`~KeyedHeap.discard` removes it, both in O(log n) without searching the heap.
Superseded entries stay in the list until they reach the top (where they are
dropped) or until they outnumber the live ones (then the list is rebuilt, in time
paid for by the pushes that made them), so the list never holds more than
``2 * len(heap) + 16`` entries: memory follows the live items, not the history.

Ties on the key go to the item pushed (or re-keyed) first.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["HeapKey", "KeyedHeap"]

T = TypeVar("T", bound=Hashable)

#: A key is two floats, compared in order.
HeapKey = tuple[float, float]

_SLACK = 16


class KeyedHeap(Generic[T]):
    """Items ordered by a key, smallest first; every operation O(log n) amortized."""

    __slots__ = ("_entries", "_pushes", "_stamps")

    def __init__(self) -> None:
        #: (key0, key1, stamp, item): stamps are unique, so items are never compared.
        self._entries: list[tuple[float, float, int, T]] = []
        #: The stamp of each live item's current entry.
        self._stamps: dict[T, int] = {}
        self._pushes = 0

    def __len__(self) -> int:
        return len(self._stamps)

    def __contains__(self, item: T) -> bool:
        return item in self._stamps

    @property
    def entries(self) -> int:
        """Entries held, superseded ones included (bounded by ``2 * len + 16``)."""
        return len(self._entries)

    def push(self, item: T, key: HeapKey) -> None:
        """Insert ``item`` with ``key``, or give it a new key if it is already in."""
        self._pushes += 1
        self._stamps[item] = self._pushes
        heapq.heappush(self._entries, (key[0], key[1], self._pushes, item))
        self._compact_if_sparse()

    def discard(self, item: T) -> None:
        """Remove ``item`` if it is in."""
        if self._stamps.pop(item, None) is not None:
            self._compact_if_sparse()

    def peek(self) -> tuple[T, HeapKey] | None:
        """The item with the smallest key and that key, or None when empty."""
        entries = self._entries
        stamps = self._stamps
        while entries:
            key0, key1, stamp, item = entries[0]
            if stamps.get(item) == stamp:
                return item, (key0, key1)
            heapq.heappop(entries)
        return None

    def least(self, default: float) -> float:
        """The first half of the smallest key, or ``default`` when empty."""
        top = self.peek()
        return default if top is None else top[1][0]

    def pop(self) -> T | None:
        """Remove and return the item with the smallest key, or None when empty."""
        top = self.peek()
        if top is None:
            return None
        heapq.heappop(self._entries)
        del self._stamps[top[0]]
        return top[0]

    def pop_due(self, bound: float) -> list[T]:
        """Remove and return, smallest first, every item whose key starts ``<= bound``."""
        due: list[T] = []
        while (top := self.peek()) is not None and top[1][0] <= bound:
            heapq.heappop(self._entries)
            del self._stamps[top[0]]
            due.append(top[0])
        return due

    def key_of(self, item: T) -> HeapKey | None:
        """The current key of ``item`` (O(n): for tests and diagnostics only)."""
        stamp = self._stamps.get(item)
        for key0, key1, entry_stamp, _ in self._entries:
            if entry_stamp == stamp:
                return key0, key1
        return None

    def clear(self) -> None:
        self._entries.clear()
        self._stamps.clear()

    def _compact_if_sparse(self) -> None:
        if len(self._entries) > 2 * len(self._stamps) + _SLACK:
            stamps = self._stamps
            self._entries = [e for e in self._entries if stamps.get(e[3]) == e[2]]
            heapq.heapify(self._entries)
