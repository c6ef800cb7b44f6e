"""MaskNet (Wang et al., arXiv 2102.07619): instance-guided masks over the features.

A mask block multiplies its input element-wise by a mask computed from the *features*
(`Linear -> ReLU -> Linear`, aggregation size given directly or as a reduction factor of
the feature width), then applies `Linear -> LayerNorm`. Parallel MaskNet runs every block
on the features and concatenates their outputs; serial MaskNet chains them, each block
masking the previous block's output with the features. An optional MLP follows.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import MaskBlockConfig, MaskNetConfig
from .mlp import Mlp, xavier_init


class MaskBlock(nn.Module):
    def __init__(self, config: MaskBlockConfig, input_dim: int, mask_input_dim: int) -> None:
        super().__init__()
        self.input_layer_norm = nn.LayerNorm(input_dim) if config.input_layer_norm else None
        if config.aggregation_size is not None:
            aggregation = config.aggregation_size
        else:
            aggregation = max(1, int(mask_input_dim * (config.reduction_factor or 1.0)))
        self.mask = nn.Sequential(nn.Linear(mask_input_dim, aggregation), nn.ReLU(),
                                  nn.Linear(aggregation, input_dim))
        self.hidden = nn.Linear(input_dim, config.output_size)
        self.layer_norm = nn.LayerNorm(config.output_size)
        self.mask.apply(xavier_init)
        self.hidden.apply(xavier_init)

    def forward(self, net: torch.Tensor, mask_input: torch.Tensor) -> torch.Tensor:
        if self.input_layer_norm is not None:
            net = self.input_layer_norm(net)
        return self.layer_norm(self.hidden(net * self.mask(mask_input)))


class MaskNet(nn.Module):
    def __init__(self, config: MaskNetConfig, in_features: int) -> None:
        super().__init__()
        self.parallel = config.use_parallel
        blocks = []
        size = in_features
        for block in config.mask_blocks:
            blocks.append(MaskBlock(block, in_features if self.parallel else size, in_features))
            size = block.output_size
        self.blocks = nn.ModuleList(blocks)
        masked = sum(b.output_size for b in config.mask_blocks) if self.parallel \
            else config.mask_blocks[-1].output_size
        self.mlp = Mlp(masked, config.mlp) if config.mlp is not None else None
        self.out_features = self.mlp.out_features if self.mlp is not None else masked

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.parallel:
            net = torch.cat([block(inputs, inputs) for block in self.blocks], dim=1)
        else:
            net = inputs
            for block in self.blocks:
                net = block(net, inputs)
        return self.mlp(net) if self.mlp is not None else net
