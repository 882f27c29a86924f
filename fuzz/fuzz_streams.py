"""Atheris target: the parsers of bytes an upstream sends.

The rule: for any bytes, split anywhere,

- :class:`~ostiary.protocol.sse.SseDecoder` and
  :class:`~ostiary.protocol.ndjson.NdjsonDecoder` either return their payloads or
  raise an :class:`~ostiary.protocol.errors.OpenAIError` (they raise ``BackendError``);
- the response parsing of :mod:`ostiary.backends.httpclient` (``HeadReader``, which
  skips 1xx heads, ``response_framing`` and the ``LengthBody`` / ``ChunkedBody``
  de-framers, driven as ``_exchange`` and ``HttpResponse._next_chunk`` drive them,
  without a socket) either succeeds or raises
  :class:`~ostiary.backends.httpclient.HttpClientError`.

Any other exception is a crash (a proxied request would die with a 500 instead of a
clean upstream error).

Input layout: byte 0 picks the parser (``byte % 3``: SSE, NDJSON, HTTP response) and
a variant (``byte // 3``: a small event/line limit for the decoders; the request
method for HTTP, ``HEAD`` when ``byte // 3 % 4 == 3``, else ``POST``). Byte 1 gives
the number of split points (``byte % 8``), and that many bytes follow, each the
length of one piece; the rest of the input is the stream, fed in those pieces and
then the remainder, before the end of the stream. The seed corpus in
``fuzz/corpus/streams`` starts with ``0``, ``1`` or ``2`` then ``0`` (no splits) or
a split count and piece lengths.

Run: ``python fuzz/fuzz_streams.py fuzz/corpus/streams -runs=20000`` (any libFuzzer
flags; add ``-artifact_prefix=DIR/`` to keep crash files out of the working tree).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Sequence

import atheris

with atheris.instrument_imports(include=["ostiary"]):
    from ostiary.protocol.errors import OpenAIError
    from ostiary.protocol.ndjson import NdjsonDecoder
    from ostiary.protocol.sse import SseDecoder
    from ostiary.protocol.wire import (
        ChunkedBody,
        HeadReader,
        HttpClientError,
        LengthBody,
        response_framing,
    )

__all__ = ["main", "test_one_input"]

#: Event / line limit of the decoders in the "small limit" variant, so that the
#: too-large paths are reached by inputs of a few hundred bytes.
SMALL_LIMIT = 64


def _pieces(data: bytes) -> list[bytes]:
    """The stream in ``data[1:]`` cut as its split header says (see the module doc)."""
    if not data:
        return []
    count = data[0] % 8
    sizes = data[1 : 1 + count]
    stream = data[1 + count :]
    pieces: list[bytes] = []
    pos = 0
    for size in sizes:
        pieces.append(stream[pos : pos + size])
        pos += size
    pieces.append(stream[pos:])
    return pieces


def _sse(pieces: list[bytes], small: bool) -> None:
    decoder = SseDecoder(SMALL_LIMIT) if small else SseDecoder()
    events: list[str] = []
    for piece in pieces:
        events += decoder.feed(piece)
    events += decoder.close()
    assert all(type(event) is str for event in events)


def _ndjson(pieces: list[bytes], small: bool) -> None:
    decoder = NdjsonDecoder(max_line_bytes=SMALL_LIMIT) if small else NdjsonDecoder()
    for piece in pieces:
        decoder.feed(piece)
    decoder.close()


def _http(pieces: list[bytes], method: bytes) -> None:
    """Parse a response as the client does: heads until a final (>= 200) one, then
    the body, fed the bytes that came with the head and then the rest, until the
    body is done or the stream ends."""
    reader = HeadReader()
    rest = iter(pieces)
    head = None
    for piece in rest:
        if (head := reader.feed(piece)) is not None:
            break
    if head is None:
        return  # the upstream closed before a whole head: the client raises here
    status, _keep_alive, headers, buffer = head
    assert 200 <= status <= 999
    body, _keep = response_framing(method, status, headers)
    for data in (buffer, *rest):
        if body.done:
            break
        if data:
            assert type(body.feed(data)) is bytes
    if not body.done:
        body.end()
    assert isinstance(body, LengthBody | ChunkedBody)


def _run_sse(variant: int, pieces: list[bytes]) -> None:
    with contextlib.suppress(OpenAIError):
        _sse(pieces, small=variant % 2 == 1)


def _run_ndjson(variant: int, pieces: list[bytes]) -> None:
    with contextlib.suppress(OpenAIError):
        _ndjson(pieces, small=variant % 2 == 1)


def _run_http(variant: int, pieces: list[bytes]) -> None:
    with contextlib.suppress(HttpClientError):
        _http(pieces, b"HEAD" if variant % 4 == 3 else b"POST")


TARGETS: tuple[Callable[[int, list[bytes]], None], ...] = (_run_sse, _run_ndjson, _run_http)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    TARGETS[data[0] % 3](data[0] // 3, _pieces(data[1:]))


def main(argv: Sequence[str] | None = None) -> int:
    """Run libFuzzer with ``argv`` (``sys.argv`` by default; ``argv[0]`` is the
    program name). Returns 0 when the run ends without a crash."""
    args = list(sys.argv if argv is None else argv)
    atheris.Setup(args, test_one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
