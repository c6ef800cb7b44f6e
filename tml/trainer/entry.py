"""The command line of a project's training script, read the same way for every project.

Why here: every `projects/<name>/run.py` takes the original's flags (`--config_yaml_path`,
`--save_dir`), starts its own workers (`--nproc_per_node`), can run as an evaluator beside
a training job (`--only_evaluate`, `--evaluate_until_step`) and takes config overrides
(`--set a.b=c`, or `--a.b=c`), and hands its workers the same keyword arguments. Written
once, a second project cannot drift from the first (a save_dir left relative, a looser
`--overrides`, dotted flags only in one of them).

    request = read_run_request(MyConfig, argv, prog="run.py", description=__doc__)
    launch(train_from_yaml, __name__, request.config.training,
           nproc_per_node=request.nproc_per_node, **request.worker_kwargs())

and in each worker `load_worker_config(MyConfig, config_yaml_path, overrides)` reads the
same config back.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from tml.common.cli import StrictArgumentParser, split_dotted_overrides
from tml.core.config.overrides import load_config_with_overrides
from tml.errors import ConfigError

C = TypeVar("C", bound=BaseModel)


def _flag(text: str) -> bool:
    # nargs="?": the self-launched workers receive it back as --only_evaluate=true.
    return text.lower() in ("1", "true", "yes")


def _json_list(text: str) -> list[str]:
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"--overrides must be a JSON list of KEY=VALUE strings, not {text!r}")
    return value


def training_parser(prog: str = "run.py", description: str = "") -> StrictArgumentParser:
    """The flags of a training script; add a project's own to it before parsing."""
    parser = StrictArgumentParser(prog=prog, description=description)
    parser.add_argument("--config_yaml_path", required=True, help="The run's YAML config.")
    parser.add_argument("--save_dir", default=None, help="Checkpoint directory (overrides "
                        "training.save_dir; one of the two is required).")
    parser.add_argument("--nproc_per_node", type=int, default=None,
                        help="Workers to start when not launched by torchrun.")
    parser.add_argument("--only_evaluate", nargs="?", const=True, default=False, type=_flag,
                        help="Evaluate each new complete checkpoint in save_dir once, beside "
                        "a training job, instead of training.")
    parser.add_argument("--evaluate_until_step", type=int, default=None,
                        help="With --only_evaluate: stop after evaluating a checkpoint at "
                        "this step or later (default: the run's final step).")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="Override a config value, e.g. training.num_epochs=3 "
                        "(repeatable); --training.num_epochs=3 is the same.")
    # The launcher forwards the overrides to the workers it starts as one JSON list.
    parser.add_argument("--overrides", type=_json_list, default=[], help=argparse.SUPPRESS)
    return parser


def require_save_dir(save_dir: str | None, configured: str | None, source: str) -> str:
    """`--save_dir`, else `training.save_dir` (`configured`), as an absolute path.

    Without either the run is refused: a default directory (the original `/tmp/model`) is
    shared by every run on the machine, and a run there resumes whatever another left.
    """
    chosen = save_dir or configured
    if not chosen:
        raise ConfigError(f"{source}: no save_dir: pass --save_dir or set training.save_dir "
                          "(there is no default, so that two runs never share one)")
    return os.path.abspath(chosen)


@dataclass(frozen=True)
class RunRequest(Generic[C]):
    """What the command line asked for, with the config read and checked."""

    config: C
    source: str                  # the config file; says `(with --set)` when overridden
    config_yaml_path: str
    save_dir: str                # absolute
    overrides: list[str]
    nproc_per_node: int | None
    only_evaluate: bool
    evaluate_until_step: int | None
    args: argparse.Namespace     # every flag, a project's own included

    def worker_kwargs(self) -> dict[str, Any]:
        """The keyword arguments the launcher hands each worker's `train_from_yaml`."""
        kwargs: dict[str, Any] = {"config_yaml_path": self.config_yaml_path,
                                  "save_dir": self.save_dir}
        if self.overrides:
            kwargs["overrides"] = list(self.overrides)
        if self.only_evaluate:
            kwargs["only_evaluate"] = True
            if self.evaluate_until_step is not None:
                kwargs["evaluate_until_step"] = self.evaluate_until_step
        return kwargs


def read_run_request(config_type: type[C], argv: Sequence[str] | None = None,
                     prog: str = "run.py", description: str = "",
                     parser: StrictArgumentParser | None = None) -> RunRequest[C]:
    """Parse the flags (unknown ones refused), read the config with the overrides and find
    the save_dir: every mistake is one `ConfigError` line, before any worker starts."""
    argv, dotted = split_dotted_overrides(sys.argv[1:] if argv is None else list(argv))
    parser = parser or training_parser(prog, description)
    args = parser.parse_args(argv)
    overrides = [*args.overrides, *args.set, *dotted]
    config, _, source = load_config_with_overrides(config_type, args.config_yaml_path,
                                                   overrides)
    training = getattr(config, "training", None)
    save_dir = require_save_dir(args.save_dir, getattr(training, "save_dir", None), source)
    return RunRequest(config=config, source=source, config_yaml_path=args.config_yaml_path,
                      save_dir=save_dir, overrides=overrides,
                      nproc_per_node=args.nproc_per_node, only_evaluate=args.only_evaluate,
                      evaluate_until_step=args.evaluate_until_step, args=args)


def load_worker_config(config_type: type[C], config_yaml_path: str,
                       overrides: Sequence[str] | None = None) -> C:
    """The config in a worker: the same file and overrides the launcher checked."""
    return load_config_with_overrides(config_type, config_yaml_path, overrides or ())[0]


def run_summary(result: Any) -> dict[str, Any]:
    """What `train_from_yaml` returns (rank 0's is the launcher's result): the final step,
    the checkpoint and the last evaluation's metrics as `eval_<name>`."""
    return {"final_step": result.final_step, "checkpoint": result.checkpoint,
            **{f"eval_{k}": v for k, v in result.eval_metrics.items()}}
