"""Held-out evaluation of a binary model: AUROC, RCE, NRCE and the loss, over all workers.

Runs on every rank over the same number of validation batches (a sharded model's lookups
are collectives); torchmetrics gathers every rank's state, so the metrics are those of all
the batches every rank read (AUROC exact, not an average of per-rank AUROCs). The model
returns `(loss, outputs)` with `outputs["logits"]` and `outputs["labels"]` (0/1), and
optionally `outputs["weights"]` (example weights, used by RCE and NRCE).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from torchmetrics.classification import BinaryAUROC

from tml.metrics.rce import NRCE, RCE
from tml.metrics.stable_mean import StableMean


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable, device: torch.device,
             num_steps: int = -1, seed: int = 1234) -> dict[str, float]:
    """auc, rce, nrce, loss (the mean batch loss) and batches (per worker) of `model`.

    `num_steps < 0` means all batches. Random draws in the model (negatives) are seeded, so
    repeated evaluations of one checkpoint agree; the caller's RNG state is kept.
    Empty dict when there was no batch.
    """
    was_training = model.training
    model.eval()
    auroc = BinaryAUROC().to(device)
    rce, nrce = RCE(from_logits=True).to(device), NRCE(from_logits=True).to(device)
    loss_mean = StableMean().to(device)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    batches_read = 0
    try:
        limited = batches if num_steps < 0 else itertools.islice(batches, num_steps)
        for batch in limited:
            loss, outputs = model(batch.to(device))
            logits, labels = outputs["logits"], outputs["labels"]
            weights = outputs.get("weights")
            weights = 1.0 if weights is None else weights
            auroc.update(logits, labels.long())
            rce.update(logits, labels, weights)
            nrce.update(logits, labels, weights)
            loss_mean.update(loss.detach())
            batches_read += 1
    finally:
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    if not batches_read:
        return {}
    return {"auc": float(auroc.compute()), "rce": float(rce.compute()),
            "nrce": float(nrce.compute()), "loss": float(loss_mean.compute()),
            "batches": float(batches_read)}
