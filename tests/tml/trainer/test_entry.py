"""tml.trainer.entry: the command line every project's training script shares (flags,
overrides, save_dir, what the workers receive), on the tiny project's real config."""

from __future__ import annotations

import os

import pytest

from tests.data.tiny_project.config import TinyConfig
from tml.errors import ConfigError
from tml.trainer.entry import (
    load_worker_config,
    read_run_request,
    require_save_dir,
    run_summary,
    training_parser,
)

CONFIG = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "data",
                                      "tiny_project", "config", "local.yaml"))


@pytest.fixture(autouse=True)
def _data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TINY_DATA", str(tmp_path))   # the config's ${TINY_DATA}


def test_flags_overrides_and_dotted_flags_reach_the_config_and_the_workers(tmp_path):
    request = read_run_request(TinyConfig, [
        f"--config_yaml_path={CONFIG}", "--save_dir", "relative/save", "--nproc_per_node=2",
        "--set", "training.num_train_steps=7", "--training.seed=11"])
    assert request.config.training.num_train_steps == 7
    assert request.config.training.seed == 11
    assert request.save_dir == os.path.abspath("relative/save")
    assert request.nproc_per_node == 2 and "(with --set)" in request.source
    kwargs = request.worker_kwargs()
    assert kwargs == {"config_yaml_path": CONFIG, "save_dir": os.path.abspath("relative/save"),
                      "overrides": ["training.num_train_steps=7", "training.seed=11"]}
    # A worker reads back exactly the config the launcher checked.
    again = load_worker_config(TinyConfig, kwargs["config_yaml_path"], kwargs["overrides"])
    assert again == request.config


def test_only_evaluate_is_forwarded_in_the_form_workers_parse_back():
    request = read_run_request(TinyConfig, [f"--config_yaml_path={CONFIG}", "--save_dir=s",
                                            "--only_evaluate", "--evaluate_until_step=5"])
    kwargs = request.worker_kwargs()
    assert kwargs["only_evaluate"] is True and kwargs["evaluate_until_step"] == 5
    assert "overrides" not in kwargs
    # The launcher hands kwargs to self-launched workers as `--name=value` flags.
    again = training_parser().parse_args([f"--config_yaml_path={CONFIG}", "--save_dir=s",
                                          "--only_evaluate=True", "--evaluate_until_step=5",
                                          '--overrides=["training.seed=3"]'])
    assert again.only_evaluate is True and again.overrides == ["training.seed=3"]
    assert training_parser().parse_args([f"--config_yaml_path={CONFIG}",
                                         "--only_evaluate=false"]).only_evaluate is False


@pytest.mark.parametrize("argv, message", [
    (["--save-dir=x"], "unknown flag --save-dir (did you mean --save_dir?)"),
    (["--save_dir=x", '--overrides={"a": 1}'], "--overrides must be a JSON list"),
    (["--save_dir=x", "--overrides=[1]"], "--overrides must be a JSON list"),
    (["--save_dir=x", "--set", "training.no_such_field=1"], "no_such_field"),
    ([], "no save_dir: pass --save_dir or set training.save_dir"),
])
def test_each_mistake_is_one_line_naming_it(argv, message):
    with pytest.raises(ConfigError) as error:
        read_run_request(TinyConfig, [f"--config_yaml_path={CONFIG}", *argv])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_save_dir_from_the_config_when_no_flag():
    assert require_save_dir(None, "from/config", "x.yaml") == os.path.abspath("from/config")
    assert require_save_dir("flag", "from/config", "x.yaml") == os.path.abspath("flag")


def test_the_summary_names_the_last_evaluation():
    class Result:
        final_step, checkpoint, eval_metrics = 64, "/s/64", {"auc": 0.9}

    assert run_summary(Result()) == {"final_step": 64, "checkpoint": "/s/64",
                                     "eval_auc": 0.9}
