"""Checkpoints: async and atomic, resharded on load, bad input, crash and resume, evaluator.

Multi-process checks run on real gloo workers (`launch_function`, torchrun); the functions
they run are in tests/checkpoint_checks.py.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from tests.launch_checks import launch_checks
from tests.twhin_setup import REPO, launcher_env, small_twhin_config
from tml.common.checkpointing import (
    TMP_PREFIX,
    Checkpointer,
    _ChecksumWriter,
    checkpoint_steps,
    latest_checkpoint,
    read_tensors,
    save_checkpoint,
)
from tml.core.loop_state import SchedulerState, TrainState

RUN = os.path.join(REPO, "projects", "twhin", "run.py")
LOCAL = os.path.join(REPO, "projects", "twhin", "config", "local.yaml")


@pytest.fixture(autouse=True)
def _importable_repo(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


def test_latest_checkpoint_ignores_incomplete_saves(tmp_path, caplog):
    for step in (10, 20, 30):
        save_checkpoint(str(tmp_path), step, {"model": torch.nn.Linear(2, 2)})
    for name in (f"{TMP_PREFIX}40", "notes", "45"):   # 45: a torn copy, no .metadata
        (tmp_path / name).mkdir()
    (tmp_path / "50").write_text("a file, not a checkpoint")
    assert checkpoint_steps(str(tmp_path)) == [10, 20, 30]
    assert f"skipping {tmp_path / '45'}: not a complete checkpoint" in caplog.text
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "30")
    assert latest_checkpoint(str(tmp_path / "missing")) is None


def test_async_staging_copies_each_tensor_once_and_the_save_holds_its_step(tmp_path):
    """An async save's staged state shares no memory with the live weights (changing them
    after `save` returns cannot reach the checkpoint), and the checkpoint holds them."""
    model = torch.nn.Linear(300, 200)
    state = {"model": model.state_dict(), "extra": {"step": torch.tensor(5)}}
    staged = _ChecksumWriter(str(tmp_path / "staged")).stage(state)
    for part, tensors in state.items():
        for name, value in tensors.items():
            assert torch.equal(staged[part][name], value), name
            assert staged[part][name].untyped_storage().data_ptr() != \
                value.untyped_storage().data_ptr(), name

    before = {name: value.clone() for name, value in model.state_dict().items()}
    checkpointer = Checkpointer(str(tmp_path / "save"), async_save=True)
    checkpointer.prepare()
    path = checkpointer.save(5, {"model": model})
    with torch.no_grad():  # in place, while the background thread may still be writing
        model.weight.add_(1.0)
        model.bias.zero_()
    assert checkpointer.wait() == path
    saved = read_tensors(path, "model.")
    assert sorted(saved) == sorted(f"model.{name}" for name in before)
    for name, value in before.items():
        assert torch.equal(saved[f"model.{name}"], value), name


def test_when_saved_follows_the_checkpoint_onto_disk(tmp_path):
    """A marker naming a checkpoint (early stopping's best.json) is written only once that
    checkpoint is complete: a process killed while a background save is in flight leaves
    the marker on the previous complete checkpoint, never on a missing one."""
    save = tmp_path / "save"
    checkpointer = Checkpointer(str(save), async_save=True)
    checkpointer.prepare()
    calls = []

    def mark(step):
        assert (save / str(step) / ".metadata").is_file()   # complete when called
        calls.append(step)

    checkpointer.save(5, {"model": torch.nn.Linear(300, 200)})
    checkpointer.when_saved(5, lambda: mark(5))
    assert calls == [] and not (save / "5").exists()   # in flight: not yet
    checkpointer.wait()
    assert calls == [5]
    checkpointer.when_saved(5, lambda: mark(5))        # already complete: at once
    assert calls == [5, 5]
    checkpointer.when_saved(7, lambda: mark(7))        # no such checkpoint: never
    checkpointer.save(8, {"model": torch.nn.Linear(2, 2)})
    checkpointer.wait()
    assert calls == [5, 5]


@pytest.mark.filterwarnings("ignore:To get the last learning rate")
def test_small_states_are_tensors_and_round_trip():
    state = TrainState()
    state.step, state.batches_consumed, state.wall_time = 7, 9, 12.5
    saved = state.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in saved.values())
    again = TrainState()
    again.load_state_dict(saved)
    assert (again.step, again.batches_consumed, again.wall_time) == (7, 9, 12.5)

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    SchedulerState(scheduler).load_state_dict({"last_epoch": torch.tensor(3)})
    assert scheduler.last_epoch == 3 and optimizer.param_groups[0]["lr"] == pytest.approx(0.25)


@pytest.mark.slow
def test_two_workers_async_atomic_reshard_retention_and_bad_input(tmp_path):
    from tests.checkpoint_checks import load_into_world, save_load_reshard_and_failures

    results = launch_checks(save_load_reshard_and_failures, 2, str(tmp_path))
    for rank, out in results.items():
        assert out["steps_kept"] == [3, 4], out  # retention keeps the newest 2
        assert out["async_snapshot_diff"] == 0.0, out  # the state of step 3, not later
        assert out["only_tensors"]
        for sharding_type in ("table_wise", "row_wise", "column_wise"):
            assert out[f"reshard_{sharding_type}_diff"] == 0.0, (sharding_type, out)
        assert out["adagrad_momentum_nonzero"] > 0
        assert out["adagrad_row_wise_momentum_diff"] == 0.0
        assert "cannot be resharded" in out["adagrad_column_wise_error"], out
        assert "column_wise" in out["adagrad_column_wise_error"]
        assert "'model.model.large_embeddings.ebc.embedding_bags.user.weight' has shape " \
               "[60, 8] but this model needs [70, 8]" in out["other_shapes_error"], out
        for name, victim in (("data", "__1_0.distcp"), ("metadata", ".metadata")):
            error = out[f"damaged_{name}_error"]   # the truncated file, named
            assert f"/damaged-{name}/4 is damaged: " in error and f"/{victim} has " in error, \
                out
        assert out["metadata_checked"] >= 8 and out["unverified"] == [], out
        assert {"__0_0.distcp", "__1_0.distcp"} <= set(out["data_files_seen"]), out
        assert "torch.distributed.checkpoint.metadata.Metadata" in out["metadata_globals"]
        for mode in ("async", "sync"):
            error = out[f"{mode}_write_failure_error"]
            assert error.startswith("saving checkpoint") and "File too large" in error \
                and "previous complete checkpoints are intact" in error, (mode, out)
            assert "\n" not in error
            assert out[f"{mode}_after_failure"] == ["3", "4"], out  # no .tmp-7 left
        assert out["latest_after_failures"].endswith("/save/4")
        assert out["loadable_after_failures"] == 0.0
        assert out["unwritable_error"].startswith("cannot write checkpoints to "), out
        assert out["latest_with_killed_save"].endswith("/save/4")
        assert out["after_cleanup"] == ["3", "4"]
        assert out["loop_final_step"] == 6 and out["loop_steps"] == [2, 4, 6], out
        assert out["loop_train_state"]["step"] == 6
        assert out["loop_train_state"]["batches_consumed"] == 6
        assert out["loop_train_state"]["last_epoch"] == 6
        assert out["loop_train_state"]["wall_time"] > 0
        assert out["loop_final_diff"] == 0.0
        assert out["warm_start_step"] == 0 and out["warm_resumed_from"] is None
        assert out["warm_weights_diff"] == 0.0, (rank, out)

    saved = str(tmp_path / "save" / "4")
    one = launch_checks(load_into_world, 1, saved, "table_wise")
    assert one[0] == {"world_size": 1, "diff": 0.0}
    four = launch_checks(load_into_world, 4, saved, "row_wise")
    assert sorted(four) == [0, 1, 2, 3]
    assert all(r == {"world_size": 4, "diff": 0.0} for r in four.values()), four


# --- crash and resume with torch elastic, and the evaluator -----------------------------

def _env(**extra):
    return launcher_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", **extra)


def _twhin_config(tmp_path, graph, **training):
    return small_twhin_config(
        tmp_path / "twhin.yaml", graph, 600, 200, 100,
        **{"train_log_every_n": 10, "eval_log_every_n": 100000, "num_eval_steps": 2,
           "num_epochs": 1, "num_train_steps": 30, "checkpoint_every_n": 10, **training})


def _torchrun(config, save_dir, *extra, env=None, max_restarts=0, background=False):
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", "2", "--max-restarts", str(max_restarts), RUN,
            f"--config_yaml_path={config}", f"--save_dir={save_dir}", *extra]
    if background:
        return subprocess.Popen(args, env=env or _env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, cwd=REPO)
    return subprocess.run(args, env=env or _env(), capture_output=True, text=True,
                          timeout=240, cwd=REPO)


@pytest.mark.slow
def test_evaluator_alongside_training_and_killed_worker_resumes_to_same_weights(tmp_path):
    from projects.twhin.data.generate import generate_graph
    from tml.common.checkpointing import read_tensors

    graph = tmp_path / "graph"
    generate_graph(str(graph), num_users=600, num_tweets=200, num_edges=8000,
                   num_communities=4, seed=1, validation_fraction=0.05)
    config = _twhin_config(tmp_path, graph)

    # The reference run, with an evaluator following its save_dir alongside.
    reference = tmp_path / "reference"
    evaluator = _torchrun(config, reference, "--only_evaluate", background=True)
    try:
        result = _torchrun(config, reference)
        assert result.returncode == 0, result.stderr[-4000:]
        assert checkpoint_steps(str(reference)) == [10, 20, 30]
        _, evaluator_log = evaluator.communicate(timeout=120)
    finally:
        if evaluator.poll() is None:
            evaluator.kill()
            evaluator.communicate()
    assert evaluator.returncode == 0, evaluator_log[-4000:]
    for step in (10, 20, 30):  # every complete checkpoint once, then it stopped
        evaluation = json.loads((reference / str(step) / "evaluation.json").read_text())
        assert evaluation["step"] == step and 0.0 <= evaluation["metrics"]["auc"] <= 1.0
    assert evaluator_log.count("evaluated checkpoint") == 3, evaluator_log[-4000:]

    crashed = tmp_path / "crashed"
    result = _torchrun(config, crashed, env=_env(TML_TEST_CRASH_AT_STEP="25"), max_restarts=1)
    log = result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "killing rank 1 at step 25 (test hook)" in log
    # The save at step 20 is asynchronous: whether it completed before the kill 5 steps
    # later is a race; resuming from either complete checkpoint is right.
    resumed = re.findall(r"resumed from \S+/(\d+) at step (\d+)", log)
    assert len(resumed) == 1 and resumed[0][0] == resumed[0][1] in ("10", "20"), log[-4000:]
    assert checkpoint_steps(str(crashed)) == [10, 20, 30]
    assert not [n for n in os.listdir(crashed) if n.startswith(TMP_PREFIX)]

    ours = read_tensors(str(crashed / "30"))
    theirs = read_tensors(str(reference / "30"))
    assert sorted(ours) == sorted(theirs)
    assert int(ours["train.step"]) == 30 and int(ours["train.batches_consumed"]) == 30
    for key, value in theirs.items():
        if key != "train.wall_time":
            torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-6, msg=key)
