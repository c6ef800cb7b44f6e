"""Ranking metrics from the rank of each true item among its candidates: MRR, Hits@k and
the mean rank, summed over every worker.

A rank is 1-based (1: the true item scored best). Callers compute ranks their own way
(filtered or not, ties as they choose) and pass them here; the metric only aggregates, so
every rank's share counts once however the queries were split between workers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchmetrics


def ranks_from_scores(true_scores: torch.Tensor, candidate_scores: torch.Tensor) -> torch.Tensor:
    """(N,) 1-based ranks of N true items among their (N, C) candidates; ties count
    against the true item (a candidate scoring the same ranks ahead of it)."""
    return 1 + (candidate_scores >= true_scores.unsqueeze(1)).sum(1)


class RankingMetrics(torchmetrics.Metric):
    """`mrr`, `hits_at_<k>` for each k, `mean_rank` and `count` of the ranks seen."""

    full_state_update = False

    def __init__(self, ks: Sequence[int] = (1, 3, 10), **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.ks = tuple(int(k) for k in ks)
        self.add_state("reciprocal_sum", default=torch.zeros((), dtype=torch.float64),
                       dist_reduce_fx="sum")
        self.add_state("rank_sum", default=torch.zeros((), dtype=torch.float64),
                       dist_reduce_fx="sum")
        self.add_state("hits", default=torch.zeros(len(self.ks), dtype=torch.float64),
                       dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.float64),
                       dist_reduce_fx="sum")

    def update(self, ranks: torch.Tensor) -> None:
        """Add 1-based ranks (any shape)."""
        ranks = ranks.detach().reshape(-1).double()
        if ranks.numel() and float(ranks.min()) < 1:
            raise ValueError("ranks are 1-based: got a rank below 1")
        self.reciprocal_sum += (1.0 / ranks).sum()
        self.rank_sum += ranks.sum()
        for index, k in enumerate(self.ks):
            self.hits[index] += (ranks <= k).sum()
        self.count += ranks.numel()

    def compute(self) -> dict[str, float]:
        count = float(self.count)
        if not count:
            return {"count": 0.0}
        result = {"mrr": float(self.reciprocal_sum) / count,
                  "mean_rank": float(self.rank_sum) / count, "count": count}
        result.update({f"hits_at_{k}": float(h) / count for k, h in zip(self.ks, self.hits)})
        return result
