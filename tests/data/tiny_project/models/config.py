"""The model section (the doc's step 1: LargeEmbeddingsConfig and an OptimizerConfig)."""

from __future__ import annotations

from tml.common.modules.embedding.config import LargeEmbeddingsConfig
from tml.core.config.base_config import BaseConfig, Field
from tml.optimizers.config import OptimizerConfig


class TinyModelConfig(BaseConfig):
    """The user and item tables (each with its fused optimizer) and the dense optimizer."""

    embeddings: LargeEmbeddingsConfig = Field(..., description="The user and item tables.")
    dense_optimizer: OptimizerConfig = Field(..., description="The bias and scale.")
