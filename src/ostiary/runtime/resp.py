"""RESP, as the Redis client speaks it: what a command argument may be, commands
packed for the wire (whole, with ``hiredis.pack_command``, or a piece at a time, for
a command built once and sent many times), the errors a call may raise, and
:class:`Script`, a Lua script known by its SHA1.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import cast

import attrs
import hiredis

__all__ = [
    "Arg",
    "RedisError",
    "RedisMaybeRanError",
    "RedisReplyError",
    "RedisUnavailableError",
    "Script",
    "bulk",
    "evalsha_head",
    "pack",
]

#: What a command argument may be.
Arg = str | int | float | bytes
#: One command, packed: its arguments as one tuple.
# hiredis' stub types the argument as a 1-tuple; it takes any tuple of arguments.
pack = cast(Callable[[tuple[Arg, ...]], bytes], hiredis.pack_command)


def bulk(data: bytes) -> bytes:
    """One command argument as RESP writes it: a piece of a packed command."""
    return b"$%d\r\n%b\r\n" % (len(data), data)


def evalsha_head(script: Script, keys: int, args: int) -> bytes:
    """The start of an EVALSHA of ``script`` with ``keys`` keys then ``args``
    arguments, each to follow as :func:`bulk` (for :meth:`.RedisClient.evalsha_packed`)."""
    return b"*%d\r\n$7\r\nEVALSHA\r\n%b%b" % (
        3 + keys + args,
        bulk(script.sha.encode()),
        bulk(b"%d" % keys),
    )


class RedisError(Exception):
    """Anything that went wrong talking to Redis."""


class RedisUnavailableError(RedisError):
    """Redis could not be reached, or did not answer within the timeout."""


class RedisReplyError(RedisError):
    """Redis answered with an error reply (``-ERR ...``)."""


class RedisMaybeRanError(RedisUnavailableError):
    """A call made with ``resend=False`` was cut off by a pooled connection that
    broke: Redis may or may not have carried it out. The caller decides whether
    to send it again (as it is, or in a form that is safe to repeat)."""


@attrs.frozen
class Script:
    """A Lua script known by its SHA1, loaded into Redis when Redis does not know it."""

    source: str
    sha: str = attrs.field(init=False)

    @sha.default
    def _sha(self) -> str:
        return hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest()
