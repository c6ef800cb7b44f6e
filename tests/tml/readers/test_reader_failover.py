"""Failover and node-scoped reader lists, in this process: real Flight servers on real
sockets (tests.test_readers' `Readers`), no mocks.

A reader that goes away mid-stream has its share served by another reader from the first
batch the trainer had not received: the trainer's batches and their order are those of
in-process reading. With no other reader left, the run ends naming the dead one, one line.
Readers of a node serve that node's trainers with the same batches as in-process reading.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time

import pytest

from projects.twhin.data.dataset import EdgesDataset
from projects.twhin.data.edges import EdgeBatch
from tests.tml.readers.test_readers import (
    RELATIONS,
    TABLES,
    Readers,
    _factory,
    assert_same,
    write_edges,
)
from tests.twhin_setup import REPO
from tml.readers.client import ReaderDataset, ReaderError
from tml.readers.server import encode_ticket


@pytest.fixture(scope="module")
def edges(tmp_path_factory):
    return write_edges(tmp_path_factory.mktemp("edges"))


@pytest.fixture
def started():
    made = []

    def start(*args, **kwargs):
        made.append(Readers(*args, **kwargs))
        return made[-1]
    yield start
    for readers in made:
        readers.stop()


def _local(edges, rank, world_size):
    return list(_factory(edges)(rank, world_size))


_SERVE = """
import sys
from tests.tml.readers.test_readers import _factory
from tml.readers.server import ReaderServer, serve
root, index, count, world, block, epochs, port_file = sys.argv[1:]
server = ReaderServer(_factory(root, epochs=int(epochs)), int(index), int(count), int(world),
                      block=int(block))
serve(server, port_file)
"""


class ReaderProcesses:
    """`count` reader processes serving the `edges` fixture's data (killable for real)."""

    def __init__(self, tmp_path, edges, count, world_size, block, epochs):
        self.processes = []
        files = [tmp_path / f"reader-{j}.address" for j in range(count)]
        for j, path in enumerate(files):
            self.processes.append(subprocess.Popen(
                [sys.executable, "-c", _SERVE, edges, str(j), str(count), str(world_size),
                 str(block), str(epochs), str(path)], env={**os.environ, "PYTHONPATH": REPO}, cwd=REPO))
        deadline = time.monotonic() + 120
        while not all(path.exists() for path in files):
            assert all(p.poll() is None for p in self.processes), "a reader exited"
            assert time.monotonic() < deadline, "readers did not start"
            time.sleep(0.1)
        self.addresses = [path.read_text() for path in files]

    def kill(self, index):
        self.processes[index].kill()
        self.processes[index].wait()

    def stop(self):
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_killed_readers_are_taken_over_mid_stream_with_the_same_batches(tmp_path, edges):
    # 40 epochs (3,000 batches): more than the streams' buffers hold, so the kills land
    # mid-stream.
    readers = ReaderProcesses(tmp_path, edges, 3, 1, block=2, epochs=40)
    try:
        remote = ReaderDataset(readers.addresses, 0, 1, EdgeBatch, queue_depth=1,
                               batch_timeout_s=60)
        local = list(_factory(edges, epochs=40)(0, 1))
        got = []
        batches = iter(remote)
        got += list(itertools.islice(batches, 7))
        readers.kill(1)                 # reader 2 takes over part 1
        got += list(itertools.islice(batches, 20))
        readers.kill(2)                 # reader 0 takes over parts 1 and 2
        got += list(batches)
        assert_same(got, local)
        assert {d for d, _ in remote.takeovers} == {1, 2} and set(remote.dead) == {1, 2}
        assert remote.takeovers[-1][1] == 0
        # A later pass (a resume) goes to the survivor directly.
        remote.load_state_dict({"epoch": 39, "batch": 5})
        assert_same(list(iter(remote)), local[39 * 75 + 5:])
        # The last one killed: nothing left to take over, the run ends naming it.
        batches = iter(remote)
        next(batches)
        readers.kill(0)
        with pytest.raises(ReaderError) as error:
            list(batches)
        message = str(error.value)
        # Reader 0 served every part: the part whose stream breaks first is named, then the
        # readers tried for it, reader 0 among them when the part was first another's.
        assert message.startswith("reader "), message
        assert f"reader 0 ({readers.addresses[0]})" in message, message
        assert "no other reader could take over its share" in message and "\n" not in message
    finally:
        readers.stop()


def test_a_reader_stopped_before_the_stream_is_taken_over(edges, started):
    readers = started(_factory(edges), 2, 2, block=3)   # one reader per trainer rank
    remote = ReaderDataset(readers.addresses, 1, 2, EdgeBatch)
    readers.stop(1)
    assert_same(list(remote), _local(edges, 1, 2))   # reader 0 serves rank 1's share
    assert remote.takeovers == [(1, 0)]


@pytest.mark.parametrize("world_size,rank", [(1, 0), (2, 1)])
def test_a_reader_gone_before_the_trainer_starts_is_taken_over(edges, started, world_size,
                                                               rank):
    # A trainer (re)started after one of its readers died: another reader of the list
    # serves that share (with 2 trainers, rank 1's only reader is gone: reader 0 serves it).
    readers = started(_factory(edges), 2, world_size, block=3)
    readers.stop(1)
    remote = ReaderDataset(readers.addresses, rank, world_size, EdgeBatch,
                           connect_timeout_s=1.0)
    assert 1 in remote.dead and remote.dead[1].startswith("did not answer within 1 s")
    assert_same(list(remote), _local(edges, rank, world_size))
    assert remote.takeovers == [(1, 0)]


def test_a_lone_reader_gone_before_the_stream_is_named_in_one_line(edges, started):
    readers = started(_factory(edges), 1, 1)
    remote = ReaderDataset(readers.addresses, 0, 1, EdgeBatch)
    readers.stop()
    with pytest.raises(ReaderError) as error:
        list(remote)
    message = str(error.value)
    assert message.startswith(f"reader 0 ({readers.addresses[0]}) failed: ")
    assert message.endswith("no other reader could take over its share")
    assert "\n" not in message


def test_when_every_reader_is_gone_the_error_names_what_was_tried(edges, started):
    readers = started(_factory(edges), 2, 1, block=2)
    remote = ReaderDataset(readers.addresses, 0, 1, EdgeBatch)
    readers.stop()
    with pytest.raises(ReaderError) as error:
        list(remote)
    message = str(error.value)
    assert "no other reader could take over its share (tried: reader " in message, message
    assert "\n" not in message


@pytest.mark.parametrize("per_node,trainers_per_node", [(1, 2), (2, 2), (3, 1), (2, 1)])
def test_node_readers_serve_their_nodes_trainers_the_in_process_batches(
        edges, started, per_node, trainers_per_node):
    nodes = 2
    world_size = nodes * trainers_per_node
    for node in range(nodes):
        first = node * trainers_per_node
        readers = started(_factory(edges), per_node, world_size, block=2)
        for rank in range(first, first + trainers_per_node):
            remote = ReaderDataset(readers.addresses, rank, world_size, EdgeBatch,
                                   group=(first, trainers_per_node))
            assert_same(list(remote), _local(edges, rank, world_size))
        readers.stop()


def test_a_rank_outside_its_group_is_refused(edges, started):
    readers = started(_factory(edges), 1, 4)
    with pytest.raises(Exception, match="rank 3 is not in its reader group 0..1 of 4"):
        ReaderDataset(readers.addresses, 3, 4, EdgeBatch, group=(0, 2))


def test_any_share_is_served_on_request(edges, started):
    # Reader 0 of 2 serves part 1 of 2 (normally reader 1's) of rank 0: what failover asks.
    readers = started(_factory(edges), 2, 1, block=2)
    import pyarrow.flight as flight

    from tml.readers.codec import Decoder

    client = flight.connect(f"grpc://{readers.addresses[0]}")
    table = client.do_get(flight.Ticket(encode_ticket(0, 0, 1, 2, 3, part=1, parts=2)))
    got = [b for chunk in table for b in Decoder(EdgeBatch, "r").decode(chunk.data)]
    client.close()
    local = _local(edges, 0, 1)
    want = [local[i] for i in range(3, len(local)) if (i // 2) % 2 == 1]
    assert_same(got, want)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_training_survives_a_killed_reader_with_the_in_process_losses(tmp_path):
    """A real training run fed by 2 reader processes; reader 1 is killed after step 10:
    reader 0 takes over its share and every logged loss is the in-process run's."""
    import re

    from projects.twhin.data.generate import generate_graph
    from tests.tml.readers.test_readers_processes import (
        RUN,
        _config,
        _free_ports,
        _losses,
        _wait_serving,
    )
    from tests.twhin_setup import launcher_env

    graph = tmp_path / "graph"
    generate_graph(str(graph), num_users=500, num_tweets=200, num_edges=8000,
                   num_communities=4, seed=3, validation_fraction=0.05)
    common = {"num_train_steps": 120, "checkpoint_every_n": 1000, "num_epochs": 3}
    plain = _config(tmp_path, graph, name="plain.yaml", **common)
    fed = _config(tmp_path, graph, name="fed.yaml", readers={"block_batches": 2}, **common)
    # The readers start while the in-process reference run trains (they only serve once
    # the fed trainer connects): their start-up overlaps that run's.
    addresses = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    env = launcher_env(TML_READERS=",".join(addresses), TML_TRAINER_WORLD_SIZE="1")
    readers = [subprocess.Popen([sys.executable, RUN, f"--config_yaml_path={fed}",
                                 f"--save_dir={tmp_path / 'unused'}"],
                                env={**env, "TML_ROLE": "reader", "TML_READER_INDEX": str(j)},
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for j in range(2)]
    try:
        result = subprocess.run([sys.executable, RUN, f"--config_yaml_path={plain}",
                                 f"--save_dir={tmp_path / 'plain'}", "--nproc_per_node=1"],
                                env=launcher_env(), cwd=REPO, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-4000:]
        plain_losses = dict(_losses(result.stderr))
        assert len(plain_losses) == 24

        for process, address in zip(readers, addresses):
            _wait_serving(process, address)
        trainer = subprocess.Popen([sys.executable, RUN, f"--config_yaml_path={fed}",
                                    f"--save_dir={tmp_path / 'fed'}", "--nproc_per_node=1"],
                                   env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)
        lines, killed_at = [], None
        for line in trainer.stderr:
            lines.append(line)
            step = re.search(r"step (\d+): loss", line)
            # Killed once: a SIGKILLed reader stays "running" to poll() until it is reaped,
            # and lines read in one burst would otherwise move killed_at to a later step.
            if step and int(step.group(1)) >= 10 and killed_at is None:
                readers[1].kill()
                killed_at = int(step.group(1))
        assert trainer.wait(timeout=300) == 0, "".join(lines)[-4000:]
        log = "".join(lines)
        assert killed_at is not None and killed_at < 100, killed_at   # mid-run, not at the end
        assert re.search(r"reader 1 \(127\.0\.0\.1:\d+\) failed \(.*\); reader 0 "
                         r"\(127\.0\.0\.1:\d+\) takes over rank 0's part 1 of 2", log), \
            log[-3000:]
        fed_losses = _losses(log)
        assert {s for s, _ in fed_losses} == set(plain_losses)
        assert all(plain_losses[step] == loss for step, loss in fed_losses), \
            (fed_losses, plain_losses)
    finally:
        for process in readers:
            if process.poll() is None:
                process.terminate()
        codes = [process.wait(timeout=30) for process in readers]
    # SIGTERM stops a reader cleanly (exit 0), as the launcher stops them.
    assert codes[0] == 0


def test_validation_data_is_served_too_and_refused_where_there_is_none(edges, started,
                                                                       tmp_path):
    validation = write_edges(tmp_path)   # the same rows, read with another batch size

    def make_validation(rank, world_size):
        return EdgesDataset(validation, TABLES, RELATIONS, batch_size=7, rank=rank,
                            world_size=world_size, num_epochs=1, global_negatives=2,
                            shared_negatives=3, seed=9)
    readers = started({"train": _factory(edges), "validation": make_validation}, 2, 2,
                      block=2)
    for rank in range(2):
        remote = ReaderDataset(readers.addresses, rank, 2, EdgeBatch, dataset=1)
        want = list(make_validation(rank, 2))
        assert len(remote) == len(want) and remote.num_epochs == 1
        # Each evaluation reads its first batches again, from the start.
        for _ in range(2):
            assert_same(list(itertools.islice(iter(remote), 5)), want[:5])
        assert_same(list(remote), want)
    train_only = started(_factory(edges), 1, 1)
    with pytest.raises(ReaderError) as error:
        ReaderDataset(train_only.addresses, 0, 1, EdgeBatch, dataset=1)
    assert "dataset 1 (validation) is not served by this reader (it serves train)" in \
        str(error.value) and "\n" not in str(error.value)
