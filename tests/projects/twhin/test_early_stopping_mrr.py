"""Early stopping on the validation MRR in the config `twhin import` writes (issue 20).

The rule (`choose_defaults(validation=True)`), the written config and its reason comment,
and one real run that stops: the MRR the trainer logs during training is the one
`twhin evaluate --best --split validation` reports for the checkpoint it kept.
"""

import json
import os
import subprocess
import sys

import pytest
import yaml

from projects.twhin.importer import (
    DENSE_PATIENCE,
    EVAL_EPOCHS,
    LARGE_EPOCHS,
    LARGE_MAX_EPOCHS,
    LOG_EVALS,
    MIN_DELTA,
    PATIENCE,
    SPARSE_ENDS_PER_ROW,
    VALID_BATCHES,
    choose_defaults,
    eval_every_n,
    import_triples,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))


def _write(path, rows):
    path.write_text("".join("\t".join(row) + "\n" for row in rows))
    return str(path)


def _graph(n=1300):
    # One relation, ~65 edges per batch: the few-relations settings.
    return [(f"user:u{i % 300}", "likes", f"item:i{(7 * i) % 97}") for i in range(n)]


def test_rule_stops_on_validation_mrr_only_with_a_validation_split():
    n = 1_960_000
    counts = [int(n * p) for p in (0.5, 0.15, 0.2, 0.15)]
    without = choose_defaults(n, counts, [100_000, 20_000], 32)
    with_valid = choose_defaults(n, counts, [100_000, 20_000], 32, validation=True)
    assert (without.early_stopping, without.epochs) == (False, LARGE_EPOCHS)
    assert (with_valid.early_stopping, with_valid.epochs) == (True, LARGE_MAX_EPOCHS)
    assert LARGE_MAX_EPOCHS > LARGE_EPOCHS      # room to keep improving
    assert "early stopping" not in without.reason
    # 2 x 1.96M edge ends over 120k rows: a dense graph, which stops sooner
    assert with_valid.patience == DENSE_PATIENCE < PATIENCE
    assert (f"early stopping on the validation MRR (every {EVAL_EPOCHS} epochs, after "
            f"{DENSE_PATIENCE} without a gain over {MIN_DELTA:g}; {DENSE_PATIENCE} on dense "
            f"graphs: on a generated one it stopped at epoch 35 instead of 50"
            ) in with_valid.reason
    # A sparse graph (fewer than SPARSE_ENDS_PER_ROW ends per entity) keeps PATIENCE.
    rows = int(2 * n / SPARSE_ENDS_PER_ROW) + 1
    sparse = choose_defaults(n, counts, [rows], 32, validation=True)
    assert (sparse.early_stopping, sparse.patience) == (True, PATIENCE)
    assert (f"after {PATIENCE} without a gain over {MIN_DELTA:g}; {PATIENCE} on sparse "
            f"graphs") in sparse.reason
    assert DENSE_PATIENCE < PATIENCE == 3       # sixth round: 2 stopped a sparse graph early
    assert f"at most {LARGE_MAX_EPOCHS} epochs" in with_valid.reason
    # Many relations per batch: no early stopping (Nations' validation MRR is noisy and
    # rises to the end), the same epochs as without a validation split, and it says so.
    nations = [1592 // 55] * 55
    many = choose_defaults(1592, nations, [14], 32, validation=True)
    assert not many.early_stopping
    assert many.epochs == choose_defaults(1592, nations, [14], 32).epochs
    assert "no early stopping (validation MRR noisy" in many.reason


def test_import_writes_early_stopping_and_its_reason_only_with_validation(tmp_path):
    rows = _graph()
    import_triples(_write(tmp_path / "t.tsv", rows), str(tmp_path / "valid"),
                   valid=_write(tmp_path / "v.tsv", rows[:20]), dim=8)
    text = (tmp_path / "valid" / "config.yaml").read_text()
    config = yaml.safe_load(text)
    # 2 x 1300 edge ends over 397 rows: sparse, PATIENCE
    assert config["training"]["early_stopping"] == {
        "metric": "mrr", "mode": "max", "patience": PATIENCE, "min_delta": MIN_DELTA}
    assert config["training"]["num_epochs"] == LARGE_MAX_EPOCHS
    steps_per_epoch = 1300 // config["train_data"]["per_replica_batch_size"]
    assert config["training"]["eval_log_every_n"] == EVAL_EPOCHS * steps_per_epoch
    # every one of up to VALID_BATCHES workers gets a validation batch
    assert config["validation_data"]["per_replica_batch_size"] == 20 // VALID_BATCHES
    comment = text.splitlines()[1]
    assert comment.startswith("# ") and "early stopping on the validation MRR" in comment

    # The same edges over 30 users and 20 items: 52 ends per entity, dense, DENSE_PATIENCE
    dense = [(f"user:u{i % 30}", "likes", f"item:i{(7 * i) % 20}") for i in range(1300)]
    import_triples(_write(tmp_path / "d.tsv", dense), str(tmp_path / "dense"),
                   valid=_write(tmp_path / "dv.tsv", dense[:20]), dim=8)
    text = (tmp_path / "dense" / "config.yaml").read_text()
    assert yaml.safe_load(text)["training"]["early_stopping"]["patience"] == DENSE_PATIENCE
    assert f"after {DENSE_PATIENCE} without a gain" in text.splitlines()[1]

    import_triples(_write(tmp_path / "t2.tsv", rows), str(tmp_path / "none"), dim=8,
                   split="1,0,0")
    config = yaml.safe_load((tmp_path / "none" / "config.yaml").read_text())
    assert "early_stopping" not in config["training"]
    assert config["training"]["num_epochs"] == LARGE_EPOCHS
    # Without early stopping the evaluations only write the log: about LOG_EVALS of them.
    steps_per_epoch = 1300 // config["train_data"]["per_replica_batch_size"]
    assert config["training"]["eval_log_every_n"] == \
        steps_per_epoch * -(-LARGE_EPOCHS // LOG_EVALS) > EVAL_EPOCHS * steps_per_epoch
    assert eval_every_n(20, 200, early_stopping=False) == 1000     # Nations: 4, not 40
    assert eval_every_n(20, 200, early_stopping=True) == 20 * EVAL_EPOCHS
    assert eval_every_n(20, 10, early_stopping=False) == 20 * EVAL_EPOCHS


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("workers", [1, 2])
def test_training_stops_on_validation_mrr_and_keeps_the_checkpoint_evaluate_reports(
        tmp_path, workers):
    """A real run with the written config, patience 1 and a min_delta no gain reaches: it
    must stop at its second evaluation, keep the first as best, and the MRR it logged
    there must be what `twhin evaluate --best` computes from that checkpoint (with 2
    workers each holds part of the tables during training: gathered exactly)."""
    rows = _graph(2600)
    train, valid = rows[:2400], rows[2400:]
    data = tmp_path / "data"
    import_triples(_write(tmp_path / "t.tsv", train), str(data),
                   valid=_write(tmp_path / "v.tsv", valid), dim=8)
    config = yaml.safe_load((data / "config.yaml").read_text())
    every = config["training"]["eval_log_every_n"]
    save = tmp_path / "save"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    twhin = [sys.executable, "-m", "projects.twhin"]
    done = subprocess.run(
        twhin + ["train", "--config", str(data / "config.yaml"), "--save_dir", str(save),
                 "--nproc_per_node", str(workers), "--set", "training.early_stopping.patience=1",
                 "--set", "training.early_stopping.min_delta=1.0"],
        env=env, capture_output=True, text=True, timeout=500, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"stopped early at step {2 * every}" in done.stdout + done.stderr
    best = json.loads((save / "best.json").read_text())
    assert (best["step"], best["metric"]) == (every, "mrr")
    evals = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["metrics"] for r in evals if r["kind"] == "eval"}
    assert sorted(evals) == [every, 2 * every]        # stopped long before the bound
    assert 2 * every < config["training"]["num_epochs"] * every // EVAL_EPOCHS
    assert 0 < evals[every]["mrr"] == best["value"]
    out = subprocess.run(
        twhin + ["evaluate", "--config", str(save / "twhin_config.yaml"), "--checkpoint",
                 str(save), "--best", "--split", "validation", "--json"],
        env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["checkpoint"] == str(save / str(every))
    assert result["mrr"] == pytest.approx(best["value"], rel=1e-9)
    assert result["hits_at_10"] == pytest.approx(evals[every]["hits_at_10"], rel=1e-9)
