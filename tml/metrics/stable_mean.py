"""`StableMean`: a weighted mean accumulated as (mean, weight sum), merged across workers.

Summing float32 values and dividing at the end loses the small ones once the sum is large
(1e8 ones summed in float32 stop growing at 2**24); updating the mean itself (weighted
Welford: mean += w / W * (x - mean)) keeps it exact to float32's relative precision, as
the original tml's `metrics/aggregation.StableMean` did.
"""

from __future__ import annotations

import torch
import torchmetrics


def update_mean(mean: torch.Tensor, weight_sum: torch.Tensor, value: torch.Tensor,
                weight: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, weight_sum) after adding `value` with `weight` (broadcast to its shape)."""
    value = value.to(mean.dtype)
    weight = torch.broadcast_to(torch.as_tensor(weight, dtype=mean.dtype,
                                                device=mean.device), value.shape)
    total = weight_sum + weight.sum()
    if float(total) == 0.0:
        return mean, total
    return mean + (weight * (value - mean)).sum() / total, total


def merge_means(state: torch.Tensor) -> torch.Tensor:
    """Merge gathered `(mean, weight_sum)` rows (one per worker) into one such pair."""
    if state.dim() == 1:
        return state
    mean, total = update_mean(state.new_zeros(()), state.new_zeros(()), state[:, 0],
                              state[:, 1])
    return torch.stack([mean, total])


class StableMean(torchmetrics.Metric):
    """Weighted mean of everything passed to `update`, over every worker."""

    full_state_update = False

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.add_state("mean_and_weight_sum", default=torch.zeros(2, dtype=torch.float64),
                       dist_reduce_fx=merge_means)

    def update(self, value: torch.Tensor, weight: torch.Tensor | float = 1.0) -> None:
        """Add `value` (any shape) with `weight` (broadcastable to it)."""
        mean, total = update_mean(self.mean_and_weight_sum[0], self.mean_and_weight_sum[1],
                                  value.detach(), weight)
        self.mean_and_weight_sum = torch.stack([mean, total])

    def compute(self) -> torch.Tensor:
        """The mean (nan before any weight was added)."""
        mean, total = self.mean_and_weight_sum
        return mean if float(total) > 0 else torch.tensor(float("nan"), dtype=mean.dtype)
