"""The trainer: one entry that turns a project's parts and `TrainingConfig` into a run.

A project gives what only it knows (`ProjectParts`: how to build its model-and-loss, its
data and its table configs) and the trainer does the rest, the same way for every project
and every entry point (a script, `twhin train`, `tml launch`, a notebook):

    from tml.trainer import ProjectParts, train
    result = train(parts, config.training, config.runtime, save_dir)

Modules, one job each: `project` (what a project hands over), `runtime` (device, process
group, TF32, seeds), `fused_tables` (table optimizers fused into backward, parameter to
table mapping), `trainer` (sharding, optimizers, the loop, evaluation, only-evaluate),
`launch` (starting the workers with the config's `max_restarts`, leaving together),
`entry` (a training script's flags, config and save_dir, read the same way for every project).

Names are imported on first use: a launcher that only imports `tml.trainer.launch` does
not pay for torchrec and fbgemm.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"ProjectParts": "tml.trainer.project", "train": "tml.trainer.trainer"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tml.trainer' has no attribute {name!r}")
