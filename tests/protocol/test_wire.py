"""The upstream client's wire format, sans I/O: response heads against h11 (a
hypothesis test), chunked and length bodies however split, and their errors."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ostiary.protocol.wire import (
    ChunkedBody,
    LengthBody,
    RemoteProtocolError,
    parse_head,
    response_framing,
)

# -- body framing, sans I/O -------------------------------------------------------------------


def chunked(pieces: list[bytes], extension: bool, trailers: bool) -> bytes:
    out = b"".join(
        b"%x%s\r\n%s\r\n" % (len(p), b";k=v" if extension else b"", p) for p in pieces if p
    )
    return out + b"0\r\n" + (b"a: b\r\nc: d\r\n" if trailers else b"") + b"\r\n"


@given(
    st.lists(st.binary(max_size=40), max_size=8),
    st.booleans(),
    st.booleans(),
    st.lists(st.integers(min_value=0), max_size=10),
    st.binary(max_size=3),
)
def test_chunked_decoding_however_split(
    pieces: list[bytes], extension: bool, trailers: bool, cuts: list[int], extra: bytes
) -> None:
    wire = chunked(pieces, extension, trailers) + extra
    points = sorted({c % (len(wire) + 1) for c in cuts})
    body = ChunkedBody()
    out = b""
    for a, b in zip([0, *points], [*points, len(wire)], strict=True):
        if not body.done:
            out += body.feed(wire[a:b])
    assert out == b"".join(pieces)
    assert body.done
    # Bytes after the end are noticed when they come with it, not after.
    assert body.excess == (bool(extra) and len(wire) - len(extra) not in points)


def ours(message: bytes, method: bytes) -> object:
    """What the client makes of a whole response followed by EOF."""
    buffer = message
    try:
        while (head := parse_head(buffer)) is not None:
            status, _, headers, buffer = head
            if status >= 200:
                body, _ = response_framing(method, status, headers)
                content = body.feed(buffer) if buffer and not body.done else b""
                if not body.done:
                    body.end()
                return status, normalized(headers), content
        return "error"
    except RemoteProtocolError:
        return "error"


def theirs(message: bytes, method: bytes) -> object:
    """What h11 makes of it."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target=b"/", headers=[(b"host", b"x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(message)
    conn.receive_data(b"")
    content = b""
    try:
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Response):
                status, headers = event.status_code, list(event.headers)
            elif isinstance(event, h11.Data):
                content += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, normalized(headers), content
            elif not isinstance(event, h11.InformationalResponse):
                return "error"
    except h11.RemoteProtocolError:
        return "error"


def normalized(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """h11 keeps one content-length (deduplicated) and lower-cases transfer-encoding."""
    framing = {b"content-length", b"transfer-encoding"}
    return [(n, v) for n, v in headers if n not in framing]


_status_lines = st.sampled_from(
    [b"HTTP/1.1 200 OK"] * 8
    + [
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 200",
        b"HTTP/1.0 201 Created fine",
        b"HTTP/1.1 204 No Content",
        b"HTTP/1.1 304 ",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK",
        b"HTTP/1.1 099 Low",
        b"HTTP/1.1 20 OK",
        b"http/1.1 200 OK",
        b"HTTP/1.1 200 O\x00K",
        b"HTTP/1.1  200 OK",
        b"",
    ]
)
_names = st.sampled_from([b"x-a", b"Content-Type", b"X_B"] * 3 + [b"bad name", b"", b"\xff"])
_values = st.text(alphabet=" \tab,;:=\x01\x7f\x80\xff", max_size=6).map(
    lambda t: t.encode("latin-1")
)
_framing_fields = st.sampled_from(
    [
        b"Content-Length: 5",
        b"content-length: 5, 5",
        b"Content-Length: 4",
        b"Content-Length: 5, 6",
        b"Content-Length: +5",
        b"Content-Length: " + b"9" * 21,
        b"Transfer-Encoding: chunked",
        b"Transfer-Encoding: Chunked",
        b"Transfer-Encoding: gzip",
        b"Connection: close",
        b" folded continuation",
        b"\tfolded\ttab ",
    ]
)
_fields = st.one_of(
    st.builds(lambda n, v, sp: n + b":" + sp + v, _names, _values, st.sampled_from([b"", b" "])),
    _framing_fields,
)
_bodies = st.sampled_from([b"", b"hello", b"hello world", b"5\r\nhello\r\n0\r\n\r\n"])


@settings(max_examples=500, deadline=None)
@given(
    _status_lines,
    st.lists(_fields, max_size=5),
    st.sampled_from([b"\r\n", b"\n"]),
    _bodies,
    st.sampled_from([b"GET", b"HEAD"]),
)
def test_response_parsing_agrees_with_h11(
    status_line: bytes, fields: list[bytes], eol: bytes, body: bytes, method: bytes
) -> None:
    message = eol.join([status_line, *fields]) + eol + eol + body
    assert ours(message, method) == theirs(message, method)


@pytest.mark.parametrize(
    "wire",
    [b"zz\r\n", b"0x5\r\n", b" 5\r\n", b"+5\r\n", b"\r\n", b"1\r\naXX", b"1" * 70_000],
)
def test_chunked_decoding_rejects_garbage(wire: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        ChunkedBody().feed(wire)


def test_body_ends_early() -> None:
    with pytest.raises(RemoteProtocolError, match="middle of a chunked body"):
        ChunkedBody().end()
    body = LengthBody(5)
    assert body.feed(b"ab") == b"ab"
    assert not body.done
    with pytest.raises(RemoteProtocolError, match=r"3 bytes before the body's end"):
        body.end()
    assert body.feed(b"cdefg") == b"cde"
    assert body.done
    assert body.excess
