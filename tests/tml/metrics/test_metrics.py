"""tml.metrics: losses, the stable mean, RCE / NRCE, and their values across 2 workers."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional

from tests.metric_checks import all_metrics, example_data
from tml.metrics.losses import binary_cross_entropy, multi_task_bce
from tml.metrics.rce import NRCE, RCE
from tml.metrics.stable_mean import StableMean


def _ce(p: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> float:
    p = p.double().clamp(1e-7, 1 - 1e-7)
    return float((w * -(y * p.log() + (1 - y) * (1 - p).log())).sum() / w.sum())


def test_binary_cross_entropy_with_weights_and_positive_weights():
    logits, labels, weights = example_data()
    assert torch.allclose(binary_cross_entropy(logits, labels, weights),
                          functional.binary_cross_entropy_with_logits(logits, labels, weights))
    # pos_weight multiplies the positives' term: -w (pw y log s + (1 - y) log(1 - s)).
    s = torch.sigmoid(logits)
    expected = (weights * -(3.0 * labels * s.log() + (1 - labels) * (1 - s).log())).mean()
    assert torch.allclose(binary_cross_entropy(logits, labels, weights, torch.tensor(3.0)),
                          expected, atol=1e-6)


def test_multi_task_bce_gives_a_loss_per_task_and_their_reduction():
    logits, labels, weights = (x.reshape(-1, 1).repeat(1, 2)[:36].reshape(18, 4)
                               for x in example_data())
    tasks = ["fav", "reply", "retweet", "click"]
    losses = multi_task_bce(tasks, pos_weights=[1, 2, 1, 1])(logits, labels, weights)
    assert set(losses) == {f"loss/{t}" for t in tasks} | {"loss"}
    assert torch.allclose(losses["loss/reply"], binary_cross_entropy(
        logits[:, 1], labels[:, 1], weights[:, 1], torch.tensor(2.0)))
    assert torch.allclose(losses["loss"], torch.stack([losses[f"loss/{t}"] for t in tasks]).mean())
    with pytest.raises(ValueError, match="3 pos_weights for 4 tasks"):
        multi_task_bce(tasks, pos_weights=[1, 2, 3])


def test_stable_mean_is_the_weighted_mean_and_exact_where_a_float32_sum_is_not():
    values, weights = torch.arange(10.0), torch.arange(1.0, 11.0)
    mean = StableMean()
    mean.update(values[:4], weights[:4])
    mean.update(values[4:], weights[4:])
    assert math.isclose(float(mean.compute()), float((values * weights).sum() / weights.sum()))
    # 2**24 + 1 added to a float32 sum of 2**24 is lost; the mean of 1.0 stays 1.0.
    big = StableMean()
    big.update(torch.ones(1), torch.tensor(2.0 ** 24))
    big.update(torch.full((1000,), 3.0))
    assert math.isclose(float(big.compute()), (2 ** 24 + 3000) / (2 ** 24 + 1000), rel_tol=1e-12)
    assert math.isnan(float(StableMean().compute()))


def test_rce_and_nrce_against_the_definition():
    logits, labels, weights = (x.double() for x in example_data())
    p = torch.sigmoid(logits)
    base = float((weights * labels).sum() / weights.sum())
    base_ce = _ce(torch.tensor([base], dtype=torch.float64),
                  torch.tensor([base], dtype=torch.float64), torch.ones(1))
    values = all_metrics(logits, labels, weights)
    assert math.isclose(values["rce"], 100 * (1 - _ce(p, labels, weights) / base_ce),
                        rel_tol=1e-9)
    scaled = p * base / float((weights * p).sum() / weights.sum())
    assert math.isclose(values["nrce"], 100 * (1 - _ce(scaled, labels, weights) / base_ce),
                        rel_tol=1e-9)
    # The constant base-rate predictor scores 0; (almost) perfect predictions near 100.
    constant = RCE()
    constant.update(torch.full((37,), base, dtype=torch.float64), labels, weights)
    assert abs(float(constant.compute())) < 1e-9
    perfect = NRCE(from_logits=True)
    perfect.update((labels * 2 - 1) * 30, labels)
    assert float(perfect.compute()) > 99


@pytest.mark.slow
def test_metrics_and_the_logged_loss_are_global_over_two_gloo_workers():
    """Each of 2 real gloo workers holds part of the data (15 and 22 rows): AUROC, RCE,
    NRCE, the stable mean and the ranking metrics equal one process's values on all of it; `global_mean` (the
    loss in the training log) is the mean over workers, not rank 0's value."""
    from tests.launch_checks import launch_checks

    whole = all_metrics(*example_data())
    results = launch_checks(_two_workers, 2)
    for rank in (0, 1):
        for name, value in whole.items():
            assert math.isclose(results[rank][name], value, rel_tol=1e-6), (rank, name)
        assert results[rank]["global_mean"] == 2.0   # ranks hold 1.0 and 3.0


def _two_workers():  # noqa: ANN202  (spawned: importable from this module)
    from tests.metric_checks import two_worker_metrics

    return two_worker_metrics()


def test_ranking_metrics_from_ranks_and_scores():
    from tml.metrics.ranking import RankingMetrics, ranks_from_scores

    ranks = ranks_from_scores(torch.tensor([0.9, 0.1, 0.5]),
                              torch.tensor([[0.1, 0.2], [0.5, 0.6], [0.5, 0.0]]))
    assert ranks.tolist() == [1, 3, 2]            # a tie ranks ahead of the true item
    metric = RankingMetrics(ks=(1, 3))
    metric.update(ranks[:2])
    metric.update(ranks[2:])
    result = metric.compute()
    assert result["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 2) / 3)
    assert result["hits_at_1"] == pytest.approx(1 / 3) and result["hits_at_3"] == 1.0
    assert result["mean_rank"] == 2.0 and result["count"] == 3
    with pytest.raises(ValueError, match="1-based"):
        metric.update(torch.tensor([0]))
