"""1. Config: a BaseConfig with the shared runtime and training sections (the doc's step 1)."""

from __future__ import annotations

from tests.data.tiny_project.data.config import TinyDataConfig
from tests.data.tiny_project.models.config import TinyModelConfig
from tml.core.config.base_config import BaseConfig, Field
from tml.core.config.training import RuntimeConfig, TrainingConfig


class TinyConfig(BaseConfig):
    """The tiny project's YAML: unknown keys are errors, as everywhere in tml."""

    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig, description="Precision.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="The loop.")
    model: TinyModelConfig = Field(..., description="Tables and the dense optimizer.")
    train_data: TinyDataConfig = Field(..., description="Training pairs.")
    validation_data: TinyDataConfig | None = Field(None, description="Held-out pairs.")
