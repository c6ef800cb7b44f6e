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
import json
import os
import resource
import time

from tml.common.run_training import maybe_run_training

CPU_SKIP_STEPS = 10


def _measured_pipeline(cpu: dict[str, list[float]]):  # noqa: ANN202
    """`TrainPipelineSparseDist` recording each `progress` call's thread and process CPU."""
    import tml.core.custom_training_loop as ctl

    class Measured(ctl.TrainPipelineSparseDist):  # type: ignore[misc, valid-type]
        def progress(self, dataloader_iter):  # noqa: ANN001, ANN201
            thread, process = time.thread_time(), time.process_time()
            out = super().progress(dataloader_iter)
            cpu["thread"].append(time.thread_time() - thread)
            cpu["process"].append(time.process_time() - process)
            return out

    return ctl, Measured


def train(config_yaml_path: str, save_dir: str, out_dir: str) -> None:
    import torch

    from projects.twhin.config import TwhinConfig
    from projects.twhin.run import run
    from tml.core.config import load_config_from_yaml

    cpu: dict[str, list[float]] = {"thread": [], "process": []}
    ctl, measured = _measured_pipeline(cpu)
    original, ctl.TrainPipelineSparseDist = ctl.TrainPipelineSparseDist, measured
    start = time.perf_counter()
    try:
        result = run(load_config_from_yaml(TwhinConfig, config_yaml_path), save_dir=save_dir)
    finally:
        ctl.TrainPipelineSparseDist = original
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
