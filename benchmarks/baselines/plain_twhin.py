"""The program a user would write instead of tml: TwHIN in plain PyTorch, one process.

Same model and loss as `projects/twhin` (score dot(lhs, rhs + t_rel), in-batch negatives per
relation scored with the relation's translation and labelled 0, negatives weighing as much
as the positives, weighted BCE with logits), `nn.Embedding(sparse=True)` tables and
`torch.optim.SGD`. Reads the same parquet files with pyarrow, in the same order.

    python -m benchmarks.baselines.plain_twhin --config CONFIG.yaml --out report.json
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import resource
import time

import numpy as np
import pyarrow.parquet as pq
import torch
import yaml
from torch import nn
from torch.nn import functional as F
from torchmetrics.classification import BinaryAUROC


def _read_edges(root: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    files = sorted(glob.glob(os.path.join(root, "*.parquet"))) if os.path.isdir(root) \
        else sorted(glob.glob(root))
    table = pq.read_table(files, columns=["lhs", "rel", "rhs"])
    return (table["lhs"].to_numpy(), table["rel"].to_numpy(), table["rhs"].to_numpy())


class PlainTwhin(nn.Module):
    def __init__(self, sizes: list[int], dim: int, relation_tables: torch.Tensor) -> None:
        super().__init__()
        scale = 1.0 / math.sqrt(dim)
        self.tables = nn.ModuleList(nn.Embedding(n, dim, sparse=True) for n in sizes)
        for table in self.tables:
            nn.init.uniform_(table.weight, -scale, scale)
        self.translations = nn.Parameter(torch.zeros(len(relation_tables), dim))
        self.register_buffer("relation_tables", relation_tables)
        self.dim = dim

    def _vectors(self, ids: torch.Tensor, table_of: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(ids), self.dim)
        for index, table in enumerate(self.tables):
            rows = torch.nonzero(table_of == index).squeeze(1)
            out = out.index_put((rows,), table(ids[rows]))
        return out

    def forward(self, lhs: torch.Tensor, rhs: torch.Tensor, rel: torch.Tensor,
                negatives: int) -> torch.Tensor:
        lhs_vec = self._vectors(lhs, self.relation_tables[rel, 0])
        rhs_vec = self._vectors(rhs, self.relation_tables[rel, 1])
        logits = [(lhs_vec * (rhs_vec + self.translations[rel])).sum(-1)]
        for relation in torch.unique(rel).tolist():
            rows = torch.nonzero(rel == relation).squeeze(1)
            count = rows.numel()
            repeats = math.ceil(negatives / count)
            lhs_sample = rows[torch.randperm(count).repeat(repeats)[:negatives]]
            rhs_sample = rows[torch.randperm(count).repeat(repeats)[:negatives]]
            t = self.translations[relation]
            logits.append((lhs_vec[rows] @ (rhs_vec[rhs_sample] + t).T).reshape(-1))
            logits.append(((rhs_vec[rows] + t) @ lhs_vec[lhs_sample].T).reshape(-1))
        return torch.cat(logits)


def _loss(logits: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    negatives = logits.numel() - batch
    labels = torch.cat([torch.ones(batch), torch.zeros(negatives)])
    weights = torch.cat([torch.ones(batch), torch.full((negatives,), batch / max(1, negatives))])
    return F.binary_cross_entropy_with_logits(logits, labels, weights), labels


def evaluate(model: PlainTwhin, root: str, batch: int, negatives: int,
             eval_batches: int = 40) -> float:
    """Held-out AUC: the first `eval_batches` batches of `root`, each positive against the
    in-batch negatives of its relation (labelled 0), seed 1234. `benchmarks.peers` scores
    PyTorch-BigGraph's trained tables with this same function."""
    auroc = BinaryAUROC()
    vl, vrel, vr = (torch.from_numpy(a) for a in _read_edges(root))
    torch.manual_seed(1234)
    with torch.no_grad():
        for index, first in enumerate(range(0, len(vl) - batch + 1, batch)):
            if index >= eval_batches:
                break
            sl = slice(first, first + batch)
            logits = model(vl[sl], vr[sl], vrel[sl], negatives)
            _, labels = _loss(logits, batch)
            auroc.update(logits, labels.long())
    return float(auroc.compute())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True, help="the tml TwHIN YAML (sizes, data)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--eval_batches", type=int, default=40)
    args = parser.parse_args(argv)
    config = yaml.safe_load(open(args.config))
    tables = config["model"]["embeddings"]["tables"]
    names = [t["name"] for t in tables]
    relations = config["model"]["relations"]
    rt = torch.tensor([[names.index(r["lhs"]), names.index(r["rhs"])] for r in relations])
    batch = config["train_data"]["per_replica_batch_size"]
    negatives = config["train_data"]["in_batch_negatives"]
    table_lr = tables[0]["optimizer"]["sgd"]["lr"]
    translation_lr = config["model"]["translation_optimizer"]["sgd"]["lr"]
    epochs = config["training"].get("num_epochs", 1)
    max_steps = config["training"].get("num_train_steps", 10**12)

    start = time.perf_counter()
    torch.manual_seed(0)
    model = PlainTwhin([t["num_embeddings"] for t in tables], tables[0]["embedding_dim"], rt)
    optimizer = torch.optim.SGD([{"params": model.tables.parameters(), "lr": table_lr},
                                 {"params": [model.translations], "lr": translation_lr}])
    lhs, rel, rhs = (torch.from_numpy(a) for a in _read_edges(config["train_data"]["data_root"]))
    steps = 0
    train_start = time.perf_counter()
    for _ in range(epochs):
        for first in range(0, len(lhs) - batch + 1, batch):
            if steps >= max_steps:
                break
            sl = slice(first, first + batch)
            optimizer.zero_grad()
            loss, _ = _loss(model(lhs[sl], rhs[sl], rel[sl], negatives), batch)
            loss.backward()
            optimizer.step()
            steps += 1
    train_seconds = time.perf_counter() - train_start

    auc = evaluate(model, config["validation_data"]["data_root"], batch, negatives,
                   args.eval_batches)
    report = {"steps": steps, "batch": batch, "train_seconds": train_seconds,
              "total_seconds": time.perf_counter() - start,
              "edges_per_s": steps * batch / train_seconds,
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "auc": auc, "threads": torch.get_num_threads()}
    with open(args.out, "w") as f:
        json.dump(report, f)
    return report


if __name__ == "__main__":
    main()
