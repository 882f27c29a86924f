"""Per-operation cost of the schedulers against the number of requests queued.

For each depth (10 ... 100,000 queued, spread over up to 1,000 principals in three
priority classes, each ticket with a deadline of its own), the queue is held at that
depth while it times:

* ``submit+release``: one slot freed (which dispatches the ticket chosen next) and
  one ticket submitted, so the depth stays put;
* ``cancel``: a queued ticket, picked at random, cancelled (the depth is restored,
  untimed, after each batch);
* ``expire``: per ticket expired, in batches of up to 1,000 due at once.

Each figure is the best of ``--repeat`` runs (the least disturbed by other load on
the machine), in microseconds per operation, with the garbage collector off while
timing. Flat columns mean the cost does not grow with the queue.

    .venv/bin/python bench/fair_queue.py [--ops 20000] [--repeat 3] [--fifo]
"""

from __future__ import annotations

import argparse
import gc
import random
import time
from collections.abc import Callable, Iterator

from ostiary.protocol.fair_queue import FairQueue
from ostiary.protocol.scheduler import FifoScheduler, Scheduler, Submitted, Ticket

DEPTHS = (10, 100, 1_000, 10_000, 100_000)
SLOTS = 8
BATCH = 1_000


class Load:
    """A scheduler holding ``depth`` queued tickets; a principal's weight and
    priority are its role's, so each principal is one flow."""

    def __init__(self, make: Callable[[int, int], Scheduler], depth: int) -> None:
        self.s = make(SLOTS, depth + BATCH)
        self.rng = random.Random(depth)
        self.principals = [f"key:{n}" for n in range(min(depth, 1_000))]
        self.serial = 0
        self.now = 0.0
        self.running: list[str] = []
        for _ in range(SLOTS + depth):
            self.submit()

    def ticket(self) -> Ticket:
        self.serial += 1
        n = self.serial
        p = n % len(self.principals)
        return Ticket(
            f"r{n}",
            self.principals[p],
            cost=float(50 + n % 200),
            weight=float(1 + p % 3),
            priority=(p // 3) % 3,
            deadline=1e6 + n,
        )

    def submit(self) -> None:
        ticket = self.ticket()
        result = self.s.submit(ticket, self.now)
        assert result is not Submitted.FULL
        if result is Submitted.RUNNING:
            self.running.append(ticket.request_id)

    def cycle(self, ops: int) -> float:
        """Seconds for ``ops`` submit+release pairs."""
        s, running, now = self.s, self.running, self.now
        tickets = [self.ticket() for _ in range(ops)]
        start = time.perf_counter()
        for n, ticket in enumerate(tickets):
            for started in s.release(running[n % SLOTS], now):
                running[n % SLOTS] = started.request_id
            s.submit(ticket, now)
        return time.perf_counter() - start


def batches(total: int, depth: int) -> Iterator[int]:
    size = max(1, min(BATCH, depth // 2))
    while total > 0:
        yield min(size, total)
        total -= size


def time_cancel(load: Load, ops: int) -> float:
    """Seconds for ``ops`` cancels of random queued tickets."""
    tickets = load.s.drain()
    for ticket in tickets:
        load.s.submit(ticket, load.now)
    ids = [t.request_id for t in tickets]
    spent = 0.0
    for size in batches(ops, len(ids)):
        victims = []
        for _ in range(size):
            n = load.rng.randrange(len(ids))
            ids[n], ids[-1] = ids[-1], ids[n]
            victims.append(ids.pop())
        start = time.perf_counter()
        for rid in victims:
            load.s.cancel(rid)
        spent += time.perf_counter() - start
        for _ in range(size):
            ticket = load.ticket()
            load.s.submit(ticket, load.now)
            ids.append(ticket.request_id)
    return spent


def time_expire(make: Callable[[int, int], Scheduler], depth: int, ops: int) -> float:
    """Seconds for ``ops`` tickets expired, ``size`` due at each call. Deadlines
    follow submission (``1e6 + serial``) and nothing is released, so the oldest
    queued serial says which tickets fall due."""
    load = Load(make, depth)
    oldest = SLOTS + 1
    spent = 0.0
    for size in batches(ops, depth):
        start = time.perf_counter()
        expired = load.s.expire(1e6 + oldest + size - 1)
        spent += time.perf_counter() - start
        assert len(expired) == size
        oldest += size
        for _ in range(size):
            load.submit()
    return spent


def measure(make: Callable[[int, int], Scheduler], depth: int, ops: int) -> dict[str, float]:
    load = Load(make, depth)
    gc.collect()
    gc.disable()
    try:
        return {
            "submit+release": load.cycle(ops) / ops,
            "cancel": time_cancel(load, ops) / ops,
            "expire": time_expire(make, depth, ops) / ops,
        }
    finally:
        gc.enable()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--ops", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--fifo", action="store_true", help="FifoScheduler as well")
    args = parser.parse_args()
    kinds: list[tuple[str, Callable[[int, int], Scheduler]]] = [("FairQueue", FairQueue)]
    if args.fifo:
        kinds.append(("FifoScheduler", FifoScheduler))
    for name, make in kinds:
        print(f"{name}: µs per operation ({SLOTS} slots, best of {args.repeat})")
        print(f"{'queued':>8} {'submit+release':>15} {'cancel':>8} {'expire':>8}")
        for depth in DEPTHS:
            runs = [measure(make, depth, args.ops) for _ in range(args.repeat)]
            best = {op: min(run[op] for run in runs) * 1e6 for op in runs[0]}
            print(
                f"{depth:>8,} {best['submit+release']:>15.2f} {best['cancel']:>8.2f}"
                f" {best['expire']:>8.2f}"
            )


if __name__ == "__main__":
    main()
