"""PyTorch-BigGraph 1.0 on tml's generated graph; runs in its own venv (.venv-pbg).

Why a separate program: PBG 1.0 needs `setuptools<81` and its own dependencies (h5py),
which stay out of tml's environment. `benchmarks.peers` (tml's side) writes the graph's
train edges as .npy arrays next to a cache directory; this program turns them into PBG's
partitioned HDF5 edge format directly (one partition per entity type, `edges_0_0.h5`, the
format PBG's own importer writes, without its ~9-minute TSV pass), trains PBG, and writes
the trained tables and translations as .npy for tml's side to score on the held-out edges.

The model is tml's TwHIN model in PBG's terms: entity types user and tweet, one relation
per tml relation (same order, so PBG's relation index is tml's `rel` column), translation
operator on the right-hand side, dot comparator, no global embedding and no bias, logistic
loss, `num_batch_negs` in-batch negatives on both sides and no uniform ones. PBG trains with
its own optimiser (row-wise Adagrad), as a PBG user would.

    .venv-pbg/bin/python benchmarks/peers/pbg_train.py --cache C --out O --workers 2 ...
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import re
import shutil
import time

import h5py
import numpy as np

RELATIONS = ("fav", "reply", "retweet", "magic_recs")


def write_hdf5(cache: str) -> None:
    """cache/{lhs,rel,rhs}.npy + counts.json -> cache/pbg/ (entity counts, edges_0_0.h5)."""
    pbg = os.path.join(cache, "pbg")
    if os.path.exists(os.path.join(pbg, "_SUCCESS")):
        return
    counts = json.load(open(os.path.join(cache, "counts.json")))
    tmp = pbg + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "edges"))
    for entity in ("user", "tweet"):
        with open(os.path.join(tmp, f"entity_count_{entity}_0.txt"), "w") as f:
            f.write(f"{counts[entity]}\n")
    with h5py.File(os.path.join(tmp, "edges", "edges_0_0.h5"), "w") as hf:
        hf.attrs["format_version"] = 1
        for name in ("lhs", "rhs", "rel"):
            hf.create_dataset(name, data=np.load(os.path.join(cache, f"{name}.npy"))
                              .astype(np.int64))
    open(os.path.join(tmp, "_SUCCESS"), "w").close()
    shutil.rmtree(pbg, ignore_errors=True)
    os.rename(tmp, pbg)


class _BucketTimes(logging.Handler):
    """Collects PBG's own per-bucket training time ("Processed N edges in T s")."""

    PATTERN = re.compile(r"Processed (\d+) edges in ([0-9.]+) s")

    def __init__(self) -> None:
        super().__init__()
        self.edges, self.seconds = 0, 0.0

    def emit(self, record: logging.LogRecord) -> None:
        match = self.PATTERN.search(record.getMessage())
        if match:
            self.edges += int(match.group(1))
            self.seconds += float(match.group(2))


def train(args: argparse.Namespace) -> dict:
    import torch
    from torchbiggraph.config import parse_config
    from torchbiggraph.train import train as pbg_train
    from torchbiggraph.util import SubprocessInitializer, setup_logging

    pbg = os.path.join(args.cache, "pbg")
    checkpoints = os.path.join(args.out, "checkpoints")
    config = parse_config({
        "entity_path": pbg, "edge_paths": [os.path.join(pbg, "edges")],
        "checkpoint_path": checkpoints,
        "entities": {"user": {"num_partitions": 1}, "tweet": {"num_partitions": 1}},
        "relations": [{"name": r, "lhs": "user", "rhs": "tweet", "operator": "translation"}
                      for r in RELATIONS],
        "dimension": args.dim, "global_emb": False, "comparator": "dot", "bias": False,
        "loss_fn": "logistic", "init_scale": args.init_scale, "lr": args.lr,
        "num_epochs": args.epochs, "batch_size": args.batch,
        "num_batch_negs": args.negatives, "num_uniform_negs": 0,
        "eval_fraction": 0.0, "workers": args.workers, "hogwild_delay": 0.0,
        "verbose": 0,
    })
    setup_logging()
    times = _BucketTimes()
    logging.getLogger("torchbiggraph").addHandler(times)
    start = time.perf_counter()
    subprocess_init = SubprocessInitializer()
    pbg_train(config, subprocess_init=subprocess_init)
    total = time.perf_counter() - start

    version = int(open(os.path.join(checkpoints, "checkpoint_version.txt")).read().strip())
    for entity in ("user", "tweet"):
        with h5py.File(os.path.join(checkpoints, f"embeddings_{entity}_0.v{version}.h5")) as hf:
            np.save(os.path.join(args.out, f"{entity}.npy"), hf["embeddings"][...])
    translations = np.zeros((len(RELATIONS), args.dim), dtype=np.float32)
    with h5py.File(os.path.join(checkpoints, f"model.v{version}.h5")) as hf:
        group = hf["model"]
        for name in group:
            match = re.search(r"rhs_operators\.(\d+)\.translation$", name)
            if match:
                translations[int(match.group(1))] = group[name][...]
    np.save(os.path.join(args.out, "translations.npy"), translations)
    for path in glob.glob(os.path.join(checkpoints, "*.h5")):
        os.remove(path)   # hundreds of MiB per run; the .npy copies are what is scored
    return {"workers": args.workers, "batch": args.batch, "edges": times.edges,
            "train_seconds": times.seconds, "total_seconds": total,
            "edges_per_s": times.edges / times.seconds if times.seconds else 0.0,
            "threads": torch.get_num_threads(), "lr": args.lr}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache", required=True, help="directory with lhs/rel/rhs.npy")
    parser.add_argument("--out", required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--negatives", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--init_scale", type=float, default=0.1)
    parser.add_argument("--prepare_only", action="store_true")
    args = parser.parse_args()
    write_hdf5(args.cache)
    if args.prepare_only:
        return
    os.makedirs(args.out, exist_ok=True)
    report = train(args)
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
