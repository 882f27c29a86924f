"""The upstream client's wire format, sans I/O: response heads against h11 (a
hypothesis test), chunked and length bodies however split, their errors, and the
work a trickling upstream costs (bytes examined, counted, never timed)."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ostiary.protocol import wire
from ostiary.protocol.wire import (
    ChunkedBody,
    HeadReader,
    LengthBody,
    RemoteProtocolError,
    parse_head,
    response_framing,
)
from tests.protocol.meters import ScanMeter

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
                if {b"content-length", b"transfer-encoding"} <= {n for n, _ in headers}:
                    return "error"  # h11 lets transfer-encoding win; we refuse (RFC 9112 6.1)
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


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def chunked_outcome(pieces: list[bytes]) -> object:
    """What a ChunkedBody makes of ``pieces``, fed until it is done."""
    body = ChunkedBody()
    out = b""
    try:
        for piece in pieces:
            if body.done:
                break
            out += body.feed(piece)
    except RemoteProtocolError:
        return "error"
    return out, body.done


_chunk_tokens = st.sampled_from(
    [
        b"0",
        b"1",
        b"5",
        b"a",
        b"F",
        b"x",
        b";e=1",
        b" ",
        b"\t",
        b"\r",
        b"\n",
        b"\r\n",
        b"hello",
        b"0\r\n",
        b"t: v\r\n",
        b"5\r\nhello\r\n",
    ]
)


@settings(max_examples=300)
@given(
    st.lists(_chunk_tokens, max_size=20).map(b"".join),
    st.lists(st.integers(min_value=0), max_size=12),
)
def test_chunked_errors_do_not_depend_on_the_split(data: bytes, cuts: list[int]) -> None:
    assert chunked_outcome(split_at(data, cuts)) == chunked_outcome([data])


@pytest.mark.parametrize(
    "wire_bytes",
    [b"zz\r\n", b"1\r\naXX", b"1\r\na\rX", b"1" * 70_000, b"0\r\n" + b"t" * 70_000],
)
def test_chunked_garbage_is_refused_byte_by_byte(wire_bytes: bytes) -> None:
    body = ChunkedBody()
    with pytest.raises(RemoteProtocolError):
        for i in range(len(wire_bytes)):
            body.feed(wire_bytes[i : i + 1])


_heads = st.sampled_from(
    [
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early\r\nlink: x\r\n\r\nHTTP/1.1 204 \r\n\r\n",
        b"HTTP/1.1 200 OK\nx: a\n\nrest\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nx: a\n\r\n",
        b"HTTP/1.1 200 OK\r\nx: a\r\n folded\r\n\r\n\n",
        b"HTTP/1.1 101 Switching\r\n\r\n",
        b"\r\nHTTP/1.1 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nx: a\r\n",
    ]
)


def head_outcome(pieces: list[bytes]) -> object:
    """The final head HeadReader finds in ``pieces``, with all the bytes after it."""
    reader = HeadReader()
    try:
        for i, piece in enumerate(pieces):
            if (head := reader.feed(piece)) is not None:
                return (*head[:3], head[3] + b"".join(pieces[i + 1 :]))
    except RemoteProtocolError:
        return "error"
    return None


@given(_heads, st.lists(st.integers(min_value=0), max_size=12))
def test_head_reader_however_split(message: bytes, cuts: list[int]) -> None:
    assert head_outcome(split_at(message, cuts)) == head_outcome([message])


def test_head_reader_skips_informational_heads_and_refuses_101() -> None:
    reader = HeadReader()
    assert reader.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 20") is None
    assert reader.feed(b"0 OK\r\nx: y\r\n\r\nbody") == (200, True, [(b"x", b"y")], b"body")
    with pytest.raises(RemoteProtocolError, match="switched protocols"):
        HeadReader().feed(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")


# -- framing: ambiguity and connection tokens ---------------------------------------------


@pytest.mark.parametrize("method", [b"GET", b"HEAD"])
@pytest.mark.parametrize(
    "fields",
    [
        [(b"content-length", b"5"), (b"transfer-encoding", b"chunked")],
        [(b"transfer-encoding", b"chunked"), (b"content-length", b"0")],
    ],
)
def test_content_length_beside_transfer_encoding_is_refused(
    method: bytes, fields: list[tuple[bytes, bytes]]
) -> None:
    with pytest.raises(RemoteProtocolError, match="both content-length and transfer-encoding"):
        response_framing(method, 200, fields)


@pytest.mark.parametrize(
    ("value", "keep_alive"),
    [
        (b"keep-alive,\tclose", False),
        (b"Keep-Alive ,  CLOSE", False),
        (b"upgrade,close", False),
        (b"close", False),
        (b"keep-alive", True),
        (b"closed, x-close", True),
    ],
)
def test_connection_close_is_a_token_whatever_the_whitespace(
    value: bytes, keep_alive: bool
) -> None:
    _, keep = response_framing(b"GET", 200, [(b"content-length", b"0"), (b"connection", value)])
    assert keep is keep_alive


# -- a trickling upstream costs linear work ------------------------------------------------


def test_a_head_trickling_in_is_scanned_once(monkeypatch: pytest.MonkeyPatch) -> None:
    meter = ScanMeter(wire._HEAD_END)
    monkeypatch.setattr(wire, "_HEAD_END", meter)
    head = b"HTTP/1.1 200 OK\r\nx-pad: " + b"a" * 60_000 + b"\r\ncontent-length: 0\r\n\r\n"
    reader = HeadReader()
    results = [reader.feed(head[i : i + 1]) for i in range(len(head))]
    assert results[-1] == (200, True, [(b"x-pad", b"a" * 60_000), (b"content-length", b"0")], b"")
    assert results[:-1] == [None] * (len(head) - 1)
    # Each byte is looked at by at most three searches (it may start a blank line).
    assert meter.examined <= 3 * len(head)


def test_a_chunk_line_trickling_in_is_parsed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    meters = [ScanMeter(wire._CHUNK_HEAD), ScanMeter(wire._NEXT_CHUNK_HEAD)]
    monkeypatch.setattr(wire, "_CHUNK_HEAD", meters[0])
    monkeypatch.setattr(wire, "_NEXT_CHUNK_HEAD", meters[1])
    extension = b";" + b"e" * 30_000
    data = b"5%s\r\nhello\r\n1%s\r\n!\r\n0\r\n\r\n" % (extension, extension)
    body = ChunkedBody()
    out = b"".join(body.feed(data[i : i + 1]) for i in range(len(data)))
    assert (out, body.done) == (b"hello!", True)
    assert sum(m.examined for m in meters) <= 2 * len(data)
