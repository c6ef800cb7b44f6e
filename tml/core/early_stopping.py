"""Early stopping on a validation metric, and the run's best checkpoint.

Resuming a checkpoint written without early stopping (turned on later) starts the rule
afresh (tml.core.custom_training_loop leaves its part out of that load).

`EarlyStopping` watches one evaluation metric: after each evaluation it says whether the
metric improved (by more than `min_delta`) and whether `patience` evaluations in a row
have not improved it, which ends the run. Its state (best value and step, evaluations
since) is `Stateful`: saved with every checkpoint and restored on resume, so a restart
counts on. Every rank decides the same (evaluation metrics are global).

The checkpoint of the best evaluation is marked in `save_dir/best.json`
(`{"step", "metric", "value"}`, written by rank 0), kept by checkpoint retention, and
picked by `best_checkpoint(save_dir)` (`twhin evaluate/export --best`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import torch
import torch.distributed as dist

from tml.common.atomic_file import write_json_atomic
from tml.core.config.training import EarlyStoppingConfig
from tml.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

BEST_FILE = "best.json"


class EarlyStopping:
    """The stopping rule of `EarlyStoppingConfig`; `Stateful` (state_dict/load_state_dict)."""

    def __init__(self, config: EarlyStoppingConfig) -> None:
        self.config = config
        self.best: float | None = None
        self.best_step: int | None = None
        self.since_best = 0

    def update(self, step: int, metrics: dict[str, float]) -> tuple[bool, bool]:
        """(improved, stop) after the evaluation at `step`.

        A missing metric is a ConfigError naming it and the metrics there are.
        """
        name = self.config.metric
        if name not in metrics:
            raise ConfigError(f"training.early_stopping.metric: '{name}' is not an "
                              f"evaluation metric (there are: {', '.join(sorted(metrics))})")
        value = float(metrics[name])
        sign = 1.0 if self.config.mode == "max" else -1.0
        improved = not math.isnan(value) and (
            self.best is None or sign * (value - self.best) > self.config.min_delta)
        if improved:
            self.best, self.best_step, self.since_best = value, step, 0
        else:
            self.since_best += 1
        stop = self.since_best >= self.config.patience
        if stop:
            logger.info("early stopping at step %d: %s has not improved for %d evaluations "
                        "(best %.5f at step %s)", step, name, self.since_best,
                        self.best if self.best is not None else float("nan"), self.best_step)
        return improved, stop

    def state_dict(self) -> dict[str, Any]:
        """Tensors (checkpoints save tensors only); best_step -1: no best yet."""
        return {"best": torch.tensor(math.nan if self.best is None else self.best,
                                     dtype=torch.float64),
                "best_step": torch.tensor(-1 if self.best_step is None else self.best_step),
                "since_best": torch.tensor(self.since_best)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        best, step = float(state["best"]), int(state["best_step"])
        self.best = None if step < 0 else best
        self.best_step = None if step < 0 else step
        self.since_best = int(state["since_best"])


def mark_best(save_dir: str, step: int, metric: str, value: float) -> None:
    """Rank 0 writes `save_dir/best.json` naming the checkpoint of `step` (atomically)."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    path = os.path.join(save_dir, BEST_FILE)
    write_json_atomic(path, {"step": step, "metric": metric, "value": value})
    logger.info("best checkpoint so far: %s (%s %.5f)", os.path.join(save_dir, str(step)),
                metric, value)


def best_step(save_dir: str) -> int | None:
    """The step `best.json` names, or None without one."""
    path = os.path.join(save_dir, BEST_FILE)
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a best-checkpoint record ({error})") from None
    step = data.get("step") if isinstance(data, dict) else None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path}: 'step' must be a non-negative integer")
    return step


def best_checkpoint(save_dir: str) -> str:
    """The best checkpoint of `save_dir` (see `mark_best`); CheckpointError if none."""
    step = best_step(save_dir)
    if step is None:
        raise CheckpointError(f"{save_dir}: no best checkpoint ({BEST_FILE} is written by "
                              "runs with training.early_stopping)")
    path = os.path.join(save_dir, str(step))
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise CheckpointError(f"{save_dir}: the best checkpoint {path} is missing or "
                              "incomplete")
    return path
