"""Work meters for the tests that a trickling upstream costs linear work: they count
the bytes a parser examines or copies, so the tests assert on work, never on time."""

from __future__ import annotations

import re
from typing import Any, SupportsIndex

__all__ = ["MeteredBuffer", "ScanMeter"]


class ScanMeter:
    """Stands in for a module's compiled pattern; counts the bytes each search or
    match is given to examine."""

    def __init__(self, pattern: re.Pattern[bytes]) -> None:
        self.pattern = pattern
        self.examined = 0

    def search(self, buffer: bytes | bytearray, pos: int = 0) -> re.Match[bytes] | None:
        self.examined += len(buffer) - pos
        return self.pattern.search(buffer, pos)

    def match(self, buffer: bytes | bytearray, pos: int = 0) -> re.Match[bytes] | None:
        self.examined += len(buffer) - pos
        return self.pattern.match(buffer, pos)


class MeteredBuffer(bytearray):
    """A ``bytearray`` that counts the bytes its appends, searches, slices and
    deletions touch. Put in a decoder as its buffer: if the decoder keeps the buffer
    (``is`` the same object at the end), ``work`` is all the buffering it did."""

    work = 0

    def __iadd__(self, other: Any) -> MeteredBuffer:  # type: ignore[misc]
        self.work += len(other)
        return super().__iadd__(other)

    def find(self, sub: Any, start: SupportsIndex | None = None, *args: Any) -> int:
        self.work += len(self) - int(start or 0)
        return super().find(sub, start, *args)

    def rfind(self, sub: Any, start: SupportsIndex | None = None, *args: Any) -> int:
        self.work += len(self) - int(start or 0)
        return super().rfind(sub, start, *args)

    def __getitem__(self, key: Any) -> Any:
        item = super().__getitem__(key)
        if isinstance(key, slice):
            self.work += len(item)
        return item

    def __delitem__(self, key: Any) -> None:
        if isinstance(key, slice):
            self.work += len(self) - (key.stop or 0)
        super().__delitem__(key)
