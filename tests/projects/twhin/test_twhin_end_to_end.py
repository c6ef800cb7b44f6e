"""TwHIN end to end, as a user runs it: self-launch, torchrun, resume, bad input."""

import os
import re
import subprocess
import sys

import pytest

from projects.twhin.data.generate import generate_graph
from tests.twhin_setup import REPO, launcher_env, small_twhin_config

RUN = os.path.join(REPO, "projects", "twhin", "run.py")
LOCAL = os.path.join(REPO, "projects", "twhin", "config", "local.yaml")


def _env():
    return launcher_env()


@pytest.fixture(scope="module")
def small_graph(tmp_path_factory):
    out = tmp_path_factory.mktemp("graph")
    generate_graph(str(out), num_users=3000, num_tweets=600, num_edges=60_000,
                   num_communities=8, seed=3, validation_fraction=0.05)
    return out


def _config(tmp_path, graph, **training):
    return small_twhin_config(
        tmp_path / "twhin.yaml", graph, 3000, 600, 200,
        **{"train_log_every_n": 20, "eval_log_every_n": 100000, "num_eval_steps": -1,
           "num_epochs": 2, **training})


def _run(args, timeout=300):
    return subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


def _losses(log):
    return [float(x) for x in re.findall(r"step \d+: loss ([0-9.]+)", log)]


@pytest.mark.slow
def test_self_launched_training_learns_then_resumes(tmp_path, small_graph):
    config = _config(tmp_path, small_graph)
    save_dir = tmp_path / "save"
    result = _run([sys.executable, RUN, f"--config_yaml_path={config}",
                   f"--save_dir={save_dir}", "--nproc_per_node=2"])
    log = result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "table_wise" in log  # the sharding plan is printed
    losses = _losses(log)
    assert len(losses) >= 3 and losses[-1] < losses[0] * 0.8, losses
    auc = float(re.findall(r"held-out AUC ([0-9.]+)", log)[-1])
    assert auc > 0.8, log[-3000:]
    # 57k train edges / 2 workers / 200 = 142 batches per epoch, 2 epochs
    assert (save_dir / "284").is_dir()

    again = _run([sys.executable, RUN, f"--config_yaml_path={config}",
                  f"--save_dir={save_dir}", "--nproc_per_node=2"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already reached step 284" in again.stderr


@pytest.mark.slow
def test_original_torchrun_launch_line_and_resume_mid_run(tmp_path, small_graph):
    config = _config(tmp_path, small_graph, num_train_steps=50, checkpoint_every_n=25)
    save_dir = tmp_path / "save"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                "--nproc_per_node", "2", RUN, f"--config_yaml_path={config}",
                f"--save_dir={save_dir}"]
    result = _run(torchrun)
    assert result.returncode == 0, result.stderr[-4000:]
    # The checkpoints (beside them: the run records metrics.jsonl and tensorboard/).
    assert sorted(n for n in os.listdir(save_dir) if n.isdigit()) == ["25", "50"]

    longer = _config(tmp_path, small_graph, num_train_steps=80, checkpoint_every_n=1000)
    result = _run(torchrun[:-2] + [f"--config_yaml_path={longer}", f"--save_dir={save_dir}"])
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resumed from" in result.stderr and "at step 50" in result.stderr
    assert "80" in os.listdir(save_dir)


def test_missing_config_file_is_one_clear_line(tmp_path):
    result = _run([sys.executable, RUN, f"--config_yaml_path={tmp_path}/nope.yaml"], timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: config file not found: {tmp_path}/nope.yaml"


@pytest.mark.slow
def test_bad_data_names_file_and_row_through_the_workers(tmp_path, small_graph):
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    table = pq.read_table(f"{small_graph}/train")
    lhs = table.column("lhs").to_pylist()
    lhs[7] = 5000  # outside the user table (3000 rows)
    table = table.set_column(table.schema.get_field_index("lhs"), "lhs", pa.array(lhs))
    pq.write_table(table, bad_dir / "edges.parquet")
    config = _config(tmp_path, small_graph)
    text = open(config).read().replace(f"{small_graph}/train", str(bad_dir))
    open(config, "w").write(text)
    result = _run([sys.executable, RUN, f"--config_yaml_path={config}",
                   f"--save_dir={tmp_path / 'save'}", "--nproc_per_node=2"])
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: worker rank 0 failed"), result.stderr[-3000:]
    assert f"{bad_dir}/edges.parquet row 7: lhs=5000 is outside table 'user' " \
           "(num_embeddings=3000)" in last
    assert "Traceback" not in result.stderr

    empty = open(config).read().replace(str(bad_dir), str(tmp_path / "nothing-here"))
    open(config, "w").write(empty)
    result = _run([sys.executable, RUN, f"--config_yaml_path={config}",
                   f"--save_dir={tmp_path / 'save'}", "--nproc_per_node=2"])
    assert result.returncode == 2
    assert "matches no parquet files" in result.stderr and "nothing-here" in result.stderr


def test_mistyped_config_field_is_one_clear_line_before_any_worker_starts(tmp_path):
    text = open(LOCAL).read().replace("num_train_steps:", "num_train_step:")
    path = tmp_path / "typo.yaml"
    path.write_text(text)
    result = _run([sys.executable, RUN, f"--config_yaml_path={path}"], timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: {path}: training.num_train_step: unknown field "
                                     "(not allowed here; check the spelling)")
