"""Run records: metrics.jsonl, TensorBoard events (read back by tensorboard's own reader),
`tml report`, and early stopping with its best checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.twhin_setup import REPO, launcher_env
from tml.core.run_records import METRICS_FILE, TENSORBOARD_DIR, RunRecorder, read_records


def _scalars(save_dir, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(os.path.join(save_dir, TENSORBOARD_DIR))
    accumulator.Reload()
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def test_a_real_run_writes_metrics_jsonl_and_tensorboard_events(small_trained_twhin):
    """The shared trained run (1 worker, 10 steps, log every 5, evaluation at the end)."""
    records = read_records(small_trained_twhin["save"])
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [5, 10] and [r["step"] for r in evals] == [10]
    assert set(train[0]["lr"]) == {"fused_opt", "operator_opt"}
    assert all(r["examples_per_s"] > 0 and r["loss"] > 0 for r in train)
    assert 0 < train[0]["wall_time"] <= train[1]["wall_time"]
    assert {"auc", "rce", "nrce", "loss"} <= set(evals[0]["metrics"])
    events = _scalars(small_trained_twhin["save"], "train/loss")
    assert [s for s, _ in events] == [r["step"] for r in train]
    assert [v for _, v in events] == pytest.approx([r["loss"] for r in train], rel=1e-6)
    assert [s for s, _ in _scalars(small_trained_twhin["save"], "eval/auc")] == [10]
    assert [s for s, _ in _scalars(small_trained_twhin["save"], "lr/fused_opt")] == [5, 10]


def test_tml_report_draws_a_png_and_prints_the_summary(small_trained_twhin, tmp_path, capsys):
    from tml.launch.cli import main

    out = tmp_path / "curves.png"
    main(["report", small_trained_twhin["save"], "--out", str(out)])
    printed = capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert "last loss" in printed and "auc" in printed and f"curves: {out}" in printed
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit):
        main(["report", str(empty)])
    assert f"error: {empty / METRICS_FILE}: no records" in capsys.readouterr().err


def test_a_resumed_run_replaces_records_after_its_checkpoint(tmp_path):
    """Records written after the checkpoint a run resumes from (before its crash) are
    dropped, in metrics.jsonl and in the event files: each step appears once."""
    first = RunRecorder(str(tmp_path), start_step=0)
    for step, loss in ((5, 0.9), (10, 0.8)):
        first.train(step, step * 1.0, loss, 1.0, 10.0, {"fused_opt": 0.1})
    first.evaluation(10, 10.0, {"auc": 0.7})
    first.close()
    with open(tmp_path / METRICS_FILE, "a") as handle:
        handle.write('{"kind": "train", "st')                  # torn by the crash
    resumed = RunRecorder(str(tmp_path), start_step=5)          # from checkpoint 5
    resumed.train(10, 10.5, 0.75, 1.0, 10.0, {"fused_opt": 0.1})
    resumed.evaluation(10, 11.0, {"auc": 0.72})
    resumed.close()
    records = read_records(str(tmp_path))
    assert [(r["kind"], r["step"]) for r in records] == [("train", 5), ("train", 10),
                                                          ("eval", 10)]
    assert records[1]["loss"] == 0.75 and records[2]["metrics"] == {"auc": 0.72}
    events = _scalars(tmp_path, "train/loss")
    assert [s for s, _ in events] == [5, 10]
    assert [v for _, v in events] == pytest.approx([0.9, 0.75])
    off = RunRecorder(str(tmp_path / "off"), start_step=0, tensorboard=False)
    off.train(1, 1.0, 0.5, 1.0, 1.0, {})
    off.close()
    assert os.listdir(tmp_path / "off") == [METRICS_FILE]


def test_early_stopping_rule_and_its_state(tmp_path):
    """The rule, and its state through a real checkpoint (a resumed run counts on)."""
    from tml.common.checkpointing import load_checkpoint, save_checkpoint
    from tml.core.config.training import EarlyStoppingConfig
    from tml.core.early_stopping import EarlyStopping
    from tml.errors import ConfigError

    rule = EarlyStopping(EarlyStoppingConfig(metric="loss", mode="min", patience=2,
                                             min_delta=0.01))
    assert rule.update(1, {"loss": 0.5}) == (True, False)
    assert rule.update(2, {"loss": 0.495}) == (False, False)     # within min_delta
    restored = EarlyStopping(rule.config)
    load_checkpoint(save_checkpoint(str(tmp_path), 2, {"early_stopping": rule}),
                    {"early_stopping": restored})
    assert (restored.best, restored.best_step, restored.since_best) == (0.5, 1, 1)
    assert restored.update(3, {"loss": 0.4}) == (True, False)
    assert restored.update(4, {"loss": 0.45}) == (False, False)
    assert restored.update(5, {"loss": 0.41}) == (False, True)
    assert restored.best_step == 3
    with pytest.raises(ConfigError, match=r"^training.early_stopping.metric: 'mrr' is not an "
                       r"evaluation metric \(there are: auc, loss\)$"):
        EarlyStopping(EarlyStoppingConfig(metric="mrr")).update(1, {"auc": 1, "loss": 0})


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_early_stopping_keeps_the_best_checkpoint_and_export_picks_it(small_trained_twhin,
                                                                      tmp_path, capsys):
    """Evaluations at steps 3 and 6; nothing can improve by min_delta 1.0, so the first is
    the best and the second stops the run (patience 1). Retention (keep 1) removes 2 and 4
    but keeps the best, 3; `twhin export --best` exports it."""
    save = tmp_path / "save"
    done = subprocess.run(
        [sys.executable, "-m", "projects.twhin", "train", "--config",
         small_trained_twhin["config"], "--save_dir", str(save), "--nproc_per_node", "1",
         "--set", "training.eval_log_every_n=3", "--set", "training.checkpoint_every_n=2",
         "--set", "training.checkpoint_max_to_keep=1", "--set", "training.tensorboard=false",
         "--set", "training.early_stopping={metric: auc, patience: 1, min_delta: 1.0}"],
        env=launcher_env(), capture_output=True, text=True, timeout=360, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "early stopping at step 6: auc has not improved for 1 evaluations" in done.stderr
    assert json.loads((save / "best.json").read_text())["step"] == 3
    assert sorted(n for n in os.listdir(save) if n.isdigit()) == ["3", "6"]
    assert not (save / TENSORBOARD_DIR).exists()
    assert [r["step"] for r in read_records(str(save)) if r["kind"] == "eval"] == [3, 6]

    from projects.twhin.cli import dispatch

    result = dispatch(["export", "--config", small_trained_twhin["config"], "--checkpoint",
                       str(save), "--best", "--out", str(tmp_path / "emb")])
    assert result["checkpoint"] == str(save / "3")
