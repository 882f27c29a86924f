"""The gateway's access control: who a request is from, what it may do, and what
it is charged (DESIGN §5a).

:class:`Guard` holds the :class:`~.access.AccessPolicy`, the JWT verifier the runtime
handed in, the trusted proxies and the in-process limit store. The gateway asks it,
in the order of checks of DESIGN §5a:

1. :meth:`Guard.authenticate` (from the head): the client's address, the per-IP
   budget of failed authentications (a client over it is refused unheard, 429), the
   credentials (an Ostiary key or, by its shape, a JWT; 401), the principal's role
   (403 when it is not configured);
2. :meth:`Guard.check_endpoint` (403);
3. :meth:`Guard.may_use_model` (a model the role may not use is a 404 like an
   unknown one) and :meth:`Guard.cap_output` (400 over the role's cap);
4. :meth:`Guard.charges` and :meth:`Guard.judge` (429), or the shared store through
   the runtime;
5. :meth:`Guard.settle` when the request ends.

Token reservations (the estimate a request is charged at admission): the prompt
counted with the cl100k counter the runtime loads (only as far as the largest token
limit needs, so a huge prompt costs no more to count than the limit is large),
plus four tokens a message, plus the output: what the request asks for (times its
choices), or, when it asks for nothing, the smaller of the role's cap and ``[limits]
max_output_tokens``, clamped to what the tightest token limit leaves after the
prompt, so small limits still admit small requests. Without a counter the prompt is
its text's length / 4. The real usage settles the reservation when the request ends
(see :mod:`.buckets` for what happens when it was larger).
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from .access import AccessPolicy, Principal, Role, Scope
from .actions import BackendCall, SettleLimits, ShareFailedAuth
from .admission import ANY_PRINCIPAL, ENDPOINT_LABELS, Endpoint
from .auth import ApiKey, KeyTable
from .buckets import Charge, ConcurrencyLimit, Limit, Unit, wait_ms
from .client_ip import client_address
from .credentials import TokenVerifier, looks_like_jwt
from .errors import InvalidRequestError, PermissionDeniedError, RateLimitError
from .exchange import Exchange, Reservation
from .generation import Usage
from .limits import RATE_HEADER_NAMES, Decision, MemoryLimitStore, Plan
from .requests import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from .tokens import TokenCodec
from .visibility import Network

__all__ = ["Guard", "format_reset", "rate_headers"]

Header = tuple[bytes, bytes]
#: Tokens a chat message costs beyond its text (role, separators), as OpenAI counts.
_PER_MESSAGE = 4
#: ``max_tokens`` of a legacy completion that sets none: OpenAI's documented default.
COMPLETION_MAX_TOKENS = 16
#: Texts of at most this many characters have their counts remembered, at most
#: ``_MEMO_SIZE`` of them (8 MB of ASCII text at most, 32 MB of any; see
#: :meth:`Guard._count`).
_MEMO_CHARS = 2048
_MEMO_SIZE = 4096


def format_reset(ms: int) -> str:
    """A duration as the ``x-ratelimit-reset-*`` headers write it: ``250ms``,
    ``1s``, ``1.5s``, ``6m0s``, ``1h2m3s``."""
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds = f"{rest // 1000}" if rest % 1000 == 0 else f"{rest / 1000:.3f}".rstrip("0")
    if hours:
        return f"{hours}h{minutes}m{seconds}s"
    if minutes:
        return f"{minutes}m{seconds}s"
    return f"{seconds}s"


#: ``format_reset`` of the durations headers have shown, as bytes; only minute
#: buckets are reported, whose resets are at most two minutes (a debt of a window), so
#: the table stays small, and it starts over past 8192 entries.
_RESETS: dict[int, bytes] = {}


def _reset_bytes(ms: int) -> bytes:
    text = _RESETS.get(ms)
    if text is None:
        if len(_RESETS) >= 8192:
            _RESETS.clear()
        text = _RESETS[ms] = format_reset(ms).encode()
    return text


class Guard:
    """See the module docstring. ``max_output_tokens`` is ``[limits]``'; ``tokens``
    the counter for token reservations (None: a length estimate)."""

    def __init__(
        self,
        access: AccessPolicy | None = None,
        *,
        verifier: TokenVerifier | None = None,
        trusted_proxies: tuple[Network, ...] = (),
        max_output_tokens: int = 32_768,
        tokens: TokenCodec | None = None,
        shared: bool = False,
        on_failure: str = "refuse",
    ) -> None:
        self.access = access if access is not None else AccessPolicy()
        self.verifier = verifier
        self.trusted_proxies = trusted_proxies
        self.max_output_tokens = max_output_tokens
        self.tokens = tokens
        #: Limits live in the shared store (judged through the runtime).
        self.shared = shared
        self.on_failure = on_failure
        self.store = MemoryLimitStore()
        #: Failed authentications per client IP, on the wall clock (heads carry no
        #: monotonic time); always in this process.
        self.failures = MemoryLimitStore(max_buckets=65_536)
        self._principals: dict[str, tuple[ApiKey, Principal]] = {}
        #: Token counts by principal and text (see :meth:`_count`).
        self._memo: dict[tuple[str, str], int] = {}

    def replace(
        self,
        access: AccessPolicy,
        verifier: TokenVerifier | None,
        trusted_proxies: tuple[Network, ...],
    ) -> None:
        """New roles, limits and JWT settings (a config reload); the buckets stay."""
        self.access = access
        self.verifier = verifier
        self.trusted_proxies = trusted_proxies
        self._principals.clear()

    # -- 1. who ---------------------------------------------------------------------

    def client(self, peer: str, headers: tuple[Header, ...]) -> str:
        return client_address(peer, headers, self.trusted_proxies) if self.trusted_proxies else peer

    def authenticate(
        self, keys: KeyTable, credentials: bytes | None, client: str, wall: float
    ) -> Principal:
        """The principal ``credentials`` (an ``Authorization`` value) name (raises
        429, 401 or 403)."""
        key = self.access.failed_auth_key(client) if client else None
        limit = (
            self.access.failed_auth_limit(client)
            if key is not None and self.failures.tracks(key)
            else None
        )
        if limit is not None:
            wait = wait_ms(limit.spec, self.failures.deficit(limit, wall), 1)
            if wait:
                raise RateLimitError(
                    "Too many failed authentications from this address; retry later.",
                    code="rate_limit_exceeded",
                    retry_after=wait / 1000,
                )
        return self._principal(keys, credentials, wall)

    def failed(self, client: str, wall: float) -> ShareFailedAuth | None:
        """Count a 401 against ``client``'s budget (when it is answered, so a head
        judged twice is counted once); with a shared store, also there."""
        limit = self.access.failed_auth_limit(client) if client else None
        if limit is None:
            return None
        decision = self.failures.admit(((limit, 1),), (), wall)
        if decision.hold is not None:  # a debit, not a request in flight
            self.failures.settle(decision.hold, 1, wall)
        return ShareFailedAuth(limit) if self.shared else None

    def failures_shared(self, limit: Limit, deficit: int, wall: float) -> None:
        """The shared store's deficit of a failed-authentication bucket: this
        replica's own never counts less (401s earned on other replicas count here)."""
        self.failures.raise_deficit(limit, deficit, wall)

    def _principal(self, keys: KeyTable, header: bytes | None, wall: float) -> Principal:
        verifier = self.verifier
        if header is not None and verifier is not None:
            scheme, _, secret = header.strip().partition(b" ")
            token = secret.strip().decode("latin-1")
            if scheme.lower() == b"bearer" and looks_like_jwt(token):
                claims = verifier.verify(token, wall)
                role = next((r for r in map(self.access.role, claims.roles) if r is not None), None)
                if role is None:
                    raise PermissionDeniedError(
                        "None of the token's roles is configured on this server.",
                        code="permission_denied",
                    )
                return self.access.principal(f"jwt:{claims.subject}", role, label=claims.subject)
        key = keys.authenticate(header, wall)
        cached = self._principals.get(key.id)
        if cached is not None and cached[0] is key:
            return cached[1]
        role = self.access.role(key.role)
        if role is None:
            raise PermissionDeniedError(
                f"The key's role '{key.role}' is not configured on this server.",
                code="permission_denied",
            )
        principal = self.access.principal(f"key:{key.id}", role, key.overrides, label=key.id)
        if len(self._principals) >= 65_536:
            self._principals.clear()
        self._principals[key.id] = (key, principal)
        return principal

    # -- 2, 3. what -------------------------------------------------------------------

    @staticmethod
    def check_endpoint(principal: Principal, endpoint: Endpoint) -> None:
        if endpoint not in ANY_PRINCIPAL and not principal.role.may_use_endpoint(endpoint.value):
            raise PermissionDeniedError(
                f"This {_kind(principal)}'s role may not use the "
                f"{ENDPOINT_LABELS[endpoint]} endpoint.",
                code="permission_denied",
            )

    @staticmethod
    def may_use_model(principal: Principal | None, model: str) -> bool:
        return principal is None or principal.role.may_use_model(model)

    def cap_output(self, call: BackendCall, role: Role) -> BackendCall:
        """Refuse a request asking for more output than ``role`` allows; send a chat
        that asks for nothing with the smaller of the two caps, and a legacy
        completion that asks for nothing with OpenAI's default of 16 (or the role's
        cap, if smaller)."""
        if isinstance(call, EmbeddingRequest):
            return call
        cap = role.max_output_tokens
        asked = call.output_limit
        if asked is not None:
            if cap is not None and asked > cap:
                param = (
                    "max_completion_tokens"
                    if isinstance(call, ChatCompletionRequest)
                    and call.max_completion_tokens is not None
                    else "max_tokens"
                )
                raise InvalidRequestError(
                    f"Invalid '{param}': {asked} is more than this key's role allows ({cap}).",
                    param=param,
                    code="invalid_value",
                )
            return call
        if isinstance(call, CompletionRequest):
            # OpenAI's default for a legacy completion (a model left to run to its
            # context's end instead would hold its slot for minutes).
            value = COMPLETION_MAX_TOKENS if cap is None else min(cap, COMPLETION_MAX_TOKENS)
        elif cap is None:
            return call
        else:
            value = min(cap, self.max_output_tokens)
        if isinstance(call, ChatCompletionRequest):
            raw = {**call.raw, "max_completion_tokens": value} if call.raw else call.raw
            return attrs.evolve(call, max_completion_tokens=value, raw=raw)
        raw = {**call.raw, "max_tokens": value} if call.raw else call.raw
        return attrs.evolve(call, max_tokens=value, raw=raw)

    # -- 4. how much ------------------------------------------------------------------

    def charges(
        self, principal: Principal, client: str, call: BackendCall, endpoint: Endpoint
    ) -> tuple[tuple[Charge, ...], tuple[ConcurrencyLimit, ...], int]:
        """Every charge and slot of the request, and its prompt estimate (tokens)."""
        shape = self.access.shape(principal, client, call.model, ENDPOINT_LABELS[endpoint])
        capacity = shape.largest_tokens
        if not capacity:
            return shape.untokened, shape.slots, 0
        prompt = self._prompt_tokens(call, capacity, principal.id)
        room = shape.smallest_tokens - prompt
        cost = prompt + self._output_reservation(call, principal.role, room)
        return shape.charged(cost), shape.slots, prompt

    def take(
        self,
        exchange: Exchange,
        principal: Principal,
        call: BackendCall,
        endpoint: Endpoint,
        now: float,
    ) -> Decision | None:
        """Admission in the in-process store, in this same call: :meth:`charges` and
        :meth:`judge`, then the exchange's reservation and ``x-ratelimit-*`` headers,
        over the request shape's :class:`~.limits.Plan`. None: admitted (or no limit
        applies); else the decision for :meth:`refusal`."""
        plan = self.access.shape(principal, exchange.client, call.model, ENDPOINT_LABELS[endpoint])
        if plan.empty:
            return None
        capacity = plan.largest_tokens
        prompt = tokens = 0
        if capacity:
            prompt = self._prompt_tokens(call, capacity, principal.id)
            tokens = prompt + self._output_reservation(
                call, principal.role, plan.smallest_tokens - prompt
            )
        taken = self.store.take(plan, tokens, now)
        if taken is None:
            exchange.prompt_estimate = prompt
            exchange.limit_slots = plan.slots
            return self.store.admit(plan.charged(tokens), plan.slots, now)
        hold, deficits = taken
        exchange.reservation = Reservation(hold, False, prompt)
        exchange.rate = rate_headers(plan, deficits)
        return None

    def _prompt_tokens(self, call: BackendCall, limit: int, who: str) -> int:
        """The prompt's tokens, counted text by text (a chat message's content, its
        tool calls' arguments and names; each string of a prompt or input list) as far
        as ``limit`` needs: past it, ``limit + 1``. Text by text, as OpenAI counts a
        chat's messages, so that a conversation's earlier turns, sent again with each
        new one, are the same texts again for the counter's memo."""
        count = self._count
        total = 0
        if isinstance(call, ChatCompletionRequest):
            memo = self._memo
            total = _PER_MESSAGE * len(call.messages) + 3
            for message in call.messages:
                if total > limit:
                    break
                content = message.content
                text = content if type(content) is str else message.text()
                # A remembered count that fits, looked up here (what _count would
                # return, without the call).
                known = memo.get((who, text))
                if known is not None and known <= limit - total:
                    total += known
                else:
                    total += count(text, limit - total, who)
                if message.tool_calls:
                    for tool_call in message.tool_calls:
                        total += count(tool_call.function.arguments, limit - total, who)
                        total += count(tool_call.function.name, limit - total, who)
        else:
            inputs = call.prompt if isinstance(call, CompletionRequest) else call.input
            for item in (inputs,) if isinstance(inputs, str) else inputs:
                if total > limit:
                    break
                if isinstance(item, str):
                    total += count(item, limit - total, who)
                elif isinstance(item, int):
                    total += 1
                else:
                    total += len(item)
        return total if total <= limit else limit + 1

    def _count(self, text: str, limit: int, who: str) -> int:
        """Tokens of ``text`` up to ``limit`` (past it, more), by the counter; without
        one, its length / 4. A negative ``limit`` (spent already) counts nothing.

        Exact counts of short texts are remembered per principal (``who``), in a
        bounded memo that starts over when full: a chat sends its system prompt and
        earlier turns again with every new turn, and a lookup costs a fraction of a
        count. Per principal, so that how fast a text is counted never tells one
        tenant what another sent."""
        if limit < 0 or not text:
            return 0
        counter = self.tokens
        if counter is None:
            return -(-len(text) // 4)
        if len(text) > _MEMO_CHARS:
            return counter.count(text, limit)
        memo = self._memo
        key = (who, text)
        known = memo.get(key)
        if known is None:
            counted = counter.count(text, limit)
            if counted > limit:
                return counted
            if len(memo) >= _MEMO_SIZE:
                memo.clear()
            known = memo[key] = counted
        return known if known <= limit else limit + 1

    def _output_reservation(self, call: BackendCall, role: Role, room: int) -> int:
        if isinstance(call, ChatCompletionRequest):
            choices = call.n or 1
            # output_limit, inlined (a property's frame): max_completion_tokens wins.
            asked = call.max_completion_tokens
            if asked is None:
                asked = call.max_tokens
        elif isinstance(call, EmbeddingRequest):
            return 0
        else:
            choices = max(call.n or 1, call.best_of or 1)
            asked = call.output_limit
        if asked is not None:
            return asked * choices
        most = self.max_output_tokens
        cap = role.max_output_tokens or most
        want = (cap if cap < most else most) * choices
        want = want if want < room else room
        return want if want > 1 else 1

    def judge(
        self, charges: tuple[Charge, ...], slots: tuple[ConcurrencyLimit, ...], now: float
    ) -> Decision:
        """All-or-nothing admission in the in-process store, in this same call."""
        return self.store.admit(charges, slots, now)

    def refusal(
        self,
        decision: Decision,
        slots: Sequence[ConcurrencyLimit],
        principal: Principal,
        prompt: int = 0,
    ) -> RateLimitError:
        """The 429 of a refused decision: which layer, how long, the headers.
        ``prompt`` is the request's prompt estimate (counted only up to the largest
        token limit: past it, the cost is a lower bound)."""
        refusal = decision.refusal
        assert refusal is not None
        headers = list(self.headers(decision, exhausted=refusal.exhausted))
        if refusal.exhausted is not None:
            limit, cost = decision.charges[refusal.exhausted]
            what = _DIMENSIONS[limit.name]
            layer = self._layer_name(limit.layer, principal)
            if refusal.never:
                largest = max(
                    (c[0].spec.capacity for c in decision.charges if c[0].unit is Unit.TOKENS),
                    default=0,
                )
                needs = "at least " if limit.unit is Unit.TOKENS and prompt > largest else ""
                message = (
                    f"This request needs {needs}{cost} {what.split()[0]}, more than the limit of "
                    f"{limit.spec.capacity} {what} {layer} allows; it can never pass. "
                    "Ask for fewer tokens."
                )
                headers.append((b"x-should-retry", b"false"))
                retry = None
            else:
                message = f"Rate limit reached for {what} {layer} (limit {limit.spec.capacity}). "
                if limit.unit is Unit.TOKENS:
                    # A request that sets no max_tokens reserves the output cap: say
                    # so, as it is what keeps such requests from running side by side.
                    message += (
                        f"This request reserves {cost} tokens: its prompt and its "
                        "max_tokens, or the output cap if it sets none. "
                    )
                message += "Retry after the time in retry-after."
                retry = (refusal.retry_after_ms or 1) / 1000
        else:
            assert refusal.full_slot is not None
            slot = slots[refusal.full_slot]
            layer = self._layer_name(slot.layer, principal)
            message = (
                f"Too many concurrent requests {layer} (limit {slot.limit}); retry when one ends."
            )
            retry = None
        error = RateLimitError(message, code="rate_limit_exceeded", retry_after=retry)
        error.headers = tuple(headers)
        return error

    def scope_of(self, decision: Decision, slots: Sequence[ConcurrencyLimit]) -> str:
        """The ``scope`` label of ``ostiary_rate_limited_total`` for a refusal."""
        refusal = decision.refusal
        assert refusal is not None
        if refusal.exhausted is not None:
            layer = decision.charges[refusal.exhausted][0].layer
        else:
            assert refusal.full_slot is not None
            layer = slots[refusal.full_slot].layer
        return _scope(layer).value

    def _layer_name(self, layer: str, principal: Principal) -> str:
        if layer.startswith("principal:"):
            return f"for this {_kind(principal)} (role '{principal.role.name}')"
        index = layer.partition("/")[0]
        return f"of rate_limits[{int(index) - 1}] ({_SCOPES[_scope(layer)]})"

    @staticmethod
    def headers(decision: Decision, *, exhausted: int | None = None) -> tuple[Header, ...]:
        """``x-ratelimit-*`` for the tightest minute bucket of each unit (the
        exhausted one, at 0, in its place on a refusal)."""
        charges = decision.charges
        deficits = decision.deficits
        # One pass: the tightest minute bucket of each unit (requests r, tokens t),
        # but for the unit of the exhausted bucket, reported whatever its window.
        fixed = -1
        if exhausted is not None:
            fixed = 0 if charges[exhausted][0].unit is Unit.REQUESTS else 1
        r = t = -1
        r_left = t_left = 0
        for i, (limit, _) in enumerate(charges):
            u = limit.reports
            if u < 0 or u == fixed:
                continue
            _, per_token, _, full, _ = limit.bucket
            level = full - deficits[i]
            here = level // per_token if level > 0 else 0
            if u:
                if t < 0 or here < t_left:
                    t, t_left = i, here
            elif r < 0 or here < r_left:
                r, r_left = i, here
        if fixed == 0:
            r, r_left = exhausted if exhausted is not None else -1, 0
        elif fixed == 1:
            t, t_left = exhausted if exhausted is not None else -1, 0
        if r < 0:
            return () if t < 0 else _figures(_TOKEN_HEADERS, charges[t][0], deficits[t], t_left)
        figures = _figures(_REQUEST_HEADERS, charges[r][0], deficits[r], r_left)
        if t < 0:
            return figures
        return figures + _figures(_TOKEN_HEADERS, charges[t][0], deficits[t], t_left)

    # -- 5. the end -------------------------------------------------------------------

    def settle(
        self,
        reservation: Reservation,
        usage: Usage | None,
        produced: int,
        now: float,
    ) -> SettleLimits | None:
        """End a request's hold: the tokens it really used (its usage; else, for an
        output cut short, the prompt estimate plus the pieces produced; nothing if
        it produced nothing). Shared holds are settled by the runtime."""
        if usage is not None:
            actual = usage.prompt_tokens + usage.completion_tokens
        elif produced:
            actual = reservation.prompt_tokens + produced
        else:
            actual = 0
        if reservation.shared:
            return SettleLimits(reservation.hold, actual)
        self.store.settle(reservation.hold, actual, now)
        return None


_REQUEST_HEADERS, _TOKEN_HEADERS = RATE_HEADER_NAMES


def rate_headers(plan: Plan, deficits: Sequence[int]) -> tuple[Header, ...]:
    """:meth:`Guard.headers` of an admission through ``plan`` that left its buckets at
    ``deficits``: for each unit, the first of the plan's minute buckets with the least
    remaining."""
    out: tuple[Header, ...] = ()
    for first, rest, remaining, reset in plan.report_units:
        best = first
        deficit = deficits[first[0]]
        # What is left of each bucket, unclamped (below zero when in debt): a bucket
        # wins with less left, and none wins over a bucket at or below zero, whose
        # figure is 0 (as Guard.headers clamps each before comparing).
        left = (first[2] - deficit) // first[1]
        for row in rest:
            d = deficits[row[0]]
            here = (row[2] - d) // row[1]
            if here < left and left > 0:
                best, left, deficit = row, here, d
        left = left if left > 0 else 0
        ms = -(-deficit // best[3]) if deficit > 0 else 0
        figures: tuple[Header, Header, Header] = (
            best[4],
            (remaining, b"%d" % left),
            (reset, _RESETS.get(ms) or _reset_bytes(ms)),
        )
        out += figures
    return out


def _figures(
    names: tuple[bytes, ...], limit: Limit, deficit: int, left: int
) -> tuple[Header, Header, Header]:
    """The three headers of one bucket: its limit, what is left, when it is full."""
    _, _, per_ms, _, _ = limit.bucket
    ms = -(-deficit // per_ms) if deficit > 0 else 0
    reset = _RESETS.get(ms) or _reset_bytes(ms)
    return (
        (names[0], b"%d" % limit.spec.capacity),
        (names[1], b"%d" % left),
        (names[2], reset),
    )


_DIMENSIONS = {
    "rpm": "requests per minute",
    "tpm": "tokens per minute",
    "rpd": "requests per day",
    "tpd": "tokens per day",
}


def _scope(layer: str) -> Scope:
    """The scope of a limit's or slot's layer, read off its own name (``principal:…``,
    or ``<index>/<scope>:<value>`` and ``<index>/global`` for ``[[rate_limits]]``):
    never off the policy in force, which a reload may have changed since."""
    if layer.startswith("principal:"):
        return Scope.PRINCIPAL
    return Scope(layer.partition("/")[2].partition(":")[0])


def _kind(principal: Principal) -> str:
    return "token" if principal.id.startswith("jwt:") else "key"


_SCOPES = {
    Scope.IP: "per client address",
    Scope.PRINCIPAL: "per key or token",
    Scope.ROLE: "per role",
    Scope.MODEL: "per model",
    Scope.ENDPOINT: "per endpoint",
    Scope.GLOBAL: "global",
}
