"""The original launch line with restarts, no tml launcher in between:

    torchrun --standalone --nproc_per_node 2 --max-restarts 1 projects/twhin/run.py ...

then `kill -9` of one worker after the first checkpoint. torch elastic restarts the group
with the agent's shared TCP store (no TORCH_DISABLE_SHARE_RDZV_TCP_STORE here), whose keys
from the first attempt used to send the restarted workers to dead peers; they must come up
under a store prefix of their own (tml.common.process_group), resume from the checkpoint and
finish. Every wait is bounded: a regression fails instead of hanging CI.
"""

import os
import signal
import subprocess
import sys

import pytest
import yaml

from tests.tml.common.test_launch_nodes import CLUSTER_VARS
from tests.twhin_setup import REPO, launcher_env, small_twhin_config

RUN = os.path.join(REPO, "projects", "twhin", "run.py")


def _run_bounded(cmd, env, timeout):
    """Run cmd in its own process group; on timeout kill the whole group (the workers too)."""
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output = proc.communicate()[0]
        pytest.fail(f"still running after {timeout} s (restarted workers hung?):\n"
                    f"{output[-4000:]}")
    return proc.returncode, output


@pytest.mark.slow
def test_plain_torchrun_restart_after_kill_9_resumes_from_the_checkpoint(tmp_path):
    from projects.twhin.data.generate import generate_graph

    generate_graph(str(tmp_path / "graph"), num_users=2000, num_tweets=500, num_edges=40_000,
                   num_communities=5, seed=1, validation_fraction=0.05)
    # Checkpoints written in the foreground: on a loaded host a background write of step 10
    # could still be in flight when rank 1 is killed at step 15, and the restart would
    # begin at step 0 (seen at load 8).
    config = small_twhin_config(tmp_path / "twhin.yaml", tmp_path / "graph", 2000, 500, 100,
                                num_train_steps=30, train_log_every_n=10, num_eval_steps=2,
                                eval_log_every_n=1000, checkpoint_every_n=10,
                                async_checkpoint=False)
    assert yaml.safe_load(open(config))["training"].get("max_restarts", 0) == 0
    save = tmp_path / "save"
    env = launcher_env(
        (*CLUSTER_VARS, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "TML_FORWARDED_KWARGS",
         "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_USE_AGENT_STORE"),
        # The test hook: rank 1 sends itself SIGKILL after step 15 (checkpoint 10 is
        # complete by then: written in the foreground), on the first attempt only.
        TML_TEST_CRASH_AT_STEP="15")
    code, output = _run_bounded(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
         "2", "--max-restarts", "1", RUN, f"--config_yaml_path={config}",
         f"--save_dir={save}"], env, timeout=420)
    assert "killing rank 1 at step 15 (test hook)" in output
    assert code == 0, output[-5000:]
    assert "restart 1: starting the process group under the store prefix" in output
    assert f"resumed from {save}/10 at step 10" in output
    assert "done: step 30" in output
    assert (save / "30").is_dir()


def test_store_prefix_only_on_restarts_with_the_agent_store(monkeypatch):
    from tml.common.process_group import restart_store_prefix

    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    assert restart_store_prefix() is None  # rank 0 hosts a fresh store on every attempt
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    assert restart_store_prefix() == "tml_attempt_2/default_pg"
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert restart_store_prefix() is None  # the first attempt: torch's own set-up
