"""What a run leaves to look at: `save_dir/metrics.jsonl` and TensorBoard event files.

`RunRecorder` is called by the training loop at every log step and evaluation, on every
rank; rank 0 writes. One JSON object per line in `metrics.jsonl`:

    {"kind": "train", "step": 100, "wall_time": 12.3, "loss": 0.41, "steps_per_s": 8.1,
     "examples_per_s": 16200.0, "lr": {"fused_opt": 0.05, "operator_opt": 0.1}}
    {"kind": "eval", "step": 100, "wall_time": 12.9, "metrics": {"auc": 0.81, ...}}
    {"kind": "checkpoint_eval", "step": 100, "wall_time": 12.5, "checkpoint": "100",
     "metrics": {"auc": 0.81, ...}}

The last kind is written by the only-evaluate mode (an evaluator beside the training job,
`record_checkpoint_evaluation`): its own kind, so that it never reads as a second in-line
evaluation of the same step; `wall_time` is the checkpoint's training time. The evaluator
and the trainer append to the same file, one line per write (O_APPEND), so their lines
never interleave. (A resumed trainer rewrites the file once, at its start, to drop the
records after its checkpoint; an evaluator's line appended in that instant can be lost,
while the checkpoint's evaluation.json keeps its metrics.)

`wall_time` is seconds of training so far, restored from the checkpoint on a resume (not
the clock). A resumed run first drops the records after the step it resumes from (written
after that checkpoint, before the crash: they will be written again), so the file has each
(kind, step) once, in order. TensorBoard's writer purges its events after that step the
same way (`purge_step`). The losses are global means over workers
(`tml.metrics.reduce.global_mean`), evaluation metrics are global by construction.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch.distributed as dist

from tml.common.atomic_file import write_atomic

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def read_records(save_dir: str) -> list[dict[str, Any]]:
    """The records of `save_dir/metrics.jsonl` (a torn last line, from a crash, skipped)."""
    path = os.path.join(save_dir, METRICS_FILE)
    records = []
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and isinstance(record.get("step"), int):
                    records.append(record)
    except FileNotFoundError:
        pass
    return records


def learning_rates(optimizer: Any) -> dict[str, float]:
    """The learning rate of each optimizer by its key (`fused_opt`, `operator_opt`, ...).

    A CombinedOptimizer's parts are named by their keys; a part with groups of several
    rates lists them as `key/<index>`. A plain optimizer's groups are `group<index>`.
    """
    parts = getattr(optimizer, "optimizers", None)
    if not parts:
        return {f"group{i}": float(g["lr"]) for i, g in enumerate(optimizer.param_groups)}
    rates: dict[str, float] = {}
    for key, part in parts:
        values = [float(group["lr"]) for group in part.param_groups]
        if len(set(values)) <= 1:
            rates[key] = values[0] if values else float("nan")
        else:
            rates.update({f"{key}/{i}": value for i, value in enumerate(values)})
    return rates


def record_checkpoint_evaluation(save_dir: str, step: int, metrics: Mapping[str, float],
                                 wall_time: float | None = None) -> None:
    """Append the evaluator's record of the checkpoint `save_dir/<step>` (rank 0 writes).

    No TensorBoard events: the trainer's writer owns the event files of `save_dir`.
    """
    if (dist.is_initialized() and dist.get_rank() != 0) or not metrics:
        return
    record: dict[str, Any] = {"kind": "checkpoint_eval", "step": step, "checkpoint": str(step),
                              "metrics": {k: float(v) for k, v in metrics.items()}}
    if wall_time is not None:
        record["wall_time"] = round(wall_time, 3)
    with open(os.path.join(save_dir, METRICS_FILE), "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")


class RunRecorder:
    """Writes metrics.jsonl and (optionally) TensorBoard events on rank 0; no-op elsewhere."""

    def __init__(self, save_dir: str, start_step: int, tensorboard: bool = True) -> None:
        self.save_dir = save_dir
        self.active = not dist.is_initialized() or dist.get_rank() == 0
        self._writer = None
        if not self.active:
            return
        os.makedirs(save_dir, exist_ok=True)
        self._truncate_after(start_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(os.path.join(save_dir, TENSORBOARD_DIR),
                                         purge_step=start_step + 1 if start_step else None)

    def _truncate_after(self, step: int) -> None:
        path = os.path.join(self.save_dir, METRICS_FILE)
        if not os.path.exists(path):
            return
        kept = [r for r in read_records(self.save_dir) if r["step"] <= step]
        write_atomic(path, lambda handle: handle.writelines(
            json.dumps(r, sort_keys=True) + "\n" for r in kept))

    def _append(self, record: Mapping[str, Any]) -> None:
        with open(os.path.join(self.save_dir, METRICS_FILE), "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")

    def train(self, step: int, wall_time: float, loss: float, steps_per_s: float,
              examples_per_s: float, lr: Mapping[str, float]) -> None:
        """One log step's record (loss: the global mean since the previous record)."""
        if not self.active:
            return
        self._append({"kind": "train", "step": step, "wall_time": round(wall_time, 3),
                      "loss": loss, "steps_per_s": steps_per_s,
                      "examples_per_s": examples_per_s, "lr": dict(lr)})
        if self._writer is not None:
            self._writer.add_scalar("train/loss", loss, step)
            self._writer.add_scalar("train/examples_per_s", examples_per_s, step)
            for name, value in lr.items():
                self._writer.add_scalar(f"lr/{name}", value, step)

    def evaluation(self, step: int, wall_time: float, metrics: Mapping[str, float]) -> None:
        """One evaluation's record."""
        if not self.active or not metrics:
            return
        values = {k: float(v) for k, v in metrics.items()}
        self._append({"kind": "eval", "step": step, "wall_time": round(wall_time, 3),
                      "metrics": values})
        if self._writer is not None:
            for name, value in values.items():
                if name != "batches":
                    self._writer.add_scalar(f"eval/{name}", value, step)

    def close(self) -> None:
        """Flush and close the event file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

