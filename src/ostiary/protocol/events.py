"""What the runtime tells the core: frozen events, each naming its request.

``now`` is monotonic seconds from the runtime's one clock; the core never reads a
clock of its own.
"""

from __future__ import annotations

import attrs

from .errors import OpenAIError
from .generation import Delta, EmbeddingResult, Usage

__all__ = [
    "BackendChunk",
    "BackendFailed",
    "BackendFinished",
    "ClientGone",
    "EmbeddingsComputed",
    "Event",
    "ReadinessChecked",
    "RequestReceived",
]

Header = tuple[bytes, bytes]


@attrs.frozen
class RequestReceived:
    """A complete HTTP request. Header names are lower-case bytes (as h11 gives them)."""

    request_id: str
    method: str
    target: str
    headers: tuple[Header, ...]
    body: bytes
    now: float
    #: Unix seconds, for the ``created`` field of responses.
    created: int
    client: str = ""


@attrs.frozen
class BackendChunk:
    """Output the backend produced since the last event (one or more pieces)."""

    request_id: str
    pieces: tuple[Delta | Usage, ...]


@attrs.frozen
class BackendFinished:
    """The generation ended normally (its Usage came in a BackendChunk)."""

    request_id: str
    now: float


@attrs.frozen
class EmbeddingsComputed:
    request_id: str
    result: EmbeddingResult
    now: float


@attrs.frozen
class BackendFailed:
    request_id: str
    error: OpenAIError
    now: float


@attrs.frozen
class ClientGone:
    """The client closed its connection before the response was complete."""

    request_id: str
    now: float


@attrs.frozen
class ReadinessChecked:
    """Result of checking every backend for ``/readyz``: (backend, problem) pairs."""

    request_id: str
    failures: tuple[tuple[str, str], ...]
    now: float


Event = (
    RequestReceived
    | BackendChunk
    | BackendFinished
    | EmbeddingsComputed
    | BackendFailed
    | ClientGone
    | ReadinessChecked
)
