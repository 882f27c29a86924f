"""A sans-IO decoder for newline-delimited JSON (NDJSON), as Ollama streams it.

Bytes go in as they arrive, in pieces of any size; the JSON values of the complete
lines come out. The decoder holds at most one unfinished line, bounded by
``max_line_bytes``, so a backend that never sends a newline cannot make us buffer
without limit. Anything that is not NDJSON is a :class:`BackendError`: the backend,
not the client, sent it, and the message says nothing more than that.

After a :class:`BackendError` the stream is unusable; stop feeding it.
"""

from __future__ import annotations

from typing import Any

import orjson

from ostiary.protocol.errors import BackendError

__all__ = ["DEFAULT_MAX_LINE_BYTES", "NdjsonDecoder"]

#: Longest line accepted by default, not counting its ``\n``.
DEFAULT_MAX_LINE_BYTES = 1024 * 1024


class NdjsonDecoder:
    """Split a byte stream into lines and parse each non-blank line as JSON.

    A line ends at ``\\n``; a ``\\r`` before it and surrounding whitespace are
    ignored, and so are blank lines. Call :meth:`close` at the end of the stream to
    parse a last line that has no ``\\n``.
    """

    def __init__(self, *, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        if max_line_bytes < 1:
            raise ValueError(f"max_line_bytes must be at least 1, got {max_line_bytes}")
        self._max_line_bytes = max_line_bytes
        self._buffer = bytearray()
        #: Where to look for the next ``\n``: everything before it has none.
        self._scan_from = 0
        self._closed = False

    @property
    def buffered(self) -> int:
        """Bytes of an unfinished line held now."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Any]:
        """Add ``data``; return the values of the lines it completed, in order."""
        if self._closed:
            raise RuntimeError("NdjsonDecoder.feed() called after close()")
        self._buffer += data
        values: list[Any] = []
        start = 0
        while True:
            end = self._buffer.find(b"\n", max(start, self._scan_from))
            if end < 0:
                break
            self._parse_into(values, start, end)
            start = end + 1
        if start:
            del self._buffer[:start]
        self._scan_from = len(self._buffer)
        if len(self._buffer) > self._max_line_bytes:
            raise self._too_long()
        return values

    def close(self) -> list[Any]:
        """End the stream: return the value of a last line left without ``\\n``."""
        if self._closed:
            return []
        self._closed = True
        values: list[Any] = []
        self._parse_into(values, 0, len(self._buffer))
        self._buffer.clear()
        self._scan_from = 0
        return values

    def _parse_into(self, values: list[Any], start: int, end: int) -> None:
        if end - start > self._max_line_bytes:
            raise self._too_long()
        line = bytes(self._buffer[start:end])
        if not line.strip():
            return
        try:
            values.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            raise BackendError(
                "The model backend sent a response that is not valid JSON."
            ) from None

    def _too_long(self) -> BackendError:
        return BackendError(
            f"The model backend sent a response line longer than {self._max_line_bytes} bytes."
        )
