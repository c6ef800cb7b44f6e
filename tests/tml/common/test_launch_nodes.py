"""maybe_run_training on several nodes (two agents on 127.0.0.1) and with restarts."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import yaml

from tests.twhin_setup import REPO, launcher_env, small_twhin_config

SCRIPTS = os.path.join(REPO, "tests", "scripts")
LOCAL = os.path.join(REPO, "projects", "twhin", "config", "local.yaml")
CLUSTER_VARS = ("TML_NUM_NODES", "TML_RDZV_ENDPOINT", "TML_RUN_ID", "TML_IS_CHIEF",
                "TML_RDZV_PORT", "TML_MACHINES_FILE", "TML_MAX_RESTARTS", "SLURM_JOB_NUM_NODES",
                "SLURM_NNODES", "SLURM_NODEID", "SLURM_JOB_NODELIST", "SLURM_JOB_ID",
                "RANK", "WORLD_SIZE", "LOCAL_RANK")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    return launcher_env(CLUSTER_VARS, **{"TML_RDZV_TIMEOUT": "120", **extra})


def _wait_listening(port, timeout=60.0, process=None):
    """Wait for the chief's store on `port`; fail (with the chief's output) on timeout or
    when the chief exits first, rather than starting the other nodes against nothing."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if process is not None and process.poll() is not None:
            pytest.fail(f"the chief exited ({process.returncode}) before listening on port "
                        f"{port}:\n{process.communicate()[0][-3000:]}")
        time.sleep(0.2)
    if process is not None:
        process.kill()
    pytest.fail(f"nothing listened on port {port} within {timeout:.0f} s")


def test_waiting_for_the_chief_fails_on_timeout_or_when_it_exits_first():
    with pytest.raises(pytest.fail.Exception, match="nothing listened on port"):
        _wait_listening(_free_port(), timeout=0.5)
    chief = subprocess.Popen([sys.executable, "-c", "print('chief: bad config')"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with pytest.raises(pytest.fail.Exception, match=r"(?s)exited \(0\).*chief: bad config"):
        _wait_listening(_free_port(), timeout=30, process=chief)


def _start_nodes(cmd, envs, port):
    """Start the chief (first env), wait for its rendezvous store, then the other nodes.

    On one host every agent could bind the endpoint; the chief must be the one that does.
    """
    procs = [subprocess.Popen(cmd, env=envs[0], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)]
    _wait_listening(port, process=procs[0])
    procs += [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True) for env in envs[1:]]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    return [p.returncode for p in procs], outputs


def _reports(out_dir, world):
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def tiny_graph_config(tmp_path_factory):
    from projects.twhin.data.generate import generate_graph

    root = tmp_path_factory.mktemp("nodes")
    generate_graph(str(root / "graph"), num_users=2000, num_tweets=500, num_edges=40_000,
                   num_communities=5, seed=1, validation_fraction=0.05)
    return small_twhin_config(root / "twhin.yaml", root / "graph", 2000, 500, 100,
                              num_train_steps=30, train_log_every_n=10, num_eval_steps=2,
                              eval_log_every_n=1000)


@pytest.mark.slow
def test_two_nodes_of_two_workers_train_twhin_over_c10d(tmp_path, tiny_graph_config):
    port = _free_port()
    common = dict(TML_NUM_NODES="2", TML_RDZV_ENDPOINT=f"127.0.0.1:{port}", TML_RUN_ID="job1")
    cmd = [sys.executable, os.path.join(SCRIPTS, "multinode_twhin.py"), f"--out_dir={tmp_path}",
           f"--config_yaml_path={tiny_graph_config}", f"--save_dir={tmp_path / 'save'}"]
    codes, outputs = _start_nodes(cmd, [_env(**common, TML_IS_CHIEF="1"), _env(**common)], port)
    assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    reports = _reports(tmp_path, 4)
    assert [r["rank"] for r in reports] == [0, 1, 2, 3]
    assert {r["world_size"] for r in reports} == {4}
    assert sorted(r["group_rank"] for r in reports) == [0, 0, 1, 1]
    assert {r["final_step"] for r in reports} == {30}
    assert (tmp_path / "save" / "30").is_dir()


@pytest.mark.slow
def test_slurm_environment_drives_the_rendezvous(tmp_path):
    port = _free_port()
    common = dict(SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="127.0.0.1", SLURM_JOB_ID="4242",
                  TML_RDZV_PORT=str(port))
    cmd = [sys.executable, os.path.join(SCRIPTS, "toy_train.py"), f"--out_dir={tmp_path}",
           "--nproc=1"]
    codes, outputs = _start_nodes(cmd, [_env(**common, SLURM_NODEID="0"),
                                        _env(**common, SLURM_NODEID="1")], port)
    assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    reports = _reports(tmp_path, 2)
    assert {r["world_size"] for r in reports} == {2}
    assert reports[0]["values"]["token"] != ""
    assert "(SLURM_JOB_NUM_NODES)" in outputs[0]


@pytest.mark.slow
def test_a_worker_that_crashes_once_is_restarted(tmp_path):
    cmd = [sys.executable, os.path.join(SCRIPTS, "toy_train.py"), f"--out_dir={tmp_path}",
           "--crash_once_rank=1", "--max_restarts=1"]
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = _reports(tmp_path, 2)
    assert [r["restart_count"] for r in reports] == [1, 1]

    again = subprocess.run(cmd[:-1] + ["--max_restarts=0"], env=_env(), capture_output=True,
                           text=True, timeout=240)
    assert again.returncode != 0
    assert "worker rank 1 failed (exit code 3)" in again.stderr


@pytest.mark.slow
def test_busy_rendezvous_port_and_missing_nodes_fail_clearly(tmp_path):
    busy = socket.socket()
    busy.bind(("0.0.0.0", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    cmd = [sys.executable, os.path.join(SCRIPTS, "toy_train.py"), f"--out_dir={tmp_path}",
           "--nproc=1"]
    chief = dict(TML_NUM_NODES="2", TML_IS_CHIEF="1", TML_RDZV_TIMEOUT="5")
    try:
        result = subprocess.run(cmd, env=_env(**chief, TML_RDZV_ENDPOINT=f"127.0.0.1:{port}"),
                                capture_output=True, text=True, timeout=120)
    finally:
        busy.close()
    assert result.returncode != 0
    assert f"the rendezvous port {port} (127.0.0.1:{port}) is already in use" in result.stderr

    result = subprocess.run(cmd, env=_env(**chief, TML_RDZV_ENDPOINT=f"127.0.0.1:{_free_port()}"),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "not all 2 nodes joined the rendezvous" in result.stderr
    assert "within 5 s" in result.stderr


@pytest.mark.slow
def test_max_restarts_from_the_config_survives_a_killed_worker(tmp_path, tiny_graph_config):
    data = yaml.safe_load(open(tiny_graph_config))
    # Checkpoints written in the foreground: on a loaded host a background write of step 10
    # could still be in flight when the worker is killed at step 15, and the restart would
    # begin at step 0 with no "resumed from" (seen at load 5-8).
    data["training"].update(max_restarts=1, checkpoint_every_n=10, async_checkpoint=False)
    config = tmp_path / "restarts.yaml"
    config.write_text(yaml.safe_dump(data))
    run = os.path.join(REPO, "projects", "twhin", "run.py")
    result = subprocess.run(
        [sys.executable, run, f"--config_yaml_path={config}", f"--save_dir={tmp_path / 'save'}",
         "--nproc_per_node=2"],
        env=_env(TML_TEST_CRASH_AT_STEP="15"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr
    assert (tmp_path / "save" / "30").is_dir()
