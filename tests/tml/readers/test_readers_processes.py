"""Reader processes for real: started in their role (TML_ROLE=reader, as on their own
nodes) or by the launcher beside the trainers; a killed or stalled reader is named in one
line; a training run fed by readers trains exactly as one reading in-process, also across
a crash and restart."""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

from projects.twhin.config import TwhinConfig
from projects.twhin.data.data import create_dataset
from projects.twhin.data.edges import EdgeBatch
from projects.twhin.data.generate import generate_graph
from tests.tml.readers.test_readers import assert_same
from tests.twhin_setup import REPO, launcher_env, small_twhin_config
from tml.core.config import load_config_from_yaml
from tml.readers.client import ReaderDataset, ReaderError

RUN = os.path.join(REPO, "projects", "twhin", "run.py")


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    out = tmp_path_factory.mktemp("graph")
    generate_graph(str(out), num_users=500, num_tweets=200, num_edges=8000,
                   num_communities=4, seed=3, validation_fraction=0.05)
    return out


def _config(tmp_path, graph, readers=None, name="twhin.yaml", **training):
    path = small_twhin_config(tmp_path / name, graph, 500, 200, 50,
                              **{"train_log_every_n": 5, "eval_log_every_n": 10**6,
                                 "num_eval_steps": 2, "num_epochs": 1, **training})
    if readers is not None:
        data = yaml.safe_load(open(path))
        data["readers"] = readers
        yaml.safe_dump(data, open(path, "w"))
    return path


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _wait_serving(process, address, timeout=90):
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"reader exited with {process.returncode}"
        with socket.socket() as s:
            if s.connect_ex((host, int(port))) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"reader at {address} did not come up")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_reader_role_processes_serve_in_process_batches_and_faults_are_named(tmp_path, graph):
    # 3 epochs: more data than gRPC's buffers hold, so a stalled reader is noticed.
    config_path = _config(tmp_path, graph, readers={"block_batches": 2}, num_epochs=3)
    addresses = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    env = launcher_env(TML_ROLE="reader", TML_READERS=",".join(addresses),
                       TML_TRAINER_WORLD_SIZE="1")
    readers = [subprocess.Popen([sys.executable, RUN, f"--config_yaml_path={config_path}",
                                 f"--save_dir={tmp_path / 'unused'}"],
                                env={**env, "TML_READER_INDEX": str(index)}, cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
               for index in range(2)]
    try:
        for process, address in zip(readers, addresses):
            _wait_serving(process, address)
        config = load_config_from_yaml(TwhinConfig, config_path)
        local = create_dataset(config.train_data, config.model, 0, 1, num_epochs=3)
        remote = ReaderDataset(addresses, 0, 1, EdgeBatch, batch_timeout_s=3.0,
                               queue_depth=1)
        assert len(remote) == len(local) == 152 and remote.num_epochs == 3
        assert_same(list(remote), list(local))

        # A stalled reader: the trainer waits batch_timeout_s, then names it.
        batches = iter(remote)
        next(batches)
        readers[0].send_signal(signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(ReaderError) as stalled:
            list(batches)
        assert time.monotonic() - start < 30
        assert re.fullmatch(rf"reader 0 \({addresses[0]}\) sent no batch within 3 s "
                            r"\(batch \d+ of rank 0\); is it stuck\?", str(stalled.value))
        readers[0].send_signal(signal.SIGCONT)

        # Resume from a position after the stall: the same batches as in-process.
        remote.load_state_dict({"epoch": 0, "batch": 97})
        local.load_state_dict({"epoch": 0, "batch": 97})
        assert_same(list(itertools.islice(iter(remote), 10)),
                    list(itertools.islice(iter(local), 10)))

        # A killed reader: the other one takes over its share, the batches do not change.
        remote.load_state_dict({"epoch": 0, "batch": 0})
        batches = iter(remote)
        got = [next(batches)]
        readers[1].kill()
        readers[1].wait()
        got += list(batches)
        local.load_state_dict({"epoch": 0, "batch": 0})
        assert_same(got, list(local))
        # With none left to take over, the iteration ends naming the reader, in one line.
        batches = iter(remote)
        next(batches)
        readers[0].kill()
        readers[0].wait()
        with pytest.raises(ReaderError) as killed:
            list(batches)
        message = str(killed.value)
        # Which error comes first depends on how fast gRPC notices the dead connection: on a
        # loaded host the batch timeout (3 s) can run out before it does. Both name a reader.
        assert (re.match(r"reader [01] \(127\.0\.0\.1:\d+\) failed: .*no other reader could "
                         "take over its share", message)
                or re.fullmatch(r"reader [01] \(127\.0\.0\.1:\d+\) sent no batch within 3 s "
                                r"\(batch \d+ of rank 0\); is it stuck\?", message)), message
        assert "\n" not in message
    finally:
        for process in readers:
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.terminate()
        for process in readers:
            process.wait(timeout=30)



def _losses(log):
    return re.findall(r"step (\d+): loss ([0-9.]+)", log)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_training_fed_by_readers_matches_in_process_also_after_a_crash(tmp_path, graph):
    # Checkpoints written in the foreground: a background write of step 10 could still be
    # in flight when the worker is killed at step 14, and the restart would begin at 0.
    common = {"num_train_steps": 30, "checkpoint_every_n": 10, "async_checkpoint": False}
    plain = _config(tmp_path, graph, name="plain.yaml", **common)
    fed = _config(tmp_path, graph, name="fed.yaml", max_restarts=1,
                  readers={"num_readers": 2, "block_batches": 3}, **common)
    runs = {}
    for name, config, extra in (("plain", plain, {}),
                                ("fed", fed, {"TML_TEST_CRASH_AT_STEP": "14"})):
        result = subprocess.run([sys.executable, RUN, f"--config_yaml_path={config}",
                                 f"--save_dir={tmp_path / name}", "--nproc_per_node=1"],
                                env=launcher_env(**extra), cwd=REPO, capture_output=True,
                                text=True, timeout=280)
        assert result.returncode == 0, result.stderr[-4000:]
        runs[name] = result.stderr
    log = runs["fed"]
    assert "started 2 reader(s) beside the trainers: 127.0.0.1:" in log
    assert re.search(r"resumed from .*/10 at step 10", log), log[-3000:]
    assert "serving rank 0 (part 1 of 2) from batch 10" in log   # the restart's position
    plain_losses = dict(_losses(runs["plain"]))
    fed_losses = _losses(log)
    # Every logged step of the readers-fed run (before and after the crash) has the loss
    # of the in-process run, to the printed digit; and the run ends at the same step.
    assert len(plain_losses) == 6 and {s for s, _ in fed_losses} == set(plain_losses)
    assert all(plain_losses[step] == loss for step, loss in fed_losses), (fed_losses,
                                                                          plain_losses)
    steps = [int(name) for name in os.listdir(tmp_path / "fed") if name.isdigit()]
    assert max(steps) == 30


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_reader_that_cannot_start_ends_the_launch_in_one_line(tmp_path, graph):
    # 192.0.2.1 (TEST-NET-1) is no interface of this host: the reader cannot bind it.
    config = _config(tmp_path, graph, readers={"num_readers": 2, "bind_host": "192.0.2.1"})
    result = subprocess.run([sys.executable, RUN, f"--config_yaml_path={config}",
                             f"--save_dir={tmp_path / 'save'}", "--nproc_per_node=1"],
                            env=launcher_env(), cwd=REPO, capture_output=True, text=True,
                            timeout=110)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"error: reader [01] exited with code 1 before serving: reader [01]: "
                        r"cannot listen on 192\.0\.2\.1:0 .*", last), last
    assert "launching" not in result.stderr          # no trainer was started
    assert not os.path.exists(tmp_path / "save") or not os.listdir(tmp_path / "save")
