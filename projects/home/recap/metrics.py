"""Held-out metrics of the ranker, per task: AUROC and RCE.

RCE (relative cross entropy) is how much better the model's cross entropy is than that of
always predicting the positive rate: `100 * (1 - CE(model) / CE(positive rate))`; 0 is no
better than the base rate, 100 is perfect. Both use the examples' weights (the inverse
down-sampling rates) in RCE, and plain ranks in AUROC.

Every rank evaluates the same number of batches of its share, then the logits, labels and
weights are gathered from all ranks for exact metrics. Keys: `auc/<task>`, `rce/<task>`,
their means over the evaluated tasks `auc` (over the tasks whose labels hold both
classes; AUROC is undefined, NaN, for the others) and `rce`, the `loss` and `batches`; a named
validation set other than the first is prefixed with `<name>:`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from torch.nn import functional as F
from torchmetrics.functional.classification import binary_auroc


class ValidationSets:
    """The config's named validation sets, evaluated one after the other."""

    def __init__(self, sets: Mapping[str, Iterable], tasks: Mapping[str, list[int]]) -> None:
        self.sets = dict(sets)
        self.tasks = dict(tasks)      # set name -> indices of the tasks to report

    def __len__(self) -> int:
        return sum(len(s) for s in self.sets.values())  # type: ignore[arg-type]


def _gather(tensor: torch.Tensor) -> torch.Tensor:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def rce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> float:
    """Relative cross entropy in percent (module docstring)."""
    total = weights.sum()
    rate = float((labels * weights).sum() / total) if total > 0 else 0.0
    rate = min(max(rate, 1e-7), 1 - 1e-7)
    model = F.binary_cross_entropy_with_logits(logits, labels, weight=weights,
                                               reduction="sum") / total
    base = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
    return 100.0 * (1.0 - float(model) / base)


def task_metrics(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                 names: list[str], tasks: list[int]) -> dict[str, float]:
    """AUROC and RCE of each task in `tasks` (columns), and their means."""
    out: dict[str, float] = {}
    aucs, rces = [], []
    for index in tasks:
        label = labels[:, index]
        if 0 < float(label.sum()) < len(label):
            auc = float(binary_auroc(logits[:, index], label.long()))
        else:
            auc = float("nan")       # one class only: AUROC is undefined
        value = rce(logits[:, index], label, weights[:, index])
        out[f"auc/{names[index]}"], out[f"rce/{names[index]}"] = auc, value
        aucs.append(auc)
        rces.append(value)
    defined = [auc for auc in aucs if not math.isnan(auc)]
    out["auc"] = sum(defined) / len(defined) if defined else float("nan")
    out["rce"] = sum(rces) / len(rces)
    return out


@torch.no_grad()
def _evaluate_one(model: torch.nn.Module, batches: Iterable, device: torch.device,
                  num_steps: int, names: list[str], tasks: list[int]) -> dict[str, float]:
    logits, labels, weights, losses = [], [], [], []
    limited = batches if num_steps < 0 else itertools.islice(batches, num_steps)
    for batch in limited:
        loss, outputs = model(batch.to(device))
        logits.append(outputs["logits"].float())
        labels.append(outputs["labels"].float())
        weights.append(outputs["weights"].float())
        losses.append(loss.detach().float())
    if not losses:
        return {}
    all_logits = _gather(torch.cat(logits)).cpu()
    all_labels = _gather(torch.cat(labels)).cpu()
    all_weights = _gather(torch.cat(weights)).cpu()
    loss = _gather(torch.stack(losses).mean().reshape(1)).mean()
    metrics = task_metrics(all_logits, all_labels, all_weights, names, tasks)
    return {**metrics, "loss": float(loss), "batches": float(len(losses))}


def make_evaluate(task_names: list[str]):  # noqa: ANN201
    """`evaluate(model, sets, device, num_steps)` for the trainer (see module docstring)."""

    def evaluate(model: torch.nn.Module, sets: ValidationSets, device: torch.device,
                 num_steps: int = -1) -> dict[str, float]:
        was_training = model.training
        model.eval()
        out: dict[str, float] = {}
        try:
            for position, (name, batches) in enumerate(sets.sets.items()):
                metrics = _evaluate_one(model, batches, device, num_steps, task_names,
                                        sets.tasks[name])
                prefix = "" if position == 0 else f"{name}:"
                out.update({prefix + key: value for key, value in metrics.items()})
        finally:
            model.train(was_training)
        return out

    return evaluate
