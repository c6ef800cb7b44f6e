"""The seams of the trainer: honest names (old ones still work, deprecated), the test
crash hook in its own module, the loop's state out of checkpointing, compatibility fields
that warn, early stopping refused without validation data, the evaluator's run records."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import warnings

import pytest
import torch
import yaml

from tests.twhin_setup import LOCAL, REPO, launcher_env
from tml.errors import ConfigError

# --- the crash hook -------------------------------------------------------------------------


def _run_hook(step: int, **env: str) -> int:
    """`maybe_crash(step)` in a forked child with `TML_TEST_CRASH_AT_STEP=3` and `env`; the
    child's exit status (negative: the signal that ended it). A fork, not a new interpreter:
    the hook reads the environment at the call, and the child needs no second torch import."""
    from tml.core.crash_hook import maybe_crash

    pid = os.fork()
    if pid == 0:   # the child: never back into pytest
        code = 1
        try:
            os.environ.pop("TORCHELASTIC_RESTART_COUNT", None)
            os.environ.update({"TML_TEST_CRASH_AT_STEP": "3", **env})
            maybe_crash(step)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_the_crash_hook_kills_at_its_step_on_the_first_attempt_only():
    """A real process: killed by SIGKILL at step 3, alive at another step and on a
    restarted attempt; and the loop's module holds none of it."""
    assert _run_hook(3) == -signal.SIGKILL
    assert _run_hook(2) == 0
    assert _run_hook(3, TORCHELASTIC_RESTART_COUNT="1") == 0
    import tml.core.custom_training_loop as ctl
    from tml.core.crash_hook import crash_rank

    assert (crash_rank(1), crash_rank(2), crash_rank(8)) == (0, 1, 1)
    source = open(ctl.__file__).read()
    assert "SIGKILL" not in source and "import signal" not in source
    assert "CRASH_AT_STEP_ENV" not in source
    assert ctl.maybe_crash.__module__ == "tml.core.crash_hook"


# --- the loop's state -----------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:To get the last learning rate")
def test_checkpointing_holds_no_loop_state_and_the_saved_names_are_unchanged(tmp_path):
    """TrainState / SchedulerState live with the loop (tml.core.loop_state); a checkpoint
    of them still has the names every earlier checkpoint has (train.step, ...), so those
    load; the old import path still works, with a DeprecationWarning."""
    import tml.common.checkpointing as checkpointing
    from tml.common.checkpointing import load_checkpoint, read_tensors, save_checkpoint
    from tml.core import loop_state

    assert not {"TrainState", "SchedulerState", "set_schedule_step",
                "EVALUATION_FILE"} & set(vars(checkpointing))
    with pytest.warns(DeprecationWarning, match="moved to tml.core.loop_state.TrainState"):
        assert checkpointing.TrainState is loop_state.TrainState

    param = torch.nn.Parameter(torch.zeros(1))
    scheduler = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([param], lr=1.0),
                                                  lambda step: 1.0 / (1 + step))
    state = loop_state.TrainState()
    state.step, state.batches_consumed, state.wall_time = 7, 9, 1.5
    loop_state.set_schedule_step(scheduler, 3)
    path = save_checkpoint(str(tmp_path), 7, {"train": state,
                                              "scheduler": loop_state.SchedulerState(scheduler)})
    assert sorted(read_tensors(path)) == ["scheduler.last_epoch", "train.batches_consumed",
                                          "train.step", "train.wall_time"]
    again = loop_state.TrainState()
    load_checkpoint(path, {"train": again})
    assert (again.step, again.batches_consumed, again.wall_time) == (7, 9, 1.5)


# --- renames ----------------------------------------------------------------------------------


def test_maybe_shard_model_is_a_deprecated_alias_with_the_originals_maybe():
    """`shard_model` always shards (and says it needs a process group); the original's
    `tml.model.maybe_shard_model` still works: it warns and, as the original, returns the
    model as it is without a process group."""
    import torch.distributed as dist

    from tml.common.sharding import shard_model
    from tml.model import maybe_shard_model

    assert not dist.is_initialized()
    model = torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="^shard_model needs an initialised process group"):
        shard_model(model, torch.device("cpu"))
    with pytest.warns(DeprecationWarning, match="use tml.common.sharding.shard_model"):
        assert maybe_shard_model(model, torch.device("cpu")) is model


def test_the_dense_optimizer_key_is_named_by_the_project():
    """tml's generic key says what it holds; TwHIN keeps the original's `operator_opt` (its
    checkpoints and run records use it), and so does the ranker (its checkpoints do)."""
    import inspect

    from projects.home.recap.optimizer.optimizer import ADAM_OPT_KEY
    from projects.twhin.optimizer import TRANSLATION_OPT_KEY
    from tml.optimizers.combined import DENSE_OPT_KEY, build_combined_optimizer
    from tml.trainer.project import ProjectParts

    assert DENSE_OPT_KEY == "dense_opt"
    assert ProjectParts.__dataclass_fields__["dense_optimizer_key"].default == DENSE_OPT_KEY
    assert TRANSLATION_OPT_KEY == ADAM_OPT_KEY == "operator_opt"
    parameter = inspect.signature(build_combined_optimizer).parameters["dense_key"]
    assert parameter.kind is inspect.Parameter.KEYWORD_ONLY
    assert parameter.default is inspect.Parameter.empty      # no silent default


def train_with_old_batch_keyword(root: str) -> dict:
    """In a worker: the loop with the original's `worker_batch_size` keyword."""
    from tests.checkpoint_checks import _build
    from tests.distributed_checks import _edges
    from tml.common.checkpointing import read_tensors
    from tml.core import custom_training_loop as ctl
    from tml.core.run_records import read_records

    model, optimizer, scheduler, config = _build("table_wise")
    batches = [_edges(i, config)[4] for i in range(4)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = ctl.train(model, optimizer, torch.device("cpu"), root, logging_interval=2,
                           train_steps=4, checkpoint_frequency=4, dataset=batches,
                           worker_batch_size=24, scheduler=scheduler, tensorboard=False)
    train = [r for r in read_records(root) if r["kind"] == "train"]
    return {"final_step": result.final_step,
            "deprecations": [str(w.message) for w in caught
                             if issubclass(w.category, DeprecationWarning)
                             and "worker_batch_size" in str(w.message)],
            "per_step": [r["examples_per_s"] / r["steps_per_s"] for r in train],
            "lr_keys": sorted(train[0]["lr"]),
            "saved_steps": int(read_tensors(os.path.join(root, "4"), "train.")["train.step"])}


@pytest.mark.slow
def test_the_loop_still_takes_worker_batch_size_as_the_global_batch(tmp_path):
    """`worker_batch_size` (the original's name; it always held the global batch) works,
    warns, and means global_batch_size: examples/s = steps/s x 24 on 1 worker. TwHIN's
    optimizer keeps its record names (fused_opt, operator_opt)."""
    from tml.common.run_training import launch_function

    out = launch_function(train_with_old_batch_keyword, 1, str(tmp_path / "run"))[0]
    assert out["final_step"] == 4
    assert len(out["deprecations"]) == 1 and "pass global_batch_size" in \
        out["deprecations"][0]
    assert out["per_step"] == pytest.approx([24.0, 24.0])
    assert out["lr_keys"] == ["fused_opt/0", "fused_opt/1", "operator_opt"]  # 2 table lrs
    assert out["saved_steps"] == 4


def test_the_loop_refuses_two_different_batch_sizes():
    from tml.core import custom_training_loop as ctl

    with pytest.warns(DeprecationWarning), pytest.raises(
            TypeError, match=r"global_batch_size=48 and worker_batch_size=24"):
        ctl.train(torch.nn.Linear(1, 1), None, torch.device("cpu"), "unused", 1, 1, 1, [],
                  global_batch_size=48, worker_batch_size=24)
    with pytest.raises(TypeError, match="missing required argument: 'global_batch_size'"):
        ctl.train(torch.nn.Linear(1, 1), None, torch.device("cpu"), "unused", 1, 1, 1, [])


# --- config: compatibility fields, early stopping -------------------------------------------


def _local_data() -> dict:
    return yaml.safe_load(open(LOCAL).read())


def test_compatibility_fields_say_so_and_warn_when_set(caplog):
    """Fields kept for the original's YAML that do nothing are marked in their description
    and warn, naming the field, when set to anything but their default."""
    from projects.home.recap.config import RecapConfig
    from projects.twhin.config import TwhinConfig
    from tml.core.config.compat import NO_EFFECT, has_no_effect, no_effect_settings
    from tml.core.config.config_load import parse_config

    marked = {f"{cls.__name__}.{name}" for cls in _config_classes(TwhinConfig)
              | _config_classes(RecapConfig) for name, info in cls.model_fields.items()
              if has_no_effect(info)}
    assert {"RuntimeConfig.enable_amp", "TrainingConfig.eval_timeout_in_s",
            "EmbeddingBagConfig.vocab", "TwhinEmbeddingsConfig.tables_to_log",
            "RecapConfig.which_metrics", "RecapDataConfig.cache"} <= marked
    for cls in _config_classes(TwhinConfig) | _config_classes(RecapConfig):
        for name, info in cls.model_fields.items():
            assert has_no_effect(info) == (info.description or "").startswith(NO_EFFECT), \
                (cls.__name__, name)

    data = _local_data()
    data["runtime"] = {"enable_amp": True}
    data["training"]["eval_timeout_in_s"] = 10
    data["model"]["embeddings"]["tables"][1]["vocab"] = "some/dir"
    caplog.set_level("WARNING")
    config = parse_config(TwhinConfig, data, source="my.yaml")
    assert no_effect_settings(config) == [("runtime.enable_amp", True),
                                          ("training.eval_timeout_in_s", 10.0),
                                          ("model.embeddings.tables.1.vocab", "some/dir")]
    assert "my.yaml: model.embeddings.tables.1.vocab is set ('some/dir') but has no " \
        "effect: it is accepted for compatibility with the-algorithm-ml" in caplog.text
    caplog.clear()
    data["runtime"] = {"enable_amp": False}           # the default: nothing to say
    del data["training"]["eval_timeout_in_s"]
    del data["model"]["embeddings"]["tables"][1]["vocab"]
    parse_config(TwhinConfig, data, source="my.yaml")
    assert "has no effect" not in caplog.text


def _config_classes(root: type) -> set[type]:
    from tml.core.config.base_config import BaseConfig
    from tml.core.config.reference import _config_types

    seen, queue = set(), [root]
    while queue:
        cls = queue.pop()
        if cls in seen:
            continue
        seen.add(cls)
        for info in cls.model_fields.values():
            queue += [t for t in _config_types(info.annotation) if issubclass(t, BaseConfig)]
    return seen


def test_early_stopping_without_validation_data_is_refused_when_the_config_is_read(
        tmp_path, capsys):
    """One line naming the fields, from the config check: before any worker starts."""
    from projects.twhin.config import TwhinConfig
    from projects.twhin.run import main
    from tml.common.cli import run_cli
    from tml.core.config.config_load import parse_config

    data = _local_data()
    data.pop("validation_data")
    data["training"]["early_stopping"] = {"metric": "auc"}
    with pytest.raises(ConfigError, match=r"^x.yaml: <top level>: training.early_stopping "
                       r"needs validation_data, which is not set \(set validation_data or "
                       r"remove training.early_stopping\)$"):
        parse_config(TwhinConfig, data, source="x.yaml")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(data))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main([f"--config_yaml_path={config}",
                              f"--save_dir={tmp_path / 'save'}"]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training.early_stopping needs validation_data" in err[0]
    assert not (tmp_path / "save").exists()


def test_recap_refuses_early_stopping_without_validation_sets(monkeypatch):
    from projects.home.recap.config import RecapConfig
    from tml.core.config.config_load import parse_config, read_config_data

    monkeypatch.setenv("HOME", "/home/u")
    monkeypatch.setenv("TML_BASE", "/src/tml")
    data = read_config_data(os.path.join(REPO, "tests", "data", "original_recap_local_prod.yaml"))
    parse_config(RecapConfig, data, source="r.yaml")          # loads as it is
    data["validation_data"] = {}
    data["training"]["early_stopping"] = {"metric": "auc"}
    with pytest.raises(ConfigError, match="^r.yaml: <top level>: training.early_stopping "
                       "needs validation_data, which is not set"):
        parse_config(RecapConfig, data, source="r.yaml")


# --- the evaluator's records ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_only_evaluate_appends_its_records_to_metrics_jsonl(small_trained_twhin, tmp_path):
    """`--only_evaluate` on a finished run evaluates checkpoints 5 and 10 and appends one
    `checkpoint_eval` record each (the checkpoint's training time, the metrics of its
    evaluation.json); the run's own records stay; `tml report` lists them apart."""
    from tml.common.checkpointing import read_tensors
    from tml.core.run_records import read_records
    from tml.core.run_report import summary_lines

    save = tmp_path / "save"
    shutil.copytree(small_trained_twhin["save"], save)
    before = read_records(str(save))
    done = subprocess.run(
        [sys.executable, small_trained_twhin["run_py"],
         f"--config_yaml_path={small_trained_twhin['config']}", f"--save_dir={save}",
         "--nproc_per_node=1", "--only_evaluate"],
        env=launcher_env(), capture_output=True, text=True, timeout=360, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_records(str(save))
    assert records[:len(before)] == before
    added = records[len(before):]
    assert [(r["kind"], r["step"], r["checkpoint"]) for r in added] == [
        ("checkpoint_eval", 5, "5"), ("checkpoint_eval", 10, "10")]
    for record in added:
        step = record["step"]
        evaluation = json.loads((save / str(step) / "evaluation.json").read_text())
        assert record["metrics"] == pytest.approx(evaluation["metrics"])
        wall = float(read_tensors(str(save / str(step)), "train.wall_time")["train.wall_time"])
        assert record["wall_time"] == pytest.approx(wall, abs=1e-3)
    lines = summary_lines(records)
    assert any(line.startswith("checkpoint evaluation") for line in lines)
    assert any(line.startswith("evaluation ") for line in lines)
