"""tml TwHIN under measurement: every rank reports its time, steps, memory and quality.

Besides wall-clock time, each rank reports the CPU time of its training steps (the train
pipeline's `progress`, after `CPU_SKIP_STEPS` warm-up steps): the main thread's own CPU
time per step and the whole process's (the batch-reading thread included). On a host whose
cores other jobs share, wall-clock time measures them too; CPU time mostly does not (it
still sees their cache and memory-bandwidth pressure).

    python benchmarks/twhin_tml.py --config C.yaml --save_dir D --out_dir O --nproc N
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import time
from collections.abc import Callable, Iterator
from typing import Any

from tml.common.run_training import maybe_run_training

CPU_SKIP_STEPS = 10


# `benchmarks.ab` runs this file on an older revision's code too: `wrapped_progress` lives
# here (not in a module of the tree under test) and handles both kinds of training loop.
Progress = Callable[[Any], Any]


@contextlib.contextmanager
def wrapped_progress(wrap: Callable[[Progress], Progress]) -> Iterator[None]:
    """While inside, every training pipeline's `progress` is `wrap(its progress)`."""
    import tml.core.custom_training_loop as ctl

    if hasattr(ctl, "train_pipeline"):
        original = ctl.train_pipeline

        def make(model, optimizer, device):  # noqa: ANN001, ANN202
            pipeline = original(model, optimizer, device)
            pipeline.progress = wrap(pipeline.progress)
            return pipeline

        ctl.train_pipeline = make
        try:
            yield
        finally:
            ctl.train_pipeline = original
        return
    original_class = ctl.TrainPipelineSparseDist

    class Wrapped(original_class):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.progress = wrap(super().progress)  # type: ignore[method-assign]

    ctl.TrainPipelineSparseDist = Wrapped
    try:
        yield
    finally:
        ctl.TrainPipelineSparseDist = original_class


def _measured(cpu: dict[str, list[float]]):  # noqa: ANN202
    """A `wrapped_progress` wrapper recording each `progress` call's thread and process CPU."""

    def wrap(progress):  # noqa: ANN001, ANN202
        def measured(dataloader_iter):  # noqa: ANN001, ANN202
            thread, process = time.thread_time(), time.process_time()
            out = progress(dataloader_iter)
            cpu["thread"].append(time.thread_time() - thread)
            cpu["process"].append(time.process_time() - process)
            return out
        return measured

    return wrap


def train(config_yaml_path: str, save_dir: str, out_dir: str) -> None:
    import torch

    from projects.twhin.config import TwhinConfig
    from projects.twhin.run import run
    from tml.core.config import load_config_from_yaml

    cpu: dict[str, list[float]] = {"thread": [], "process": []}
    start = time.perf_counter()
    with wrapped_progress(_measured(cpu)):
        result = run(load_config_from_yaml(TwhinConfig, config_yaml_path), save_dir=save_dir)
    total = time.perf_counter() - start
    steady = {kind: sorted(times[CPU_SKIP_STEPS:]) for kind, times in cpu.items()}
    rank = int(os.environ["RANK"])
    report = {"rank": rank, "world_size": int(os.environ["WORLD_SIZE"]),
              "steps": result.final_step - result.start_step,
              "total_seconds": total,
              "train_seconds": getattr(result, "train_seconds", None) or total,
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "auc": result.eval_metrics.get("auc"), "threads": torch.get_num_threads(),
              **{f"step_{kind}_cpu_ms": (1000 * sum(times) / len(times) if times else None)
                 for kind, times in steady.items()},
              **{f"step_{kind}_cpu_ms_median": (1000 * times[len(times) // 2] if times else None)
                 for kind, times in steady.items()}}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--config_yaml_path", "--config", dest="config", required=True)
    parser.add_argument("--save_dir", required=True)
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--nproc", type=int, default=1)
    args, _ = parser.parse_known_args()
    maybe_run_training(train, __name__, nproc_per_node=args.nproc,
                       config_yaml_path=args.config, save_dir=args.save_dir,
                       out_dir=args.out_dir)
