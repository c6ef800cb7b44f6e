"""The TwHIN model, its loss wrapper and its per-table fused optimizers.

Score of an edge (lhs, rel, rhs): `dot(lhs, rhs + t_rel)`, with one learned translation
vector `t_rel` per relation. Negatives are drawn from the batch itself: for every relation
in the batch, `in_batch_negatives` rows of that relation's lhs and rhs are sampled, and each
positive's lhs is scored against the sampled rhs (and each rhs against the sampled lhs) with
the same operator. Fixes against the original tml: the translation is a trained parameter
(the original read `.data`, so it never learned), negatives use the relation's translation,
and negatives are labelled 0 (the original labelled them 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from projects.twhin.data.config import TwhinDataConfig
from projects.twhin.data.edges import EdgeBatch
from projects.twhin.models.config import TwhinModelConfig
from tml.common.modules.embedding.embedding import LargeEmbeddings
from tml.errors import ConfigError
from tml.optimizers.optimizer import get_optimizer_class, optimizer_kwargs


class TwhinModel(nn.Module):
    """Embedding tables (one per entity type) plus a translation vector per relation."""

    def __init__(self, model_config: TwhinModelConfig, data_config: TwhinDataConfig) -> None:
        super().__init__()
        self.table_names = [table.name for table in model_config.embeddings.tables]
        self.embedding_dim = model_config.embeddings.tables[0].embedding_dim
        self.num_relations = len(model_config.relations)
        self.in_batch_negatives = data_config.in_batch_negatives
        self.large_embeddings = LargeEmbeddings(model_config.embeddings)
        self.all_trans_embs = nn.Parameter(
            torch.empty(self.num_relations, self.embedding_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Translations start at zero: the score starts as a plain dot product."""
        with torch.no_grad():
            self.all_trans_embs.zero_()

    def lookup(self, batch: EdgeBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(lhs, rhs) embeddings, each (B, D), read from the tables by name.

        Each lookup is non-empty in exactly one table, so summing the per-table pooled
        outputs gives its vector; by name because sharding reorders the output keys.
        """
        pooled = self.large_embeddings(batch.nodes).to_dict()
        x = torch.stack([pooled[name] for name in self.table_names], dim=0).sum(dim=0)
        x = x.view(-1, 2, self.embedding_dim)
        return x[:, 0, :], x[:, 1, :]

    def forward(self, batch: EdgeBatch) -> dict[str, torch.Tensor]:
        """Logits of the B positives, then of the in-batch negatives (relation by relation)."""
        lhs, rhs = self.lookup(batch)
        translated = rhs + self.all_trans_embs[batch.rels]
        positives = (lhs * translated).sum(-1)
        negatives = in_batch_negative_logits(lhs, rhs, batch.rels, self.all_trans_embs,
                                             self.in_batch_negatives)
        logits = torch.cat([positives, negatives])
        return {"logits": logits, "probabilities": torch.sigmoid(logits)}


def in_batch_negative_logits(lhs: torch.Tensor, rhs: torch.Tensor, rels: torch.Tensor,
                             translations: torch.Tensor, n: int) -> torch.Tensor:
    """Logits of `n` in-batch negatives per positive and side, relation by relation.

    For each relation in the batch: every lhs row is scored against `n` sampled rhs rows of
    the same relation and every rhs row against `n` sampled lhs rows (a permutation,
    repeated when the relation has fewer than `n` rows), with the relation's translation.
    Returns `2 * B * n` logits.
    """
    if not n:
        return lhs.new_zeros(0)
    negatives = []
    for relation in torch.unique(rels).tolist():
        rows = torch.nonzero(rels == relation).squeeze(1)
        count = rows.numel()
        repeats = math.ceil(n / count)
        lhs_sample = rows[torch.randperm(count, device=rows.device).repeat(repeats)[:n]]
        rhs_sample = rows[torch.randperm(count, device=rows.device).repeat(repeats)[:n]]
        t = translations[relation]
        negatives.append((lhs[rows] @ (rhs[rhs_sample] + t).T).reshape(-1))
        negatives.append(((rhs[rows] + t) @ lhs[lhs_sample].T).reshape(-1))
    return torch.cat(negatives)


def labels_and_weights(logits: torch.Tensor, positive_labels: torch.Tensor,
                       positive_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (1 positives, 0 negatives) and weights (negatives together weigh B)."""
    num_positives = positive_labels.numel()
    num_negatives = logits.numel() - num_positives
    labels = torch.cat([positive_labels.float(), logits.new_zeros(num_negatives)])
    negative_weight = num_positives / max(1, num_negatives)
    weights = torch.cat([positive_weights.float(),
                         logits.new_full((num_negatives,), negative_weight)])
    return labels, weights


# TorchRec's train pipeline traces the model with torch.fx to find the sharded lookups;
# these functions hold data-dependent shapes, so the tracer records them as calls.
torch.fx.wrap("in_batch_negative_logits")
torch.fx.wrap("labels_and_weights")


def apply_optimizers(model: TwhinModel, model_config: TwhinModelConfig) -> TwhinModel:
    """Attach each table's optimizer to its weights, to be fused into backward by TorchRec."""
    ebc = model.large_embeddings.ebc
    for table in model_config.embeddings.tables:
        if table.optimizer.sgd is not None and table.optimizer.sgd.momentum:
            raise ConfigError(f"model.embeddings.tables '{table.name}': sgd momentum is not "
                              "supported by fused embedding optimizers; use adagrad or adam")
        apply_optimizer_in_backward(
            optimizer_class=get_optimizer_class(table.optimizer),
            params=[ebc.embedding_bags[table.name].weight],
            optimizer_kwargs=optimizer_kwargs(table.optimizer),
        )
    return model


class TwhinModelAndLoss(nn.Module):
    """The model plus weighted binary cross-entropy; returns `(loss, outputs)`.

    Labels: the batch's labels (1) for positives, 0 for negatives. Weights: the batch's edge
    weights for positives; each negative weighs `B / num_negatives`, so negatives as a whole
    weigh as much as the positives.
    """

    def __init__(self, model: TwhinModel,
                 loss_fn: Callable[..., torch.Tensor] = nn.functional.binary_cross_entropy_with_logits,
                 data_config: TwhinDataConfig | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: EdgeBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        outputs = self.model(batch)
        labels, weights = labels_and_weights(outputs["logits"], batch.labels, batch.weights)
        loss = self.loss_fn(outputs["logits"], labels, weights)
        outputs.update({"loss": loss.detach(), "labels": labels, "weights": weights})
        return loss, outputs
