"""Runtime and training-loop configuration shared by every project."""

from __future__ import annotations

from typing import Literal

import pydantic

from tml.core.config.base_config import BaseConfig, Field
from tml.core.config.compat import compat_field


class RuntimeConfig(BaseConfig):
    """How the process runs (precision switches)."""

    enable_tensorfloat32: bool = Field(False, description="Use TF32 matmuls on Ampere+ GPUs.")
    enable_amp: bool = compat_field(False, "each table's precision is its data_type; the "
                                    "dense parameters train in fp32")


class EarlyStoppingConfig(BaseConfig):
    """Stop when a validation metric has not improved for `patience` evaluations."""

    metric: str = Field("auc", description="The evaluation metric watched (a key of the "
                        "evaluation's metrics, e.g. auc, rce, nrce, loss).")
    mode: Literal["max", "min"] = Field("max", description="max: larger is better (auc, "
                                        "rce); min: smaller is better (loss).")
    patience: pydantic.PositiveInt = Field(3, description="Evaluations in a row without "
                                           "improvement that end the run.")
    min_delta: pydantic.NonNegativeFloat = Field(0.0, description="An improvement must "
                                                 "exceed this.")


class TrainingConfig(BaseConfig):
    """The training loop: how long, how often to log, evaluate and checkpoint."""

    save_dir: str | None = Field(None, description="Directory for checkpoints; overridden "
                                 "by --save_dir. No default: a run without either is refused "
                                 "(a shared default would resume another run's checkpoints).")
    num_train_steps: pydantic.PositiveInt = Field(10000, description="Upper bound on steps; "
                                                  "training also stops when the data of "
                                                  "num_epochs epochs is used up.")
    initial_checkpoint_dir: str | None = Field(
        None, at_most_one_of="initialization",
        description="Warm start: load weights from this checkpoint, start at step 0. "
        "Tables with more rows than saved (grown by `twhin import --vocab`) keep the saved "
        "rows bit for bit; the new rows are initialised as usual.")
    checkpoint_every_n: pydantic.PositiveInt = Field(1000, description="Save every N steps "
                                                     "(and always at the end).")
    checkpoint_max_to_keep: pydantic.PositiveInt | None = Field(
        None, description="Keep only the newest N complete checkpoints (default: all).")
    train_log_every_n: pydantic.PositiveInt = Field(1000, description="Log every N steps.")
    num_eval_steps: int = Field(16384, description="Evaluation batches per evaluation; "
                                "< 0 means the whole validation data.")
    eval_log_every_n: pydantic.PositiveInt = Field(5000, description="Evaluate every N steps.")
    eval_timeout_in_s: pydantic.PositiveFloat = compat_field(
        3600.0, "evaluation runs in-line in the training loop, so there is nothing to wait "
        "for")
    gradient_accumulation: pydantic.PositiveInt | None = Field(
        None, description="Step the dense optimizer every N batches. Embedding tables with "
        "fused optimizers update in every backward regardless.")
    num_epochs: pydantic.PositiveInt = Field(1, description="Passes over the training data.")
    async_checkpoint: bool = Field(
        True, description="Write checkpoints in the background (torch.distributed.checkpoint "
        "async_save) while training goes on; at most one save in flight. False: training "
        "waits for each save.")
    max_restarts: pydantic.NonNegativeInt | None = Field(
        None, description="Restarts of the whole worker group after a failure (torch "
        "elastic), resuming from the latest checkpoint; default TML_MAX_RESTARTS or 0. Read "
        "by the launcher of projects' run.py.")
    seed: int = Field(0, description="Seed of the model's initial weights and of the per-step "
                      "random numbers (in-batch negatives), re-seeded from (seed, step, rank) "
                      "every step so that a resumed run draws what an uninterrupted one does.")
    tensorboard: bool = Field(True, description="Write TensorBoard event files to "
                              "save_dir/tensorboard (loss, learning rates, examples/s, "
                              "evaluation metrics). save_dir/metrics.jsonl is always written.")
    early_stopping: EarlyStoppingConfig | None = Field(
        None, description="Stop when a validation metric stops improving; its best "
        "checkpoint is kept and marked (save_dir/best.json). Needs validation data.")


def check_early_stopping_data(training: TrainingConfig, has_validation_data: bool,
                              data_field: str = "validation_data") -> None:
    """Refuse early stopping without validation data (ValueError naming both fields).

    A project's top-level config calls it from a model validator, so a run that could never
    evaluate is refused when its config is read, before any worker starts.
    """
    if training.early_stopping is not None and not has_validation_data:
        raise ValueError(f"training.early_stopping needs {data_field}, which is not set "
                         f"(set {data_field} or remove training.early_stopping)")
