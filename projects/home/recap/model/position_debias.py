"""Position debiasing: the model sees where the tweet was shown, through an embedding.

Engagement depends on the slot a tweet was shown in; learning that effect explicitly keeps it
out of the other weights. Positions 0..max_position-1 have their own row, later positions
share one and negative ones count as unknown. In training, each row's position is replaced by
the 'unknown' row with probability `drop_probability`, so the model also learns to score
without a position (how candidates are scored before they are shown).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import PositionDebiasConfig


class PositionDebias(nn.Module):
    def __init__(self, config: PositionDebiasConfig) -> None:
        super().__init__()
        self.index = config.position_feature_index
        self.max_position = config.max_position
        self.unknown = config.max_position + 1
        self.drop_probability = config.drop_probability
        self.embedding = nn.Embedding(config.max_position + 2, config.num_dims)
        self.out_features = config.num_dims

    def positions(self, discrete: torch.Tensor) -> torch.Tensor:
        """The embedding row of each example's position."""
        position = discrete[:, self.index].long().clamp(max=self.max_position)
        position = torch.where(position < 0, torch.full_like(position, self.unknown), position)
        if self.training and self.drop_probability > 0:
            dropped = torch.rand(position.shape, device=position.device) < self.drop_probability
            position = torch.where(dropped, torch.full_like(position, self.unknown), position)
        return position

    def forward(self, discrete: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.positions(discrete))
