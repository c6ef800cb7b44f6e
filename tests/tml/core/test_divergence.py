"""A run whose loss turns non-finite stops with one line naming the step, before any
checkpoint of non-finite values is written; the earlier (finite) checkpoints stay."""

import math
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml

from tests.twhin_setup import REPO, launcher_env, small_twhin_config
from tml.common.checkpointing import read_tensors
from tml.core.custom_training_loop import TrainingDivergedError, _check_finite

RUN = os.path.join(REPO, "projects", "twhin", "run.py")


def test_check_names_the_first_non_finite_step():
    cpu = torch.device("cpu")
    _check_finite([], 1, 0, cpu)                         # nothing seen yet: fine
    _check_finite([torch.tensor(0.7), torch.tensor(0.6)], 1, 2, cpu)
    losses = [torch.tensor(x) for x in (0.7, 0.6, math.nan, 0.5, math.inf)]
    with pytest.raises(TrainingDivergedError) as error:
        _check_finite(losses, 11, 15, cpu, last_checkpoint="/s/10")
    assert str(error.value) == (
        "training diverged: the loss became non-finite (nan or inf) at step 13; stopped at "
        "step 15 without saving it (the last checkpoint is /s/10); lower the learning rate or "
        "check the edge weights")


def test_check_looks_at_the_state_to_be_saved():
    cpu = torch.device("cpu")
    state = {"model": {"w": torch.ones(3), "ids": torch.arange(3)},
             "optim": {"state": [torch.zeros(2)]}}
    _check_finite([torch.tensor(0.5)], 1, 1, cpu, state)          # all finite
    state["optim"]["state"][0][1] = -math.inf
    with pytest.raises(TrainingDivergedError) as error:
        _check_finite([torch.tensor(0.5)], 1, 1, cpu, state)
    assert str(error.value) == (
        "training diverged: the weights or optimizer state became non-finite by step 1 (the "
        "loss was still finite); stopped without saving them (no checkpoint was written); "
        "lower the learning rate or check the edge weights")


@pytest.mark.slow
def test_diverging_run_stops_before_saving_non_finite_weights(tmp_path):
    from projects.twhin.data.generate import generate_graph

    graph = tmp_path / "graph"
    generate_graph(str(graph), num_users=300, num_tweets=60, num_edges=6000,
                   num_communities=4, seed=3, validation_fraction=0.05)
    config = small_twhin_config(tmp_path / "c.yaml", graph, 300, 60, 20, train_log_every_n=5,
                                checkpoint_every_n=10, eval_log_every_n=100000,
                                num_eval_steps=2, num_epochs=1, async_checkpoint=True)
    data = yaml.safe_load(open(config))
    for table in data["model"]["embeddings"]["tables"]:
        # A schedule mistake: the learning rate jumps to 1e38 after step 22.
        table["optimizer"]["learning_rate"] = {"piecewise_constant": {
            "learning_rate_boundaries": [22], "learning_rate_values": [0.5, 1e38]}}
    open(config, "w").write(yaml.safe_dump(data))
    save = tmp_path / "save"
    done = subprocess.run([sys.executable, RUN, f"--config_yaml_path={config}",
                           f"--save_dir={save}", "--nproc_per_node=2"], env=launcher_env(),
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    match = re.search(r"the loss became non-finite \(nan or inf\) at step (\d+); stopped at "
                      r"step (\d+) without saving it \(the last checkpoint is (\S+)\)", last)
    assert last.startswith("error: worker rank ") and match, done.stderr[-3000:]
    bad, stopped = int(match.group(1)), int(match.group(2))
    assert 22 < bad <= stopped and stopped in (25, 30)
    assert match.group(3) == str(save / "20")
    assert "Traceback" not in done.stderr
    assert sorted(n for n in os.listdir(save) if n.isdigit()) == ["10", "20"]
    assert not [n for n in os.listdir(save) if n.startswith(".tmp")]
    for step in ("10", "20"):
        tensors = read_tensors(str(save / step))
        floats = [t for t in tensors.values() if t.is_floating_point()]
        assert floats and all(torch.isfinite(t).all() for t in floats), step
