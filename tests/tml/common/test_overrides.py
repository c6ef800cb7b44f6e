"""`--set a.b=c` and `--a.b=c` on every entry point, validated like the YAML; versions."""

from __future__ import annotations

import os

import pytest

from tml.errors import ConfigError


def test_dotted_flags_become_overrides_and_the_rest_stays():
    from tml.common.cli import split_dotted_overrides

    rest, overrides = split_dotted_overrides(
        ["--config_yaml_path=a.yaml", "--training.num_epochs=3", "--model.relations.0.operator",
         "diagonal", "--save_dir", "x.y", "--", "--not.this=1"])
    assert overrides == ["training.num_epochs=3", "model.relations.0.operator=diagonal"]
    assert rest == ["--config_yaml_path=a.yaml", "--save_dir", "x.y", "--", "--not.this=1"]
    with pytest.raises(ConfigError, match=r"^--training.seed: expected a value"):
        split_dotted_overrides(["--training.seed"])


def test_run_py_refuses_a_bad_override_before_any_worker_starts(small_trained_twhin, tmp_path,
                                                                  capsys):
    """run.py validates `--set` and `--a.b=c` like the YAML: an unknown key or a wrong
    type is one line naming the file and the key; nothing is written."""
    from projects.twhin.run import main

    config = small_trained_twhin["config"]
    save = tmp_path / "save"
    with pytest.raises(ConfigError, match=r"\(with --set\).*training.num_epoch\b"):
        main([f"--config_yaml_path={config}", f"--save_dir={save}",
              "--training.num_epoch=2"])
    with pytest.raises(ConfigError, match=r"\(with --set\).*training.num_epochs"):
        main([f"--config_yaml_path={config}", f"--save_dir={save}",
              "--set", "training.num_epochs=many"])
    assert not save.exists()


def test_twhin_takes_dotted_overrides_for_train_only(small_trained_twhin, tmp_path):
    from projects.twhin.cli import dispatch

    config = small_trained_twhin["config"]
    with pytest.raises(ConfigError, match=r"training.checkpoint_every_n"):
        dispatch(["train", "--config", config, "--save_dir", str(tmp_path / "s"),
                  "--training.checkpoint_every_n=0"])
    with pytest.raises(ConfigError, match=r"^twhin export: --training.seed: config overrides "
                       r"are for `twhin train` only$"):
        dispatch(["export", "--config", config, "--checkpoint", "x", "--out", "y",
                  "--training.seed=1"])


def test_versions(capsys):
    import tml
    from tml.launch.cli import main

    assert tml.__version__ == "0.1.0"
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == "tml 0.1.0"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_run_py_overrides_reach_the_workers(small_trained_twhin, tmp_path):
    """`--training.num_train_steps=3 --set training.checkpoint_every_n=3`: the workers
    (self-launched) train 3 steps, not the config's 10, and checkpoint at 3."""
    import subprocess
    import sys

    from tests.twhin_setup import REPO, launcher_env

    save = tmp_path / "save"
    done = subprocess.run(
        [sys.executable, small_trained_twhin["run_py"],
         f"--config_yaml_path={small_trained_twhin['config']}", f"--save_dir={save}",
         "--nproc_per_node=1", "--training.num_train_steps=3",
         "--set", "training.checkpoint_every_n=3"],
        env=launcher_env(), capture_output=True, text=True, timeout=240, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(n for n in os.listdir(save) if n.isdigit()) == ["3"]
