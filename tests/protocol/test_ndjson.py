"""NdjsonDecoder: any split of a valid stream decodes the same; bad input is a BackendError."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ostiary.protocol.errors import BackendError
from ostiary.protocol.ndjson import DEFAULT_MAX_LINE_BYTES, NdjsonDecoder
from tests.protocol.meters import MeteredBuffer

json_values: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)

line_endings = st.sampled_from([b"\n", b"\r\n", b"\n\n", b" \n"])


def encode(values: list[Any], endings: list[bytes]) -> bytes:
    return b"".join(orjson.dumps(v) + endings[i % len(endings)] for i, v in enumerate(values))


def decode_in_pieces(data: bytes, cuts: list[int]) -> list[Any]:
    decoder = NdjsonDecoder()
    out: list[Any] = []
    last = 0
    for cut in sorted(set(cuts)):
        out += decoder.feed(data[last:cut])
        last = cut
    out += decoder.feed(data[last:])
    out += decoder.close()
    return out


@given(st.lists(json_values, max_size=8), st.lists(line_endings, min_size=1, max_size=4))
def test_byte_at_a_time(values: list[Any], endings: list[bytes]) -> None:
    data = encode(values, endings)
    decoder = NdjsonDecoder()
    out: list[Any] = []
    for i in range(len(data)):
        out += decoder.feed(data[i : i + 1])
    assert decoder.buffered == 0
    assert out + decoder.close() == values


@given(st.lists(json_values, max_size=8), st.lists(line_endings, min_size=1), st.data())
def test_any_split(values: list[Any], endings: list[bytes], data: st.DataObject) -> None:
    encoded = encode(values, endings)
    cuts = data.draw(st.lists(st.integers(0, len(encoded)), max_size=10))
    assert decode_in_pieces(encoded, cuts) == values


@given(st.lists(json_values, min_size=1, max_size=5), st.data())
def test_last_line_without_newline_is_decoded_on_close(
    values: list[Any], data: st.DataObject
) -> None:
    encoded = b"\n".join(orjson.dumps(v) for v in values)
    cuts = data.draw(st.lists(st.integers(0, len(encoded)), max_size=5))
    assert decode_in_pieces(encoded, cuts) == values


def test_lines_come_out_as_soon_as_complete() -> None:
    decoder = NdjsonDecoder()
    assert decoder.feed(b'{"a": 1}\n{"b"') == [{"a": 1}]
    assert decoder.buffered == 4
    assert decoder.feed(b": 2}\n\n  \n[3]\r\n") == [{"b": 2}, [3]]
    assert decoder.close() == []


def test_close_twice_and_blank_tail() -> None:
    decoder = NdjsonDecoder()
    decoder.feed(b"  \r")
    assert decoder.close() == []
    assert decoder.close() == []
    with pytest.raises(RuntimeError):
        decoder.feed(b"{}\n")


@pytest.mark.parametrize("data", [b"not json\n", b'{"a": 1\n', b"\xff\xfe\n", b"{}{}\n", b"[1,]\n"])
def test_invalid_line_is_backend_error(data: bytes) -> None:
    with pytest.raises(BackendError) as info:
        NdjsonDecoder().feed(data)
    assert info.value.status == 502
    assert "valid JSON" in info.value.message


def test_invalid_last_line_is_backend_error_on_close() -> None:
    decoder = NdjsonDecoder()
    assert decoder.feed(b"{}\n{") == [{}]
    with pytest.raises(BackendError):
        decoder.close()


def test_line_of_exactly_the_limit_is_accepted() -> None:
    line = orjson.dumps("x" * 8)  # 10 bytes
    decoder = NdjsonDecoder(max_line_bytes=len(line))
    assert decoder.feed(line) == []
    assert decoder.feed(b"\n" + line + b"\n") == ["x" * 8, "x" * 8]


def test_unfinished_line_over_the_limit_fails_before_its_newline() -> None:
    decoder = NdjsonDecoder(max_line_bytes=16)
    decoder.feed(b'"' + b"a" * 15)
    with pytest.raises(BackendError) as info:
        decoder.feed(b"a")
    assert "longer than 16 bytes" in info.value.message


def test_complete_line_over_the_limit_fails() -> None:
    decoder = NdjsonDecoder(max_line_bytes=4)
    with pytest.raises(BackendError):
        decoder.feed(b'"abcdef"\n{}\n')


def test_limit_counts_each_line_not_the_whole_chunk() -> None:
    decoder = NdjsonDecoder(max_line_bytes=4)
    assert decoder.feed(b"[1]\n" * 100) == [[1]] * 100


@given(st.binary(max_size=64))
def test_arbitrary_bytes_give_values_or_backend_error(data: bytes) -> None:
    decoder = NdjsonDecoder(max_line_bytes=32)
    try:
        for i in range(len(data)):
            decoder.feed(data[i : i + 1])
        decoder.close()
    except BackendError:
        pass


def test_defaults_and_bad_limit() -> None:
    assert DEFAULT_MAX_LINE_BYTES == 1024 * 1024
    with pytest.raises(ValueError, match="max_line_bytes"):
        NdjsonDecoder(max_line_bytes=0)


def test_a_line_trickling_in_is_buffered_in_place() -> None:
    decoder = NdjsonDecoder()
    meter = decoder._buffer = MeteredBuffer()
    stream = b'{"a": "' + b"x" * 65_536 + b'"}\n{"b": 1}\n'
    values: list[Any] = []
    for i in range(len(stream)):
        values += decoder.feed(stream[i : i + 1])
    assert values == [{"a": "x" * 65_536}, {"b": 1}]
    assert decoder._buffer is meter
    assert meter.work <= 4 * len(stream)
