"""SseDecoder: the WHATWG rules it follows, its bounds, and split-invariance against
a line-by-line reference decoder."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ostiary.protocol.errors import BackendError
from ostiary.protocol.sse import SseDecoder
from tests.protocol.meters import MeteredBuffer

Outcome = tuple[list[str], str | None]


def decode(chunks: list[bytes], max_event_bytes: int = 1 << 20) -> Outcome:
    """Events from feeding ``chunks`` then closing, and the error (if any)."""
    decoder = SseDecoder(max_event_bytes)
    events: list[str] = []
    try:
        for chunk in chunks:
            events += decoder.feed(chunk)
        events += decoder.close()
    except BackendError as exc:
        return events, "too large" if "larger than" in exc.message else "truncated"
    return events, None


def reference(stream: bytes, max_event_bytes: int = 1 << 20) -> Outcome:
    """The spec, line by line, over the whole stream at once."""
    text = stream.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    *lines, partial = text.split(b"\n")
    events: list[str] = []
    data: list[str] | None = None
    size = 0
    for index, raw in enumerate(lines):
        if not raw:
            if data is not None:
                events.append("\n".join(data))
            data, size = None, 0
            continue
        size += len(raw) + 1
        if size > max_event_bytes:
            return events, "too large"
        line = raw.decode("utf-8", "replace")
        if index == 0 and line.startswith("\ufeff"):
            line = line[1:]
        name, _, value = line.partition(":")
        if name == "data":
            data = [*(data or []), value[1:] if value.startswith(" ") else value]
    if size + len(partial) > max_event_bytes:
        return events, "too large"
    if partial:
        return events, "truncated"
    if data is not None:
        events.append("\n".join(data))
    return events, None


def split(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(stream) + 1) for c in cuts})
    return [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]


# -- the rules -----------------------------------------------------------------------


def test_single_and_multiple_events_in_one_feed() -> None:
    decoder = SseDecoder()
    assert decoder.feed(b"data: a\n\ndata: b\n\ndata: c") == ["a", "b"]
    assert decoder.feed(b"\n\n") == ["c"]
    assert decoder.close() == []


def test_multiline_data_fields_comments_and_spaces() -> None:
    stream = (
        b": keep-alive\n"
        b"event: message\nid: 7\nretry: 100\n"
        b"data: first\ndata:second\ndata:  third\ndata\nunknown: x\n\n"
    )
    assert SseDecoder().feed(stream) == ["first\nsecond\n third\n"]


def test_event_without_data_dispatches_nothing_and_empty_data_dispatches_empty() -> None:
    assert SseDecoder().feed(b"event: ping\n\n: comment\n\ndata:\n\n") == [""]


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_line_endings(eol: bytes) -> None:
    stream = b"data: a" + eol + b"data: b" + eol + eol + b"data: c" + eol + eol
    assert SseDecoder().feed(stream) == ["a\nb", "c"]


def test_crlf_split_across_feeds_counts_once() -> None:
    decoder = SseDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"\r") == ["a"]
    assert decoder.feed(b"\ndata: b\r\n\r\n") == ["b"]


def test_leading_blank_lines_and_bom() -> None:
    assert SseDecoder().feed(b"\xef\xbb\xbfdata: x\n\n") == ["x"]
    assert SseDecoder().feed(b"\n\n\ndata: y\n\n") == ["y"]
    # A BOM that is not the first byte is part of the field name.
    assert SseDecoder().feed(b"\n\xef\xbb\xbfdata: z\n\n") == []


def test_runs_of_blank_lines_between_events() -> None:
    assert SseDecoder().feed(b"data:x\n\n\n\n\ndata: y\n\n\n") == ["x", "y"]


def test_invalid_utf8_is_replaced() -> None:
    assert SseDecoder().feed(b"data: \xff\xfe ok\n\n") == ["\ufffd\ufffd ok"]


def test_empty_feed() -> None:
    assert SseDecoder().feed(b"") == []


def test_close_dispatches_complete_lines_and_rejects_a_partial_line() -> None:
    decoder = SseDecoder()
    assert decoder.feed(b"data: [DONE]\n") == []
    assert decoder.close() == ["[DONE]"]
    decoder = SseDecoder()
    decoder.feed(b'data: {"trunc')
    with pytest.raises(BackendError, match="middle of an event") as caught:
        decoder.close()
    assert caught.value.code == "backend_error"
    assert caught.value.message.startswith("The upstream model server ")


def test_event_size_limit() -> None:
    # "data: 12345\n" is 12 bytes: allowed at 12, refused at 11, complete or not.
    assert SseDecoder(12).feed(b"data: 12345\n\n") == ["12345"]
    with pytest.raises(BackendError, match="larger than the 11 bytes") as caught:
        SseDecoder(11).feed(b"data: 12345\n\n")
    assert caught.value.code == "backend_error"
    decoder = SseDecoder(11)
    decoder.feed(b"data: 1234")
    with pytest.raises(BackendError):
        decoder.feed(b"56")
    with pytest.raises(BackendError):
        SseDecoder(11).feed(b"data: a\n\ndata: 123456")
    # Many small events in one big feed are fine.
    assert SseDecoder(16).feed(b"data: 1234567\n\n" * 100) == ["1234567"] * 100


def test_max_event_bytes_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        SseDecoder(0)


# -- split-invariance ------------------------------------------------------------------

_values = st.text(alphabet="ab :é\ufeff", max_size=6).map(str.encode) | st.sampled_from(
    [b"\xff", b"\xe2\x82", b"[DONE]"]
)
_lines = st.one_of(
    st.builds(lambda v: b"data:" + v, _values),
    st.builds(lambda v: b"data: " + v, _values),
    st.sampled_from([b"", b"", b"data", b": comment", b"event: x", b"id: 1", b"retry: 5"]),
    _values,
)
_streams = st.builds(
    lambda pairs, bom: (
        (b"\xef\xbb\xbf" if bom else b"") + b"".join(line + end for line, end in pairs)
    ),
    st.lists(st.tuples(_lines, st.sampled_from([b"\n", b"\r\n", b"\r"])), max_size=12),
    st.booleans(),
) | st.binary(max_size=40)


@settings(max_examples=400, deadline=None)
@given(_streams, st.lists(st.integers(min_value=0), max_size=8))
def test_matches_reference_however_split(stream: bytes, cuts: list[int]) -> None:
    expected = reference(stream)
    assert decode([stream]) == expected
    assert decode(split(stream, cuts)) == expected
    assert decode([stream[i : i + 1] for i in range(len(stream))]) == expected


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(_lines, st.sampled_from([b"\n", b"\r\n", b"\r"])), max_size=12).map(
        lambda pairs: b"".join(line + end for line, end in pairs)
    ),
    st.integers(min_value=1, max_value=20),
    st.lists(st.integers(min_value=0), max_size=8),
)
def test_size_limit_however_split(stream: bytes, limit: int, cuts: list[int]) -> None:
    """Raises exactly when the reference does, whatever the split; events before
    the error are a prefix of the reference's."""
    expected_events, expected_error = reference(stream, limit)
    for chunks in ([stream], split(stream, cuts), [bytes([b]) for b in stream]):
        events, error = decode(chunks, limit)
        assert error == expected_error
        assert events == expected_events[: len(events)]
        if error is None:
            assert events == expected_events


@pytest.mark.parametrize("eol", [b"\n", b"\r\n"])
def test_an_event_trickling_in_is_buffered_in_place(eol: bytes) -> None:
    # One byte per receive used to recopy the whole event each time: quadratic.
    decoder = SseDecoder()
    meter = decoder._buffer = MeteredBuffer()
    stream = b"data: " + b"x" * 65_536 + eol + eol + b"data: y" + eol + eol
    events: list[str] = []
    for i in range(len(stream)):
        events += decoder.feed(stream[i : i + 1])
    assert events == ["x" * 65_536, "y"]
    assert decoder._buffer is meter
    assert meter.work <= 4 * len(stream)
