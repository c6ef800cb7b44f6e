"""Worker functions of tests/tml/metrics/test_metrics.py, run in 2 real gloo workers (spawned)."""

from __future__ import annotations

import torch


def example_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed logits, 0/1 labels and weights: 37 rows (split unevenly between 2 ranks)."""
    generator = torch.Generator().manual_seed(5)
    labels = (torch.rand(37, generator=generator) < 0.3).float()
    logits = torch.randn(37, generator=generator) + 1.5 * labels
    weights = torch.rand(37, generator=generator) + 0.5
    return logits, labels, weights


def all_metrics(logits: torch.Tensor, labels: torch.Tensor,
                weights: torch.Tensor) -> dict[str, float]:
    """AUROC, RCE, NRCE, the weighted StableMean of the logits and ranking metrics (of
    ranks made from the logits), in this process group."""
    from torchmetrics.classification import BinaryAUROC

    from tml.metrics.ranking import RankingMetrics
    from tml.metrics.rce import NRCE, RCE
    from tml.metrics.stable_mean import StableMean

    auroc, rce, nrce, mean = BinaryAUROC(), RCE(from_logits=True), NRCE(from_logits=True), \
        StableMean()
    ranking = RankingMetrics(ks=(1, 3))
    # Two updates per rank: states accumulate across batches as well as across ranks.
    for part in (slice(0, 3), slice(3, None)):
        auroc.update(logits[part], labels[part].long())
        rce.update(logits[part], labels[part], weights[part])
        nrce.update(logits[part], labels[part], weights[part])
        mean.update(logits[part], weights[part])
        ranking.update((logits[part].abs() * 3).long() + 1)
    ranks = ranking.compute()
    return {"auc": float(auroc.compute()), "rce": float(rce.compute()),
            "nrce": float(nrce.compute()), "mean": float(mean.compute()),
            "mrr": ranks["mrr"], "hits_at_3": ranks["hits_at_3"], "ranks": ranks["count"]}


def two_worker_metrics() -> dict[str, float]:
    """Each of 2 ranks holds part of `example_data` (rank 0: 15 rows, rank 1: 22)."""
    import torch.distributed as dist

    from tml.metrics.reduce import global_mean

    dist.init_process_group("gloo")
    try:
        rank = dist.get_rank()
        logits, labels, weights = example_data()
        part = slice(0, 15) if rank == 0 else slice(15, None)
        result = all_metrics(logits[part], labels[part], weights[part])
        result["global_mean"] = global_mean(torch.tensor(1.0 + rank * 2.0))
        return result
    finally:
        dist.destroy_process_group()
