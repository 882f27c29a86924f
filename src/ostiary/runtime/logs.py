"""Logging: one line per record (JSON or text), with secrets redacted.

Redaction happens in a handler filter, so it covers every logger, ours and our
dependencies' alike: API-key secrets, bearer tokens, ``sk-`` style keys and values of
fields named like credentials never reach a log line.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
import time
from typing import Any, TextIO

import orjson

__all__ = ["RedactingFilter", "redact", "redact_value", "secret_field", "setup_logging"]

_PATTERNS = [
    re.compile(r"ost_[0-9a-f]{12}_[A-Za-z0-9_\-]+"),
    re.compile(r"\bsk-[A-Za-z0-9_\-]{8,}"),
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9_\-.~+/=]+"),
]
_SECRET_FIELDS = re.compile(r"(?i)(authorization|api[_-]?key|secret|password|token$)")
REDACTED = "[redacted]"


def redact(text: str) -> str:
    """``text`` with every secret-looking token replaced by ``[redacted]``."""
    # Each pattern needs one of these substrings: most text has none, and looking
    # for them costs far less than running the patterns.
    if "ost_" not in text and "sk-" not in text and "bearer" not in text.lower():
        return text
    for pattern in _PATTERNS:
        text = pattern.sub(REDACTED, text)
    return text


@functools.lru_cache(maxsize=1024)
def secret_field(key: str) -> bool:
    """Whether a field of this name is logged as ``[redacted]``, whatever it holds."""
    return _SECRET_FIELDS.search(key) is not None and not key.endswith(("_tokens", "_id"))


def redact_value(key: str, value: Any) -> Any:
    """A field's value as it may be logged: ``[redacted]`` under a credential-like
    name, secrets scrubbed from strings (nested dicts alike)."""
    if secret_field(key):
        return REDACTED
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_value(str(k), v) for k, v in value.items()}
    return value


class RedactingFilter(logging.Filter):
    """Scrubs secrets from a record's message, arguments and structured fields."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        record.msg = redact(message)
        record.args = None
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            record.fields = {k: redact_value(k, v) for k, v in fields.items()}
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_text:
            out["exc"] = record.exc_text
        return orjson.dumps(out, default=str).decode()


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict) and fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return line


def setup_logging(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    """Route every logger to one redacting handler on ``stream`` (stderr)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RedactingFilter())
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Python warnings (a library's SecurityWarning, say) as records of the same
    # stream and format, not raw lines beside them.
    logging.captureWarnings(True)
