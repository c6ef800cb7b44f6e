"""maybe_run_training, launched for real: 2 worker processes through torch elastic."""

import json
import os
import subprocess
import sys

import pytest

from tests.twhin_setup import REPO, launcher_env
from tml.common.cluster_env import expand_slurm_nodelist, resolve_node_setup
from tml.common.run_training import (
    FORWARDED_KWARGS_ENV,
    args_to_kwargs,
    build_torchrun_args,
    check_kwargs_fit,
    encode_kwarg,
    entrypoint_args,
    is_distributed_worker,
    kwargs_to_args,
    maybe_run_training,
    training_failed_error,
)
from tml.errors import TmlError

SCRIPT = os.path.join(REPO, "tests", "scripts", "toy_train.py")
ODD_KWARGS = os.path.join(REPO, "tests", "scripts", "odd_kwargs.py")
TORCHRUN_LIKE = ["n", "d", "e", "nnodes", "standalone", "node_rank", "m", "nproc"]


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


def test_kwargs_named_like_torchrun_options_parse_back_exactly():
    """torchrun's argparse would read `--n=1` as --nnodes / --nproc_per_node; the launcher
    puts `--` before the script, and the worker side matches keys exactly."""
    import torch.distributed.run as torchrun

    kwargs = {"n": 1, "d": "--nnodes=9", "e": [1], "nnodes": 7, "standalone": False,
              "node_rank": "-m", "m": "x.py", "nproc_per_node": 5}
    script_args = kwargs_to_args(kwargs)
    for entrypoint in (["x.py"], ["-m", "pkg.mod"]):
        argv = build_torchrun_args(entrypoint, script_args, 2, resolve_node_setup(num_nodes=1))
        parsed = torchrun.get_args_parser().parse_args(argv)
        assert (parsed.nnodes, parsed.nproc_per_node, parsed.standalone) == ("1", "2", True)
        assert parsed.training_script == entrypoint[-1]
        assert parsed.module == (entrypoint[0] == "-m")
        assert parsed.training_script_args == script_args
        assert args_to_kwargs(parsed.training_script_args, list(kwargs), strict=True) == kwargs


def test_worker_side_rejects_flags_the_launcher_did_not_forward():
    keys = ["steps", "n"]
    assert args_to_kwargs(["--steps=3", "--n=1"], keys, strict=True) == {"steps": 3, "n": 1}
    with pytest.raises(TmlError, match=r"--nnodes is not a training kwarg the launcher "
                                       r"forwarded \(TML_FORWARDED_KWARGS lists \['n', 'steps'\]"):
        args_to_kwargs(["--steps=3", "--n=1", "--nnodes=2"], keys, strict=True)
    with pytest.raises(TmlError, match="'stray' is not a training kwarg"):
        args_to_kwargs(["--steps=3", "stray", "--n=1"], keys, strict=True)
    with pytest.raises(TmlError, match="--steps is given twice"):
        args_to_kwargs(["--steps=3", "--steps=4", "--n=1"], keys, strict=True)
    with pytest.raises(TmlError, match=r"kwarg\(s\) \['n'\] named in TML_FORWARDED_KWARGS "
                                       "are missing"):
        args_to_kwargs(["--steps=3"], keys, strict=True)
    # Not strict (a plain torchrun worker of a script): other arguments are the script's.
    assert args_to_kwargs(["--steps=3", "--nnodes=2", "x"], keys) == {"steps": 3}


def _two_args(a, b=1):
    return a, b


def test_kwargs_that_do_not_fit_the_training_function_fail_in_the_launcher(tmp_path):
    check_kwargs_fit(_two_args, {"a": 1})
    with pytest.raises(TmlError, match=r"training kwargs do not fit _two_args\(a, b=1\): "
                                       "got an unexpected keyword argument 'c'"):
        check_kwargs_fit(_two_args, {"a": 1, "c": 2})
    with pytest.raises(TmlError, match="missing a required argument: 'a'"):
        check_kwargs_fit(_two_args, {"b": 2})
    # Before anything starts: no worker, no temporary directory.
    with pytest.raises(TmlError, match="unexpected keyword argument 'n'"):
        maybe_run_training(_two_args, SCRIPT, nproc_per_node=1, a=1, n=2)


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
    assert args == ["--nnodes", "1", "--nproc_per_node", "2", "--standalone", "--", "x.py",
                    "--a=1"]
    with pytest.raises(Exception, match="2 nodes need a rendezvous endpoint"):
        resolve_node_setup(num_nodes=2)
    monkeypatch.setenv("TML_RDZV_ENDPOINT", "node0:29400")
    args = build_torchrun_args(["x.py"], [], 2, resolve_node_setup(2, is_chief=True),
                               max_restarts=1)
    assert args[:9] == ["--nnodes", "2", "--nproc_per_node", "2", "--rdzv_backend", "c10d",
                        "--rdzv_endpoint", "localhost:29400", "--rdzv_id"]
    assert args[-4:] == ["--max_restarts", "1", "--", "x.py"]
    module = build_torchrun_args(["-m", "pkg.mod"], ["--n=1"], 1, resolve_node_setup())
    assert module[-4:] == ["-m", "--", "pkg.mod", "--n=1"]
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


@pytest.mark.slow
def test_kwargs_named_like_torchrun_options_reach_the_workers(tmp_path):
    result = subprocess.run([sys.executable, ODD_KWARGS, f"--out_dir={tmp_path}"], env=_env(),
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in reports] == [2, 2]  # torchrun's own options unchanged
    expected = {"n": 1, "d": "--nnodes=9", "e": [1, 2], "nnodes": 7, "standalone": False,
                "node_rank": "-m", "m": "x.py", "nproc": 3, "rdzv_endpoint_": "h:1"}
    assert all(r["values"] == expected for r in reports)
    assert set(TORCHRUN_LIKE) <= set(expected)


@pytest.mark.slow
def test_a_worker_refuses_a_flag_that_was_not_forwarded(tmp_path):
    """A worker told (TML_FORWARDED_KWARGS) that its argv holds the launcher's kwargs stops
    with one line on anything else, instead of training without it."""
    env = {**_env(), FORWARDED_KWARGS_ENV: json.dumps(["out_dir", "count"])}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
         "1", "--", SCRIPT, f"--out_dir={tmp_path}", "--count=3", "--cont=4"],
        env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode != 0
    assert ("TmlError: worker command line: --cont is not a training kwarg the launcher "
            "forwarded (TML_FORWARDED_KWARGS lists ['count', 'out_dir'])") in result.stderr
    assert not (tmp_path / "rank0.json").exists()


def _square(x):
    return x * x


@pytest.mark.slow
def test_launch_function_leaves_no_temp_dirs(tmp_path, monkeypatch):
    """torch elastic's default log dir (a torchelastic_* dir) was never removed."""
    import tempfile

    from tml.common.run_training import launch_function

    private = tmp_path / "tmp"
    private.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    assert launch_function(_square, 1, 3) == {0: 9}
    assert os.listdir(private) == []


ONE_WORKER = """
import os

from tml.common.run_training import maybe_run_training


def work(tag):
    import torch
    import torch.distributed as dist

    from tml.common.device import setup_and_get_device

    setup_and_get_device()
    value = torch.ones(1)
    dist.all_reduce(value)
    print("worker", os.getpid(), os.environ["RANK"], dist.get_world_size(), value.item(),
          torch.get_num_threads(), tag, flush=True)
    return tag


if __name__ == "__main__":
    print("launcher", os.getpid(), flush=True)
    restarts = int(os.environ["ONE_WORKER_RESTARTS"])   # workers run this file again
    print("returned", maybe_run_training(work, __name__, nproc_per_node=1,
                                         max_restarts=restarts, tag="t"), flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("restarts,switch,here", [(0, None, True), (0, "0", False),
                                                  (1, None, False)])
def test_one_worker_without_restarts_trains_in_the_launchers_process(tmp_path, restarts,
                                                                     switch, here):
    """One worker, one node, nothing to restart: no torchrun, no second interpreter; the
    worker sees rank 0 of 1, a working process group and torchrun's thread count, and the
    launcher returns its result. TML_ONE_WORKER_IN_PROCESS=0 or restarts launch it."""
    script = tmp_path / "one_worker.py"
    script.write_text(ONE_WORKER)
    env = {k: v for k, v in _env().items() if k != "OMP_NUM_THREADS"}
    env["ONE_WORKER_RESTARTS"] = str(restarts)
    if switch is not None:
        env["TML_ONE_WORKER_IN_PROCESS"] = switch
    result = subprocess.run([sys.executable, str(script)], env=env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    lines: dict[str, list[str]] = {}
    for line in result.stdout.splitlines():   # a torchrun worker runs the file again
        key, value = line.split(" ", 1)
        lines.setdefault(key, []).append(value)
    launcher = lines["launcher"][0]
    pid, rank, world, total, threads, tag = lines["worker"][0].split()
    assert (rank, world, total, tag) == ("0", "1", "1.0", "t")
    assert threads == str(max(1, len(os.sched_getaffinity(0)) // 2))
    assert (pid == launcher) is here
    assert lines["returned"][-1] == ("t" if here else "None")   # the launcher's
    assert ("in this process (no restarts, no readers" in result.stderr) is here
