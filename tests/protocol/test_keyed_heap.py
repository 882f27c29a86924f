"""KeyedHeap against a plain dict: same order, same contents, bounded entries."""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import given, settings

from ostiary.protocol.keyed_heap import KeyedHeap

ITEMS = st.integers(0, 20)
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("push"), ITEMS, st.integers(-5, 5)),
        st.tuples(st.just("discard"), ITEMS, st.just(0)),
        st.tuples(st.just("pop"), st.just(0), st.just(0)),
        st.tuples(st.just("due"), st.just(0), st.integers(-5, 5)),
    ),
    max_size=300,
)


@settings(max_examples=300, deadline=None)
@given(OPS)
def test_keyed_heap_matches_a_dict(ops: list[tuple[str, int, int]]) -> None:
    heap: KeyedHeap[int] = KeyedHeap()
    model: dict[int, tuple[float, int]] = {}  # item -> (key, push order)
    order = 0

    def smallest() -> list[int]:
        return sorted(model, key=lambda item: model[item])

    for op, item, key in ops:
        if op == "push":
            order += 1
            model[item] = (float(key), order)
            heap.push(item, (float(key), 0.0))
        elif op == "discard":
            model.pop(item, None)
            heap.discard(item)
        elif op == "pop":
            expected = smallest()[0] if model else None
            assert heap.pop() == expected
            model.pop(expected, None)  # type: ignore[arg-type]
        else:
            due = [i for i in smallest() if model[i][0] <= key]
            assert heap.pop_due(float(key)) == due
            for i in due:
                del model[i]
        assert len(heap) == len(model)
        assert all((i in heap) is (i in model) for i in range(21))
        assert heap.entries <= 2 * len(heap) + 16
        assert heap.least(99.0) == (model[smallest()[0]][0] if model else 99.0)
        for i, (k, _) in model.items():
            assert heap.key_of(i) == (k, 0.0)


def test_many_rekeys_keep_memory_bounded() -> None:
    heap: KeyedHeap[str] = KeyedHeap()
    for n in range(10_000):
        heap.push("x", (float(n), 0.0))
        heap.push(f"tmp{n}", (0.0, 0.0))
        heap.discard(f"tmp{n}")
    assert len(heap) == 1
    assert heap.entries <= 18
    assert heap.peek() == ("x", (9999.0, 0.0))
    assert heap.key_of("tmp0") is None
    heap.clear()
    assert heap.pop() is None
