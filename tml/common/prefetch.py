"""Read the next batches in a background thread while the current step trains.

Why: a training step on CPU leaves the data reading (parquet decoding, id mapping, building
the KeyedJaggedTensor) on the critical path, about 7% of a TwHIN step measured with one
worker, while a second core often sits idle. pyarrow and torch release the GIL in their
kernels, so a thread overlaps that work with the step; the batches come out in the same
order, and an error in the reader is raised in the consumer at the batch where it happened.

The training loop computes its data position from the batches it consumed, not from the
reader, so reading ahead does not change what a checkpoint records.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_END = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetch(iterable: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Yield the items of `iterable`, produced up to `depth` ahead by a daemon thread.

    Closing the returned generator (or dropping it) stops the thread after its current item.
    `depth <= 0` yields from `iterable` directly (no thread).
    """
    if depth <= 0:
        yield from iterable
        return
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in iterable:
                while not stop.is_set():
                    try:
                        items.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            items.put(_END)
        except BaseException as error:  # noqa: BLE001 (handed to the consumer)
            items.put(_Failure(error))

    thread = threading.Thread(target=produce, name="tml-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        # Unblock a producer waiting on a full queue, then let it see `stop`.
        while thread.is_alive():
            try:
                items.get(timeout=0.1)
            except queue.Empty:
                pass
