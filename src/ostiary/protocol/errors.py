"""The one error family every layer raises and every client sees.

An :class:`OpenAIError` carries exactly what OpenAI's API puts in an error body
(``message``, ``type``, ``param``, ``code``) plus the HTTP status. Its message is
always safe to show a client: internal details never go into one.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "AuthenticationError",
    "BackendError",
    "BackendTimeoutError",
    "BackendUnavailableError",
    "HeadersTooLargeError",
    "InternalServerError",
    "InvalidRequestError",
    "MethodNotAllowedError",
    "NotFoundError",
    "NotImplementedHttpError",
    "OpenAIError",
    "PermissionDeniedError",
    "RateLimitError",
    "RequestTimeoutError",
    "RequestTooLargeError",
    "ServiceUnavailableError",
    "UnsupportedMediaTypeError",
]


class OpenAIError(Exception):
    """An error with an OpenAI-style body: ``{"error": {message, type, param, code}}``."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        #: Seconds a client should wait before retrying (429 and 503 only).
        self.retry_after = retry_after
        #: Further response headers the error's cause calls for (``x-ratelimit-*``).
        self.headers: tuple[tuple[bytes, bytes], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status={self.status}, message={self.message!r}, "
            f"param={self.param!r}, code={self.code!r})"
        )


class InvalidRequestError(OpenAIError):
    status = 400
    type = "invalid_request_error"


class AuthenticationError(OpenAIError):
    status = 401
    type = "invalid_request_error"


class PermissionDeniedError(OpenAIError):
    status = 403
    type = "invalid_request_error"


class NotFoundError(OpenAIError):
    status = 404
    type = "invalid_request_error"


class MethodNotAllowedError(OpenAIError):
    """``allow`` lists the methods the path does take (the ``Allow`` header)."""

    status = 405
    type = "invalid_request_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        allow: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message, param=param, code=code)
        self.allow = allow


class RequestTooLargeError(OpenAIError):
    status = 413
    type = "invalid_request_error"


class UnsupportedMediaTypeError(OpenAIError):
    """A body that is not declared as JSON."""

    status = 415
    type = "invalid_request_error"


class RequestTimeoutError(OpenAIError):
    """The client did not send its request in time."""

    status = 408
    type = "invalid_request_error"


class NotImplementedHttpError(OpenAIError):
    """The request uses an HTTP feature the server does not implement (a transfer
    coding other than chunked)."""

    status = 501
    type = "invalid_request_error"


class HeadersTooLargeError(OpenAIError):
    status = 431
    type = "invalid_request_error"


class RateLimitError(OpenAIError):
    status = 429
    type = "rate_limit_error"


class InternalServerError(OpenAIError):
    status = 500
    type = "server_error"


class BackendError(OpenAIError):
    """The model backend answered with something we cannot use; ``code`` is
    ``backend_error`` unless given, so every such failure reads the same."""

    status = 502
    type = "server_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = "backend_error",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, param=param, code=code, retry_after=retry_after)


class ServiceUnavailableError(OpenAIError):
    status = 503
    type = "server_error"


class BackendUnavailableError(ServiceUnavailableError):
    """The model backend could not be reached."""


class BackendTimeoutError(OpenAIError):
    status = 504
    type = "server_error"
