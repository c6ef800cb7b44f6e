"""Featurization of the continuous features, followed by the raw binary features.

* `double_norm_log`: non-finite -> 0, sign(x) log1p(|x|), batch norm, clip to
  +-clip_magnitude; concatenate the binary features; layer norm over all of them.
* `log1p_abs`: non-finite -> 0, sign(x) log1p(|x|); concatenate the binary features.
* `clip_log1p_abs`: as log1p_abs after clipping the raw values to +-clip_magnitude.
* none configured: the raw continuous values (non-finite -> 0) and the binary features.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import FeaturizationConfig, LayerNormConfig


def log1p_abs(x: torch.Tensor) -> torch.Tensor:
    """sign(x) * log1p(|x|): a log that keeps the sign and is finite at 0."""
    return torch.sign(x) * torch.log1p(torch.abs(x))


def finite(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype, device=x.device))


def layer_norm(width: int, config: LayerNormConfig) -> nn.LayerNorm:
    # epsilon 0 (as local_prod.yaml writes it) divides by zero on a constant row.
    return nn.LayerNorm(width, eps=max(config.epsilon, 1e-12),
                        elementwise_affine=config.scale, bias=config.center)


class Featurizer(nn.Module):
    def __init__(self, config: FeaturizationConfig | None, continuous: int,
                 binary: int) -> None:
        super().__init__()
        self.clip_raw: float | None = None
        self.log = False
        self.batch_norm: nn.Module | None = None
        self.clip: float | None = None
        self.layer_norm: nn.Module | None = None
        if config is None:
            pass
        elif config.double_norm_log_config is not None:
            dnl = config.double_norm_log_config
            self.log = True
            if dnl.batch_norm_config is not None:
                self.batch_norm = nn.BatchNorm1d(continuous, affine=dnl.batch_norm_config.affine,
                                                 momentum=dnl.batch_norm_config.momentum)
            self.clip = dnl.clip_magnitude
            if dnl.layer_norm_config is not None:
                self.layer_norm = layer_norm(continuous + binary, dnl.layer_norm_config)
        elif config.log1p_abs_config is not None:
            self.log = True
        elif config.clip_log1p_abs_config is not None:
            self.log = True
            self.clip_raw = config.clip_log1p_abs_config.clip_magnitude
        self.out_features = continuous + binary

    def forward(self, continuous: torch.Tensor, binary: torch.Tensor) -> torch.Tensor:
        x = finite(continuous)
        if self.clip_raw is not None:
            x = x.clamp(-self.clip_raw, self.clip_raw)
        if self.log:
            x = log1p_abs(x)
        if self.batch_norm is not None:
            x = self.batch_norm(x)
        if self.clip is not None:
            x = x.clamp(-self.clip, self.clip)
        x = torch.cat([x, binary.to(x.dtype)], dim=1)
        return self.layer_norm(x) if self.layer_norm is not None else x
