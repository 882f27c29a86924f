"""A stateful property test over the whole gateway lifecycle.

Hypothesis plays a correct runtime: it sends requests (streamed or not, to a backend
with few slots and a short queue), backend output, finishes, failures, clients that
leave, writes that complete, the passing of time, key-table replacements and the
HTTP layer's refusals, each only where the gateway's state allows it. Throughout:
slots and the queue stay within bounds, actions name only live exchanges, and at the
end every exchange has ended exactly once, with exactly one access-log record, and
nothing is left behind. A second property replays random scripts and requires the
very same actions, access-log fields (status, duration...) included.
"""

from __future__ import annotations

import math
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ostiary.protocol.actions import (
    Action,
    CancelBackend,
    CheckReadiness,
    Dispatch,
    EndStream,
    Log,
    Respond,
    StartStream,
)
from ostiary.protocol.errors import BackendUnavailableError
from ostiary.protocol.events import (
    BackendChunk,
    BackendFailed,
    BackendFinished,
    ClientGone,
    Event,
    KeysReplaced,
    ReadinessChecked,
    Refusal,
    RequestRefused,
    ResponseSent,
    Tick,
)
from ostiary.protocol.exchange import BackendPolicy, ExchangeState
from ostiary.protocol.gateway import Gateway, ModelRoute
from ostiary.protocol.generation import Delta, Usage
from tests.conftest import USER_SECRET, auth_headers, chat_body, key_table
from tests.protocol.test_gateway import request

S = ExchangeState
SLOTS, QUEUE = 2, 3


def new_gateway() -> Gateway:
    policy = BackendPolicy(
        name="b",
        max_concurrency=SLOTS,
        max_queue=QUEUE,
        max_queue_wait=5.0,
        first_output_timeout=4.0,
        stall_timeout=3.0,
        total_timeout=20.0,
    )
    return Gateway(routes=[ModelRoute("m", "b")], keys=key_table(), backends=[policy])


class GatewayLifecycle(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.gw = new_gateway()
        self.now = 0.0
        self.next_id = 0
        self.started: set[str] = set()
        self.logged: Counter[str] = Counter()
        self.finals: Counter[str] = Counter()  # Respond or EndStream per exchange
        self.streams: set[str] = set()

    # -- helpers -------------------------------------------------------------------

    def feed(self, event: Event) -> list[Action]:
        actions = self.gw.handle(event)
        for action in actions:
            if isinstance(action, Log) and action.message == "request":
                self.logged[action.fields["request_id"]] += 1
            elif isinstance(action, Respond | EndStream):
                self.finals[action.request_id] += 1
            elif isinstance(action, StartStream):
                self.streams.add(action.request_id)
            if isinstance(action, Respond | StartStream | Dispatch | CheckReadiness):
                assert action.request_id in self.started
        return actions

    def live(self, *states: ExchangeState) -> list[str]:
        return sorted(r for r in self.started if self.gw.state_of(r) in states)

    # -- rules ---------------------------------------------------------------------

    @rule(stream=st.booleans(), bad_key=st.booleans(), bad_body=st.booleans())
    def new_request(self, stream: bool, bad_key: bool, bad_body: bool) -> None:
        self.next_id += 1
        rid = f"r{self.next_id}"
        self.started.add(rid)
        headers = ((b"authorization", b"Bearer nope"),) if bad_key else auth_headers(USER_SECRET)
        body = b"{" if bad_body else chat_body(stream=stream)
        self.feed(request(self.gw, rid, body, headers=headers, now=self.now))

    @rule()
    def readiness(self) -> None:
        self.next_id += 1
        rid = f"r{self.next_id}"
        self.started.add(rid)
        self.feed(request(self.gw, rid, method="GET", target="/readyz", headers=(), now=self.now))

    @rule(refusal=st.sampled_from(Refusal))
    def refused(self, refusal: Refusal) -> None:
        self.next_id += 1
        rid = f"r{self.next_id}"
        self.started.add(rid)
        self.feed(RequestRefused(rid, refusal, self.now, 1e9, "POST", "/v1/chat/completions"))

    @precondition(lambda self: self.live(S.RUNNING, S.STREAMING))
    @rule(data=st.data(), pieces=st.integers(0, 3), usage=st.booleans())
    def chunk(self, data: st.DataObject, pieces: int, usage: bool) -> None:
        rid = data.draw(st.sampled_from(self.live(S.RUNNING, S.STREAMING)))
        out: list[Delta | Usage] = [Delta(f"t{i}") for i in range(pieces)]
        if usage:
            out.append(Usage(1, pieces))
        self.feed(BackendChunk(rid, tuple(out), self.now))

    @precondition(lambda self: self.live(S.RUNNING, S.STREAMING))
    @rule(data=st.data(), fail=st.booleans())
    def backend_ends(self, data: st.DataObject, fail: bool) -> None:
        rid = data.draw(st.sampled_from(self.live(S.RUNNING, S.STREAMING)))
        if fail:
            self.feed(BackendFailed(rid, BackendUnavailableError("x"), self.now))
        else:
            self.feed(BackendFinished(rid, self.now))

    @precondition(lambda self: self.live(S.CHECKING))
    @rule(data=st.data(), failing=st.booleans())
    def readiness_checked(self, data: st.DataObject, failing: bool) -> None:
        rid = data.draw(st.sampled_from(self.live(S.CHECKING)))
        self.feed(ReadinessChecked(rid, (("b", "down"),) if failing else (), self.now))

    @precondition(lambda self: self.live(S.SENDING))
    @rule(data=st.data(), written=st.booleans())
    def write_completes(self, data: st.DataObject, written: bool) -> None:
        rid = data.draw(st.sampled_from(self.live(S.SENDING)))
        self.feed(ResponseSent(rid, self.now) if written else ClientGone(rid, self.now))

    @precondition(lambda self: self.live(S.QUEUED, S.RUNNING, S.STREAMING, S.CHECKING))
    @rule(data=st.data())
    def client_leaves(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(self.live(S.QUEUED, S.RUNNING, S.STREAMING, S.CHECKING)))
        actions = self.feed(ClientGone(rid, self.now))
        assert self.gw.state_of(rid) is None
        assert any(isinstance(a, Log) for a in actions)

    @rule(dt=st.floats(0.0, 6.0))
    def time_passes(self, dt: float) -> None:
        self.now += dt
        deadline = self.gw.next_deadline()
        actions = self.feed(Tick(self.now))
        if deadline > self.now:
            assert actions == []
        for action in actions:
            if isinstance(action, CancelBackend):
                assert self.gw.state_of(action.request_id) is S.SENDING

    @rule()
    def keys_replaced(self) -> None:
        self.feed(KeysReplaced(key_table(), self.now))

    # -- invariants ------------------------------------------------------------------

    @invariant()
    def bounded(self) -> None:
        scheduler = self.gw.scheduler("b")
        assert scheduler.running <= SLOTS
        assert scheduler.queued <= QUEUE
        assert scheduler.running == len(self.live(S.RUNNING, S.STREAMING))
        assert scheduler.queued == len(self.live(S.QUEUED))
        assert self.gw.in_flight == len(self.live(*S))
        assert len(self.gw._backends.timers) <= 2 * self.gw.in_flight + 65

    @invariant()
    def ended_once(self) -> None:
        for rid in self.started:
            alive = self.gw.state_of(rid) is not None
            assert self.logged[rid] == (0 if alive else 1), rid
            assert self.finals[rid] <= 1

    def teardown(self) -> None:
        for rid in sorted(self.started):
            if self.gw.state_of(rid) is not None:
                self.feed(ClientGone(rid, self.now))
        assert self.gw.in_flight == 0
        assert all(self.logged[rid] == 1 for rid in self.started)
        scheduler = self.gw.scheduler("b")
        assert (scheduler.running, scheduler.queued) == (0, 0)
        assert scheduler.next_deadline() == math.inf


TestGatewayLifecycle = GatewayLifecycle.TestCase
TestGatewayLifecycle.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


# -- replay ------------------------------------------------------------------------

steps = st.lists(
    st.tuples(
        st.sampled_from(["request", "stream", "chunk", "finish", "fail", "gone", "sent", "tick"]),
        st.integers(0, 4),
    ),
    max_size=50,
)


def replay(script: list[tuple[str, int]]) -> list[Action]:
    gw = new_gateway()
    out: list[Action] = []
    now = 0.0
    for op, n in script:
        rid = f"r{n}"
        state = gw.state_of(rid)
        now += 0.25
        event: Event | None = None
        if op in ("request", "stream") and state is None:
            event = request(gw, rid, chat_body(stream=op == "stream"), now=now)
        elif op == "chunk" and state in (S.RUNNING, S.STREAMING):
            event = BackendChunk(rid, (Delta(f"t{n}"), Usage(2, 1)), now)
        elif op == "finish" and state in (S.RUNNING, S.STREAMING):
            event = BackendFinished(rid, now)
        elif op == "fail" and state in (S.RUNNING, S.STREAMING):
            event = BackendFailed(rid, BackendUnavailableError("x"), now)
        elif op == "gone" and state is not None:
            event = ClientGone(rid, now)
        elif op == "sent" and state is S.SENDING:
            event = ResponseSent(rid, now)
        elif op == "tick":
            now += n
            event = Tick(now)
        if event is not None:
            out += gw.handle(event)
    return out


@settings(max_examples=200, deadline=None)
@given(steps)
def test_replays_give_identical_actions_and_records(script: list[tuple[str, int]]) -> None:
    first = replay(script)
    assert first == replay(script)
    records = [a for a in first if isinstance(a, Log) and a.message == "request"]
    starts = [a for a in first if isinstance(a, Dispatch | Respond | StartStream)]
    assert len(records) <= len(starts)
    # Log fields take part in the comparison: a record differing in status or
    # duration would make the replays unequal.
    assert all(Log(r.level, r.message, {**r.fields, "status": 0}) != r for r in records)
