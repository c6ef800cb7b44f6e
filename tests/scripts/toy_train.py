"""A toy training script for the launcher tests: each rank writes what it received."""

import argparse
import json
import os
import uuid

from tml.common.cli import run_cli
from tml.common.run_training import maybe_run_training


def train(out_dir, token, count, ratio, flag, nothing, items, text_number, fail_rank,
          crash_once_rank=-1):
    rank = int(os.environ["RANK"])
    restart_count = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if rank == fail_rank:
        raise ValueError(f"planned failure on rank {rank}")
    if rank == crash_once_rank and restart_count == 0:
        os._exit(3)  # a hard crash on the first attempt only
    received = {"token": token, "count": count, "ratio": ratio, "flag": flag,
                "nothing": nothing, "items": items, "text_number": text_number}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "world_size": int(os.environ["WORLD_SIZE"]),
                   "restart_count": restart_count,
                   "group_rank": int(os.environ.get("GROUP_RANK", "0")),
                   "values": received,
                   "types": {k: type(v).__name__ for k, v in received.items()}}, f)
    return rank


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--fail_rank", type=int, default=-1)
    parser.add_argument("--subprocess", action="store_true")
    parser.add_argument("--crash_once_rank", type=int, default=-1)
    parser.add_argument("--max_restarts", type=int, default=None)
    parser.add_argument("--nproc", type=int, default=2)
    args, _ = parser.parse_known_args()
    maybe_run_training(
        train,
        __name__,
        nproc_per_node=args.nproc,
        set_python_path_in_subprocess=args.subprocess,
        max_restarts=args.max_restarts,
        crash_once_rank=args.crash_once_rank,
        out_dir=args.out_dir,
        # Differs on every run of the script: the workers must see the launcher's value.
        token=uuid.uuid4().hex,
        count=3,
        ratio=0.5,
        flag=True,
        nothing=None,
        items=[1, "a", 2.5],
        text_number="42",
        fail_rank=args.fail_rank,
    )


if __name__ == "__main__":
    run_cli(main)
