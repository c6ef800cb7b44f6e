"""An MLP: hidden layers Linear -> [BatchNorm] -> ReLU -> [Dropout], then a last Linear
(followed by ReLU with `final_layer_activation`), as the original recap MLP."""

from __future__ import annotations

import torch
from torch import nn

from .config import MlpConfig


def xavier_init(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every Linear (the original's init)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)


class Mlp(nn.Module):
    def __init__(self, in_features: int, config: MlpConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        size = in_features
        for width in config.layer_sizes[:-1]:
            layers.append(nn.Linear(size, width))
            if config.batch_norm is not None:
                layers.append(nn.BatchNorm1d(width, affine=config.batch_norm.affine,
                                             momentum=config.batch_norm.momentum))
            layers.append(nn.ReLU())
            if config.dropout is not None:
                layers.append(nn.Dropout(config.dropout.rate))
            size = width
        layers.append(nn.Linear(size, config.layer_sizes[-1]))
        if config.final_layer_activation:
            layers.append(nn.ReLU())
        self.layers = nn.Sequential(*layers)
        self.layers.apply(xavier_init)
        self.out_features = config.layer_sizes[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
