"""tml.common.prefetch: same items in the same order, errors where they happened, no leak."""

from __future__ import annotations

import threading
import time

import pytest

from tml.common.prefetch import prefetch


def _threads() -> int:
    return sum(t.name == "tml-prefetch" for t in threading.enumerate())


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_same_items_in_order(depth: int) -> None:
    assert list(prefetch(iter(range(50)), depth=depth)) == list(range(50))


def test_reads_ahead_while_the_consumer_works() -> None:
    produced: list[int] = []

    def slow_source():
        for i in range(4):
            produced.append(i)
            yield i

    items = prefetch(slow_source(), depth=2)
    assert next(items) == 0
    deadline = time.monotonic() + 5
    while len(produced) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert produced == [0, 1, 2]   # two ahead of the one consumed, not more
    assert list(items) == [1, 2, 3]


def test_error_is_raised_at_the_failing_item() -> None:
    def failing():
        yield 1
        yield 2
        raise ValueError("row 7 is bad")

    items = prefetch(failing(), depth=2)
    assert next(items) == 1
    assert next(items) == 2
    with pytest.raises(ValueError, match="row 7 is bad"):
        next(items)


def test_close_stops_the_thread() -> None:
    before = _threads()
    items = prefetch(iter(range(10**9)), depth=2)
    assert next(items) == 0
    assert _threads() == before + 1
    items.close()
    deadline = time.monotonic() + 5
    while _threads() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _threads() == before
