"""maybe_run_training, launched for real: 2 worker processes through torch elastic."""

import json
import os
import subprocess
import sys

import pytest

from tests.twhin_setup import REPO, launcher_env
from tml.common.cluster_env import expand_slurm_nodelist, resolve_node_setup
from tml.common.run_training import (
    args_to_kwargs,
    build_torchrun_args,
    encode_kwarg,
    entrypoint_args,
    is_distributed_worker,
    kwargs_to_args,
    training_failed_error,
)

SCRIPT = os.path.join(REPO, "tests", "scripts", "toy_train.py")


def _env():
    return launcher_env()


@pytest.mark.parametrize("value", [3, 0.5, True, False, None, "plain", "42", "true", "null",
                                   '"quoted"', [1, "a", 2.5], {"k": [1]}, "a=b", ""])
def test_kwargs_round_trip_their_types(value):
    args = kwargs_to_args({"v": value})
    assert args_to_kwargs(args, ["v"]) == {"v": value}
    assert type(args_to_kwargs(args, ["v"])["v"]) is type(value)


def test_plain_strings_travel_as_typed():
    assert encode_kwarg("/tmp/save dir") == "/tmp/save dir"
    assert kwargs_to_args({"steps": 3, "flag": True}) == ["--steps=3", "--flag=true"]


def test_only_forwarded_keys_are_taken_from_argv():
    argv = ["--a=1", "--b=2", "positional", "--c"]
    assert args_to_kwargs(argv, ["a"]) == {"a": 1}


def test_entrypoint_forms(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("")
    assert entrypoint_args(str(script)) == [str(script)]
    assert entrypoint_args("projects.twhin.run") == ["-m", "projects.twhin.run"]
    with pytest.raises(Exception, match="script not found"):
        entrypoint_args(str(tmp_path / "missing.py"))


def _clear_cluster_env(monkeypatch):
    for name in ("TML_NUM_NODES", "TML_RDZV_ENDPOINT", "TML_RUN_ID", "TML_IS_CHIEF",
                 "TML_RDZV_PORT", "TML_MACHINES_FILE", "SLURM_JOB_NUM_NODES", "SLURM_NNODES",
                 "SLURM_NODEID", "SLURM_JOB_NODELIST", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)


def test_single_node_is_standalone_and_several_nodes_need_an_endpoint(monkeypatch):
    _clear_cluster_env(monkeypatch)
    args = build_torchrun_args(["x.py"], ["--a=1"], 2, resolve_node_setup())
    assert args == ["--nnodes", "1", "--nproc_per_node", "2", "--standalone", "x.py", "--a=1"]
    with pytest.raises(Exception, match="2 nodes need a rendezvous endpoint"):
        resolve_node_setup(num_nodes=2)
    monkeypatch.setenv("TML_RDZV_ENDPOINT", "node0:29400")
    args = build_torchrun_args(["x.py"], [], 2, resolve_node_setup(2, is_chief=True),
                               max_restarts=1)
    assert args[:9] == ["--nnodes", "2", "--nproc_per_node", "2", "--rdzv_backend", "c10d",
                        "--rdzv_endpoint", "localhost:29400", "--rdzv_id"]
    assert args[-3:] == ["--max_restarts", "1", "x.py"]
    assert resolve_node_setup(2).torchrun_endpoint() == "node0:29400"


def test_node_setup_precedence(monkeypatch, tmp_path):
    _clear_cluster_env(monkeypatch)
    machines = tmp_path / "machines.yaml"
    machines.write_text("chief: {num_accelerators: 1}\nnum_workers: 3\n")
    monkeypatch.setenv("TML_MACHINES_FILE", str(machines))
    monkeypatch.setenv("TML_RDZV_ENDPOINT", "chief:1234")
    assert resolve_node_setup().num_nodes == 4                      # machines file
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "3")
    monkeypatch.setenv("SLURM_NODEID", "1")
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-09]")
    setup = resolve_node_setup()
    assert (setup.num_nodes, setup.is_chief, setup.run_id) == (3, False, "777")  # SLURM
    assert setup.rdzv_endpoint == "chief:1234"                       # ours beat SLURM's
    monkeypatch.delenv("TML_RDZV_ENDPOINT")
    assert resolve_node_setup().rdzv_endpoint == "gpu07:29500"
    monkeypatch.setenv("TML_NUM_NODES", "2")
    monkeypatch.setenv("TML_RUN_ID", "mine")
    assert (resolve_node_setup().num_nodes, resolve_node_setup().run_id) == (2, "mine")
    assert resolve_node_setup(num_nodes=5, run_id="arg").num_nodes == 5   # arguments first
    monkeypatch.setenv("SLURM_NODEID", "0")
    assert resolve_node_setup().is_chief


def test_slurm_nodelist_expansion():
    assert expand_slurm_nodelist("n[1-3,7],gpu05") == ["n1", "n2", "n3", "n7", "gpu05"]
    assert expand_slurm_nodelist("a[01-02]") == ["a01", "a02"]
    assert expand_slurm_nodelist("127.0.0.1") == ["127.0.0.1"]


def test_killed_worker_message_says_what_to_do():
    error = training_failed_error({1: (-9, "Signal 9 (SIGKILL) received by PID 5", 1.0)})
    assert "worker rank 1 was killed by SIGKILL (out of memory?" in str(error)
    assert "max_restarts" in str(error)


def test_failure_names_the_causing_rank_not_the_killed_one():
    error = training_failed_error({
        0: (-15, "Signal 15 (SIGTERM) received by PID 1", 10.0),
        1: (1, "DataError: file x row 3: bad id", 10.0),
    })
    assert error.rank == 1
    assert "worker rank 1 failed" in str(error) and "bad id" in str(error)


def test_not_a_worker_in_the_test_process():
    assert not is_distributed_worker()


@pytest.mark.slow
def test_launch_two_workers_forwarding_typed_kwargs(tmp_path):
    result = subprocess.run([sys.executable, SCRIPT, f"--out_dir={tmp_path}"], env=_env(),
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in reports] == [0, 1]
    assert all(r["world_size"] == 2 for r in reports)
    assert reports[0]["values"]["token"] == reports[1]["values"]["token"]
    assert reports[0]["types"] == {"token": "str", "count": "int", "ratio": "float",
                                   "flag": "bool", "nothing": "NoneType", "items": "list",
                                   "text_number": "str"}
    assert reports[0]["values"]["items"] == [1, "a", 2.5]
    assert reports[0]["values"]["text_number"] == "42"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["module", "subprocess"])
def test_failing_rank_gives_nonzero_exit_and_its_message(tmp_path, mode):
    if mode == "module":
        env = {**_env(), "PYTHONPATH": os.pathsep.join([REPO, os.path.dirname(SCRIPT)])}
        cmd = [sys.executable, "-m", "toy_train", f"--out_dir={tmp_path}", "--fail_rank=1"]
    else:
        env = _env()
        cmd = [sys.executable, SCRIPT, f"--out_dir={tmp_path}", "--fail_rank=1", "--subprocess"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode != 0
    assert "worker rank 1 failed" in result.stderr, result.stderr[-3000:]
    assert "planned failure on rank 1" in result.stderr
    assert (tmp_path / "rank0.json").exists()
