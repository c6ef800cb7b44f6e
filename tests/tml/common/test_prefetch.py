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
    """With one item consumed and depth 2, the reader holds exactly 3 more: 2 queued and
    1 in hand waiting for a free slot. It cannot take a 4th until the consumer takes one,
    so once it holds 3 the count is final (no race: a correct reader can never pass it)."""
    produced: list[int] = []
    holding_three = threading.Event()

    def source():
        for i in range(6):
            produced.append(i)
            if len(produced) == 4:
                holding_three.set()
            yield i

    items = prefetch(source(), depth=2)
    assert next(items) == 0
    assert holding_three.wait(timeout=10), produced   # it reads ahead while we "work"
    time.sleep(0.3)                                    # time to overrun, were it able to
    assert produced == [0, 1, 2, 3]                    # depth ahead plus one in hand
    assert next(items) == 1
    deadline = time.monotonic() + 10
    while len(produced) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    assert produced == [0, 1, 2, 3, 4]                 # one slot freed: one more read
    assert list(items) == [2, 3, 4, 5]


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
