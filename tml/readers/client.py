"""`ReaderDataset`: a trainer's data, pulled from its readers instead of read in-process.

It behaves as the in-process dataset does for the training loop: `len()` is the batches per
epoch, `state_dict()` / `load_state_dict()` the position (`{"epoch", "batch"}`), and each
`iter()` starts at the beginning or at the position loaded just before. A resumed trainer
therefore asks its readers for the batches from its checkpoint's position on.

One thread per reader pulls that reader's stream into a small queue (the readers work in
parallel); the trainer takes `block` batches from each reader in turn, which is the
in-process order (`tml.readers.shares`).

Never a hang: connecting waits at most `connect_timeout_s` for a reader to answer, and
each batch at most `batch_timeout_s`; a reader that is not up, dies, stalls, refuses or
sends something that is not a batch of the expected class ends the iteration with a
`ReaderError` naming it (`reader 1 (127.0.0.1:4242) ...`), one line.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import pyarrow.flight as flight

from tml.common.data_position import ResumablePosition
from tml.errors import TmlError, error_line
from tml.readers.codec import Decoder
from tml.readers.server import encode_ticket
from tml.readers.shares import owner_part, readers_of_rank

logger = logging.getLogger(__name__)

_END = object()


class ReaderError(TmlError):
    """A reader is unreachable, died, stalled or sent something wrong."""


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def _name(index: int, address: str) -> str:
    return f"reader {index} ({address})"


def _flight_text(error: BaseException) -> str:
    """The useful part of a Flight error (gRPC appends a multi-line detail)."""
    text = error_line(error, 400)
    for marker in (". Detail:", ". gRPC client debug context:", " gRPC client debug"):
        text = text.split(marker)[0]
    return text.strip()[:240]


class ReaderDataset(ResumablePosition):
    """Trainer `rank`'s batches from the readers at `addresses` (host:port, reader order)."""

    def __init__(self, addresses: list[str], rank: int, world_size: int, batch_type: type,
                 connect_timeout_s: float = 60.0, batch_timeout_s: float = 120.0,
                 queue_depth: int = 4) -> None:
        if not addresses:
            raise TmlError("no reader addresses")
        self.addresses = list(addresses)
        self.rank, self.world_size = rank, world_size
        self.batch_type = batch_type
        self.connect_timeout_s, self.batch_timeout_s = connect_timeout_s, batch_timeout_s
        self.queue_depth = queue_depth
        self.readers = readers_of_rank(rank, world_size, len(addresses))
        self._clients: dict[int, flight.FlightClient] = {}
        sizes = set()
        blocks = set()
        for index in self.readers:
            info = self._describe(index)
            sizes.add((info["batches_per_epoch"], info["num_epochs"]))
            blocks.add(info["block"])
        if len(sizes) != 1 or len(blocks) != 1:
            raise ReaderError(f"the readers of rank {rank} disagree on the data size or block "
                              f"({sorted(sizes)}, blocks {sorted(blocks)}): start them from "
                              "the same config")
        (self._num_batches, self.num_epochs), = sizes
        (self.block,) = blocks
        self._reset_position()

    def _describe(self, index: int) -> dict[str, Any]:
        """Connect to reader `index` (waiting for it to come up) and check who it is."""
        address = self.addresses[index]
        name = _name(index, address)
        try:
            client = flight.connect(f"grpc://{address}")
        except (flight.FlightError, OSError, ValueError) as error:
            raise ReaderError(f"{name}: cannot connect: {_flight_text(error)}") from None
        deadline = time.monotonic() + self.connect_timeout_s
        while True:
            left = deadline - time.monotonic()
            try:
                options = flight.FlightCallOptions(timeout=max(0.1, min(left, 5.0)))
                results = list(client.do_action(flight.Action("describe", b""), options))
                break
            except (flight.FlightUnavailableError, flight.FlightTimedOutError,
                    flight.FlightCancelledError) as error:
                if time.monotonic() >= deadline:
                    client.close()
                    raise ReaderError(f"{name} did not answer within "
                                      f"{self.connect_timeout_s:g} s (not started, or "
                                      f"unreachable): {_flight_text(error)}") from None
                time.sleep(0.2)
            except (flight.FlightError, OSError) as error:
                client.close()
                raise ReaderError(f"{name}: {_flight_text(error)}") from None
        try:
            info = json.loads(results[0].body.to_pybytes())
            rank_info = info["ranks"][str(self.rank)] if str(self.rank) in info["ranks"] else None
            checks = {"reader": index, "num_readers": len(self.addresses),
                      "world_size": self.world_size}
            for key, want in checks.items():
                if info[key] != want:
                    raise ReaderError(f"{name} says {key}={info[key]}, this trainer expects "
                                      f"{want} (readers listed in another order, or started "
                                      "for another run?)")
            if rank_info is None:
                raise ReaderError(f"{name} does not serve rank {self.rank}")
            return {"block": int(info["block"]),
                    "batches_per_epoch": int(rank_info["batches_per_epoch"]),
                    "num_epochs": int(rank_info["num_epochs"])}
        except (ValueError, KeyError, TypeError, IndexError):
            client.close()
            raise ReaderError(f"{name}: its description is not valid") from None
        finally:
            self._clients[index] = client

    # -- the in-process dataset's interface -----------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        epoch, batch = self._start_iteration()
        return self._generate(epoch * self._num_batches + batch)

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()

    # -- streaming ------------------------------------------------------------------------

    def _generate(self, start: int) -> Iterator[Any]:
        total = self._num_batches * self.num_epochs
        if start >= total:
            self._epoch, self._batch = self.num_epochs, 0
            return
        pumps = [_Pump(self, part, index, start) for part, index in enumerate(self.readers)]
        try:
            for pump in pumps:
                pump.start()
            for position in range(start, total):
                pump = pumps[owner_part(position, len(pumps), self.block)]
                batch = pump.take(position, total)
                position += 1
                self._epoch, self._batch = divmod(position, self._num_batches)
                yield batch
        finally:
            for pump in pumps:
                pump.stop()


class _Pump:
    """One reader's stream, read by a daemon thread into a bounded queue."""

    def __init__(self, owner: ReaderDataset, part: int, index: int, start: int) -> None:
        self.owner, self.part, self.index, self.start_at = owner, part, index, start
        self.name = _name(index, owner.addresses[index])
        self.items: queue.Queue = queue.Queue(maxsize=owner.queue_depth)
        self.halt = threading.Event()
        self.reader: flight.FlightStreamReader | None = None
        self.thread = threading.Thread(target=self._run, name=f"tml-reader-{index}",
                                       daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _put(self, item: Any) -> bool:
        while not self.halt.is_set():
            try:
                self.items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        owner = self.owner
        decoder = Decoder(owner.batch_type, self.name)
        try:
            ticket = encode_ticket(self.index, owner.rank, owner.world_size,
                                   len(owner.addresses), self.start_at)
            self.reader = owner._clients[self.index].do_get(flight.Ticket(ticket))
            while not self.halt.is_set():
                try:
                    chunk = self.reader.read_chunk()
                except StopIteration:
                    self._put(_END)
                    return
                for batch in decoder.decode(chunk.data):
                    if not self._put(batch):
                        return
        except TmlError as error:
            self._put(_Failure(error))
        except (flight.FlightError, OSError) as error:
            if not self.halt.is_set():
                self._put(_Failure(ReaderError(f"{self.name} failed: "
                                               f"{_flight_text(error)}")))
        except Exception as error:  # noqa: BLE001 (handed to the trainer, named)
            self._put(_Failure(ReaderError(f"{self.name}: {error_line(error, 240)}")))

    def take(self, position: int, total: int) -> Any:
        timeout = self.owner.batch_timeout_s
        try:
            item = self.items.get(timeout=timeout)
        except queue.Empty:
            raise ReaderError(f"{self.name} sent no batch within {timeout:g} s (batch "
                              f"{position} of rank {self.owner.rank}); is it stuck?") from None
        if item is _END:
            raise ReaderError(f"{self.name} ended its stream at batch {position} of "
                              f"{total} of rank {self.owner.rank}")
        if isinstance(item, _Failure):
            raise item.error
        return item

    def stop(self) -> None:
        self.halt.set()
        if self.reader is not None:
            try:
                self.reader.cancel()
            except Exception:  # noqa: BLE001 (best effort on the way out)
                pass
        self.thread.join(timeout=2.0)
