"""Held-out evaluation: AUC of true edges against in-batch negatives, and the loss.

Runs on every rank over the same number of validation batches (the sharded lookups are
collectives); torchmetrics gathers the scores of all ranks for an exact AUC.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable

import torch
from torchmetrics.classification import BinaryAUROC

logger = logging.getLogger(__name__)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable, device: torch.device,
             num_steps: int = -1, seed: int = 1234) -> dict[str, float]:
    """AUC and mean loss of `model` (returns `(loss, outputs)`) over `num_steps` batches.

    `num_steps < 0` means all batches. The negatives' sampling is seeded so that repeated
    evaluations of one checkpoint agree.
    """
    was_training = model.training
    model.eval()
    auroc = BinaryAUROC().to(device)
    losses = []
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        limited = batches if num_steps < 0 else itertools.islice(batches, num_steps)
        for batch in limited:
            loss, outputs = model(batch.to(device))
            auroc.update(outputs["logits"], outputs["labels"].long())
            losses.append(loss.detach())
    finally:
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    if not losses:
        return {}
    loss_mean = torch.stack(losses).mean()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(loss_mean)
        loss_mean /= torch.distributed.get_world_size()
    return {"auc": float(auroc.compute()), "loss": float(loss_mean),
            "batches": float(len(losses))}
