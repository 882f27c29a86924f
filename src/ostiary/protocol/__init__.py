"""The sans-IO core of Ostiary: it parses, validates, authenticates and schedules
requests and renders OpenAI responses, reading no clock, doing no I/O and drawing no
randomness. :class:`Gateway` is the state machine (events in, actions out); the
runtime carries out its actions and reports back.
"""

from .actions import (
    AcceptWebSocket,
    Action,
    CancelBackend,
    CheckReadiness,
    CloseWebSocket,
    Count,
    Dispatch,
    EndStream,
    Log,
    RenderMetrics,
    Respond,
    SendBytes,
    StartStream,
)
from .admission import Admission, Refusal
from .auth import ApiKey, KeyTable
from .capabilities import Capabilities, ModelKind
from .cors import CorsPolicy
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
from .exchange import BackendPolicy
from .fair_queue import FairQueue
from .gateway import Endpoint, ExchangeState, Gateway, GatewayUsageError, ModelRoute
from .generation import Delta, EmbeddingResult, ToolCallDelta, Usage
from .ndjson import NdjsonDecoder
from .request_limits import RequestLimits
from .requests import ChatCompletionRequest, ChatMessage, CompletionRequest, EmbeddingRequest
from .scheduler import FifoScheduler, Scheduler, Ticket
from .sse import SseDecoder, SseEncoder
from .tokens import TokenCodec, embedding_as_text

__all__ = [
    "AcceptWebSocket",
    "Action",
    "Admission",
    "ApiKey",
    "AuthenticationError",
    "BackendChunk",
    "BackendError",
    "BackendFailed",
    "BackendFinished",
    "BackendPolicy",
    "BackendTimeoutError",
    "BackendUnavailableError",
    "CancelBackend",
    "Capabilities",
    "ChatCompletionRequest",
    "ChatMessage",
    "CheckReadiness",
    "ClientGone",
    "CloseWebSocket",
    "CompletionRequest",
    "CorsPolicy",
    "Count",
    "Delta",
    "Dispatch",
    "EmbeddingRequest",
    "EmbeddingResult",
    "EmbeddingsComputed",
    "EndStream",
    "Endpoint",
    "Event",
    "ExchangeState",
    "FairQueue",
    "FifoScheduler",
    "Gateway",
    "GatewayUsageError",
    "InternalServerError",
    "InvalidRequestError",
    "KeyTable",
    "KeysReplaced",
    "Log",
    "MethodNotAllowedError",
    "MetricsRendered",
    "ModelKind",
    "ModelRoute",
    "NdjsonDecoder",
    "NotFoundError",
    "OpenAIError",
    "PermissionDeniedError",
    "RateLimitError",
    "ReadinessChecked",
    "Refusal",
    "RenderMetrics",
    "RequestLimits",
    "RequestReceived",
    "RequestRefused",
    "RequestTooLargeError",
    "Respond",
    "ResponseSent",
    "Scheduler",
    "SendBytes",
    "ServiceUnavailableError",
    "ShutdownStarted",
    "SseDecoder",
    "SseEncoder",
    "StartStream",
    "Tick",
    "Ticket",
    "TokenCodec",
    "ToolCallDelta",
    "UnsupportedMediaTypeError",
    "Usage",
    "embedding_as_text",
]
