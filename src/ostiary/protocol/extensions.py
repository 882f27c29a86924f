"""Request parameters outside OpenAI's API that clients of vLLM and llama.cpp send.

Decoding takes them out of the body before the strict structuring (which refuses
any unknown name): each of :data:`KNOWN` is checked for its type and range here; a
name a configured backend passes through (``extra_params``) is taken as any JSON
value. Whether the chosen model takes it is decided later, from its declared
capabilities (:mod:`.capabilities`): a model that does not gets the 400
``unknown_parameter`` OpenAI itself answers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .errors import InvalidRequestError

__all__ = ["KNOWN", "LLAMA_CPP", "take_extensions"]

JsonObject = dict[str, Any]


def _number(low: float, high: float) -> Callable[[str, object], None]:
    def check(name: str, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _invalid(name, "a number")
        if not (math.isfinite(value) and low <= value <= high):
            raise _invalid(name, f"a number from {low:g} to {high:g}")

    return check


def _integer(low: int, high: int) -> Callable[[str, object], None]:
    def check(name: str, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _invalid(name, f"an integer from {low} to {high}")

    return check


def _boolean(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise _invalid(name, "a boolean")


def _invalid(name: str, what: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"Invalid '{name}': expected {what}.", param=name, code="invalid_value"
    )


#: The extension parameters Ostiary knows, with their checks.
KNOWN: dict[str, Callable[[str, object], None]] = {
    "top_k": _integer(-1, 1_000_000),
    "min_p": _number(0.0, 1.0),
    "typical_p": _number(0.0, 1.0),
    "repetition_penalty": _number(0.0, 10.0),
    "repeat_penalty": _number(0.0, 10.0),
    "repeat_last_n": _integer(-1, 1_000_000),
    "min_tokens": _integer(0, 1_000_000),
    "ignore_eos": _boolean,
    "mirostat": _integer(0, 2),
    "mirostat_tau": _number(0.0, 100.0),
    "mirostat_eta": _number(0.0, 1.0),
}
#: What llama.cpp's sampler takes (the embedded backend maps these).
LLAMA_CPP = frozenset(
    {
        "top_k",
        "min_p",
        "typical_p",
        "repeat_penalty",
        "repetition_penalty",
        "repeat_last_n",
        "ignore_eos",
        "mirostat",
        "mirostat_tau",
        "mirostat_eta",
    }
)


def take_extensions(
    payload: JsonObject, passed_on: frozenset[str]
) -> tuple[JsonObject, dict[str, Any]]:
    """Split ``payload`` into what the strict structuring sees and the extension
    parameters (checked). ``passed_on`` names further parameters some backend
    passes to its upstream, taken as they are. The payload itself is not changed
    (it stays the request's ``raw``); without extensions it is returned as is."""
    names = [k for k in payload if k in KNOWN or k in passed_on]
    if not names:
        return payload, {}
    extensions: dict[str, Any] = {}
    for name in names:
        value = payload[name]
        check = KNOWN.get(name)
        if check is not None and value is not None:
            check(name, value)
        extensions[name] = value
    return {k: v for k, v in payload.items() if k not in extensions}, extensions
