"""What each model of a backend accepts, declared by the backend and checked by the
gateway before a request is queued.

A parameter a model cannot honour is refused with a 400 naming it (code
``unsupported_parameter``) and never reaches the backend: a client asking for
``logprobs``, ``n: 3`` or ``tools`` from a model that cannot give them gets an error
it can act on, never a plain answer that silently ignores what it asked. A chat
request to an embeddings model, and the reverse, is a 400 on every backend.

Extension parameters (``top_k``, ``min_p``, ``repetition_penalty``… which clients of
vLLM and llama.cpp send) are accepted only where the model declares them in
``extensions``; anywhere else they stay a 400 ``unknown_parameter``, as OpenAI
answers them.
"""

from __future__ import annotations

import enum

import attrs

from .errors import InvalidRequestError
from .requests import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from .tokens import TokenCodec, embedding_as_text

__all__ = [
    "RESPONSE_FORMATS",
    "Capabilities",
    "ModelKind",
    "check_capabilities",
    "fit",
    "unsupported",
]

BackendCall = ChatCompletionRequest | CompletionRequest | EmbeddingRequest
RESPONSE_FORMATS = frozenset({"text", "json_object", "json_schema"})


class ModelKind(enum.Enum):
    # Members are singletons: hash by identity, not (as Enum does) in Python by name.
    __hash__ = object.__hash__

    CHAT = "chat"  # chat completions and (unless declared otherwise) text completions
    EMBEDDING = "embedding"


@attrs.frozen(kw_only=True)
class Capabilities:
    """One model's declared abilities. The defaults are what any chat model can do:
    one choice, text output, the common sampling parameters."""

    kind: ModelKind = ModelKind.CHAT
    #: Serves ``/v1/completions`` as well as chat.
    completions: bool = True
    #: Most choices per request (``n``; ``best_of`` for completions).
    max_n: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    logprobs: bool = False
    #: ``tools`` (and the deprecated ``functions``) with any ``tool_choice``.
    tools: bool = False
    response_formats: frozenset[str] = frozenset({"text"})
    echo: bool = False
    suffix: bool = False
    #: Completions prompts given as token ids.
    token_prompts: bool = False
    #: Embedding inputs given as token ids (otherwise the gateway decodes them).
    token_inputs: bool = False
    #: The ``dimensions`` parameter of embeddings.
    dimensions: bool = False
    #: Non-OpenAI request parameters passed on to the backend.
    extensions: frozenset[str] = frozenset()

    @classmethod
    def upstream(cls, kind: ModelKind, extensions: frozenset[str] = frozenset()) -> Capabilities:
        """Everything OpenAI's API accepts: an OpenAI-compatible upstream decides."""
        return cls(
            kind=kind,
            max_n=128,
            logprobs=True,
            tools=True,
            response_formats=RESPONSE_FORMATS,
            echo=True,
            suffix=True,
            token_prompts=True,
            token_inputs=True,
            dimensions=True,
            extensions=extensions,
        )


def unsupported(param: str, what: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"This model does not support {what}.", param=param, code="unsupported_parameter"
    )


def _wrong_kind(call: BackendCall, caps: Capabilities) -> InvalidRequestError:
    if caps.kind is ModelKind.EMBEDDING:
        message = f"'{call.model}' is an embeddings model; use it with /v1/embeddings."
    else:
        message = f"'{call.model}' is a chat model; it cannot create embeddings."
    return InvalidRequestError(message, param="model", code="unsupported_model")


def check_capabilities(call: BackendCall, caps: Capabilities) -> None:
    """Raise a 400 for the first thing in ``call`` the model cannot honour."""
    if isinstance(call, EmbeddingRequest):
        if caps.kind is not ModelKind.EMBEDDING:
            raise _wrong_kind(call, caps)
        if call.dimensions is not None and not caps.dimensions:
            raise unsupported("dimensions", "the 'dimensions' parameter")
        return
    if caps.kind is not ModelKind.CHAT:
        raise _wrong_kind(call, caps)
    for name in call.extensions:
        if name not in caps.extensions:
            raise InvalidRequestError(
                f"Unrecognized request argument supplied: {name}",
                param=name,
                code="unknown_parameter",
            )
    n = call.n or 1
    if n > caps.max_n:
        raise unsupported("n", f"more than {caps.max_n} choice(s) per request")
    if isinstance(call, ChatCompletionRequest):
        _check_chat(call, caps)
    else:
        _check_completion(call, caps)


def _check_chat(call: ChatCompletionRequest, caps: Capabilities) -> None:
    if (call.logprobs or call.top_logprobs is not None) and not caps.logprobs:
        raise unsupported("logprobs" if call.logprobs else "top_logprobs", "log probabilities")
    if not caps.tools:
        if call.tools and not (call.tool_choice and call.tool_choice.mode == "none"):
            raise unsupported("tools", "tools (function calling)")
        if call.functions is not None and call.function_call != "none":
            raise unsupported("functions", "functions (function calling)")
    fmt = call.response_format
    if fmt is not None and fmt.type not in caps.response_formats:
        raise unsupported("response_format", f"response_format '{fmt.type}'")


def _check_completion(call: CompletionRequest, caps: Capabilities) -> None:
    if not caps.completions:
        raise InvalidRequestError(
            f"'{call.model}' does not serve /v1/completions; use /v1/chat/completions.",
            param="model",
            code="unsupported_model",
        )
    if call.best_of is not None and call.best_of > caps.max_n:
        raise unsupported("best_of", f"best_of above {caps.max_n}")
    if call.logprobs is not None and not caps.logprobs:
        raise unsupported("logprobs", "log probabilities")
    if call.echo and not caps.echo:
        raise unsupported("echo", "echo")
    if call.suffix is not None and not caps.suffix:
        raise unsupported("suffix", "suffix")
    if not caps.token_prompts and any(not isinstance(p, str) for p in call.prompts()):
        raise unsupported("prompt", "prompts given as token ids")


def fit(call: BackendCall, caps: Capabilities, tokens: TokenCodec | None) -> BackendCall:
    """``call`` as the model may take it: refused if it asks for what the model
    cannot do; tools that ``tool_choice: "none"`` disables are left out for a model
    without tools; embedding inputs given as token ids become text (cl100k) for a
    model that takes text."""
    check_capabilities(call, caps)
    if isinstance(call, EmbeddingRequest):
        if caps.token_inputs or all(isinstance(i, str) for i in call.inputs()):
            return call
        if tokens is None:
            raise unsupported("input", "input given as token ids")
        return embedding_as_text(call, tokens)
    if isinstance(call, ChatCompletionRequest) and call.tools and not caps.tools:
        raw = {k: v for k, v in call.raw.items() if k not in TOOL_FIELDS}
        return attrs.evolve(call, tools=None, tool_choice=None, parallel_tool_calls=None, raw=raw)
    return call


TOOL_FIELDS = frozenset({"tools", "tool_choice", "parallel_tool_calls"})
