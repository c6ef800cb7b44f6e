"""The reader service (tml.readers) in this process: real Flight servers on real sockets,
real parquet, no mocks. Batches must equal in-process reading, batch by batch, for 1 and 2
readers per trainer; resume; tickets are data; faults are one line naming the reader."""

from __future__ import annotations

import itertools
import socket
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given

from projects.twhin.data.dataset import EdgesDataset
from projects.twhin.data.edges import EdgeBatch
from projects.twhin.models.config import Relation
from tests.fuzz_support import FUZZ_SETTINGS, mutated, outcome
from tml.errors import TmlError
from tml.readers import codec
from tml.readers.client import ReaderDataset, ReaderError
from tml.readers.server import ReaderServer, encode_ticket, parse_ticket, serve
from tml.readers.shares import readers_of_rank, served_ranges, shares_of_reader

RELATIONS = [Relation(name="fav", lhs="user", rhs="tweet"),
             Relation(name="follow", lhs="user", rhs="user")]
TABLES = {"user": 50, "tweet": 30}


@pytest.fixture(scope="module")
def edges(tmp_path_factory):
    return write_edges(tmp_path_factory.mktemp("edges"))


def write_edges(root):
    """301 edges of two relations in two parquet files under `root`; returns it (str)."""
    for part, (lo, hi) in enumerate(((0, 130), (130, 301))):
        i = np.arange(lo, hi)
        rel = i % 2
        pq.write_table(pa.table({"lhs": i % 50, "rel": rel,
                                 "rhs": np.where(rel == 0, (i * 7) % 30, (i * 3 + 1) % 50),
                                 "weight": (i % 5 + 1).astype(np.float32)}),
                       str(root / f"part-{part}.parquet"), row_group_size=23)
    return str(root)


def _factory(root, epochs=2, gathered=False):
    def make(rank, world_size):
        if gathered:   # global negatives as ids, each whole table looked up once
            return EdgesDataset(root, TABLES, RELATIONS, batch_size=4, rank=rank,
                                world_size=world_size, num_epochs=epochs, global_negatives=2,
                                seed=5, gather_negatives=True)
        return EdgesDataset(root, TABLES, RELATIONS, batch_size=4, rank=rank,
                            world_size=world_size, num_epochs=epochs, global_negatives=2,
                            shared_negatives=3, seed=5)
    return make


class Readers:
    """`count` reader servers in threads of this process (real sockets)."""

    def __init__(self, factory, count, world_size, block=3, host="127.0.0.1"):
        self.servers = [ReaderServer(factory, j, count, world_size, host=host, block=block)
                        for j in range(count)]
        self.stops = [threading.Event() for _ in self.servers]
        self.threads = [threading.Thread(target=serve, args=(s, None, e), daemon=True)
                        for s, e in zip(self.servers, self.stops)]
        for thread in self.threads:
            thread.start()

    @property
    def addresses(self):
        return [s.address for s in self.servers]

    def stop(self, index=None):
        for j, event in enumerate(self.stops):
            if index is None or j == index:
                event.set()
                self.threads[j].join(timeout=10)


@pytest.fixture
def readers():
    started = []

    def start(*args, **kwargs):
        started.append(Readers(*args, **kwargs))
        return started[-1]
    yield start
    for r in started:
        r.stop()


def assert_same(got, want):
    assert len(got) == len(want) > 0
    for index, (a, b) in enumerate(zip(got, want)):
        assert a.nodes.keys() == b.nodes.keys(), index
        for name in ("values", "lengths"):
            assert torch.equal(getattr(a.nodes, name)(), getattr(b.nodes, name)()), index
        for name in ("labels", "rels", "weights", "shared", "negatives"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), \
                (index, name)


# -- shares ---------------------------------------------------------------------------------

@pytest.mark.parametrize("num_readers,world_size,block",
                         [(1, 1, 1), (2, 1, 3), (3, 2, 2), (1, 3, 4), (5, 2, 1), (4, 4, 8)])
def test_shares_are_disjoint_and_cover_every_batch_once(num_readers, world_size, block):
    total = 37
    for start in (0, 5, 36):
        seen = {}
        for reader in range(num_readers):
            for share in shares_of_reader(reader, world_size, num_readers):
                assert reader in readers_of_rank(share.rank, world_size, num_readers)
                for lo, hi in served_ranges(start, total, share, block):
                    for index in range(lo, hi):
                        key = (share.rank, index)
                        assert key not in seen, key
                        seen[key] = reader
        assert set(seen) == {(r, i) for r in range(world_size) for i in range(start, total)}


# -- same batches as in-process -------------------------------------------------------------

@pytest.mark.parametrize("num_readers,world_size", [(1, 1), (2, 1), (1, 2), (2, 2), (3, 2)])
def test_trainers_get_the_in_process_batches_in_order(edges, readers, num_readers, world_size):
    factory = _factory(edges)
    started = readers(factory, num_readers, world_size, block=3)
    for rank in range(world_size):
        remote = ReaderDataset(started.addresses, rank, world_size, EdgeBatch)
        local = factory(rank, world_size)
        assert len(remote) == len(local) and remote.num_epochs == 2
        got = list(remote)
        assert_same(got, list(local))
        assert got[0].shared.shape == (len(TABLES), 3)   # the shared negatives travel too
        assert remote.state_dict() == local.state_dict() == {"epoch": 2, "batch": 0}
        remote.close()


def test_gathered_global_negatives_travel_with_their_batches(edges, readers):
    factory = _factory(edges, gathered=True)
    started = readers(factory, 2, 1, block=3)
    remote = ReaderDataset(started.addresses, 0, 1, EdgeBatch)
    got = list(remote)
    assert_same(got, list(factory(0, 1)))
    assert got[0].negatives.shape == (2, 4, 2)
    assert got[0].shared.shape == (len(TABLES), max(TABLES.values()))
    remote.close()


@pytest.mark.parametrize("num_readers", [1, 2])
@pytest.mark.parametrize("position", [{"epoch": 0, "batch": 7}, {"epoch": 1, "batch": 0},
                                      {"epoch": 1, "batch": 17}])
def test_resume_continues_from_the_position(edges, readers, num_readers, position):
    factory = _factory(edges)
    started = readers(factory, num_readers, 2, block=2)
    remote = ReaderDataset(started.addresses, 1, 2, EdgeBatch)
    local = factory(1, 2)
    # Part way, then a "restart": a new position is loaded and iterated from.
    assert_same(list(itertools.islice(iter(remote), 5)), list(itertools.islice(iter(local), 5)))
    assert remote.state_dict() == local.state_dict() == {"epoch": 0, "batch": 5}
    remote.load_state_dict(position)
    local.load_state_dict(position)
    assert_same(list(remote), list(local))


def test_codec_round_trips_and_refuses_a_foreign_schema(edges):
    batches = list(itertools.islice(iter(_factory(edges)(0, 1)), 3))
    record = codec.encode(batches)
    assert_same(codec.Decoder(EdgeBatch, "r").decode(record), batches)
    assert_same(codec.Decoder(EdgeBatch, "r").decode(record.slice(1, 2)), batches[1:])
    other = pa.RecordBatch.from_pydict({"nodes.values": [[1]], "evil": [[1]]})
    with pytest.raises(TmlError, match="r: the stream has"):
        codec.Decoder(EdgeBatch, "r").decode(other)


# -- tickets are data -----------------------------------------------------------------------

def _valid_ticket():
    return encode_ticket(reader=0, rank=0, world_size=1, num_readers=1, start=0)


@FUZZ_SETTINGS
@given(raw=mutated(_valid_ticket()))
def test_fuzzed_tickets_parse_or_are_refused_in_one_line(raw):
    def call():
        try:
            parse_ticket(raw)
        except ValueError as error:
            raise TmlError(str(error)) from None
    outcome(call)


@pytest.mark.parametrize("ticket,message", [
    (b'{"path": "/etc/passwd"}', "exactly the fields"),
    (b"../../etc/passwd", "not JSON"),
    (encode_ticket(0, 0, 1, 1, 0).replace(b'"start": 0', b'"start": "/etc/passwd"'),
     "start must be a non-negative integer"),
    (encode_ticket(0, 0, 1, 1, 0).replace(b'"start": 0', b'"start": true'),
     "start must be a non-negative integer"),
    (encode_ticket(0, 3, 1, 1, 0), "rank 3 is not one of the 1 trainers"),
    (encode_ticket(0, 0, 1, 1, 0, part=1, parts=1), "part 1 of 1 is not a share of 1 reader"),
    (encode_ticket(0, 0, 1, 1, 0, part=0, parts=2), "part 0 of 2 is not a share of 1 reader"),
    (encode_ticket(0, 0, 2, 1, 0), "world_size=2 but this reader has world_size=1"),
    (encode_ticket(1, 0, 1, 1, 0), "reader=1 but this reader has reader=0"),
    (encode_ticket(0, 0, 1, 1, 10**9), "past the end of the data"),
    (b"{" + b" " * 600 + b"}", "ticket of 602 bytes"),
])
def test_bad_tickets_are_refused_and_nothing_is_served(edges, readers, ticket, message):
    opened = []

    def factory(rank, world_size):
        opened.append((rank, world_size))
        return _factory(edges)(rank, world_size)
    started = readers(factory, 1, 1)
    opened.clear()
    client = flight.connect(f"grpc://{started.addresses[0]}")
    with pytest.raises(flight.FlightServerError, match=f"ticket refused: .*{message}"):
        client.do_get(flight.Ticket(ticket)).read_all()
    assert opened == [] and started.servers[0].streams == 0   # no dataset built or read
    # The reader still serves a valid ticket.
    assert client.do_get(flight.Ticket(_valid_ticket())).read_all().num_rows > 0
    client.close()


# -- binding and faults ---------------------------------------------------------------------

def _listening(port):
    """Local addresses (hex, as in /proc/net/tcp*) listening on `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    found.append(local.rsplit(":", 1)[0])
    return found


def test_a_reader_binds_loopback_only_by_default(edges, readers):
    started = readers(_factory(edges), 1, 1)
    port = started.servers[0].port
    assert started.addresses == [f"127.0.0.1:{port}"]
    assert _listening(port) in (["0100007F"], ["0000000000000000FFFF00000100007F"])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_reader_that_never_comes_up_is_named_after_the_timeout():
    address = f"127.0.0.1:{_free_port()}"
    start = time.monotonic()
    with pytest.raises(ReaderError) as error:
        ReaderDataset([address], 0, 1, EdgeBatch, connect_timeout_s=1.0)
    assert time.monotonic() - start < 10
    message = str(error.value)
    assert message.startswith(f"reader 0 ({address}) did not answer within 1 s")
    assert "\n" not in message


def test_readers_started_for_another_run_or_order_are_refused(edges, readers):
    started = readers(_factory(edges), 2, 1)
    with pytest.raises(ReaderError, match=r"reader 0 \(.*\) says reader=1, this trainer "
                       "expects 0"):
        ReaderDataset(list(reversed(started.addresses)), 0, 1, EdgeBatch)
    with pytest.raises(ReaderError, match=r"says world_size=1, this trainer expects 2"):
        ReaderDataset(started.addresses, 0, 2, EdgeBatch)


def test_bad_data_in_a_reader_reaches_the_trainer_as_its_line(tmp_path, readers):
    i = np.arange(40)
    pq.write_table(pa.table({"lhs": i, "rel": i % 2, "rhs": i % 30}),
                   str(tmp_path / "bad.parquet"))   # lhs 30..39 of 'follow' rows: fine,
    # but user ids >= 50 do not exist: make row 33 one.
    table = pq.read_table(str(tmp_path / "bad.parquet")).to_pydict()
    table["lhs"][33] = 77
    pq.write_table(pa.table(table), str(tmp_path / "bad.parquet"))
    started = readers(_factory(str(tmp_path), epochs=1), 1, 1)
    remote = ReaderDataset(started.addresses, 0, 1, EdgeBatch)
    with pytest.raises(ReaderError) as error:
        list(remote)
    message = str(error.value)
    assert message.startswith(f"reader 0 ({started.addresses[0]}) failed:")
    assert "bad.parquet row 33: lhs=77 is outside table 'user'" in message
    assert "\n" not in message
