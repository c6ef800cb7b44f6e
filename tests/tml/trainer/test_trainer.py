"""tml.trainer: the layering rule, max_restarts from every entry point, the fused tables."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
import yaml

from tests.twhin_setup import REPO, launcher_env
from tml.errors import ConfigError


def test_tml_never_imports_projects():
    """The layering rule: tml is a library; projects compose it. Checked on the syntax tree
    of every module under tml/ (imports inside functions count too)."""
    offenders = []
    for base, _, files in os.walk(os.path.join(REPO, "tml")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(base, name)
            for node in ast.walk(ast.parse(open(path).read(), path)):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                offenders += [f"{os.path.relpath(path, REPO)}: {m}" for m in modules
                              if m == "projects" or m.startswith("projects.")]
    assert offenders == []


def _workflow(tmp_path, config_training: dict | None, **fields):
    from tml.launch.workflow import Workflow

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"training": config_training or {}}))
    return Workflow(name="w", file="run.py", working_dir=str(tmp_path),
                    args=["--config_yaml_path", "config.yaml", "--save_dir=x"], **fields)


def test_tml_launch_takes_max_restarts_from_the_config_or_the_workflow(tmp_path, monkeypatch):
    """`tml launch` used to hard-code --max_restarts 0; now: workflow field, else the
    config's training.max_restarts, else TML_MAX_RESTARTS; restarts get the store switch."""
    from tml.launch.common import max_restarts_of, torchrun_args, workflow_environment
    from tml.launch.workflow import LaunchError

    monkeypatch.delenv("TML_MAX_RESTARTS", raising=False)

    def restarts(workflow) -> str:
        args = torchrun_args(workflow, "h:1", "id", "1")
        return args[args.index("--max_restarts") + 1]

    assert restarts(_workflow(tmp_path, {"max_restarts": 2})) == "2"
    assert workflow_environment(_workflow(tmp_path, {"max_restarts": 2}))[
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert restarts(_workflow(tmp_path, {"max_restarts": 2}, max_restarts=0)) == "0"
    assert restarts(_workflow(tmp_path, {})) == "0"
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in workflow_environment(
        _workflow(tmp_path, {}))
    overridden = _workflow(tmp_path, {"max_restarts": 2})
    overridden.args += ["--training.max_restarts=4"]
    assert restarts(overridden) == "4"
    overridden.args += ["--set", "training.max_restarts=5"]
    assert restarts(overridden) == "5"
    monkeypatch.setenv("TML_MAX_RESTARTS", "3")
    assert restarts(_workflow(tmp_path, {})) == "3"
    with pytest.raises(LaunchError, match=r"config.yaml: training.max_restarts must be a "
                       r"non-negative integer, got -1"):
        max_restarts_of(_workflow(tmp_path, {"max_restarts": -1}))


def test_fused_table_set_up_refuses_momentum_naming_the_table():
    from tml.common.modules.embedding.config import EmbeddingBagConfig, LargeEmbeddingsConfig
    from tml.common.modules.embedding.embedding import LargeEmbeddings
    from tml.trainer.fused_tables import apply_table_optimizers, table_of_param

    table = EmbeddingBagConfig(name="item", num_embeddings=4, embedding_dim=4,
                               optimizer={"sgd": {"lr": 0.1, "momentum": 0.9}})
    model = LargeEmbeddings(LargeEmbeddingsConfig(tables=[table]))
    with pytest.raises(ConfigError, match=r"^my.tables 'item': sgd momentum is not supported"):
        apply_table_optimizers(model, [table], "my.tables")
    assert table_of_param("module.model.ebc.embedding_bags.item.weight") == "item"
    assert table_of_param("model.all_trans_embs") is None


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_twhin_train_honours_max_restarts(small_trained_twhin, tmp_path):
    """`twhin train` ignored training.max_restarts; now a worker killed at step 7 (a
    1-worker run, checkpoint at 5) is restarted from step 5 and the run completes."""
    save = tmp_path / "save"
    done = subprocess.run(
        [sys.executable, "-m", "projects.twhin", "train", "--config",
         small_trained_twhin["config"], "--save_dir", str(save), "--nproc_per_node", "1",
         "--set", "training.max_restarts=1", "--set", "training.async_checkpoint=false"],
        env=launcher_env(TML_TEST_CRASH_AT_STEP="7"), capture_output=True, text=True,
        timeout=360, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "killing rank 0 at step 7" in done.stderr
    assert "at step 5" in done.stderr and "resumed from" in done.stderr
    assert (save / "10").is_dir()
    assert "examples/s, ETA " in done.stderr      # no terminal: the log line has an ETA
