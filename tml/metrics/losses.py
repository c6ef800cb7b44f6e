"""Binary cross-entropy losses: one task, or several with a loss per task.

`binary_cross_entropy` is `torch.nn.functional.binary_cross_entropy_with_logits` with the
arguments a recommender passes (example weights, positive weights) and the mean reduction
over examples: mean(w * l), not sum(w * l) / sum(w), so a loss does not change when
weights are scaled with the batch (TwHIN's negatives weigh B / num_negatives each).
`multi_task_bce` is the original tml's `build_multi_task_loss` for BCE.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Sequence

import torch
from torch.nn import functional

from tml.common import native

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


BCE_KERNEL_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bce_kernel.c")
_BCE_SIGNATURES = {
    "tml_bce_loss": [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                     ctypes.c_int64, ctypes.c_float, ctypes.c_void_p],
    "tml_bce_grad": [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                     ctypes.c_int64, ctypes.c_float, ctypes.c_float, ctypes.c_void_p],
}


def bce_kernel() -> ctypes.CDLL | None:
    """The compiled `bce_kernel.c` (`tml.common.native`), or None: torch ops then."""
    return native.load_functions(BCE_KERNEL_SOURCE, _BCE_SIGNATURES)


def _float32_cpu(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


class _PositivesThenNegativesBCE(torch.autograd.Function):
    """`positives_then_negatives_bce`'s loss, and its gradient in one backward."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor,  # noqa: ANN001
                weights: torch.Tensor, negative_weight: float) -> torch.Tensor:
        ctx.negative_weight = negative_weight
        ctx.kernel = bce_kernel() if _float32_cpu(logits) else None
        if ctx.kernel is not None:
            logits = logits.contiguous()
            labels, weights = (t.to(torch.float32).contiguous() for t in (labels, weights))
            loss = logits.new_empty(())
            _check(ctx.kernel.tml_bce_loss(logits.data_ptr(), logits.numel(), labels.data_ptr(),
                                           weights.data_ptr(), labels.numel(), negative_weight,
                                           loss.data_ptr()))
            ctx.save_for_backward(logits, labels, weights)
            return loss
        num_positives = labels.numel()
        positives, negatives = logits[:num_positives], logits[num_positives:]
        labels, weights = labels.to(logits.dtype), weights.to(logits.dtype)
        # softplus(x) - y x is BCE's -(y log s(x) + (1 - y) log(1 - s(x))).
        total = ((functional.softplus(positives) - labels * positives) * weights).sum()
        total = total + functional.softplus(negatives).sum() * negative_weight
        ctx.save_for_backward(logits, labels, weights)
        return total / logits.numel()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
        logits, labels, weights = ctx.saved_tensors
        if ctx.kernel is not None:
            d_logits = torch.empty_like(logits)
            _check(ctx.kernel.tml_bce_grad(logits.data_ptr(), logits.numel(), labels.data_ptr(),
                                           weights.data_ptr(), labels.numel(),
                                           ctx.negative_weight, float(grad), d_logits.data_ptr()))
            return d_logits, None, None, None
        num_positives = labels.numel()
        scale = grad / logits.numel()
        d_logits = torch.sigmoid(logits)
        d_logits[:num_positives].sub_(labels).mul_(weights * scale)
        d_logits[num_positives:].mul_(scale * ctx.negative_weight)
        return d_logits, None, None, None


def _check(status: int) -> None:
    if status:
        raise ValueError("bce kernel: more positives than logits")


def positives_then_negatives_bce(logits: torch.Tensor, labels: torch.Tensor,
                                 weights: torch.Tensor, negative_weight: float
                                 ) -> torch.Tensor:
    """`binary_cross_entropy(logits, all_labels, all_weights)` where the first
    `labels.numel()` logits are the positives, with those labels and weights, and the rest
    are negatives (label 0), each weighing `negative_weight`; without building the two
    full-length label and weight tensors.

    Why: a contrastive step's logits are a few positives and many negatives (TwHIN: B
    positives, 2Bn in-batch negatives). torch's weighted BCE makes about six passes over all
    of them forward and four backward; this makes two each (softplus and its sum; sigmoid
    and one scale), which was ~5% of a 4000-edge CPU step (docs/performance.md). Same value
    and gradient up to float rounding (tests/tml/metrics/test_losses.py).
    """
    return _PositivesThenNegativesBCE.apply(logits, labels, weights, float(negative_weight))


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
