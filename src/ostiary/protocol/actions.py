"""What the core asks the runtime to do: frozen actions, each naming its request."""

from __future__ import annotations

from typing import Any

import attrs

from .requests import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

__all__ = [
    "Action",
    "CancelBackend",
    "CheckReadiness",
    "Dispatch",
    "EndStream",
    "Log",
    "Respond",
    "SendBytes",
    "StartStream",
]

Header = tuple[bytes, bytes]
BackendCall = ChatCompletionRequest | CompletionRequest | EmbeddingRequest


@attrs.frozen
class Respond:
    """Send a complete response (the runtime adds ``content-length``)."""

    request_id: str
    status: int
    headers: tuple[Header, ...]
    body: bytes


@attrs.frozen
class StartStream:
    """Start a streamed response (the runtime uses chunked transfer encoding)."""

    request_id: str
    status: int
    headers: tuple[Header, ...]


@attrs.frozen
class SendBytes:
    request_id: str
    data: bytes


@attrs.frozen
class EndStream:
    request_id: str


@attrs.frozen
class Dispatch:
    """Run ``call`` on backend ``backend`` and report back with events."""

    request_id: str
    backend: str
    call: BackendCall


@attrs.frozen
class CancelBackend:
    request_id: str


@attrs.frozen
class CheckReadiness:
    request_id: str


@attrs.frozen
class Log:
    """A structured log record; ``fields`` never hold secrets."""

    level: str
    message: str
    fields: dict[str, Any] = attrs.field(factory=dict, eq=False)


Action = (
    Respond | StartStream | SendBytes | EndStream | Dispatch | CancelBackend | CheckReadiness | Log
)
