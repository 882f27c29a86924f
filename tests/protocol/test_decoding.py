"""Strict request decoding: every failure is a 400 naming the field."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import attrs
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ostiary.protocol.decoding import (
    check_content_type,
    decode_chat,
    decode_completion,
    decode_embedding,
)
from ostiary.protocol.errors import InvalidRequestError, OpenAIError, UnsupportedMediaTypeError
from ostiary.protocol.json_body import parse_json_object
from ostiary.protocol.request_limits import RequestLimits

LIMITS = RequestLimits()
USER = {"role": "user", "content": "hi"}


def chat(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "m", "messages": [USER]}
    body.update(fields)
    return body


def reject(body: dict[str, Any] | bytes, limits: RequestLimits = LIMITS) -> InvalidRequestError:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    with pytest.raises(InvalidRequestError) as info:
        decode_chat(raw, limits)
    assert info.value.status == 400
    assert info.value.type == "invalid_request_error"
    return info.value


def test_minimal_chat_request() -> None:
    req = decode_chat(orjson.dumps(chat()), LIMITS)
    assert req.model == "m"
    assert req.messages[0].text() == "hi"
    assert req.stream is False
    assert req.raw == chat()


def test_full_chat_request() -> None:
    body = chat(
        messages=[
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "42"},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:x"}}]},
        ],
        stream=True,
        stream_options={"include_usage": True},
        max_completion_tokens=10,
        max_tokens=10,  # both may be sent if they agree
        n=2,
        temperature=0,
        top_p=0.5,
        stop=["x", "y"],
        seed=1,
        presence_penalty=-1.5,
        frequency_penalty=1,
        logit_bias={"12": -100},
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        tool_choice={"type": "function", "function": {"name": "f"}},
        response_format={"type": "json_object"},
        user="u",
        metadata={"a": "b"},
    )
    req = decode_chat(orjson.dumps(body), LIMITS)
    assert req.messages[1].text() == "ab"
    assert req.messages[2].tool_calls is not None
    assert req.messages[2].tool_calls[0].function.name == "f"
    assert req.messages[4].content is not None and not isinstance(req.messages[4].content, str)
    assert req.messages[4].content[0].data == {"type": "image_url", "image_url": {"url": "data:x"}}
    assert req.include_usage
    assert req.output_limit == 10
    assert req.stop == ("x", "y")
    assert req.temperature == 0.0 and isinstance(req.temperature, float)
    assert req.tool_choice is not None and req.tool_choice.function == "f"


def test_stop_string_becomes_one_sequence() -> None:
    assert decode_chat(orjson.dumps(chat(stop="END")), LIMITS).stop == ("END",)


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        (chat(foo=1), "foo", "Unrecognized request argument supplied: foo"),
        (chat(raw={}), "raw", "Unrecognized request argument supplied: raw"),
        ({"model": "m"}, "messages", "Missing required parameter"),
        ({"messages": [USER]}, "model", "Missing required parameter"),
        (chat(model=5), "model", "expected a string, but got an integer"),
        (chat(model=""), "model", "must not be empty"),
        (chat(messages="hi"), "messages", "expected an array, but got a string"),
        (chat(messages=[]), "messages", "empty array"),
        (chat(messages=[{"role": "bot", "content": "x"}]), "messages[0].role", "must be one of"),
        (chat(messages=[{"role": "user"}]), "messages[0].content", "Missing required"),
        (
            chat(messages=[{"role": "user", "content": 5}]),
            "messages[0].content",
            "expected a string",
        ),
        (
            chat(messages=[{"role": "user", "content": "x", "x": 1}]),
            "messages[0].x",
            "Unrecognized",
        ),
        (
            chat(messages=[{"role": "user", "content": [{"type": "text"}]}]),
            "messages[0].content[0].text",
            "expected a string, but got null",
        ),
        (
            chat(messages=[{"role": "user", "content": [{"type": "video"}]}]),
            "messages[0].content[0].type",
            "must be one of",
        ),
        (
            chat(messages=[{"role": "user", "content": [{"text": "a"}]}]),
            "messages[0].content[0].type",
            "Missing required",
        ),
        (
            chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": "u"}]}]),
            "messages[0].content[0].image_url",
            "expected an object",
        ),
        (chat(messages=[{"role": "assistant"}]), "messages[0].content", "needs 'content' or"),
        (chat(messages=[{"role": "tool", "content": "x"}]), "messages[0].tool_call_id", "Missing"),
        (
            chat(messages=[{"role": "user", "content": "x", "tool_calls": []}]),
            "messages[0].tool_calls",
            "only assistant",
        ),
        (chat(temperature="1"), "temperature", "expected a number, but got a string"),
        (chat(temperature=True), "temperature", "expected a number, but got a boolean"),
        (chat(temperature=2.5), "temperature", "above maximum"),
        (chat(top_p=-0.1), "top_p", "below minimum"),
        (chat(presence_penalty=3), "presence_penalty", "above maximum"),
        (chat(frequency_penalty=-3), "frequency_penalty", "below minimum"),
        (chat(n=0), "n", "below minimum"),
        (chat(n=9), "n", "above maximum"),
        (chat(n=1.0), "n", "expected an integer, but got a decimal"),
        (chat(max_tokens="5"), "max_tokens", "expected an integer"),
        (chat(max_tokens=0), "max_tokens", "below minimum"),
        (chat(max_tokens=10**9), "max_tokens", "above maximum"),
        (chat(max_completion_tokens=0), "max_completion_tokens", "below minimum"),
        (chat(stream="yes"), "stream", "expected a boolean"),
        (chat(stream_options={"include_usage": True}), "stream_options", "only allowed when"),
        (chat(stream=True, stream_options={"x": 1}), "stream_options.x", "Unrecognized"),
        (chat(stop=["a", 1]), "stop[1]", "expected a string"),
        (chat(stop=["a", "b", "c", "d", "e"]), "stop", "too many"),
        (chat(stop=[""]), "stop[0]", "must not be empty"),
        (chat(stop=5), "stop", "expected an array of strings"),
        (chat(logit_bias={"1": "x"}), "logit_bias.1", "expected a number"),
        (chat(logit_bias={"1": 101}), "logit_bias.1", "above maximum"),
        (chat(logit_bias=[1]), "logit_bias", "expected an object"),
        (chat(top_logprobs=21), "top_logprobs", "above maximum"),
        (chat(response_format={"type": "xml"}), "response_format.type", "must be one of"),
        (chat(tools="x"), "tools", "expected an array"),
        (chat(tools=[{"type": "function"}]), "tools[0].function", "Missing required"),
        (
            chat(tools=[{"type": "retrieval", "function": {"name": "f"}}]),
            "tools[0].type",
            "expected 'function'",
        ),
        (chat(tool_choice="auto"), "tool_choice", "only allowed when 'tools'"),
        (chat(tool_choice="maybe"), "tool_choice", "must be 'none'"),
        (chat(tool_choice=3), "tool_choice", "expected a string or an object"),
        (chat(tool_choice={"type": "x"}), "tool_choice.type", "must be 'function'"),
        (chat(tool_choice={"type": "function"}), "tool_choice.function.name", "expected a string"),
        (
            chat(
                messages=[
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "a",
                                "type": "function",
                                "function": {"name": "f", "arguments": 3},
                            }
                        ],
                    }
                ]
            ),
            "messages[0].tool_calls[0].function.arguments",
            "expected a string, but got an integer",
        ),
    ],
)
def test_rejections_name_the_field(body: dict[str, Any], param: str, words: str) -> None:
    error = reject(body)
    assert error.param == param
    assert words in error.message


def test_no_string_to_number_conversion_anywhere() -> None:
    for field in ("n", "seed", "max_tokens", "top_logprobs"):
        assert reject(chat(**{field: "1"})).param == field


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"", "empty"),
        (b"{", "could not parse"),
        (b'{"a": NaN}', "could not parse"),
        (b"\xff\xfe", "could not parse"),
        (b"[1, 2]", "must be a JSON object, but got an array"),
        (b'"x"', "but got a string"),
        (b"null", "but got null"),
        (b"1.5", "but got a decimal"),
        (b"true", "but got a boolean"),
    ],
)
def test_bad_json(raw: bytes, words: str) -> None:
    error = reject(raw)
    assert error.code == "invalid_json"
    assert words in error.message


def test_depth_limit() -> None:
    deep: Any = "x"
    for _ in range(40):
        deep = {"a": deep}
    with pytest.raises(InvalidRequestError, match="nests more than 32"):
        parse_json_object(orjson.dumps(deep), 32, 100, 100)
    assert parse_json_object(orjson.dumps({"a": [[1]]}), 3, 100, 100) == {"a": [[1]]}
    with pytest.raises(InvalidRequestError):
        parse_json_object(orjson.dumps({"a": [[1]]}), 2, 100, 100)


def test_very_deep_json_is_a_clean_error() -> None:
    reject(b"[" * 100_000 + b"]" * 100_000)


def test_limits_are_configurable() -> None:
    limits = RequestLimits(max_messages=1, max_message_chars=3, max_n=1, max_tools=0 + 1)
    assert reject(chat(messages=[USER, USER]), limits).param == "messages"
    assert reject(chat(messages=[{"role": "user", "content": "long"}]), limits).param == (
        "messages[0].content"
    )
    tools = [{"type": "function", "function": {"name": "f"}}] * 2
    assert reject(chat(tools=tools), limits).param == "tools"
    assert reject(chat(n=2), limits).param == "n"


def test_completion_prompts() -> None:
    def dec(**fields: Any) -> Any:
        return decode_completion(orjson.dumps({"model": "m", **fields}), LIMITS)

    assert dec(prompt="hi").prompts() == ("hi",)
    assert dec(prompt=["a", "b"]).prompts() == ("a", "b")
    assert dec(prompt=[1, 2]).prompts() == ((1, 2),)
    assert dec(prompt=[[1], [2, 3]]).prompts() == ((1,), (2, 3))
    assert dec(prompt="x", best_of=2, echo=True, suffix="s", logprobs=2).best_of == 2
    cases: list[tuple[dict[str, Any], str]] = [
        ({"prompt": []}, "prompt"),
        ({"prompt": [True]}, "prompt[0]"),
        ({"prompt": [[1], 2]}, "prompt[1]"),
        ({"prompt": [[1, "x"]]}, "prompt[0][1]"),
        ({"prompt": [1, "x"]}, "prompt[1]"),
        ({"prompt": ["a", 1]}, "prompt[1]"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": [[]]}, "prompt[0]"),
        ({"prompt": "x", "logprobs": 6}, "logprobs"),
        ({"prompt": "x", "best_of": 0}, "best_of"),
        ({"prompt": "x", "messages": []}, "messages"),
        ({"prompt": "x", "model": ""}, "model"),
    ]
    for bad, param in cases:
        with pytest.raises(InvalidRequestError) as info:
            dec(**bad)
        assert info.value.param == param, bad


def test_embedding_inputs() -> None:
    def dec(**fields: Any) -> Any:
        return decode_embedding(orjson.dumps({"model": "e", **fields}), LIMITS)

    assert dec(input="hi").inputs() == ("hi",)
    assert dec(input=["a", "b"], encoding_format="base64", dimensions=8).encoding_format == "base64"
    cases: list[tuple[dict[str, Any], str]] = [
        ({"input": ""}, "input"),
        ({"input": ["a", ""]}, "input[1]"),
        ({"input": "x", "encoding_format": "hex"}, "encoding_format"),
        ({"input": "x", "dimensions": 0}, "dimensions"),
        ({}, "input"),
        ({"input": "x", "model": ""}, "model"),
    ]
    for bad, param in cases:
        with pytest.raises(InvalidRequestError) as info:
            dec(**bad)
        assert info.value.param == param, bad
    limits = RequestLimits(max_batch_inputs=1)
    with pytest.raises(InvalidRequestError) as info:
        decode_embedding(orjson.dumps({"model": "e", "input": ["a", "b"]}), limits)
    assert info.value.param == "input"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["model", "messages", "role", "content", "stop", "n", "type", "x"])
            | st.text(max_size=5),
            children,
            max_size=5,
        )
    ),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(json_values)
def test_random_json_never_raises_anything_but_openai_errors(value: Any) -> None:
    raw = json.dumps(value).encode()  # stdlib: also writes integers beyond 64 bits
    for decode in (decode_chat, decode_completion, decode_embedding):
        try:
            decode(raw, LIMITS)
        except OpenAIError as error:
            assert error.status == 400


chat_like = st.fixed_dictionaries(
    {
        "model": st.text(min_size=1, max_size=8),
        "messages": st.lists(
            st.fixed_dictionaries(
                {
                    "role": st.sampled_from(["user", "system", "assistant", "developer"]),
                    "content": st.text(max_size=20) | st.integers(-(2**40), 2**40) | st.none(),
                }
            ),
            max_size=3,
        ),
    },
    optional={
        "temperature": st.floats(-1, 3, allow_nan=False) | st.text(max_size=2),
        "n": st.integers(-1, 10),
        "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=5),
        "stream": st.booleans(),
    },
)


@settings(max_examples=300, deadline=None)
@given(chat_like)
def test_near_valid_chat_bodies(value: dict[str, Any]) -> None:
    try:
        req = decode_chat(orjson.dumps(value), LIMITS)
    except InvalidRequestError as error:
        assert error.param is not None
    else:
        assert req.model == value["model"]
        assert len(req.messages) == len(value["messages"])


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes(raw: bytes) -> None:
    with contextlib.suppress(OpenAIError):
        decode_chat(raw, LIMITS)


def test_openai_accepts_these_so_do_we() -> None:
    req = decode_chat(
        orjson.dumps(
            chat(
                stream=None,
                messages=[
                    USER,
                    {"role": "assistant", "content": "x", "audio": {"id": "a1"}},
                    {
                        "role": "assistant",
                        "content": None,
                        "function_call": {"name": "f", "arguments": "{}"},
                        "tool_calls": [],
                    },
                ],
            )
        ),
        LIMITS,
    )
    assert req.stream is False
    assert req.messages[1].audio == {"id": "a1"}


@pytest.mark.parametrize(
    ("metadata", "param"),
    [
        ({f"k{i}": "v" for i in range(17)}, "metadata"),
        ({"k" * 65: "v"}, "metadata"),
        ({"k": 1}, "metadata.k"),
        ({"k": "v" * 513}, "metadata.k"),
    ],
)
def test_metadata_follows_openai_rules(metadata: dict[str, Any], param: str) -> None:
    assert reject(chat(metadata=metadata)).param == param
    assert decode_chat(orjson.dumps(chat(metadata={"a": "b" * 512})), LIMITS).metadata


def test_choices_times_prompts_is_bounded() -> None:
    body = {"model": "m", "prompt": ["p"] * 300, "n": 8}
    with pytest.raises(InvalidRequestError) as info:
        decode_completion(orjson.dumps(body), LIMITS)
    assert info.value.param == "n"
    body["n"] = 6
    assert len(decode_completion(orjson.dumps(body), LIMITS).prompts()) == 300


def test_range_errors_show_the_exact_value() -> None:
    assert "got 2.0000001 instead" in reject(chat(temperature=2.0000001)).message


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (chat(messages=[{"role": "user", "content": []}]), "messages[0].content", "empty_array"),
        (
            chat(messages=[USER, {"role": "assistant", "content": []}]),
            "messages[1].content",
            "empty_array",
        ),
        (chat(tools=[]), "tools", "empty_array"),
        (
            chat(messages=[{"role": "function", "content": "42"}]),
            "messages[0].name",
            "missing_required_parameter",
        ),
        (
            chat(max_tokens=5000, max_completion_tokens=5),  # either may slip past a cap
            "max_tokens",
            "invalid_parameter_combination",
        ),
        (chat(logit_bias={"AI": 1}), "logit_bias.AI", "invalid_value"),
        (chat(logit_bias={"-1": 1}), "logit_bias.-1", "invalid_value"),
        (chat(logit_bias={"1.5": 1}), "logit_bias.1.5", "invalid_value"),
        (chat(logit_bias={"": 1}), "logit_bias.", "invalid_value"),
        (chat(logit_bias={"\u0661": 1}), "logit_bias.\u0661", "invalid_value"),
        (chat(logit_bias={"1" * 11: 1}), "logit_bias." + "1" * 11, "invalid_value"),
        (chat(logit_bias={"1": -101}), "logit_bias.1", "invalid_value"),
        (
            chat(logit_bias={str(i): 1 for i in range(1025)}),
            "logit_bias",
            "array_above_max_length",
        ),
    ],
)
def test_openai_refuses_these_so_do_we(body: dict[str, Any], param: str, code: str) -> None:
    error = reject(body)
    assert (error.param, error.code) == (param, code)


def test_what_openai_accepts_beside_those() -> None:
    body = chat(
        messages=[USER, {"role": "function", "name": "f", "content": "42"}],
        logit_bias={str(i): -100 for i in range(1024)},
    )
    req = decode_chat(orjson.dumps(body), LIMITS)
    assert req.messages[1].name == "f"
    assert req.logit_bias is not None and len(req.logit_bias) == 1024
    completion = {"model": "m", "prompt": "x", "logit_bias": {"50256": -100, "x": 1}}
    with pytest.raises(InvalidRequestError) as info:
        decode_completion(orjson.dumps(completion), LIMITS)
    assert info.value.param == "logit_bias.x"


def test_duplicate_keys_are_refused() -> None:
    raw = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "model": "n"}'
    error = reject(raw)
    assert (error.param, error.code) == ("model", "duplicate_key")
    raw = b'{"model": "m", "input": "a", "input": ["b", "c"]}'
    with pytest.raises(InvalidRequestError) as info:
        decode_embedding(raw, LIMITS)
    assert info.value.param == "input"


def _parts(n: int) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": "a"}] * n}


def test_arrays_are_counted_before_they_are_structured() -> None:
    limits = RequestLimits(max_content_parts=10, max_tool_calls=3, max_messages=4)
    # All parts together, named at the message that goes over.
    error = reject(chat(messages=[_parts(6), _parts(4), _parts(1)]), limits)
    assert (error.param, error.code) == ("messages[2].content", "array_above_max_length")
    assert decode_chat(orjson.dumps(chat(messages=[_parts(6), _parts(4)])), limits)
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    calls = [{"role": "assistant", "tool_calls": [call] * 2}] * 2
    assert reject(chat(messages=calls), limits).param == "messages[1].tool_calls"
    # Counted first: the items are not even looked at.
    assert reject(chat(messages=[5] * 5), limits).param == "messages"
    assert reject(chat(tools=[5] * 129)).param == "tools"
    assert reject(chat(stop=[5] * 5)).param == "stop"
    assert reject(chat(logit_bias={str(i): "x" for i in range(1025)})).param == "logit_bias"


def test_content_parts_default_bound() -> None:
    error = reject(chat(messages=[_parts(LIMITS.max_content_parts + 1)]))
    assert error.param == "messages[0].content"
    assert LIMITS.max_content_parts >= 1024


def test_token_ids_are_bounded_all_inputs_together() -> None:
    limits = RequestLimits(max_token_ids=5)
    ok = {"model": "e", "input": [[1, 2], [3, 4, 5]]}
    assert decode_embedding(orjson.dumps(ok), limits).inputs() == ((1, 2), (3, 4, 5))
    cases: list[tuple[str, Any, Any]] = [
        ("input", [[1, 2], [3, 4, 5, 6]], decode_embedding),
        ("input", [1] * 6, decode_embedding),
        ("prompt", [[1, 2, 3], [4, 5, 6]], decode_completion),
    ]
    for field, value, decode in cases:
        with pytest.raises(InvalidRequestError) as info:
            decode(orjson.dumps({"model": "m", field: value}), limits)
        assert (info.value.param, info.value.code) == (field, "array_above_max_length"), value
    big = {"model": "e", "input": [[1] * 1000] * 301}
    with pytest.raises(InvalidRequestError, match="too many token ids"):
        decode_embedding(orjson.dumps(big), LIMITS)


def test_json_limits_come_from_request_limits() -> None:
    # 9 arrays and objects, 10 keys, 7 levels.
    deep = chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"a": [[]]}}}])
    exact = RequestLimits(max_json_containers=9, max_json_keys=10, max_json_depth=7)
    assert decode_chat(orjson.dumps(deep), exact)
    for tighter in (
        {"max_json_containers": 8},
        {"max_json_keys": 9},
        {"max_json_depth": 6},
    ):
        assert reject(deep, attrs.evolve(exact, **tighter)).code == "invalid_json"
    with pytest.raises(ValueError, match="254"):
        RequestLimits(max_json_depth=255)


@pytest.mark.parametrize(
    "headers",
    [
        (),
        ((b"content-type", b"application/json"),),
        ((b"content-type", b"Application/JSON"),),
        ((b"content-type", b"application/json; charset=utf-8"),),
        ((b"content-type", b'application/json;charset="UTF-8"'),),
        ((b"Content-Type", b" application/json ; charset = utf8 ; x=y"),),
        ((b"accept", b"text/plain"), (b"content-type", b"application/json;")),
    ],
)
def test_json_content_types_pass(headers: tuple[tuple[bytes, bytes], ...]) -> None:
    check_content_type(headers)


@pytest.mark.parametrize(
    "headers",
    [
        ((b"content-type", b"application/x-www-form-urlencoded"),),
        ((b"content-type", b"text/plain"),),
        ((b"content-type", b"multipart/form-data; boundary=x"),),
        ((b"content-type", b"application/jsonx"),),
        ((b"content-type", b""),),
        ((b"content-type", b"application/json; charset=utf-16"),),
        ((b"content-type", b"application/json"), (b"content-type", b"text/plain")),
        ((b"content-type", b"\xff\xfe"),),
    ],
)
def test_other_content_types_get_415(headers: tuple[tuple[bytes, bytes], ...]) -> None:
    with pytest.raises(UnsupportedMediaTypeError) as info:
        check_content_type(headers)
    error = info.value.to_dict()["error"]
    assert info.value.status == 415
    assert (error["type"], error["code"]) == ("invalid_request_error", "unsupported_media_type")


def test_an_integer_past_64_bits_is_not_called_a_decimal() -> None:
    """The JSON parser yields a float for it; the message still says what was sent."""
    body = b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1'
    with pytest.raises(InvalidRequestError) as info:
        decode_chat(body + b"0" * 20 + b"}", RequestLimits())
    assert info.value.param == "max_tokens"
    assert "but got an integer out of range instead" in str(info.value)
