"""One node of a multi-node TwHIN run for the launcher tests: every rank reports itself."""

import argparse
import json
import os

from tml.common.run_training import maybe_run_training


def train(out_dir: str, config_yaml_path: str, save_dir: str) -> None:
    from projects.twhin.config import TwhinConfig
    from projects.twhin.run import run
    from tml.core.config import load_config_from_yaml

    result = run(load_config_from_yaml(TwhinConfig, config_yaml_path), save_dir=save_dir)
    rank = int(os.environ["RANK"])
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "world_size": int(os.environ["WORLD_SIZE"]),
                   "group_rank": int(os.environ["GROUP_RANK"]),
                   "final_step": result.final_step}, f)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--config_yaml_path", required=True)
    parser.add_argument("--save_dir", required=True)
    parser.add_argument("--nproc", type=int, default=2)
    args, _ = parser.parse_known_args()
    maybe_run_training(train, __name__, nproc_per_node=args.nproc, out_dir=args.out_dir,
                       config_yaml_path=args.config_yaml_path, save_dir=args.save_dir)
