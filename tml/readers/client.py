"""`ReaderDataset`: a trainer's data, pulled from its readers instead of read in-process.

It behaves as the in-process dataset does for the training loop: `len()` is the batches per
epoch, `state_dict()` / `load_state_dict()` the position (`{"epoch", "batch"}`), and each
`iter()` starts at the beginning or at the position loaded just before. A resumed trainer
therefore asks its readers for the batches from its checkpoint's position on.

One thread per reader pulls that reader's stream into a small queue (the readers work in
parallel); the trainer takes `block` batches from each reader in turn, which is the
in-process order (`tml.readers.shares`).

Failover: a reader that goes away mid-run (its connection is lost: killed, node gone) is
marked dead and its share (`Share(rank, part, parts)`) is asked of another live reader of
the list (the next one after it, wrapping), from the first batch of that share this trainer
has not received yet. Every reader can serve any share (`tml.readers.server`), and a batch
is the same wherever it is built, so the trainer's batches and their order do not change.
A trainer whose list has no other live reader ends as before, naming the dead one.

A reader that does not answer when the trainer starts (or restarts) is failed over the
same way once `connect_timeout_s` has passed, if another reader of the list answers.

Never a hang: connecting waits at most `connect_timeout_s` for a reader to answer, and
each batch at most `batch_timeout_s`; a reader that stalls, refuses or sends something
that is not a batch of the expected class, or is down or dies with no reader left to
take over, ends the iteration with a `ReaderError` naming it
(`reader 1 (127.0.0.1:4242) ...`), one line.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import pyarrow.flight as flight

from tml.common.data_position import ResumablePosition
from tml.errors import TmlError, error_line
from tml.readers.codec import Decoder
from tml.readers.server import encode_ticket
from tml.readers.shares import Share, owner_part, readers_of_rank, served_ranges

logger = logging.getLogger(__name__)

_END = object()


class ReaderError(TmlError):
    """A reader is unreachable, died, stalled or sent something wrong."""


class ReaderUnreachable(ReaderError):
    """A reader did not answer within the connect timeout (not started, or gone)."""


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def _name(index: int, address: str) -> str:
    return f"reader {index} ({address})"


def _why(error: ReaderError) -> str:
    """A reader's error without its leading name (`reader 1 (host:port) `)."""
    return re.sub(r"^reader \d+ \([^)]*\):? ", "", str(error))


def _flight_text(error: BaseException) -> str:
    """The useful part of a Flight error (gRPC appends a multi-line detail)."""
    text = error_line(error, 400)
    for marker in (". Detail:", ". gRPC client debug context:", " gRPC client debug"):
        text = text.split(marker)[0]
    return text.strip()[:240]


class ReaderDataset(ResumablePosition):
    """Trainer `rank`'s batches from the readers at `addresses` (host:port, reader order).

    `group` (first rank, number of trainers): the trainers this reader list serves;
    default all of them, `(0, world_size)`. Readers beside each node's trainers serve that
    node's trainers only: `group` is then the node's ranks, and the shares are worked out
    with the rank's place in its group (`tml.readers.shares`). `dataset`: which of the
    readers' datasets (`tml.readers.server.DATASETS`: 0 training, 1 validation).
    """

    def __init__(self, addresses: list[str], rank: int, world_size: int, batch_type: type,
                 connect_timeout_s: float = 60.0, batch_timeout_s: float = 120.0,
                 queue_depth: int = 4, group: tuple[int, int] | None = None,
                 dataset: int = 0) -> None:
        if not addresses:
            raise TmlError("no reader addresses")
        self.addresses = list(addresses)
        self.rank, self.world_size = rank, world_size
        first, size = group if group is not None else (0, world_size)
        if not (0 <= first <= rank < first + size <= world_size):
            raise TmlError(f"rank {rank} is not in its reader group {first}..{first + size - 1}"
                           f" of {world_size} trainers")
        self.batch_type = batch_type
        self.dataset = dataset
        self.connect_timeout_s, self.batch_timeout_s = connect_timeout_s, batch_timeout_s
        self.queue_depth = queue_depth
        self.readers = readers_of_rank(rank - first, size, len(addresses))
        self._clients: dict[int, flight.FlightClient] = {}
        self._lock = threading.Lock()
        self.dead: dict[int, str] = {}          # reader index -> why it was given up
        self.takeovers: list[tuple[int, int]] = []   # (dead reader, reader that took over)
        sizes = set()
        blocks = set()
        for info in self._describe_own():
            sizes.add((info["batches_per_epoch"], info["num_epochs"]))
            blocks.add(info["block"])
        if len(sizes) != 1 or len(blocks) != 1:
            raise ReaderError(f"the readers of rank {rank} disagree on the data size or block "
                              f"({sorted(sizes)}, blocks {sorted(blocks)}): start them from "
                              "the same config")
        (self._num_batches, self.num_epochs), = sizes
        (self.block,) = blocks
        self._reset_position()

    def _describe_own(self) -> list[dict[str, Any]]:
        """This rank's readers' descriptions. One that does not answer (a reader that died
        before this trainer started or restarted) is marked dead, so that another takes
        over its share, as long as some reader of the list answers."""
        infos, unreachable = [], []
        for index in self.readers:
            try:
                infos.append(self._describe(index))
            except ReaderUnreachable as error:
                if len(self.addresses) == 1:
                    raise
                unreachable.append(error)
                self.dead[index] = _why(error)
        others = [i for i in range(len(self.addresses))
                  if i not in self.readers and i not in self.dead]
        for index in others if not infos else []:
            try:
                infos.append(self._describe(index, connect_timeout_s=min(
                    self.connect_timeout_s, 5.0)))
                break
            except ReaderError as error:
                self.dead[index] = _why(error)
        if not infos:
            raise unreachable[0]
        return infos

    def _describe(self, index: int, connect_timeout_s: float | None = None) -> dict[str, Any]:
        """Connect to reader `index` (waiting for it to come up) and check who it is."""
        address = self.addresses[index]
        name = _name(index, address)
        wait = self.connect_timeout_s if connect_timeout_s is None else connect_timeout_s
        with self._lock:
            client = self._clients.get(index)   # maybe in use by a stream: never closed here
        created = client is None
        if client is None:
            try:
                client = flight.connect(f"grpc://{address}")
            except (flight.FlightError, OSError, ValueError) as error:
                raise ReaderError(f"{name}: cannot connect: {_flight_text(error)}") from None
        try:
            info = self._ask(index, client, wait)
        except ReaderError:
            if created:
                client.close()
            raise
        with self._lock:
            self._clients[index] = client
        return info

    def _ask(self, index: int, client: flight.FlightClient, wait: float) -> dict[str, Any]:
        """Reader `index`'s answer to `describe`, checked against this trainer."""
        name = _name(index, self.addresses[index])
        deadline = time.monotonic() + wait
        body = json.dumps({"rank": self.rank, "dataset": self.dataset}).encode()
        while True:
            left = deadline - time.monotonic()
            try:
                options = flight.FlightCallOptions(timeout=max(0.1, min(left, 5.0)))
                results = list(client.do_action(flight.Action("describe", body), options))
                break
            except (flight.FlightUnavailableError, flight.FlightTimedOutError,
                    flight.FlightCancelledError) as error:
                if time.monotonic() >= deadline:
                    raise ReaderUnreachable(f"{name} did not answer within "
                                      f"{wait:g} s (not started, or "
                                      f"unreachable): {_flight_text(error)}") from None
                time.sleep(0.2)
            except (flight.FlightError, OSError) as error:
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
            raise ReaderError(f"{name}: its description is not valid") from None

    def client(self, index: int) -> flight.FlightClient:
        with self._lock:
            return self._clients[index]

    def take_over(self, dead: int, why: str, share: Share) -> int:
        """A live reader to serve `share` instead of reader `dead` (which is marked dead);
        ReaderError naming the dead reader when none is left."""
        with self._lock:
            self.dead.setdefault(dead, why)
        count = len(self.addresses)
        tried = []
        for step in range(1, count):
            candidate = (dead + step) % count
            with self._lock:
                if candidate in self.dead:
                    tried.append(f"{_name(candidate, self.addresses[candidate])} failed too")
                    continue
            try:
                info = self._describe(candidate, connect_timeout_s=min(
                    self.connect_timeout_s, 5.0))
            except ReaderError as error:
                with self._lock:
                    self.dead.setdefault(candidate, str(error))
                tried.append(str(error))
                continue
            if info["block"] != self.block or \
                    (info["batches_per_epoch"], info["num_epochs"]) != (self._num_batches,
                                                                        self.num_epochs):
                tried.append(f"{_name(candidate, self.addresses[candidate])} serves other "
                             "data (another config)")
                continue
            with self._lock:
                self.takeovers.append((dead, candidate))
            logger.warning("%s failed (%s); %s takes over rank %d's part %d of %d",
                           _name(dead, self.addresses[dead]), why,
                           _name(candidate, self.addresses[candidate]), share.rank,
                           share.part, share.parts)
            return candidate
        left = f" (tried: {'; '.join(tried)})" if tried else ""
        raise ReaderError(f"{_name(dead, self.addresses[dead])} failed: {why}; no other "
                          f"reader could take over its share{left}"[:600])

    # -- the in-process dataset's interface -----------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        epoch, batch = self._start_iteration()
        return self._generate(epoch * self._num_batches + batch)

    def close(self) -> None:
        with self._lock:
            clients = list(self._clients.values())
            self._clients.clear()
        for client in clients:
            client.close()

    # -- streaming ------------------------------------------------------------------------

    def _generate(self, start: int) -> Iterator[Any]:
        total = self._num_batches * self.num_epochs
        if start >= total:
            self._epoch, self._batch = self.num_epochs, 0
            return
        parts = len(self.readers)
        pumps = [_Pump(self, Share(self.rank, part, parts), index, start)
                 for part, index in enumerate(self.readers)]
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
    """One share's stream, read by a daemon thread into a bounded queue; on a lost reader
    it asks another reader for the rest of the share (`ReaderDataset.take_over`)."""

    def __init__(self, owner: ReaderDataset, share: Share, index: int, start: int) -> None:
        self.owner, self.share, self.index, self.start_at = owner, share, index, start
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

    def _positions(self, start: int) -> Iterator[int]:
        """The global batch indices this share holds from `start` on, in stream order."""
        total = self.owner._num_batches * self.owner.num_epochs
        for lo, hi in served_ranges(start, total, self.share, self.owner.block):
            yield from range(lo, hi)

    def _run(self) -> None:
        owner = self.owner
        next_position = self.start_at   # the share's first batch not yet received
        total = owner._num_batches * owner.num_epochs
        while not self.halt.is_set():
            if self.index in owner.dead:
                try:
                    self._switch(owner.dead[self.index])
                except ReaderError as error:
                    self._put(_Failure(error))
                    return
            try:
                next_position = self._stream(next_position, total)
                return
            except _Lost as lost:
                next_position = lost.position
                if self.halt.is_set():
                    return
                try:
                    self._switch(lost.why)
                except ReaderError as error:
                    self._put(_Failure(error))
                    return
            except TmlError as error:
                self._put(_Failure(error))
                return
            except (flight.FlightError, OSError) as error:
                if not self.halt.is_set():
                    self._put(_Failure(ReaderError(f"{self.name} failed: "
                                                   f"{_flight_text(error)}")))
                return
            except Exception as error:  # noqa: BLE001 (handed to the trainer, named)
                self._put(_Failure(ReaderError(f"{self.name}: {error_line(error, 240)}")))
                return

    def _switch(self, why: str) -> None:
        self.index = self.owner.take_over(self.index, why, self.share)
        self.name = _name(self.index, self.owner.addresses[self.index])

    def _stream(self, start: int, total: int) -> int:
        """Stream the share from `start` into the queue; returns where it ended. A lost
        connection is `_Lost` with the first position not received."""
        owner = self.owner
        decoder = Decoder(owner.batch_type, self.name)
        positions = self._positions(start)
        position = start
        ticket = encode_ticket(self.index, owner.rank, owner.world_size, len(owner.addresses),
                               start, part=self.share.part, parts=self.share.parts,
                               dataset=owner.dataset)
        try:
            self.reader = owner.client(self.index).do_get(flight.Ticket(ticket))
            while not self.halt.is_set():
                try:
                    chunk = self.reader.read_chunk()
                except StopIteration:
                    self._put(_END)
                    return total
                for batch in decoder.decode(chunk.data):
                    position = next(positions, total)
                    if not self._put(batch):
                        return position
        except flight.FlightUnavailableError as error:
            # The connection is gone (reader killed, node lost): the rest of the share
            # is asked of another reader, from the first batch not received.
            raise _Lost(next(positions, total), _flight_text(error)) from None
        return position

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


class _Lost(Exception):
    """A reader's connection was lost; `position`: the share's first batch not received."""

    def __init__(self, position: int, why: str) -> None:
        super().__init__(why)
        self.position, self.why = position, why
