"""The worker's runtime: device and process group, TF32 matmuls, the initial seed."""

from __future__ import annotations

import torch

from tml.common.device import setup_and_get_device
from tml.core.config.training import RuntimeConfig


def setup_runtime(runtime: RuntimeConfig) -> torch.device:
    """This worker's device, its process group started; TF32 on CUDA when the config says."""
    device = setup_and_get_device()
    if runtime.enable_tensorfloat32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    return device


def seed_model_init(seed: int) -> None:
    """Seed torch before the model is built: one config, one set of initial weights."""
    torch.manual_seed(seed)
