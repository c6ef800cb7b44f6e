"""`tml report SAVE_DIR`: a run's curves as a PNG and its summary as a table.

Reads `SAVE_DIR/metrics.jsonl` (tml.core.run_records), draws the training loss and every
evaluation metric against the step (matplotlib, Agg backend: no display needed), and
returns the summary lines: steps, training time, the last loss, mean examples/s, and for
each evaluation metric its last and best value (best: highest, or lowest for a loss). The
records of an evaluator beside the run (`--only_evaluate`, kind `checkpoint_eval`) are
drawn as their own series and summarised in their own table.
"""

from __future__ import annotations

import os
from typing import Any

from tml.core.run_records import METRICS_FILE, read_records
from tml.errors import TmlError

REPORT_FILE = "report.png"
LOWER_IS_BETTER = ("loss",)


def lower_is_better(name: str) -> bool:
    """Whether a smaller value of metric `name` is better (losses), else larger."""
    return any(part in name for part in LOWER_IS_BETTER)


def summary_lines(records: list[dict[str, Any]]) -> list[str]:
    """The table printed by `tml report`."""
    train = [r for r in records if r.get("kind") == "train"]
    last_step = max(r["step"] for r in records)
    wall = max(float(r.get("wall_time", 0.0)) for r in records)
    lines = [f"{'steps':<24} {last_step}", f"{'training time':<24} {wall:.1f} s"]
    if train:
        lines.append(f"{'last loss':<24} {train[-1]['loss']:.5f} (step {train[-1]['step']})")
        rates = [float(r["examples_per_s"]) for r in train]
        lines.append(f"{'examples/s (mean)':<24} {sum(rates) / len(rates):.0f}")
    for title, kind in (("evaluation", "eval"), ("checkpoint evaluation", "checkpoint_eval")):
        lines.extend(_metric_table(title, [r for r in records if r.get("kind") == kind]))
    return lines


def _metric_table(title: str, evals: list[dict[str, Any]]) -> list[str]:
    if not evals:
        return []
    lines = [f"{title:<24} {'last':>10} {'best':>10} {'best step':>10}"]
    for name in _metric_names(evals):
        points = [(r["step"], r["metrics"][name]) for r in evals if name in r["metrics"]]
        pick = min if lower_is_better(name) else max
        best_step, best = pick(points, key=lambda p: p[1])
        lines.append(f"  {name:<22} {points[-1][1]:>10.4f} {best:>10.4f} {best_step:>10}")
    return lines


def _metric_names(evals: list[dict[str, Any]]) -> list[str]:
    return sorted({name for r in evals for name in r["metrics"] if name != "batches"})


def write_report(save_dir: str, out: str | None = None) -> tuple[str, list[str]]:
    """Draw `save_dir`'s curves into `out` (default `save_dir/report.png`); (path, table)."""
    records = read_records(save_dir)
    if not records:
        raise TmlError(f"{os.path.join(save_dir, METRICS_FILE)}: no records (is {save_dir} "
                       "the save_dir of a run?)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    evaluator = [r for r in records if r.get("kind") == "checkpoint_eval"]
    names = _metric_names(evals + evaluator)
    figure, axes = plt.subplots(1 + len(names), 1, figsize=(7, 2.6 * (1 + len(names))),
                                squeeze=False, sharex=True)
    loss_axis = axes[0][0]
    loss_axis.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if "loss" in names:
        _plot(loss_axis, evals, "loss", "o", "held-out")
        _plot(loss_axis, evaluator, "loss", "x", "held-out (evaluator)")
    loss_axis.set_ylabel("loss")
    loss_axis.legend()
    for axis, name in zip((row[0] for row in axes[1:]), names):
        _plot(axis, evals, name, "o", "in-line")
        _plot(axis, evaluator, name, "x", "evaluator")
        axis.set_ylabel(f"held-out {name}")
        if evaluator:
            axis.legend()
    axes[-1][0].set_xlabel("step")
    figure.suptitle(os.path.basename(os.path.abspath(save_dir)))
    figure.tight_layout()
    path = out or os.path.join(save_dir, REPORT_FILE)
    try:
        figure.savefig(path, dpi=100)
    except OSError as error:
        raise TmlError(f"cannot write {path}: {error.strerror or error}") from None
    finally:
        plt.close(figure)
    return path, summary_lines(records)


def _plot(axis: Any, evals: list[dict[str, Any]], name: str, marker: str, label: str) -> None:
    points = [(r["step"], r["metrics"][name]) for r in evals if name in r["metrics"]]
    if points:
        axis.plot(*zip(*points), marker=marker, label=label)
