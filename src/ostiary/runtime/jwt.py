"""Bearer JWTs: the verifier the core is handed, and the JWKS it keeps fresh.

:class:`JwtVerifier` keeps :class:`~ostiary.protocol.credentials.TokenVerifier`'s
contract: :meth:`~JwtVerifier.verify` is synchronous and reads only the key set it
already holds, so the gateway can call it inside ``admits``. Getting keys is the
runtime's: :meth:`~JwtVerifier.load` at start-up, :meth:`~JwtVerifier.run` in the
server's nursery (refetch every ``jwks_refresh_interval``; a file is also re-read
when it changes), and :meth:`~JwtVerifier.refresh_for_unknown_kid` when a token
names a ``kid`` the set lacks (the driver calls it, then judges the head once more).

What verification refuses, in this order, each with its own message and never
echoing the token: an over-long or malformed token; a header ``alg`` outside the
allow-list, judged before anything else (so ``none`` and every HMAC algorithm are
refused unread: an HS256 token "signed" with a published public key never reaches
a key); ``crit`` extensions; an unknown ``kid``
(:class:`~ostiary.protocol.credentials.UnknownSigningKey`); a key whose type, curve,
``use``, ``key_ops`` or own ``alg`` do not suit the token's algorithm; a bad
signature; then, with the signature good, the claims: ``exp`` (required), ``nbf``,
``iss``, ``aud`` (a string or a list), with ``leeway``, and the subject and roles
at their configured dotted paths. ``EdDSA`` is read as RFC 9864's ``Ed25519``:
one algorithm, Ed25519 keys only.

Key headers a token may carry (``jwk``, ``jku``, ``x5u``, ``x5c``) are ignored:
keys come from the configured JWKS only.

Refetches caused by unknown kids are spaced ``jwks_min_refetch_interval`` apart
(counted from the last such refetch, so the first rotation after start-up is seen
at once), and callers that arrive while a fetch runs share it: a flood of bogus
kids costs the identity provider at most one request per interval. A failed fetch
or an invalid document keeps the key set already held, and is logged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import math
import os
import re
from collections.abc import Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit

import attrs
import orjson
import trio
from joserfc.errors import JoseError
from joserfc.jwk import JWKRegistry, Key, KeySet
from joserfc.jws import JWSRegistry

from ostiary.backends.httpclient import HttpClient, HttpClientError
from ostiary.protocol.credentials import MAX_TOKEN_LENGTH, TokenClaims, UnknownSigningKey
from ostiary.protocol.errors import AuthenticationError

from .config import JwtSettings

__all__ = ["MAX_JWKS_KEYS", "JwksError", "JwtVerifier", "KeyRefresher", "parse_jwks"]

log = logging.getLogger("ostiary.jwt")

#: Keys one JWKS document may list; identity providers publish a handful.
MAX_JWKS_KEYS = 256
#: RSA moduli shorter than this are not trusted (RFC 7518 section 3.3).
_MIN_RSA_BITS = 2048
_SEGMENT = re.compile(r"[A-Za-z0-9_\-]*")
#: Seconds between two checks of a JWKS file's modification time.
_FILE_POLL = 1.0
#: First delay after a failed fetch; doubles up to ``jwks_refresh_interval``.
_FIRST_BACKOFF = 1.0
#: Verified tokens remembered (oldest forgotten first).
_VERIFIED_CACHE = 4096


class KeyRefresher(Protocol):
    """What the driver needs of a verifier: a rate-limited refresh of its keys, and
    whether it holds a key set at all (``/readyz``)."""

    async def refresh_for_unknown_kid(self) -> bool: ...

    @property
    def ready(self) -> bool: ...


class JwksError(Exception):
    """A key set that cannot be fetched or used; the message says why."""


def _canonical(alg: str) -> str:
    """RFC 9864 names the Ed25519 flavour of ``EdDSA`` ``Ed25519``; one algorithm."""
    return "Ed25519" if alg == "EdDSA" else alg


def _invalid(message: str) -> AuthenticationError:
    return AuthenticationError(message, code="invalid_token")


def _b64decode(segment: str) -> bytes:
    if not _SEGMENT.fullmatch(segment) or len(segment) % 4 == 1:
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _json_object(segment: str, what: str) -> dict[str, Any]:
    try:
        value = orjson.loads(_b64decode(segment))
    except (ValueError, binascii.Error):
        raise _invalid(f"The token is malformed: its {what} is not base64url JSON.") from None
    if not isinstance(value, dict):
        raise _invalid(f"The token is malformed: its {what} is not a JSON object.")
    return value


def _number(value: object) -> bool:
    return type(value) in (int, float) and math.isfinite(value)  # type: ignore[arg-type]


def _claim(claims: Mapping[str, Any], path: str) -> object:
    """The value at dotted ``path``; a name that itself holds dots (a namespaced
    claim such as ``https://app.example/roles``) is matched whole first."""
    if path in claims:
        return claims[path]
    start = 0
    while (dot := path.find(".", start)) != -1:
        inner = claims.get(path[:dot])
        if isinstance(inner, dict):
            found = _claim(inner, path[dot + 1 :])
            if found is not None:
                return found
        start = dot + 1
    return None


@attrs.frozen
class _KeySnapshot:
    """One JWKS as loaded: the joserfc key set and its keys indexed by ``kid``."""

    key_set: KeySet
    by_kid: Mapping[str, tuple[Key, ...]]

    @property
    def empty(self) -> bool:
        return not self.key_set


_EMPTY = _KeySnapshot(KeySet([]), {})


def parse_jwks(document: bytes) -> _KeySnapshot:
    """The signing keys of a JWKS document. Keys that cannot be used are skipped and
    logged (symmetric ones, encryption keys, short RSA moduli, unknown types); a
    document with none left is refused whole (:class:`JwksError`)."""
    try:
        data = orjson.loads(document)
    except ValueError:
        raise JwksError("not JSON") from None
    keys = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(keys, list):
        raise JwksError('not a JWKS: no "keys" list')
    if len(keys) > MAX_JWKS_KEYS:
        raise JwksError(f"lists {len(keys)} keys, more than {MAX_JWKS_KEYS}")
    usable: list[Key] = []
    for i, entry in enumerate(keys):
        try:
            usable.append(_import_key(entry))
        except JwksError as exc:
            kid = entry.get("kid") if isinstance(entry, dict) else None
            log.warning(
                "JWKS key skipped", extra={"fields": {"index": i, "kid": kid, "why": str(exc)}}
            )
    if not usable:
        raise JwksError("holds no usable signing key")
    by_kid: dict[str, tuple[Key, ...]] = {}
    for key in usable:
        if key.kid is not None:
            by_kid[key.kid] = (*by_kid.get(key.kid, ()), key)
    return _KeySnapshot(KeySet(usable), by_kid)


def _import_key(entry: object) -> Key:
    if not isinstance(entry, dict):
        raise JwksError("not a JSON object")
    kty = entry.get("kty")
    if kty == "oct":
        raise JwksError("symmetric (oct) keys are never used: HMAC is not allowed")
    if kty not in ("RSA", "EC", "OKP"):
        raise JwksError("unsupported key type")
    if entry.get("use", "sig") != "sig":
        raise JwksError("not a signing key (use)")
    kid = entry.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise JwksError("kid is not a string")
    public = {k: v for k, v in entry.items() if k not in ("d", "p", "q", "dp", "dq", "qi", "oth")}
    try:
        key = JWKRegistry.import_key(public)
    except (JoseError, ValueError, TypeError, KeyError) as exc:
        raise JwksError(f"invalid {kty} key: {exc}") from None
    if kty == "RSA":
        bits = getattr(key.get_op_key("verify"), "key_size", 0)
        if bits < _MIN_RSA_BITS:
            raise JwksError(f"RSA modulus of {bits} bits, under {_MIN_RSA_BITS}")
    return key


def _suits(key: Key, alg: str, curve: str | None, key_type: str) -> bool:
    """Whether ``key`` may check a signature of (canonical) algorithm ``alg``."""
    if key.key_type != key_type:
        return False
    if curve is not None and getattr(key, "curve_name", None) != curve:
        return False
    own = key.alg
    if own is not None and _canonical(own) != alg:
        return False
    ops = key.get("key_ops")
    return ops is None or "verify" in ops


class JwtVerifier:
    """Verifies bearer JWTs against a JWKS held in memory (module docstring).

    ``fetches`` counts the reads of the JWKS (file or URL) so far, for tests and
    logs; ``ready`` is false until a key set has been loaded; ``installed`` is set
    (and replaced by a fresh event) each time a new key set is swapped in.
    """

    def __init__(self, settings: JwtSettings, *, file_poll: float = _FILE_POLL) -> None:
        self._configure(settings)
        self._keys = _EMPTY
        self._retired = False
        self._file_poll = file_poll
        self._file_stamp: tuple[int, int, int] | None = None
        self._fetching: trio.Event | None = None
        self._last_ok = False
        self._last_on_demand = -math.inf
        #: Payloads of tokens whose signature the current key set verified, by the
        #: token's SHA-256: a client reuses its token, and the signature check is
        #: the cost (0.2-0.8 ms here); claims are still judged at every use.
        self._verified: dict[bytes, dict[str, Any]] = {}
        self.fetches = 0
        self.installed = trio.Event()

    def _configure(self, settings: JwtSettings) -> None:
        self.settings = settings
        self._allowed = frozenset(_canonical(a) for a in settings.algorithms)
        self._allowed_text = ", ".join(settings.algorithms)
        self._models = {a: JWSRegistry.algorithms[a] for a in self._allowed}

    async def reconfigure(self, settings: JwtSettings) -> None:
        """Take new ``[auth.jwt]`` settings (a config reload): their key set is
        loaded first, and only if that works are settings and keys swapped in
        together; otherwise :class:`JwksError`, and nothing changes."""
        fresh = JwtVerifier(settings, file_poll=self._file_poll)
        if settings.jwks_file is not None:
            await fresh.load()
        elif not await fresh.refresh():
            # Not load(): its "JWTs are refused until it is" is the start-up's story;
            # here the running keys stay in force.
            raise JwksError(f"{fresh.source}: cannot be fetched")
        self._configure(settings)
        self._file_stamp = fresh._file_stamp
        self._last_on_demand = -math.inf
        self._last_ok = True
        self.fetches += fresh.fetches
        self._install(fresh._keys)

    def retire(self) -> None:
        """JWTs are no longer accepted (``[auth.jwt]`` removed): :meth:`run` ends."""
        self._retired = True

    @property
    def ready(self) -> bool:
        return not self._keys.empty

    @property
    def key_set(self) -> KeySet:
        """The key set in use (replaced whole by each good refresh)."""
        return self._keys.key_set

    @property
    def source(self) -> str:
        return self.settings.jwks_url or self.settings.jwks_file or ""

    # -- verification (synchronous; the gateway calls it) -------------------------------------

    def verify(self, token: str, wall: float) -> TokenClaims:
        if len(token) > MAX_TOKEN_LENGTH:
            raise _invalid("The token is too long.")
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        known = self._verified.get(digest)
        if known is not None:
            return self._claims(known, wall)
        parts = token.split(".")
        if len(parts) != 3:
            raise _invalid("The token is malformed: a JWT has three dot-separated parts.")
        header = _json_object(parts[0], "header")
        alg = header.get("alg")
        if not isinstance(alg, str) or _canonical(alg) not in self._allowed:
            raise _invalid(
                f"The token's signing algorithm is not allowed (allowed: {self._allowed_text})."
            )
        alg = _canonical(alg)
        if "crit" in header:
            raise _invalid(
                "The token uses critical header extensions this server does not support."
            )
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _invalid("The token is malformed: its kid is not a string.")
        keys = self._keys
        if keys.empty:
            raise UnknownSigningKey(kid or "")
        if kid is not None:
            candidates = keys.by_kid.get(kid)
            if candidates is None:
                raise UnknownSigningKey(kid)
        else:
            candidates = tuple(keys.key_set)
        model = self._models[alg]
        curve = "Ed25519" if alg == "Ed25519" else getattr(model, "curve", None)
        suitable = [k for k in candidates if _suits(k, alg, curve, model.key_type)]
        if not suitable:
            raise _invalid("The token's signing key does not suit its algorithm.")
        try:
            signature = _b64decode(parts[2])
        except (ValueError, binascii.Error):
            raise _invalid("The token is malformed: its signature is not base64url.") from None
        if not _SEGMENT.fullmatch(parts[1]):
            raise _invalid("The token is malformed: its payload is not base64url JSON.")
        signed = f"{parts[0]}.{parts[1]}".encode("ascii")
        if not any(self._checks(model, signed, signature, key) for key in suitable):
            raise _invalid("The token's signature is not valid.")
        payload = _json_object(parts[1], "payload")
        result = self._claims(payload, wall)
        verified = self._verified
        if len(verified) >= _VERIFIED_CACHE:
            del verified[next(iter(verified))]
        verified[digest] = payload
        return result

    @staticmethod
    def _checks(model: Any, signed: bytes, signature: bytes, key: Key) -> bool:
        try:
            return bool(model.verify(signed, signature, key))
        except (JoseError, ValueError, TypeError):
            return False

    def _claims(self, claims: dict[str, Any], wall: float) -> TokenClaims:
        settings = self.settings
        leeway = settings.leeway
        exp = claims.get("exp")
        if exp is None:
            raise _invalid("The token has no expiry (exp); tokens without one are refused.")
        if not _number(exp):
            raise _invalid("The token is malformed: its exp is not a number.")
        if wall > exp + leeway:
            raise _invalid("The token has expired.")
        nbf = claims.get("nbf")
        if nbf is not None:
            if not _number(nbf):
                raise _invalid("The token is malformed: its nbf is not a number.")
            if wall + leeway < nbf:
                raise _invalid("The token is not valid yet (nbf is in the future).")
        if claims.get("iss") != settings.issuer:
            raise _invalid("The token's issuer (iss) is not accepted here.")
        aud = claims.get("aud")
        audiences = aud if isinstance(aud, list) else [aud]
        if settings.audience not in audiences:
            raise _invalid("The token is not meant for this server: wrong audience (aud).")
        subject = _claim(claims, settings.subject_claim)
        if not isinstance(subject, str) or not subject:
            raise _invalid(f"The token has no subject ({settings.subject_claim}) as a string.")
        roles = _claim(claims, settings.roles_claim)
        if roles is None:
            return TokenClaims(subject)
        if isinstance(roles, str):
            return TokenClaims(subject, (roles,))
        if isinstance(roles, list) and all(isinstance(r, str) for r in roles):
            return TokenClaims(subject, tuple(roles))
        raise _invalid(
            f"The token's roles claim ({settings.roles_claim}) is neither a string "
            "nor a list of strings."
        )

    # -- keeping the key set fresh (the runtime's) --------------------------------------------

    async def load(self) -> None:
        """The first load, at start-up. A file that is missing or invalid raises
        :class:`JwksError`; a URL that fails is logged and retried by :meth:`run`
        with backoff, tokens being refused (unknown key) until it succeeds."""
        if self.settings.jwks_file is not None:
            self._install(await self._read_file())
            self._last_ok = True
        elif not await self.refresh():
            log.warning(
                "JWKS not loaded yet; JWTs are refused until it is",
                extra={"fields": {"source": self.source}},
            )

    async def refresh(self) -> bool:
        """Read the JWKS again and swap it in whole; False (old set kept) if that
        failed. Callers arriving while a read runs wait for it and share its result."""
        running = self._fetching
        if running is not None:
            await running.wait()
            return self._last_ok
        done = self._fetching = trio.Event()
        self._last_ok = False
        try:
            self._last_ok = await self._reload()
        finally:
            self._fetching = None
            done.set()
        return self._last_ok

    async def refresh_for_unknown_kid(self) -> bool:
        """A token named a key the set lacks: refresh, unless a refresh of this kind
        started less than ``jwks_min_refetch_interval`` ago (then False at once).
        Joins a read already under way. True when a read succeeded."""
        if self._fetching is not None:
            return await self.refresh()
        now = trio.current_time()
        if now - self._last_on_demand < self.settings.jwks_min_refetch_interval:
            return False
        self._last_on_demand = now
        return await self.refresh()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Refetch every ``jwks_refresh_interval`` seconds (sooner, with backoff
        from one second, after a failure); a file is re-read as soon as its
        modification time or size changes."""
        task_status.started()
        interval = self.settings.jwks_refresh_interval
        backoff = _FIRST_BACKOFF
        next_refresh = trio.current_time() + interval
        if not self._last_ok:
            next_refresh = trio.current_time() + backoff
            backoff = min(backoff * 2, interval)
        while not self._retired:
            interval = self.settings.jwks_refresh_interval  # a reload may change it
            if self.settings.jwks_file is not None:
                await trio.sleep(min(self._file_poll, max(0.0, next_refresh - trio.current_time())))
                due = trio.current_time() >= next_refresh
                if not due and await self._file_changed():
                    due = True
            else:
                await trio.sleep_until(next_refresh)
                due = True
            if not due:
                continue
            if await self.refresh():
                backoff = _FIRST_BACKOFF
                next_refresh = trio.current_time() + interval
            else:
                next_refresh = trio.current_time() + backoff
                backoff = min(backoff * 2, interval)

    async def _reload(self) -> bool:
        try:
            if self.settings.jwks_file is not None:
                snapshot = await self._read_file()
            else:
                snapshot = parse_jwks(await self._fetch_url())
        except JwksError as exc:
            log.error(
                "cannot load the JWKS; keeping the keys held",
                extra={"fields": {"source": self.source, "error": str(exc)}},
            )
            return False
        self._install(snapshot)
        return True

    def _install(self, snapshot: _KeySnapshot) -> None:
        self._keys = snapshot
        # A key that left the set must stop vouching for the tokens it signed.
        self._verified = {}
        installed, self.installed = self.installed, trio.Event()
        installed.set()
        log.info(
            "JWKS loaded",
            extra={"fields": {"source": self.source, "kids": sorted(snapshot.by_kid)}},
        )

    async def _file_changed(self) -> bool:
        path = self.settings.jwks_file
        assert path is not None
        try:
            st = await trio.Path(path).stat()
        except OSError:
            return False  # gone for now: keep the keys, the next refresh logs it
        return (st.st_mtime_ns, st.st_size, st.st_ino) != self._file_stamp

    async def _read_file(self) -> _KeySnapshot:
        path = self.settings.jwks_file
        assert path is not None
        limit = self.settings.jwks_max_bytes
        self.fetches += 1

        def read() -> tuple[bytes, tuple[int, int, int]]:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                return f.read(limit + 1), (st.st_mtime_ns, st.st_size, st.st_ino)

        try:
            document, stamp = await trio.to_thread.run_sync(read)
        except OSError as exc:
            raise JwksError(f"{path}: cannot read: {exc.strerror}") from None
        # This version of the file is judged, good or bad: a bad one is read again
        # when it changes, or at the backoff's next refresh, not at every poll.
        self._file_stamp = stamp
        if len(document) > limit:
            raise JwksError(f"{path}: larger than jwks_max_bytes ({limit})")
        try:
            return parse_jwks(document)
        except JwksError as exc:
            raise JwksError(f"{path}: {exc}") from None

    async def _fetch_url(self) -> bytes:
        url = self.settings.jwks_url
        assert url is not None
        parts = urlsplit(url)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        timeout = self.settings.jwks_timeout
        self.fetches += 1
        try:
            with trio.fail_after(timeout):
                async with HttpClient(
                    f"{parts.scheme}://{parts.netloc}",
                    max_connections=1,
                    connect_timeout=timeout,
                    read_timeout=timeout,
                    max_response_bytes=self.settings.jwks_max_bytes,
                ) as client:
                    status, _, body = await client.request(
                        "GET", path, headers=[("accept", "application/json")]
                    )
        except trio.TooSlowError:
            raise JwksError(f"no answer within jwks_timeout ({timeout} s)") from None
        except (HttpClientError, OSError, ValueError) as exc:
            raise JwksError(f"fetch failed: {exc}") from None
        if status != 200:
            raise JwksError(f"the identity provider answered HTTP {status}")
        return bytes(body)
