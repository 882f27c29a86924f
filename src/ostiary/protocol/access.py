"""Who may do what, and which limits count a request: roles, rate-limit layers and
the principal a request is made by (DESIGN §5a).

- :class:`Role` is one ``[[roles]]`` table: the models (glob patterns) and endpoints
  it may use, a cap on the output it may ask for, its queue share, and its own
  limits, which count per principal. ``admin`` and ``user`` always exist
  (:data:`BUILTIN_ROLES`) unless a table of that name replaces them.
- :class:`RateLimitLayer` is one ``[[rate_limits]]`` table: limits counted per
  distinct value of its ``scope`` (per IP, per model, ...), for the requests its
  optional filters match.
- :class:`Principal` is whom a request is made by: ``key:<id>`` or ``jwt:<sub>``,
  with its role and the key's own overrides of the role's limits.
- :class:`AccessPolicy` holds them all and turns a request into the charges and
  concurrency slots that :mod:`.limits` judges.

Everything here is pure; globs are matched with :mod:`re` (``fnmatch`` would pull
in ``os``).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from .buckets import BucketSpec, Charge, ConcurrencyLimit, Limit, Unit
from .limits import Plan

__all__ = [
    "ADMIN_ENDPOINTS",
    "ADMIN_ROLE",
    "BUILTIN_ROLES",
    "ENDPOINT_NAMES",
    "MODEL_ENDPOINTS",
    "USER_ROLE",
    "AccessPolicy",
    "LimitSet",
    "Principal",
    "RateLimitLayer",
    "Role",
    "Scope",
    "Shape",
    "glob_matcher",
]

#: The endpoints a role may list (``models`` covers list and retrieve).
MODEL_ENDPOINTS = ("chat.completions", "completions", "embeddings", "models")
ADMIN_ENDPOINTS = ("queue", "metrics")
ENDPOINT_NAMES = frozenset(MODEL_ENDPOINTS + ADMIN_ENDPOINTS)
#: The endpoints limits count (``[[rate_limits]]`` endpoint filters): listing models
#: is a static answer, and the admin endpoints are the operator's own.
LIMITED_ENDPOINTS = ("chat.completions", "completions", "embeddings")
#: Routes that a role's endpoint name covers beyond its own.
_ENDPOINT_OF = {"models.retrieve": "models", "queue.live": "queue"}

_MINUTE = 60
_DAY = 86_400


def _positive(_: object, attribute: attrs.Attribute[int | None], value: int | None) -> None:
    if value is not None and (type(value) is not int or value < 1):
        raise ValueError(f"{attribute.name} must be a whole number >= 1, not {value!r}")


def _endpoints(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    assert isinstance(value, tuple)
    for name in value:
        if name not in ENDPOINT_NAMES:
            known = ", ".join(sorted(ENDPOINT_NAMES))
            raise ValueError(f"unknown endpoint {name!r} in {attribute.name} (known: {known})")


def _limited_endpoints(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    _endpoints(instance, attribute, value)
    assert value is None or isinstance(value, tuple)
    for name in value or ():
        if name not in LIMITED_ENDPOINTS:
            counted = ", ".join(LIMITED_ENDPOINTS)
            raise ValueError(
                f"{attribute.name}: {name!r} is never rate-limited (limits count {counted})"
            )


def _globs(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    assert isinstance(value, tuple)
    for pattern in value:
        if not pattern or len(pattern) > 256:
            raise ValueError(f"{attribute.name}: a pattern must be 1 to 256 characters")


def glob_matcher(patterns: Iterable[str]) -> re.Pattern[str]:
    """One regular expression matching any of the glob ``patterns`` (``*`` any run,
    ``?`` one character, everything else literal)."""
    parts = []
    for pattern in patterns:
        out = []
        for ch in pattern:
            if ch == "*":
                out.append(".*")
            elif ch == "?":
                out.append(".")
            else:
                out.append(re.escape(ch))
        parts.append("".join(out))
    return re.compile("|".join(f"(?:{p})" for p in parts) if parts else "(?!)", re.DOTALL)


@attrs.frozen(kw_only=True, cache_hash=True)
class LimitSet:
    """The five limit dimensions; None: not limited."""

    requests_per_minute: int | None = attrs.field(default=None, validator=_positive)
    tokens_per_minute: int | None = attrs.field(default=None, validator=_positive)
    requests_per_day: int | None = attrs.field(default=None, validator=_positive)
    tokens_per_day: int | None = attrs.field(default=None, validator=_positive)
    max_concurrent: int | None = attrs.field(default=None, validator=_positive)

    @property
    def empty(self) -> bool:
        return (
            self.requests_per_minute is None
            and self.tokens_per_minute is None
            and self.requests_per_day is None
            and self.tokens_per_day is None
            and self.max_concurrent is None
        )

    def buckets(self) -> tuple[tuple[str, BucketSpec, Unit], ...]:
        """(name, spec, unit) of each bucket this set counts, minute ones first."""
        out = []
        for name, value, window, unit in (
            ("rpm", self.requests_per_minute, _MINUTE, Unit.REQUESTS),
            ("tpm", self.tokens_per_minute, _MINUTE, Unit.TOKENS),
            ("rpd", self.requests_per_day, _DAY, Unit.REQUESTS),
            ("tpd", self.tokens_per_day, _DAY, Unit.TOKENS),
        ):
            if value is not None:
                out.append((name, BucketSpec.per(value, window), unit))
        return tuple(out)


@attrs.frozen(kw_only=True, cache_hash=True)
class Role(LimitSet):
    """One ``[[roles]]`` table (DESIGN §5a). Its limits count per principal."""

    name: str = attrs.field(validator=attrs.validators.matches_re(r"[A-Za-z0-9_.\-]{1,64}"))
    models: tuple[str, ...] = attrs.field(default=("*",), validator=_globs)
    endpoints: tuple[str, ...] = attrs.field(default=MODEL_ENDPOINTS, validator=_endpoints)
    max_output_tokens: int | None = attrs.field(default=None, validator=_positive)
    weight: float = attrs.field(
        default=1.0, validator=[attrs.validators.gt(0), attrs.validators.lt(1e6)]
    )
    priority: int = attrs.field(
        default=0, validator=[attrs.validators.ge(-1000), attrs.validators.le(1000)]
    )
    max_queue_wait: float | None = attrs.field(
        default=None,
        validator=attrs.validators.optional([attrs.validators.gt(0), attrs.validators.le(86_400)]),
    )
    _models_re: re.Pattern[str] = attrs.field(init=False, eq=False, repr=False)
    _endpoint_set: frozenset[str] = attrs.field(init=False, eq=False, repr=False)

    @_models_re.default
    def _compile(self) -> re.Pattern[str]:
        return glob_matcher(self.models)

    @_endpoint_set.default
    def _endpoints_default(self) -> frozenset[str]:
        return frozenset(self.endpoints)

    def may_use_model(self, model: str) -> bool:
        return self._models_re.fullmatch(model) is not None

    def may_use_endpoint(self, endpoint: str) -> bool:
        """``models.retrieve`` counts as ``models``, ``queue.live`` as ``queue``."""
        return _ENDPOINT_OF.get(endpoint, endpoint) in self._endpoint_set


ADMIN_ROLE = Role(name="admin", endpoints=MODEL_ENDPOINTS + ADMIN_ENDPOINTS)
USER_ROLE = Role(name="user")
BUILTIN_ROLES = (ADMIN_ROLE, USER_ROLE)


class Scope(enum.Enum):
    """What a ``[[rate_limits]]`` layer counts by: one bucket per distinct value."""

    __hash__ = object.__hash__

    IP = "ip"
    PRINCIPAL = "principal"
    ROLE = "role"
    MODEL = "model"
    ENDPOINT = "endpoint"
    GLOBAL = "global"


@attrs.frozen(kw_only=True)
class RateLimitLayer(LimitSet):
    """One ``[[rate_limits]]`` table: its limits count per value of ``scope``, for
    requests whose role, model and endpoint pass the optional filters."""

    scope: Scope
    roles: tuple[str, ...] | None = None
    models: tuple[str, ...] | None = attrs.field(default=None, validator=_globs)
    endpoints: tuple[str, ...] | None = attrs.field(default=None, validator=_limited_endpoints)
    _models_re: re.Pattern[str] | None = attrs.field(init=False, eq=False, repr=False)

    @_models_re.default
    def _compile(self) -> re.Pattern[str] | None:
        return glob_matcher(self.models) if self.models is not None else None

    def __attrs_post_init__(self) -> None:
        if self.empty:
            raise ValueError(f"a [[rate_limits]] layer of scope {self.scope.value!r} sets no limit")

    def applies(self, role: str, model: str, endpoint: str) -> bool:
        if self.roles is not None and role not in self.roles:
            return False
        if self.endpoints is not None and endpoint not in self.endpoints:
            return False
        return self._models_re is None or self._models_re.fullmatch(model) is not None


@attrs.frozen
class Principal:
    """Whom a request is made by. ``id`` is ``key:<key id>`` or ``jwt:<subject>``;
    ``limits`` is the role's limits with the key's own overrides applied."""

    id: str
    role: Role
    limits: LimitSet
    #: The key's or token's own label for logs (the key id, the JWT subject).
    label: str = ""


#: Most distinct layer values whose :class:`Limit` objects are kept built; past it
#: the cache starts over (they are cheap to build, just not free).
_CACHE_SIZE = 65_536


class AccessPolicy:
    """The roles and rate-limit layers, and the charges a request makes on them.

    ``roles`` replace the built-in ones of the same name. The charges of a request
    are the principal's layer (its role's limits, with the key's overrides) and every
    ``[[rate_limits]]`` layer that applies; each layer value (``ip:10.0.0.1``,
    ``model:gpt``) is its own set of buckets.
    """

    def __init__(
        self,
        roles: Iterable[Role] = (),
        layers: Iterable[RateLimitLayer] = (),
        *,
        failed_auth_per_minute: int = 60,
    ) -> None:
        table: dict[str, Role] = {r.name: r for r in BUILTIN_ROLES}
        for role in roles:
            table[role.name] = role
        self.roles: Mapping[str, Role] = table
        self.layers = tuple(layers)
        self.failed_auth_per_minute = failed_auth_per_minute
        self._failed = (
            Limit("auth", "failed", BucketSpec.per(failed_auth_per_minute, _MINUTE), Unit.REQUESTS)
            if failed_auth_per_minute > 0
            else None
        )
        #: What follows ``auth:<client>`` in a failed-authentication bucket's key.
        self._failed_suffix = None if self._failed is None else self._failed.key[len("auth") :]
        self._cache: dict[
            tuple[str, object], tuple[tuple[Limit, ...], ConcurrencyLimit | None]
        ] = {}
        #: By principal id, client, model and endpoint: the principal's limits and
        #: role name, and every limit and slot such a request is charged on.
        self._combined: dict[tuple[str, str, str, str], tuple[LimitSet, str, Shape]] = {}
        #: Whether any request can be limited at all (else admission skips the store).
        self.limited = bool(self.layers) or any(not r.empty for r in table.values())
        #: Whether some limit counts tokens (so prompts must be counted).
        self.counts_tokens = any(
            s.tokens_per_minute is not None or s.tokens_per_day is not None
            for s in (*table.values(), *self.layers)
        )

    def role(self, name: str) -> Role | None:
        return self.roles.get(name)

    def principal(
        self, id: str, role: Role, overrides: LimitSet | None = None, label: str = ""
    ) -> Principal:
        """A principal of ``role``; ``overrides`` (a key's own limits) replace the
        role's dimension by dimension."""
        limits: LimitSet = role
        if overrides is not None and not overrides.empty:
            limits = LimitSet(
                requests_per_minute=_pick(overrides.requests_per_minute, role.requests_per_minute),
                tokens_per_minute=_pick(overrides.tokens_per_minute, role.tokens_per_minute),
                requests_per_day=_pick(overrides.requests_per_day, role.requests_per_day),
                tokens_per_day=_pick(overrides.tokens_per_day, role.tokens_per_day),
                max_concurrent=_pick(overrides.max_concurrent, role.max_concurrent),
            )
        return Principal(id, role, limits, label)

    def failed_auth_key(self, client: str) -> str | None:
        """The key of ``client``'s failed-authentication bucket (None: off), without
        building its :class:`Limit` (what :meth:`MemoryLimitStore.tracks` takes)."""
        suffix = self._failed_suffix
        return None if suffix is None else f"auth:{client}{suffix}"

    def failed_auth_limit(self, client: str) -> Limit | None:
        """The bucket that counts ``client``'s failed authentications (None: off)."""
        base = self._failed
        if base is None:
            return None
        return Limit(f"auth:{client}", "failed", base.spec, Unit.REQUESTS)

    def charges(
        self,
        principal: Principal,
        client: str,
        model: str,
        endpoint: str,
        tokens: int,
    ) -> tuple[tuple[Charge, ...], tuple[ConcurrencyLimit, ...]]:
        """Every charge and slot of one request: 1 on request buckets, ``tokens`` on
        token buckets, one slot on each ``max_concurrent``."""
        shape = self.shape(principal, client, model, endpoint)
        return shape.charged(tokens), shape.slots

    def shape(self, principal: Principal, client: str, model: str, endpoint: str) -> Shape:
        """The limits and slots a request of this principal, client, model and
        endpoint is charged on, built once per distinct combination."""
        key = (principal.id, client, model, endpoint)
        found = self._combined.get(key)
        if found is not None:
            own = principal.limits
            # The same id with other limits or another role (a key whose overrides
            # changed) is another shape; compared by identity first (no attrs eq).
            if (found[0] is own or found[0] == own) and found[1] == principal.role.name:
                return found[2]
        if len(self._combined) >= _CACHE_SIZE:
            self._combined.clear()
        shape = Shape(*self._build(principal, client, model, endpoint))
        self._combined[key] = (principal.limits, principal.role.name, shape)
        return shape

    def _build(
        self, principal: Principal, client: str, model: str, endpoint: str
    ) -> tuple[tuple[Limit, ...], tuple[ConcurrencyLimit, ...]]:
        charges: list[Charge] = []
        slots: list[ConcurrencyLimit] = []
        tokens = 0
        self._add(
            charges, slots, f"principal:{principal.id}", principal.limits, index=0, tokens=tokens
        )
        role = principal.role.name
        for index, layer in enumerate(self.layers, 1):
            if not layer.applies(role, model, endpoint):
                continue
            scope = layer.scope
            if scope is Scope.IP:
                value = f"ip:{client}"
            elif scope is Scope.PRINCIPAL:
                value = f"principal:{principal.id}"
            elif scope is Scope.ROLE:
                value = f"role:{role}"
            elif scope is Scope.MODEL:
                value = f"model:{model}"
            elif scope is Scope.ENDPOINT:
                value = f"endpoint:{endpoint}"
            else:
                value = "global"
            self._add(charges, slots, f"{index}/{value}", layer, index=index, tokens=tokens)
        return tuple(limit for limit, _ in charges), tuple(slots)

    def _add(
        self,
        charges: list[Charge],
        slots: list[ConcurrencyLimit],
        value: str,
        limits: LimitSet,
        *,
        index: int,
        tokens: int,
    ) -> None:
        key: tuple[str, object] = (value, index if index else limits)
        built = self._cache.get(key)
        if built is None:
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.clear()
            bucket_limits = tuple(
                Limit(value, name, spec, unit) for name, spec, unit in limits.buckets()
            )
            slot = (
                ConcurrencyLimit(value, limits.max_concurrent)
                if limits.max_concurrent is not None
                else None
            )
            built = self._cache[key] = (bucket_limits, slot)
        for limit in built[0]:
            charges.append((limit, tokens if limit.unit is Unit.TOKENS else 1))
        if built[1] is not None:
            slots.append(built[1])


#: The limits and slots of one kind of request (see :class:`~.limits.Plan`).
Shape = Plan


def _pick(override: int | None, default: int | None) -> int | None:
    return override if override is not None else default
