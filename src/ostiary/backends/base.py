"""The one interface every model backend implements, and the settings they share.

A backend turns validated requests (:mod:`ostiary.protocol.requests`) into normalized
output (:mod:`ostiary.protocol.generation`). It raises only
:class:`~ostiary.protocol.errors.OpenAIError` subclasses; anything else escaping a
backend is a bug, which the runtime logs and shows the client as a plain 500.

Generation is an async iterator of :class:`Delta` pieces that ends with exactly one
:class:`Usage`. The runtime always closes the iterator (``aclose``), also when the
client leaves early, and runs it inside a cancel scope: a backend must stop its work
promptly when cancelled and must not hold a slot after ``aclose``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Protocol

import attrs

from ostiary.protocol.capabilities import Capabilities, ModelKind
from ostiary.protocol.exchange import BackendPolicy
from ostiary.protocol.generation import Delta, EmbeddingResult, Usage
from ostiary.protocol.requests import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

__all__ = ["Backend", "BackendSettings", "ConfiguredBackend", "Generation"]

#: What chat and completion calls return: an async generator the caller closes.
Generation = AsyncGenerator[Delta | Usage, None]


_POLICY = BackendPolicy(name="")


@attrs.frozen(kw_only=True)
class BackendSettings:
    """Keys every ``[[backends]]`` table has; each kind adds its own. The scheduling
    and timing keys are the gateway's :class:`BackendPolicy` (same names, same
    defaults)."""

    name: str
    kind: str
    models: tuple[str, ...]
    #: Which of ``models`` make embeddings (the others chat).
    embedding_models: tuple[str, ...] = ()
    #: Requests this backend runs at once.
    max_concurrency: int = attrs.field(default=_POLICY.max_concurrency)
    #: Requests waiting for a slot before new ones are refused with 503 queue_full.
    max_queue: int = attrs.field(default=_POLICY.max_queue)
    #: Seconds a request may wait for a slot (then 503 queue_timeout).
    max_queue_wait: float = attrs.field(default=_POLICY.max_queue_wait)
    #: Seconds from dispatch to the backend's first output (then 504).
    first_output_timeout: float = attrs.field(default=_POLICY.first_output_timeout)
    #: Seconds allowed between two pieces of output (then 504 backend_stalled).
    stall_timeout: float = attrs.field(default=_POLICY.stall_timeout)
    #: Seconds from dispatch to the end of the generation (then 504).
    total_timeout: float = attrs.field(default=_POLICY.total_timeout)
    #: The queue's policy: "fair" (per principal, by tokens) or "fifo".
    scheduler: str = attrs.field(default=_POLICY.scheduler)
    #: Seconds a queued request waits to rise one priority class ("fair" only).
    aging_seconds: float = attrs.field(default=_POLICY.aging_seconds)
    #: Seconds over which the service rate behind ``retry-after`` is measured.
    rate_window: float = attrs.field(default=_POLICY.rate_window)
    #: Seconds a request is assumed to hold a slot before releases are measured.
    service_time: float = attrs.field(default=_POLICY.service_time)

    def __attrs_post_init__(self) -> None:
        self.policy()  # the policy's validators judge the values
        stray = [m for m in self.embedding_models if m not in self.models]
        if stray:
            raise ValueError(f"embedding_models names {stray}, which are not in models")

    def kind_of(self, model: str) -> ModelKind:
        return ModelKind.EMBEDDING if model in self.embedding_models else ModelKind.CHAT

    def capabilities(self, model: str) -> Capabilities:
        """What ``model`` accepts; each kind of backend declares its own."""
        return Capabilities(kind=self.kind_of(model))

    def policy(self) -> BackendPolicy:
        """How the gateway schedules and times this backend."""
        return BackendPolicy(
            name=self.name,
            max_concurrency=self.max_concurrency,
            max_queue=self.max_queue,
            max_queue_wait=self.max_queue_wait,
            first_output_timeout=self.first_output_timeout,
            stall_timeout=self.stall_timeout,
            total_timeout=self.total_timeout,
            scheduler=self.scheduler,
            aging_seconds=self.aging_seconds,
            rate_window=self.rate_window,
            service_time=self.service_time,
        )


class Backend(Protocol):
    """A model backend. Constructed from its settings by the runtime, entered as an
    async context manager (``async with backend:``) for its whole life."""

    @property
    def name(self) -> str: ...

    @property
    def models(self) -> tuple[str, ...]: ...

    async def __aenter__(self) -> Backend: ...

    async def __aexit__(self, *exc_info: object) -> None: ...

    def chat(self, request: ChatCompletionRequest) -> Generation:
        """Generate a chat completion: Delta pieces, then one Usage."""
        ...

    def complete(self, request: CompletionRequest) -> Generation:
        """Generate a text completion: Delta pieces, then one Usage."""
        ...

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult: ...

    async def check_ready(self) -> None:
        """Return if the backend can serve now; raise an OpenAIError if not."""
        ...


class ConfiguredBackend:
    """What every backend takes from its settings: its name and its model ids."""

    _settings: BackendSettings

    @property
    def name(self) -> str:
        return self._settings.name

    @property
    def models(self) -> tuple[str, ...]:
        return self._settings.models
