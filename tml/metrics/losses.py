"""Binary cross-entropy losses: one task, or several with a loss per task.

`binary_cross_entropy` is `torch.nn.functional.binary_cross_entropy_with_logits` with the
arguments a recommender passes (example weights, positive weights) and the mean reduction
over examples: mean(w * l), not sum(w * l) / sum(w), so a loss does not change when
weights are scaled with the batch (TwHIN's negatives weigh B / num_negatives each).
`multi_task_bce` is the original tml's `build_multi_task_loss` for BCE.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.nn import functional

REDUCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "mean": torch.mean, "sum": torch.sum, "max": torch.max, "min": torch.min}


def binary_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                         weights: torch.Tensor | None = None,
                         pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean weighted binary cross-entropy of logits against 0/1 labels (any shape).

    `pos_weight` (broadcast along the last dim: one per task) multiplies the positives'
    term, for classes rarer in training than in serving.
    """
    return functional.binary_cross_entropy_with_logits(
        logits, labels.to(logits.dtype), weight=weights, pos_weight=pos_weight)


def multi_task_bce(tasks: Sequence[str], pos_weights: Sequence[float] | None = None,
                   global_reduction: str = "mean"
                   ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None],
                                 dict[str, torch.Tensor]]:
    """A loss of (N, T) logits, labels and weights: `loss/<task>` per task and `loss`.

    `loss` reduces the task losses with `global_reduction` (mean, sum, max or min).
    """
    if global_reduction not in REDUCTIONS:
        raise ValueError(f"global_reduction {global_reduction!r}: use one of "
                         f"{', '.join(REDUCTIONS)}")
    if pos_weights is not None and len(pos_weights) != len(tasks):
        raise ValueError(f"{len(pos_weights)} pos_weights for {len(tasks)} tasks")
    reduce = REDUCTIONS[global_reduction]

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor,
                weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        losses = {}
        for index, task in enumerate(tasks):
            pos_weight = None if pos_weights is None else \
                logits.new_tensor(pos_weights[index])
            losses[f"loss/{task}"] = binary_cross_entropy(
                logits[:, index], labels[:, index],
                None if weights is None else weights[:, index], pos_weight)
        losses["loss"] = reduce(torch.stack(list(losses.values())))
        return losses

    return loss_fn
