"""Planted-community pairs for the tiny project: user u and item i belong to communities
u % 4 and i % 4; a pair is positive (label 1) when they agree. Half the rows positive.

    python -m tests.data.tiny_project.data.generate --out DIR [--rows N] [--seed S]
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

USERS, ITEMS, COMMUNITIES = 64, 32, 4


def pairs(rows: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    users = rng.integers(0, USERS, rows)
    labels = rng.integers(0, 2, rows)
    offset = np.where(labels == 1, 0, rng.integers(1, COMMUNITIES, rows))
    community = (users % COMMUNITIES + offset) % COMMUNITIES
    items = rng.integers(0, ITEMS // COMMUNITIES, rows) * COMMUNITIES + community
    return pa.table({"user": users.astype(np.int64), "item": items.astype(np.int64),
                     "label": labels.astype(np.int64)})


def generate(out: str, rows: int = 4096, seed: int = 0) -> None:
    """train.parquet (`rows`) and validation.parquet (`rows // 4`, another seed) in `out`."""
    os.makedirs(out, exist_ok=True)
    pq.write_table(pairs(rows, seed), os.path.join(out, "train.parquet"))
    pq.write_table(pairs(rows // 4, seed + 1), os.path.join(out, "validation.parquet"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    generate(args.out, args.rows, args.seed)
