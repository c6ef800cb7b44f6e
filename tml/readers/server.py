"""The reader's Flight server: serves a project's dataset, in shares, to the trainers.

A trainer asks with a ticket `{"reader", "rank", "world_size", "num_readers", "part",
"parts", "dataset", "start"}` (JSON) and receives, as one stream of Arrow record batches
(`tml.readers.codec`), the batches of share `Share(rank, part, parts)` of `rank`'s data
(`tml.readers.shares`), from global batch index `start` on (a resumed trainer asks for its
position). `dataset` is an index into `DATASETS` (0: the training data, 1: the validation
data, when the project hands a factory for it). The reader builds a fresh dataset for each
stream, so a restarted trainer's new stream does not disturb anything.

A reader serves *any* share of any rank on request, not only the shares the arithmetic
gives it: that is what lets a trainer fail over (a surviving reader takes over a dead
reader's share from the position the trainer has reached) and lets readers serve the
trainers of their own node, whose ranks the rendezvous assigns after the readers started.
The datasets of the ranks the reader expects (`ranks`) are built at start, so bad data or
config fails the reader there; another rank's dataset is built on its first request.

Why the ticket is checked field by field: anyone who can reach the port can send one. It
names no file and no dataset (the reader serves only the dataset it was started with), it
must be small, exact JSON with integer fields, agree with this reader's index, trainer count
and reader count, name a rank among the trainers, a part among at most `num_readers`, and a
position inside the data. Anything
else is refused with one line; nothing is opened on a ticket's say.

The server binds the host it is given (127.0.0.1 when readers run beside the trainers);
0.0.0.0 only if configured so.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from tml.common.atomic_file import write_text_atomic
from tml.errors import TmlError, error_line
from tml.readers.codec import encode
from tml.readers.shares import Share, served_ranges, shares_of_reader

logger = logging.getLogger(__name__)

DatasetFactory = Callable[[int, int], Any]
"""`factory(rank, world_size)`: rank's in-process dataset (len, load_state_dict, iter)."""

MAX_TICKET_BYTES = 512
# Batches per Flight message: the per-message cost (Arrow arrays, gRPC) is paid once for
# them (measured: 1.7 ms to encode one TwHIN batch of 200 edges alone).
MESSAGE_BATCHES = 8
TICKET_FIELDS = ("reader", "rank", "world_size", "num_readers", "part", "parts", "dataset",
                 "start")
DATASETS = ("train", "validation")
MAX_ACTION_BYTES = 64


def parse_ticket(raw: bytes) -> dict[str, int]:
    """The ticket's fields; ValueError (one line) on anything but the exact expected shape."""
    if len(raw) > MAX_TICKET_BYTES:
        raise ValueError(f"ticket of {len(raw)} bytes (at most {MAX_TICKET_BYTES})")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ValueError("ticket is not JSON") from None
    if not isinstance(data, dict) or sorted(data) != sorted(TICKET_FIELDS):
        raise ValueError(f"ticket must have exactly the fields {', '.join(TICKET_FIELDS)}")
    for name in TICKET_FIELDS:
        value = data[name]
        if type(value) is not int or value < 0:
            raise ValueError(f"ticket field {name} must be a non-negative integer")
    return data


def encode_ticket(reader: int, rank: int, world_size: int, num_readers: int,
                  start: int, part: int = 0, parts: int = 1, dataset: int = 0) -> bytes:
    return json.dumps({"reader": reader, "rank": rank, "world_size": world_size,
                       "num_readers": num_readers, "part": part, "parts": parts,
                       "dataset": dataset, "start": start}).encode()


def parse_describe(raw: bytes) -> tuple[int | None, int]:
    """(rank, dataset) a `describe` action asks about (body `{"rank": r, "dataset": d}`),
    or (None, 0) for an empty body."""
    if not raw:
        return None, 0
    if len(raw) > MAX_ACTION_BYTES:
        raise ValueError(f"describe body of {len(raw)} bytes (at most {MAX_ACTION_BYTES})")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ValueError("describe body is not JSON") from None
    if not isinstance(data, dict) or sorted(data) != ["dataset", "rank"] or \
            any(type(v) is not int or v < 0 for v in data.values()):
        raise ValueError('describe body must be {"rank": r, "dataset": d} (non-negative '
                         'integers)')
    return data["rank"], data["dataset"]


def dataset_total(dataset: Any) -> tuple[int, int]:
    """(batches per epoch, epochs) of an in-process dataset."""
    return len(dataset), int(getattr(dataset, "num_epochs", 1))


class ReaderServer(flight.FlightServerBase):
    """Serves shares of `factory`'s datasets as reader `index` of `num_readers` (see the
    module docstring); `ranks`: the ranks whose datasets are built at start (default: the
    ranks of this reader's own shares, `shares_of_reader`). `factory` is the training
    data's, or `{"train": ..., "validation": ...}` (names from `DATASETS`)."""

    def __init__(self, factory: DatasetFactory | dict[str, DatasetFactory], index: int,
                 num_readers: int,
                 world_size: int, host: str = "127.0.0.1", port: int = 0,
                 block: int = 8, ranks: list[int] | None = None) -> None:
        if not 0 <= index < num_readers:
            raise TmlError(f"reader index {index} is not in 0..{num_readers - 1}")
        if world_size < 1 or block < 1:
            raise TmlError(f"readers need world_size >= 1 and block >= 1, got {world_size}, "
                           f"{block}")
        factories = factory if isinstance(factory, dict) else {"train": factory}
        unknown = sorted(set(factories) - set(DATASETS))
        if unknown or "train" not in factories:
            raise TmlError(f"a reader serves {', '.join(DATASETS)} (train required), not "
                           f"{', '.join(unknown)}")
        self.factories = {DATASETS.index(name): f for name, f in factories.items()}
        self.index, self.num_readers, self.world_size, self.block = (
            index, num_readers, world_size, block)
        self.shares: dict[int, Share] = {
            s.rank: s for s in shares_of_reader(index, world_size, num_readers)}
        if ranks is None:
            ranks = sorted(self.shares)
        # Build the expected ranks' datasets once up front: bad data or config fails the
        # reader at start, and their sizes are known before a trainer asks.
        self.sizes = {(data, rank): dataset_total(make(rank, world_size))
                      for data, make in self.factories.items() for rank in ranks}
        super().__init__(location=f"grpc://{_url_host(host)}:{port}")
        self.host = host
        self.streams = 0
        self._lock = threading.Lock()

    def size(self, rank: int, data: int = 0) -> tuple[int, int]:
        """(batches per epoch, epochs) of `rank`'s data (`DATASETS[data]`); built on the
        first request."""
        with self._lock:
            if (data, rank) not in self.sizes:
                self.sizes[data, rank] = dataset_total(self.factories[data](rank,
                                                                            self.world_size))
            return self.sizes[data, rank]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def describe(self, rank: int | None = None, data: int = 0) -> dict[str, Any]:
        """Who this reader is, and the sizes of dataset `data`'s ranks built so far (and of
        `rank`)."""
        if rank is not None:
            self.size(rank, data)
        with self._lock:
            sizes = {r: size for (d, r), size in self.sizes.items() if d == data}
        return {"reader": self.index, "num_readers": self.num_readers,
                "world_size": self.world_size, "block": self.block,
                "datasets": [DATASETS[d] for d in sorted(self.factories)],
                "ranks": {str(r): {"batches_per_epoch": n, "num_epochs": e}
                          for r, (n, e) in sizes.items()}}

    def list_actions(self, context: Any) -> list[tuple[str, str]]:
        return [("describe", "this reader's index, counts and data sizes (JSON); body "
                 '{"rank": r} adds rank r\'s size')]

    def do_action(self, context: Any, action: flight.Action) -> Iterator[bytes]:
        if action.type != "describe":
            raise flight.FlightServerError("unknown action (this reader has: describe)")
        try:
            rank, data = parse_describe(action.body.to_pybytes() if action.body else b"")
            if rank is not None and rank >= self.world_size:
                raise ValueError(f"rank {rank} is not one of the {self.world_size} trainers")
            self._check_dataset(data)
            return iter([json.dumps(self.describe(rank, data)).encode()])
        except ValueError as error:
            raise flight.FlightServerError(f"describe refused: {error}") from None
        except TmlError as error:
            logger.error("reader %d: %s", self.index, error)
            raise flight.FlightServerError(error_line(error)) from None

    def _check_dataset(self, data: int) -> None:
        if data not in self.factories:
            name = f" ({DATASETS[data]})" if data < len(DATASETS) else ""
            raise ValueError(f"dataset {data}{name} is not served by this reader (it serves "
                             f"{', '.join(DATASETS[d] for d in sorted(self.factories))})")

    def _check(self, ticket: dict[str, int]) -> Share:
        mine = {"reader": self.index, "world_size": self.world_size,
                "num_readers": self.num_readers}
        for name, value in mine.items():
            if ticket[name] != value:
                raise ValueError(f"ticket {name}={ticket[name]} but this reader has "
                                 f"{name}={value}")
        if ticket["rank"] >= self.world_size:
            raise ValueError(f"rank {ticket['rank']} is not one of the {self.world_size} "
                             "trainers")
        self._check_dataset(ticket["dataset"])
        if not 1 <= ticket["parts"] <= self.num_readers or ticket["part"] >= ticket["parts"]:
            raise ValueError(f"part {ticket['part']} of {ticket['parts']} is not a share of "
                             f"{self.num_readers} reader(s)")
        try:
            batches, epochs = self.size(ticket["rank"], ticket["dataset"])
        except TmlError as error:
            raise flight.FlightServerError(error_line(error)) from None
        if ticket["start"] > batches * epochs:
            raise ValueError(f"start {ticket['start']} is past the end of the data "
                             f"({batches * epochs} batches)")
        return Share(ticket["rank"], ticket["part"], ticket["parts"])

    def do_get(self, context: Any, ticket: flight.Ticket) -> flight.FlightDataStream:
        try:
            fields = parse_ticket(ticket.ticket)
            share = self._check(fields)
        except ValueError as error:
            logger.warning("reader %d: refused a ticket from %s: %s", self.index,
                           context.peer(), error)
            raise flight.FlightServerError(f"ticket refused: {error}") from None
        with self._lock:
            self.streams += 1
        data = fields["dataset"]
        logger.info("reader %d: serving %srank %d (part %d of %d) from batch %d to %s",
                    self.index, f"{DATASETS[data]} of " if data else "", share.rank,
                    share.part, share.parts, fields["start"], context.peer())
        records = self._records(share, fields["start"], data)
        try:
            first = next(records)
        except StopIteration:
            return flight.GeneratorStream(pa.schema([]), iter(()))
        return flight.GeneratorStream(first.schema, _chain(first, records))

    def _records(self, share: Share, start: int, data: int) -> Iterator[pa.RecordBatch]:
        """Encoded batches of `share` of dataset `data` from global index `start` (errors as
        one line)."""
        try:
            dataset = self.factories[data](share.rank, self.world_size)
            batches, epochs = self.size(share.rank, data)
            if (len(dataset), int(getattr(dataset, "num_epochs", 1))) != (batches, epochs):
                raise TmlError(f"rank {share.rank}'s data changed size since the reader "
                               "started; restart the readers")
            for lo, hi in served_ranges(start, batches * epochs, share, self.block):
                dataset.load_state_dict({"epoch": lo // batches, "batch": lo % batches})
                iterator = iter(dataset)
                count = 0
                group: list[Any] = []
                for batch in islice(iterator, hi - lo):
                    count += 1
                    group.append(batch)
                    if len(group) == MESSAGE_BATCHES:
                        yield encode(group)
                        group = []
                if group:
                    yield encode(group)
                close = getattr(iterator, "close", None)
                if close is not None:
                    close()
                if count < hi - lo:
                    raise TmlError(f"rank {share.rank}'s data ended at batch {lo + count}, "
                                   f"before the {batches * epochs} its size announced")
        except TmlError as error:
            logger.error("reader %d: %s", self.index, error)
            raise flight.FlightServerError(error_line(error)) from None


def _chain(first: pa.RecordBatch, rest: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    yield first
    yield from rest


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def serve(server: ReaderServer, port_file: str | None = None,
          stop: threading.Event | None = None) -> None:
    """Run `server` until `stop` is set or the parent process goes away, then shut it down.

    The server runs in a thread and this (normally the main) thread waits on `stop`, so a
    Python signal handler (SIGTERM from the launcher) runs: pyarrow's blocking `serve()`
    would not let it. With `port_file`, write the bound `host:port` there (atomically) once
    serving: a launcher that started the reader on port 0 learns the port from it.
    """
    parent = os.getppid()
    stop = stop or threading.Event()
    thread = threading.Thread(target=server.serve, name="tml-reader-serve", daemon=True)
    thread.start()
    if port_file:
        write_text_atomic(port_file, server.address)
    logger.info("reader %d of %d serving %s on %s", server.index, server.num_readers,
                {rank: f"part {s.part} of {s.parts}" for rank, s in server.shares.items()},
                server.address)
    try:
        while not stop.wait(0.5) and thread.is_alive():
            if os.getppid() != parent:
                # A reader started beside the trainers must not outlive its launcher.
                logger.warning("reader %d: the launcher went away; stopping", server.index)
                break
    finally:
        server.shutdown()
        thread.join(timeout=5)
        logger.info("reader %d stopped after %d stream(s)", server.index, server.streams)
