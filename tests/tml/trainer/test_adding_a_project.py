"""docs/adding_a_project.md, followed: a tiny project made step by step from the doc
(tests/data/tiny_project: the doc's layout, config, data, model, parts and entry point;
the model and dataset, which the doc leaves to the reader, filled in) trains through
`tml.trainer` with 2 real workers, as a user would start it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.twhin_setup import REPO, launcher_env
from tml.errors import DataError

PROJECT = os.path.join(REPO, "tests", "data", "tiny_project")
CONFIG = os.path.join(PROJECT, "config", "local.yaml")


def _data_config(path: str, batch: int = 32):  # noqa: ANN202
    from tests.data.tiny_project.data.config import TinyDataConfig

    return TinyDataConfig(path=path, per_replica_batch_size=batch)


def test_the_tiny_config_loads_and_the_shares_are_equal_and_resumable(tmp_path, monkeypatch):
    from tests.data.tiny_project.config import TinyConfig
    from tests.data.tiny_project.data.dataset import PairDataset
    from tests.data.tiny_project.data.generate import generate
    from tml.core.config import load_config_from_yaml

    generate(str(tmp_path), rows=1000)
    monkeypatch.setenv("TINY_DATA", str(tmp_path))
    config = load_config_from_yaml(TinyConfig, CONFIG)
    assert config.train_data.path == f"{tmp_path}/train.parquet"
    rows = {"user": 64, "item": 32}
    shares = [PairDataset(config.train_data, rows, rank, 3) for rank in range(3)]
    assert [len(share) for share in shares] == [1000 // 3 // 32] * 3
    seen = [[batch.features["user"].values().tolist() for batch in share] for share in shares]
    assert all(len(s) == 10 for s in seen)
    # A resumed dataset starts at the saved position, not at the start.
    resumed = PairDataset(config.train_data, rows, 1, 3)
    resumed.load_state_dict({"epoch": 0, "batch": 4})
    assert [b.features["user"].values().tolist() for b in resumed] == seen[1][4:]


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.drop(["label"]), "no column 'label'"),
    (lambda t: t.set_column(1, "item", pa.array([5] * 9 + [32] + [0] * (t.num_rows - 10))),
     "row 10: item id 32 is outside the table's 32 rows"),
    (lambda t: t.set_column(2, "label", pa.array([1, 0, 2] + [0] * (t.num_rows - 3))),
     "row 3: label is not 0 or 1"),
])
def test_bad_rows_are_named(tmp_path, edit, message):
    from tests.data.tiny_project.data.dataset import PairDataset
    from tests.data.tiny_project.data.generate import pairs

    path = str(tmp_path / "bad.parquet")
    pq.write_table(edit(pairs(100, 0)), path)
    with pytest.raises(DataError) as error:
        PairDataset(_data_config(path), {"user": 64, "item": 32}, 0, 1)
    assert str(error.value) == f"{path}: {message}"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_tiny_project_trains_through_the_trainer_with_two_workers(tmp_path):
    """run.py as the doc writes it, 2 workers: one epoch (64 steps), checkpoints at 32 and
    64 with a shard per worker, the loss falls, held-out AUC of the planted communities."""
    data, save = tmp_path / "data", tmp_path / "save"
    subprocess.run([sys.executable, "-m", "tests.data.tiny_project.data.generate",
                    "--out", str(data)], env=launcher_env(), cwd=REPO, check=True,
                   timeout=120)
    run = subprocess.run([sys.executable, os.path.join(PROJECT, "run.py"),
                          f"--config_yaml_path={CONFIG}", f"--save_dir={save}",
                          "--nproc_per_node=2"], env=launcher_env(TINY_DATA=str(data)),
                         cwd=REPO, capture_output=True, text=True, timeout=540)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "done: step 64, final loss" in run.stderr, run.stderr[-3000:]
    for step in ("32", "64"):
        assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= set(os.listdir(save / step))
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = {r["step"]: r["metrics"] for r in records if r["kind"] == "eval"}
    assert [r["step"] for r in train] == list(range(8, 65, 8))
    assert train[-1]["loss"] < train[0]["loss"] / 2, train
    assert sorted(evals) == [32, 64]
    assert evals[64]["auc"] > 0.95 and evals[64]["loss"] < evals[32]["loss"], evals
