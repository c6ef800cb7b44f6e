"""The Heavy Ranker end to end: 2 gloo workers self-launched by main.py learn every task
of planted data (held-out AUROC well above chance), on sharded tables (a frozen one started
from a twhin export stays unchanged), then the original torchrun line resumes the run; bad
data fails in the launcher, as one line."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from projects.home.recap.data.generate import generate
from tests.recap_setup import TASKS, config_dict, write_config, write_schema
from tests.twhin_setup import REPO, launcher_env
from tml.common.checkpoint_rows import load_rows, tensor_shapes

MAIN = os.path.join(REPO, "projects", "home", "recap", "main.py")


def _run(*args, timeout=240):
    return subprocess.run([sys.executable, MAIN, *args], env=launcher_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_two_workers_learn_every_task_and_keep_a_frozen_export(tmp_path):
    schema = write_schema(str(tmp_path))
    generate(str(tmp_path / "data"), rows=3200, schema_path=schema, files=4, num_users=20,
             num_authors=10, num_tweets=50, position_index=3)
    vectors = np.random.default_rng(1).standard_normal((20, 8)).astype(np.float32)
    pq.write_table(pa.table({"id": [str(i) for i in range(20)], "vector":
                             pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), 8)}),
                   tmp_path / "user.parquet")
    config = config_dict(schema, str(tmp_path / "data" / "part-0000[0-2].parquet"),
                         str(tmp_path / "data" / "part-00003.parquet"))
    config["training"].update(num_train_steps=60, checkpoint_every_n=40)
    config["model"]["large_embeddings"] = {
        "tables": [{"name": "user", "num_embeddings": 20, "embedding_dim": 8,
                    "feature": "meta__user_id", "sharding_type": "row_wise",
                    "init_from_export": {"path": str(tmp_path / "user.parquet")}},
                   {"name": "author", "num_embeddings": 10, "embedding_dim": 8,
                    "feature": "meta__author_id", "sharding_type": "column_wise"}],
        "optimizer": {"init_learning_rate": 0.05}}
    path = write_config(str(tmp_path / "recap.yaml"), config)
    save_dir = tmp_path / "run"

    # --set reaches the workers (80 steps, not the file's 60)
    done = _run(f"--config_yaml_path={path}", f"--save_dir={save_dir}", "--nproc_per_node=2",
                "--set", "training.num_train_steps=80")
    assert done.returncode == 0, done.stderr[-4000:]
    final = json.loads((save_dir / "final_metrics.json").read_text())
    # The checkpoints, the final metrics and the run records (tml.trainer).
    assert final["step"] == 80 and sorted(os.listdir(save_dir)) == [
        "40", "80", "final_metrics.json", "metrics.jsonl", "tensorboard"]
    steps = [json.loads(line).get("step") for line in
             (save_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps and max(steps) == 80
    for task in TASKS:
        assert final["metrics"][f"auc/{task}"] > 0.65, final
        assert final["metrics"][f"rce/{task}"] > 2.0, final
    print("held-out AUROC per task:", {t: round(final["metrics"][f"auc/{t}"], 3)
                                       for t in TASKS})

    key = next(k for k in tensor_shapes(str(save_dir / "80"))
               if k.endswith("embedding_bags.user.weight"))
    assert np.array_equal(load_rows(str(save_dir / "80"), key, 0, 20).numpy(), vectors)

    # The original launch line: torchrun starts the workers, which resume from step 80 and
    # train on to 100; the run records go on without repeating a step.
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
         "--nproc_per_node", "2", MAIN, f"--config_yaml_path={path}",
         f"--save_dir={save_dir}", "--set", "training.num_train_steps=100"],
        env=launcher_env(), cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"resumed from {save_dir / '80'} at step 80" in done.stderr, done.stderr[-4000:]
    assert json.loads((save_dir / "final_metrics.json").read_text())["step"] == 100
    train_steps = [r["step"] for r in map(json.loads,
                                          (save_dir / "metrics.jsonl").read_text().splitlines())
                   if r["kind"] == "train"]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == 100, train_steps
    assert np.array_equal(load_rows(str(save_dir / "100"), key, 0, 20).numpy(), vectors)



def test_missing_data_is_one_line_before_any_worker(tmp_path, capsys):
    """main.py's entry point (`run_cli(main)`) in this process: the launcher's check, with
    no interpreter to start (main.py as a script runs in the slow tests above)."""
    from projects.home.recap.main import main
    from tml.common.cli import run_cli

    schema = write_schema(str(tmp_path))
    path = write_config(str(tmp_path / "recap.yaml"),
                        config_dict(schema, str(tmp_path / "none" / "*.parquet")))
    with pytest.raises(SystemExit) as exited:
        run_cli(lambda: main([f"--config_yaml_path={path}", f"--save_dir={tmp_path / 'run'}",
                              "--nproc_per_node=2"]))
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"error: inputs '{tmp_path}/none/*.parquet' matches no files")
    assert not (tmp_path / "run").exists()
