"""The sans-IO core of Ostiary: it parses, validates, authenticates and schedules
requests and renders OpenAI responses, reading no clock, doing no I/O and drawing no
randomness. :class:`Gateway` is the state machine (events in, actions out); the
runtime carries out its actions and reports back.
"""

from .actions import (
    Action,
    CancelBackend,
    CheckReadiness,
    Dispatch,
    EndStream,
    Log,
    RenderMetrics,
    Respond,
    SendBytes,
    StartStream,
)
from .auth import ApiKey, KeyTable
from .errors import (
    AuthenticationError,
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    InternalServerError,
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
    OpenAIError,
    PermissionDeniedError,
    RateLimitError,
    RequestTooLargeError,
    ServiceUnavailableError,
    UnsupportedMediaTypeError,
)
from .events import (
    BackendChunk,
    BackendFailed,
    BackendFinished,
    ClientGone,
    EmbeddingsComputed,
    Event,
    MetricsRendered,
    ReadinessChecked,
    RequestReceived,
)
from .gateway import Endpoint, ExchangeState, Gateway, ModelRoute
from .generation import Delta, EmbeddingResult, ToolCallDelta, Usage
from .ndjson import NdjsonDecoder
from .request_limits import RequestLimits
from .requests import ChatCompletionRequest, ChatMessage, CompletionRequest, EmbeddingRequest
from .sse import SseDecoder, SseEncoder
from .tokens import TokenCodec, embedding_as_text

__all__ = [
    "Action",
    "ApiKey",
    "AuthenticationError",
    "BackendChunk",
    "BackendError",
    "BackendFailed",
    "BackendFinished",
    "BackendTimeoutError",
    "BackendUnavailableError",
    "CancelBackend",
    "ChatCompletionRequest",
    "ChatMessage",
    "CheckReadiness",
    "ClientGone",
    "CompletionRequest",
    "Delta",
    "Dispatch",
    "EmbeddingRequest",
    "EmbeddingResult",
    "EmbeddingsComputed",
    "EndStream",
    "Endpoint",
    "Event",
    "ExchangeState",
    "Gateway",
    "InternalServerError",
    "InvalidRequestError",
    "KeyTable",
    "Log",
    "MethodNotAllowedError",
    "MetricsRendered",
    "ModelRoute",
    "NdjsonDecoder",
    "NotFoundError",
    "OpenAIError",
    "PermissionDeniedError",
    "RateLimitError",
    "ReadinessChecked",
    "RenderMetrics",
    "RequestLimits",
    "RequestReceived",
    "RequestTooLargeError",
    "Respond",
    "SendBytes",
    "ServiceUnavailableError",
    "SseDecoder",
    "SseEncoder",
    "StartStream",
    "TokenCodec",
    "ToolCallDelta",
    "UnsupportedMediaTypeError",
    "Usage",
    "embedding_as_text",
]
