"""Train TwHIN embeddings.

    python projects/twhin/run.py --config_yaml_path=projects/twhin/config/local.yaml \
        --save_dir=runs/twhin [--nproc_per_node=2]

starts its own workers through `maybe_run_training`; the original launch line

    torchrun --standalone --nnodes 1 --nproc_per_node 2 projects/twhin/run.py \
        --config_yaml_path=projects/twhin/config/local.yaml --save_dir=/some/save/dir

runs the same code in workers torchrun started. Reads like TorchRec's golden example: set
up the device, build the tables on the meta device with fused optimizers, shard, combine
optimizers, train: all of it is `tml.trainer`; this file only names TwHIN's parts.

`--only_evaluate` runs an evaluator beside a training job instead: it follows the save_dir,
evaluates every new complete checkpoint once (held-out AUC) and writes the metrics to
`<checkpoint>/evaluation.json`; it stops once the checkpoint of the run's final step (or
`--evaluate_until_step`) is evaluated. See docs/checkpoints.md.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

# Run as a file (PEP 366): `python projects/.../x.py`, torchrun and Bazel run this module
# without a package; name it, and put the directory above the top package on the path (in
# place of the script's own directory, whose modules would shadow top-level ones).
if not __package__:
    import os as _os
    import sys as _sys

    _top, _names = _os.path.dirname(_os.path.abspath(__file__)), []
    while _os.path.isfile(_os.path.join(_top, "__init__.py")):
        _top, _name = _os.path.split(_top)
        _names.insert(0, _name)
    if _sys.path and _os.path.abspath(_sys.path[0] or ".") == _os.path.dirname(
            _os.path.abspath(__file__)):
        _sys.path[0] = _top
    elif _top not in _sys.path:
        _sys.path.insert(0, _top)
    __package__ = ".".join(_names)

import tml  # noqa: F401  (logging set-up before torchrec is imported)
from tml.common.cli import run_cli
from tml.trainer.entry import load_worker_config, read_run_request, require_save_dir, run_summary

from .config import TwhinConfig

if TYPE_CHECKING:
    import tml.core.custom_training_loop as ctl
    from tml.trainer import ProjectParts

logger = logging.getLogger(__name__)

# Validation metrics of `link_prediction.validation_evaluate` (filtered ranks of the
# validation edges), computed during training when training.early_stopping watches one.
RANK_METRICS = ("mrr", "hits_at_10")


def twhin_parts(all_config: TwhinConfig) -> ProjectParts:
    """What the trainer needs from TwHIN: its model, data and tables."""
    from tml.trainer import ProjectParts

    from .data.data import create_dataset
    from .models.models import TwhinModel, TwhinModelAndLoss
    from .optimizer import TRANSLATION_OPT_KEY
    from .signature import check_checkpoint_matches, checkpoint_extra

    model_config, validation = all_config.model, all_config.validation_data

    def train_data(rank: int, world_size: int, num_epochs: int):  # noqa: ANN202
        # From the reader processes when the run has them (tml.readers), else read here.
        from .data.readers import reader_train_dataset

        dataset = reader_train_dataset(all_config, rank, world_size)
        if dataset is not None:
            return dataset
        return create_dataset(all_config.train_data, model_config, rank, world_size,
                              num_epochs=num_epochs)

    def validation_data(rank: int, world_size: int):  # noqa: ANN202
        from .data.readers import reader_validation_dataset

        dataset = reader_validation_dataset(all_config, rank, world_size)
        if dataset is not None:
            return dataset
        return create_dataset(validation, model_config, rank, world_size)

    # Every checkpoint records how this model scores (operators, tables), and one trained
    # as another model is refused before it is loaded (same shapes, wrong scores).
    def verify_checkpoint(path: str) -> None:
        check_checkpoint_matches(all_config, path)

    def verify_warm_start(path: str) -> None:
        check_checkpoint_matches(all_config, path, grown=True)

    # Link-prediction metrics only when early stopping watches one: ranking against whole
    # tables costs far more than the default metrics on large graphs.
    evaluate = None
    stopping = all_config.training.early_stopping
    if validation is not None and stopping is not None and stopping.metric in RANK_METRICS:
        from .link_prediction import validation_evaluate

        steps = all_config.training.num_eval_steps
        evaluate = validation_evaluate(
            all_config, steps * validation.per_replica_batch_size if steps >= 0 else 1 << 62,
            all_config.training.seed)

    return ProjectParts(
        model=lambda: TwhinModelAndLoss(TwhinModel(model_config, all_config.train_data)),
        tables=model_config.embeddings.tables,
        dense_optimizer=model_config.translation_optimizer,
        dense_optimizer_key=TRANSLATION_OPT_KEY,
        train_data=train_data,
        batch_size=all_config.train_data.per_replica_batch_size,
        validation_data=validation_data if validation is not None else None,
        evaluate=evaluate,
        checkpoint_extra=checkpoint_extra(all_config),
        verify_checkpoint=verify_checkpoint,
        verify_warm_start=verify_warm_start,
    )


def run(all_config: TwhinConfig, save_dir: str | None = None, only_evaluate: bool = False,
        evaluate_until_step: int | None = None) -> ctl.TrainResult:
    """Train with `all_config` in this worker (one of WORLD_SIZE); returns what it did.

    With `only_evaluate`, evaluate the checkpoints in save_dir instead of training (see the
    module docstring); `final_step` is then the last step evaluated.
    """
    # Imported here, in the workers: the launcher process only validates the config and
    # starts them, and skipping torchrec and fbgemm there saves seconds on every launch.
    from tml.trainer import train

    save_dir = require_save_dir(save_dir, all_config.training.save_dir, "the config")
    return train(twhin_parts(all_config), all_config.training, all_config.runtime, save_dir,
                 only_evaluate=only_evaluate, evaluate_until_step=evaluate_until_step)


def train_from_yaml(config_yaml_path: str, save_dir: str | None = None,
                    only_evaluate: bool = False, evaluate_until_step: int | None = None,
                    overrides: list[str] | None = None) -> dict:
    """Worker entry point: load the config (with `overrides`, `a.b=c`) and train (or
    evaluate); a summary of the run."""
    from tml.trainer.launch import finish_workers

    result = run(load_worker_config(TwhinConfig, config_yaml_path, overrides), save_dir=save_dir,
                 only_evaluate=only_evaluate, evaluate_until_step=evaluate_until_step)
    finish_workers()
    return run_summary(result)


def serve_from_yaml(config_yaml_path: str, save_dir: str | None = None,
                    only_evaluate: bool = False, evaluate_until_step: int | None = None,
                    overrides: list[str] | None = None) -> None:
    """Reader entry point (`TML_ROLE=reader`): serve the training data until stopped.

    Takes the trainers' kwargs (the launcher forwards the same ones to both roles), and
    reads the config with the same overrides, so readers and trainers agree on the data."""
    from .data.readers import serve_train_data

    del save_dir, only_evaluate, evaluate_until_step
    serve_train_data(load_worker_config(TwhinConfig, config_yaml_path, overrides))


def main(argv: list[str] | None = None) -> None:
    """Check the flags, the config, the data, the memory and the save_dir, then train.

    Everything a user can get wrong fails here, once, before a worker starts (and in each
    torchrun-started worker before it builds a model), as one line.
    """
    from tml.readers.roles import is_reader
    from tml.trainer.launch import launch

    from .preflight import preflight

    request = read_run_request(TwhinConfig, argv, prog="run.py",
                               description=__doc__.split("\n\n")[0])
    config = request.config
    if not request.only_evaluate and not is_reader():   # a reader checks its data itself
        workers = int(os.environ.get("LOCAL_WORLD_SIZE", request.nproc_per_node or 1))
        preflight(config, request.source, request.save_dir, workers_per_node=workers)
    launch(train_from_yaml, __name__, config.training, nproc_per_node=request.nproc_per_node,
           reader_fn=None if request.only_evaluate else serve_from_yaml,
           readers=config.readers, **request.worker_kwargs())


if __name__ == "__main__":
    run_cli(main)
