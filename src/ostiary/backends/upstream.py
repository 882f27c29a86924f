"""What the ``openai`` and ``ollama`` backends share: one upstream model server
spoken to over HTTP.

:class:`UpstreamBackend` is their base class. It owns

- the :class:`~ostiary.backends.httpclient.HttpClient`, opened by ``__aenter__``
  and closed by ``__aexit__``;
- bounded draining: once a stream's last useful byte has arrived, the rest of the
  body is read for at most ``response_drain_timeout`` seconds and
  ``response_drain_max_bytes`` bytes, so that the connection can be pooled; past
  either bound it is closed instead;
- the readiness request;
- the one mapping from an upstream's answer to an
  :class:`~ostiary.protocol.errors.OpenAIError` (:func:`status_error`,
  :func:`transport_error`), and the one log record of each failure.

The mapping (DESIGN §5a)::

    upstream                 the client sees
    400, 422                 400, the upstream's message (sanitised, bounded), param, code
    413                      413, likewise (code ``request_too_large`` if it gave none)
    404 with an error body   404 model_not_found, naming our model id
    401, 403                 502 backend_error: our credentials are wrong (generic message)
    429                      503 upstream_busy, with the upstream's retry-after
    503                      503 backend_unavailable, with the upstream's retry-after
    408, 504                 504 backend_timeout
    any other status         502 backend_error
    connection refused       503 backend_unavailable
    connect or read timeout  504 backend_timeout
    garbage, a cut stream    502 backend_error
    a reply too large        502 backend_error (``max_response_bytes``, and
                             ``max_embeddings_response_bytes`` for embeddings)

An upstream's 429 is its own limit, not the client's, so it is never passed on as a
429. Its retry-after comes from ``retry-after-ms`` or ``retry-after`` (delta-seconds
or an HTTP-date) and is clamped to ``[0, max_retry_after]``; a value that is not a
number or a date (negative, ``inf``, ``nan``, garbage) counts as absent: 1 second.

What the upstream said rides along as the error's ``__cause__``
(:class:`UpstreamError`) and is logged, redacted and bounded, exactly once per
failed call, on the ``ostiary.upstream`` logger: at WARNING, or at INFO when the
upstream refused the client's own request (400, 413). The client sees only the
generic message (or, for those refusals, the sanitised one).
"""

from __future__ import annotations

import contextlib
import datetime
import email.utils
import logging
import re
import time
from collections.abc import AsyncIterator, Sequence
from typing import Self

import attrs
import orjson
import trio

from ostiary.backends.base import BackendSettings, ConfiguredBackend
from ostiary.backends.httpclient import (
    ConnectError,
    ConnectTimeout,
    HttpClient,
    HttpClientError,
    HttpResponse,
    ReadTimeout,
    ResponseTooLarge,
)
from ostiary.protocol.errors import (
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    InvalidRequestError,
    NotFoundError,
    OpenAIError,
    RequestTooLargeError,
)
from ostiary.protocol.responses import DEFAULT_RETRY_AFTER

__all__ = [
    "UpstreamBackend",
    "UpstreamError",
    "UpstreamSettings",
    "ended_early",
    "generation_failed",
    "http_url",
    "invalid_response",
    "model_not_found",
    "parse_retry_after",
    "status_error",
    "transport_error",
]

log = logging.getLogger("ostiary.upstream")

RawHeaders = Sequence[tuple[bytes, bytes]]
RawBody = bytes | bytearray

#: Longest upstream message passed on to a client (400 and 413 only).
_MAX_CLIENT_MESSAGE = 500
#: Longest upstream text in a log record.
_MAX_LOG_TEXT = 2000
_NUMBER = re.compile(rb"[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?")


def http_url(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    """An attrs validator: ``value`` is an http:// or https:// URL."""
    if not value.startswith(("http://", "https://")):
        raise ValueError(f"{attribute.name} must start with http:// or https://, got {value!r}")


@attrs.frozen(kw_only=True)
class UpstreamSettings(BackendSettings):
    """Keys of every ``[[backends]]`` kind that talks HTTP to an upstream server."""

    #: Where the upstream listens (the ``openai`` kind: its API root, e.g. ``.../v1``).
    base_url: str = attrs.field(validator=http_url)
    connect_timeout: float = attrs.field(default=5.0, validator=attrs.validators.gt(0))
    #: Longest wait for any bytes from the upstream (loading a model included).
    read_timeout: float = attrs.field(default=600.0, validator=attrs.validators.gt(0))
    max_connections: int = attrs.field(default=64, validator=attrs.validators.ge(1))
    #: Our model id -> the upstream's name for it; unlisted ids are sent unchanged.
    upstream_models: dict[str, str] = attrs.field(factory=dict, hash=False)
    #: After a stream's end, the longest wait for the rest of its HTTP body. The
    #: client's ``[DONE]`` waits for it, so it is short: a server that ends its body
    #: sends the end right behind its last event; one that keeps it open costs the
    #: connection (closed, not pooled), not the client a second.
    response_drain_timeout: float = attrs.field(default=0.1, validator=attrs.validators.ge(0))
    #: ... and the most bytes read from it, before the connection is closed instead.
    response_drain_max_bytes: int = attrs.field(default=64 * 1024, validator=attrs.validators.ge(0))
    #: Largest whole (non-streamed) reply body read from the upstream; a longer one
    #: (declared or received) is refused at once with a 502, so memory stays
    #: bounded: at most this much per request in flight. 16 MiB is several times a
    #: large completion (n=8 choices of 4,096 tokens is ~150 KB of text; with
    #: ``top_logprobs: 20`` each token costs ~1.5 KB of JSON, ~50 MB for all 8
    #: choices, so raise it for clients that ask for that much).
    max_response_bytes: int = attrs.field(
        default=16 * 1024 * 1024, validator=attrs.validators.ge(1)
    )
    #: The same for ``/embeddings`` replies, which are larger: vectors in JSON cost
    #: ~20 bytes a number, so the largest batch (2,048 inputs, ``[limits]
    #: max_batch_inputs``) of 1,536-dimension vectors (OpenAI's small model,
    #: most of vLLM's) is ~63 MB. 3,072 dimensions need twice that (or
    #: ``encoding_format: "base64"``, a quarter).
    max_embeddings_response_bytes: int = attrs.field(
        default=64 * 1024 * 1024, validator=attrs.validators.ge(1)
    )
    #: Upper bound on the retry-after passed on from an upstream, in seconds.
    max_retry_after: float = attrs.field(
        default=60.0, validator=[attrs.validators.ge(0), attrs.validators.le(86400)]
    )

    @upstream_models.validator
    def _check_upstream_models(self, attribute: object, value: dict[str, str]) -> None:
        for ours, theirs in value.items():
            if ours not in self.models:
                raise ValueError(f"upstream_models names {ours!r}, which is not in models")
            if not isinstance(theirs, str) or not theirs:
                raise ValueError(f"upstream_models[{ours!r}] must be a non-empty string")


class UpstreamError(Exception):
    """What the upstream said (its status, its error text), kept as the
    ``__cause__`` of the error a client sees; for logs only."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"upstream HTTP {status}: {message}")
        self.status = status
        self.upstream_message = message


class UpstreamBackend(ConfiguredBackend):
    """The base of a backend for one upstream HTTP server.

    Contract for subclasses: every public call wraps its exchange with the upstream
    in exactly one ``with self._failures():`` (never nested), which maps transport
    errors and logs each failure once; inside it, use :meth:`_call` or
    ``self._http.stream`` with :meth:`_check_status`, and :meth:`_drain`.
    """

    _settings: UpstreamSettings

    def __init__(self, settings: UpstreamSettings) -> None:
        self._settings = settings
        self._client: HttpClient | None = None
        self._boundary = _FailureBoundary(self)

    async def __aenter__(self) -> Self:
        s = self._settings
        self._client = HttpClient(
            s.base_url,
            max_connections=s.max_connections,
            connect_timeout=s.connect_timeout,
            read_timeout=s.read_timeout,
            max_response_bytes=s.max_response_bytes,
            default_headers=self._default_headers(),
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def _default_headers(self) -> list[tuple[str, str]]:
        """Headers sent with every request; a subclass adds its own. Called by
        ``__aenter__``, so it may raise ValueError for a bad setting."""
        return [("content-type", "application/json"), ("user-agent", "ostiary")]

    @property
    def _http(self) -> HttpClient:
        if self._client is None:
            raise RuntimeError(f"{type(self).__name__} used outside 'async with backend:'")
        return self._client

    def _upstream(self, model: str) -> str:
        return self._settings.upstream_models.get(model, model)

    def _failures(self) -> _FailureBoundary:
        """The boundary of one backend call: a transport error becomes its
        OpenAIError, and every OpenAIError leaving is logged, once."""
        return self._boundary

    async def _call(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        *,
        model: str = "",
        aliases: Sequence[str] = (),
        max_bytes: int | None = None,
    ) -> RawBody:
        """Send one request and read the whole answer: the body of a 2xx, else
        the mapped error (``model`` and ``aliases`` as for :func:`status_error`);
        ``max_bytes`` bounds it (default: ``max_response_bytes``)."""
        status, headers, data = await self._http.request(
            method, path, body=body, max_bytes=max_bytes
        )
        if not 200 <= status < 300:
            raise self._status_error(status, headers, data, model, aliases)
        return data

    async def _check_status(
        self, response: HttpResponse, model: str, aliases: Sequence[str]
    ) -> None:
        """Raise the mapped error for a streamed response that is not a 2xx."""
        if not 200 <= response.status < 300:
            data = await response.read()
            raise self._status_error(response.status, response.headers, data, model, aliases)

    def _status_error(
        self, status: int, headers: RawHeaders, data: RawBody, model: str, aliases: Sequence[str]
    ) -> OpenAIError:
        return status_error(
            status,
            headers,
            data,
            model=model,
            aliases=aliases,
            wall=time.time(),
            max_retry_after=self._settings.max_retry_after,
        )

    async def _ready_body(self, path: str) -> RawBody:
        """GET ``path`` within ``connect_timeout``: a server that cannot answer a
        listing that fast is not ready. The body of a 2xx, else the mapped error."""
        try:
            with trio.fail_after(self._settings.connect_timeout):
                return await self._call("GET", path)
        except trio.TooSlowError:
            raise BackendTimeoutError(
                "The upstream model server did not answer in time.", code="backend_timeout"
            ) from None

    async def _drain(self, chunks: AsyncIterator[bytes]) -> None:
        """Read what follows the end of a stream (normally just the end of the HTTP
        body) so that the connection can be pooled. Give up quietly after
        ``response_drain_timeout``, ``response_drain_max_bytes`` or a broken ending:
        the client then closes the connection, and the generation is complete."""
        s = self._settings
        seen = 0
        with trio.move_on_after(s.response_drain_timeout), contextlib.suppress(HttpClientError):
            async for chunk in chunks:
                seen += len(chunk)
                if seen > s.response_drain_max_bytes:
                    return

    def _log_failure(self, error: OpenAIError) -> None:
        level = logging.INFO if error.status in (400, 413) else logging.WARNING
        if not log.isEnabledFor(level):
            return
        # The handler's RedactingFilter redacts too; this keeps the record itself clean.
        from ostiary.runtime.logs import redact

        cause = error.__cause__
        status = cause.status if isinstance(cause, UpstreamError) else None
        if isinstance(cause, UpstreamError):
            text = cause.upstream_message
        elif cause is not None:
            text = f"{type(cause).__name__}: {cause}"
        else:
            text = ""
        text = _printable(redact(text[: 2 * _MAX_LOG_TEXT]))[:_MAX_LOG_TEXT]
        name = self._settings.name
        said = f"upstream HTTP {status}" if status is not None else "upstream failure"
        log.log(
            level,
            f"backend {name!r}: {said}: {text or error.message}",
            extra={
                "fields": {
                    "backend": name,
                    "upstream_status": status,
                    "upstream_error": text,
                    "status": error.status,
                    "code": error.code,
                }
            },
        )


class _FailureBoundary:
    """``with backend._failures():`` -- a class rather than a generator-based context
    manager, as it wraps every request (it costs a tenth as much); stateless, so one
    per backend serves every call at once."""

    __slots__ = ("_backend",)

    def __init__(self, backend: UpstreamBackend) -> None:
        self._backend = backend

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if isinstance(exc, HttpClientError):
            error = transport_error(exc)
            error.__cause__ = exc
            self._backend._log_failure(error)
            raise error from exc
        if isinstance(exc, OpenAIError):
            self._backend._log_failure(exc)


# -- the mapping ------------------------------------------------------------------------


def status_error(
    status: int,
    headers: RawHeaders,
    data: RawBody,
    *,
    model: str,
    aliases: Sequence[str],
    wall: float,
    max_retry_after: float,
) -> OpenAIError:
    """The client-facing error for an upstream's non-2xx answer. ``model`` is our id
    for the model asked for ("" when none was) and ``aliases`` the upstream's names
    for it, replaced by ``model`` in a message passed on; ``wall`` (Unix seconds)
    is for a retry-after given as an HTTP-date."""
    message, param, code = _error_detail(data)
    said = message or data[: 2 * _MAX_LOG_TEXT].decode(errors="replace")
    shown = _client_safe(message, model, aliases) if message else ""
    error: OpenAIError
    if status in (400, 422):
        error = InvalidRequestError(
            shown or f"The upstream model server rejected the request (HTTP {status}).",
            param=param,
            code=code,
        )
    elif status == 413:
        error = RequestTooLargeError(
            shown or "The request is too large for the upstream model server.",
            param=param,
            code=code or "request_too_large",
        )
    elif status == 404 and message and model:
        error = model_not_found(model)
    elif status in (401, 403):
        error = BackendError(
            "The upstream model server rejected our credentials.", code="backend_error"
        )
    elif status in (429, 503):
        retry_after = parse_retry_after(headers, wall=wall, ceiling=max_retry_after)
        if status == 429:
            error = BackendUnavailableError(
                "The upstream model server is busy; try again later.",
                code="upstream_busy",
                retry_after=retry_after,
            )
        else:
            error = BackendUnavailableError(
                "The upstream model server is unavailable; try again later.",
                code="backend_unavailable",
                retry_after=retry_after,
            )
    elif status in (408, 504):
        error = BackendTimeoutError("The upstream model server timed out.", code="backend_timeout")
    elif status >= 500:
        error = BackendError(
            f"The upstream model server failed (HTTP {status}).", code="backend_error"
        )
    else:
        error = BackendError(
            f"The upstream model server answered with HTTP {status}.", code="backend_error"
        )
    error.__cause__ = UpstreamError(status, said)
    return error


def transport_error(exc: HttpClientError) -> OpenAIError:
    """The client-facing error for a failure on the way to or from the upstream."""
    if isinstance(exc, ConnectTimeout):
        return BackendTimeoutError(
            "Connecting to the upstream model server timed out.", code="backend_timeout"
        )
    if isinstance(exc, ConnectError):
        return BackendUnavailableError(
            "The upstream model server is not reachable.",
            code="backend_unavailable",
            retry_after=DEFAULT_RETRY_AFTER,
        )
    if isinstance(exc, ReadTimeout):
        return BackendTimeoutError(
            "The upstream model server did not answer in time.", code="backend_timeout"
        )
    if isinstance(exc, ResponseTooLarge):
        return BackendError(
            f"The upstream model server's reply is larger than the {exc.limit} bytes "
            "this gateway accepts.",
            code="backend_error",
        )
    return BackendError("The connection to the upstream model server failed.", code="backend_error")


def invalid_response() -> BackendError:
    """A 2xx answer we cannot use (raise it ``from`` the parse error, if any)."""
    return BackendError("The upstream model server sent an invalid response.", code="backend_error")


def ended_early() -> BackendError:
    """A stream that ended before its last piece."""
    return BackendError("The upstream model server ended its response early.", code="backend_error")


def generation_failed(text: str) -> BackendError:
    """An error the upstream reported inside a stream it had begun (status 200)."""
    error = BackendError(
        "The upstream model server failed during generation.", code="backend_error"
    )
    error.__cause__ = UpstreamError(200, text[: 2 * _MAX_LOG_TEXT])
    return error


def model_not_found(model: str) -> NotFoundError:
    """The answer for a model the upstream does not have, worded as the gateway's
    for a model that does not exist (DESIGN §5a)."""
    return NotFoundError(
        f"The model `{model}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def parse_retry_after(
    headers: RawHeaders, *, wall: float, ceiling: float, default: float = DEFAULT_RETRY_AFTER
) -> float:
    """Seconds to wait, from ``retry-after-ms`` or else ``retry-after`` (delta-seconds
    or an HTTP-date, measured from ``wall``), clamped to ``[0, ceiling]``. A header
    that holds neither a non-negative number nor a date counts as absent; with no
    usable header, ``default`` (clamped too)."""
    values = dict(headers)
    ms = _seconds(values.get(b"retry-after-ms"))
    if ms is not None:
        return min(ms / 1000, ceiling)
    raw = values.get(b"retry-after")
    seconds = _seconds(raw)
    if seconds is None and raw is not None:
        seconds = _until(raw, wall)
    return min(default if seconds is None else seconds, ceiling)


def _seconds(value: bytes | None) -> float | None:
    """A non-negative decimal number (``inf`` for one too large for a float);
    None for anything else, ``inf`` and ``nan`` spelled out included."""
    if value is None or not _NUMBER.fullmatch(value.strip()):
        return None
    return float(value)


def _until(value: bytes, wall: float) -> float | None:
    try:
        when = email.utils.parsedate_to_datetime(value.decode("latin-1"))
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, when.timestamp() - wall)


def _error_detail(data: RawBody) -> tuple[str | None, str | None, str | None]:
    """``(message, param, code)`` from an error body: OpenAI's ``{"error": {...}}``,
    vLLM's older top-level form or Ollama's ``{"error": "..."}``; Nones when the body
    is something else."""
    try:
        answer = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None, None, None
    if not isinstance(answer, dict):
        return None, None, None
    error = answer.get("error")
    if isinstance(error, str):
        return error[: 2 * _MAX_LOG_TEXT] or None, None, None
    source = error if isinstance(error, dict) else answer
    message, param, code = source.get("message"), source.get("param"), source.get("code")
    return (
        message[: 2 * _MAX_LOG_TEXT] if isinstance(message, str) and message else None,
        _bounded(param) if isinstance(param, str) else None,
        _bounded(str(code)) if isinstance(code, str | int) and not isinstance(code, bool) else None,
    )


def _client_safe(message: str, model: str, aliases: Sequence[str]) -> str:
    """The upstream's message with our model id for its names, printable, short."""
    if model:
        for name in sorted({a for a in aliases if a and a != model}, key=len, reverse=True):
            message = message.replace(name, model)
    return _bounded(message)


def _bounded(text: str, limit: int = _MAX_CLIENT_MESSAGE) -> str:
    text = _printable(text[: 2 * limit]).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else " " for c in text)
