"""Launcher test script: training kwargs named like torchrun's options (n, d, e, nnodes, ...).

argparse lets `--n=1` abbreviate `--nnodes` / `--nproc_per_node`; the kwargs must still reach
the workers unchanged. Its own parser sets allow_abbrev=False, as scripts taking forwarded
kwargs should.
"""

import argparse
import json
import os

from tml.common.cli import run_cli
from tml.common.run_training import maybe_run_training


def train(out_dir, n, d, e, nnodes, standalone, node_rank, m, nproc, rdzv_endpoint_):
    rank = int(os.environ["RANK"])
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"world_size": int(os.environ["WORLD_SIZE"]),
                   "values": {"n": n, "d": d, "e": e, "nnodes": nnodes,
                              "standalone": standalone, "node_rank": node_rank, "m": m,
                              "nproc": nproc, "rdzv_endpoint_": rdzv_endpoint_}}, f)


def main():
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--out_dir", required=True)
    args, _ = parser.parse_known_args()
    maybe_run_training(train, __name__, nproc_per_node=2, out_dir=args.out_dir,
                       n=1, d="--nnodes=9", e=[1, 2], nnodes=7, standalone=False,
                       node_rank="-m", m="x.py", nproc=3, rdzv_endpoint_="h:1")


if __name__ == "__main__":
    run_cli(main)
