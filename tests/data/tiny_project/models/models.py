"""The tiny model and its loss (the doc's step 3): tables from LargeEmbeddings on the meta
device, pooled embeddings read by name, `forward(batch)` returns `(loss, outputs)` with
logits and labels for the default evaluation. No optimizer, no sharding: the trainer's."""

from __future__ import annotations

import torch
from torch import nn

from tests.data.tiny_project.models.config import TinyModelConfig
from tml.common.modules.embedding.embedding import LargeEmbeddings
from tml.metrics.losses import binary_cross_entropy


class TinyModel(nn.Module):
    """logit = scale * dot(user, item) + bias."""

    def __init__(self, config: TinyModelConfig) -> None:
        super().__init__()
        self.large_embeddings = LargeEmbeddings(config.embeddings)
        self.scale = nn.Parameter(torch.ones(()))
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, features) -> torch.Tensor:  # noqa: ANN001 (a KeyedJaggedTensor)
        pooled = self.large_embeddings(features)
        return self.scale * (pooled["user"] * pooled["item"]).sum(-1) + self.bias


class TinyModelAndLoss(nn.Module):
    """The model and its binary cross-entropy, as the trainer wants them."""

    def __init__(self, model: TinyModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # noqa: ANN001
        logits = self.model(batch.features)
        loss = binary_cross_entropy(logits, batch.labels)
        # "loss" too: the loop logs outputs["loss"] (tml.core.custom_training_loop), which
        # the doc's step 3 does not say; TwHIN and the ranker both put it there.
        return loss, {"loss": loss.detach(), "logits": logits.detach(), "labels": batch.labels}
