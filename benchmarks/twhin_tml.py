"""tml TwHIN under measurement: every rank reports its time, steps, memory and quality.

    python benchmarks/twhin_tml.py --config C.yaml --save_dir D --out_dir O --nproc N
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

from tml.common.run_training import maybe_run_training


def train(config_yaml_path: str, save_dir: str, out_dir: str) -> None:
    import torch

    from projects.twhin.config import TwhinConfig
    from projects.twhin.run import run
    from tml.core.config import load_config_from_yaml

    start = time.perf_counter()
    result = run(load_config_from_yaml(TwhinConfig, config_yaml_path), save_dir=save_dir)
    total = time.perf_counter() - start
    rank = int(os.environ["RANK"])
    report = {"rank": rank, "world_size": int(os.environ["WORLD_SIZE"]),
              "steps": result.final_step - result.start_step,
              "total_seconds": total,
              "train_seconds": getattr(result, "train_seconds", None) or total,
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "auc": result.eval_metrics.get("auc"), "threads": torch.get_num_threads()}
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
