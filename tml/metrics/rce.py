"""Relative cross-entropy: how much better than always predicting the base rate.

    RCE  = 100 * (1 - CE(model) / CE(base rate))
    NRCE = RCE of the model's predictions rescaled so their mean is the base rate

CE is the (weighted) mean binary cross-entropy; the base rate is the (weighted) mean label,
and CE(base rate) its entropy. 0 is as good as the constant predictor, 100 is perfect,
negative is worse (often: badly calibrated; NRCE shows what calibration would give). As in
the original tml's `metrics/rce.py`: probabilities are clipped to [eps, 1 - eps] with eps
1e-7. Unlike the original's NRCE (which rescaled each batch by the means seen so far),
NRCE here rescales every prediction by the final global means, so it does not depend on the
order of the batches or on the number of workers (it keeps the predictions for that, as
AUROC does).
"""

from __future__ import annotations

import torch
import torchmetrics
from torchmetrics.utilities.data import dim_zero_cat

from tml.metrics.stable_mean import StableMean

EPSILON = 1e-7


def clipped_cross_entropy(probabilities: torch.Tensor, labels: torch.Tensor,
                          epsilon: float = EPSILON) -> torch.Tensor:
    """Per-example binary cross-entropy of probabilities clipped to [eps, 1 - eps]."""
    p = probabilities.double().clamp(epsilon, 1.0 - epsilon)
    y = labels.double()
    return -(y * torch.log(p) + (1.0 - y) * torch.log(1.0 - p))


def _relative(model_ce: torch.Tensor, base_rate: torch.Tensor) -> torch.Tensor:
    base_ce = clipped_cross_entropy(base_rate, base_rate)
    return (1.0 - model_ce / base_ce) * 100.0


def _probabilities(predictions: torch.Tensor, from_logits: bool) -> torch.Tensor:
    return torch.sigmoid(predictions.double()) if from_logits else predictions.double()


class RCE(torchmetrics.Metric):
    """Relative cross-entropy (percent) of binary predictions, over every worker.

    Needs at least one positive and one negative label, else nan.
    """

    full_state_update = False

    def __init__(self, from_logits: bool = False, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.from_logits = from_logits
        self.mean_label = StableMean(**kwargs)
        self.cross_entropy = StableMean(**kwargs)

    def update(self, predictions: torch.Tensor, labels: torch.Tensor,
               weights: torch.Tensor | float = 1.0) -> None:
        """Add predictions (probabilities, or logits with `from_logits`) and 0/1 labels."""
        probabilities = _probabilities(predictions.detach(), self.from_logits)
        self.mean_label.update(labels.double(), weights)
        self.cross_entropy.update(clipped_cross_entropy(probabilities, labels), weights)

    def compute(self) -> torch.Tensor:
        return _relative(self.cross_entropy.compute(), self.mean_label.compute())

    def reset(self) -> None:
        super().reset()
        self.mean_label.reset()
        self.cross_entropy.reset()


class NRCE(torchmetrics.Metric):
    """RCE of the predictions rescaled to the base rate (percent), over every worker."""

    full_state_update = False

    def __init__(self, from_logits: bool = False, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.from_logits = from_logits
        for name in ("probabilities", "labels", "weights"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, predictions: torch.Tensor, labels: torch.Tensor,
               weights: torch.Tensor | float = 1.0) -> None:
        probabilities = _probabilities(predictions.detach(), self.from_logits).reshape(-1)
        self.probabilities.append(probabilities)
        self.labels.append(labels.detach().double().reshape(-1))
        self.weights.append(torch.broadcast_to(
            torch.as_tensor(weights, dtype=torch.float64, device=probabilities.device),
            probabilities.shape).reshape(-1).clone())

    def compute(self) -> torch.Tensor:
        p, y, w = (dim_zero_cat(getattr(self, n)) for n in ("probabilities", "labels",
                                                               "weights"))
        base_rate = (w * y).sum() / w.sum()
        normalized = p * base_rate / ((w * p).sum() / w.sum())
        model_ce = (w * clipped_cross_entropy(normalized, y)).sum() / w.sum()
        return _relative(model_ce, base_rate)
