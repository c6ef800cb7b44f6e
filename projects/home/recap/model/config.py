"""The ranker's architecture: featurization, backbone, one tower per task (original schema).

Architectures: `mlp_config` and `mask_net_config` (parallel or serial MaskNet, arXiv
2102.07619). `dcn_config` and `dlrm_config` are in the schema, so the original configs load,
but are refused when set: the original never implemented them either.
"""

from __future__ import annotations

import enum

import pydantic

from tml.core.config.base_config import BaseConfig, Field

from ..config_support import refuse_when_set
from ..embedding.config import (
    LargeEmbeddingsConfig,
    SmallEmbeddingsConfig,
    StratifierConfig,
)


class DropoutConfig(BaseConfig):
    rate: pydantic.PositiveFloat = Field(0.1, lt=1.0, description="Fraction dropped.")


class LayerNormConfig(BaseConfig):
    epsilon: float = Field(1e-3, ge=0.0, description="Added to the variance (0 is read as "
                           "1e-12, so a constant row does not divide by zero).")
    axis: int = Field(-1, description="Only -1 (the feature axis).")
    center: bool = Field(True, description="Learn a bias (needs scale).")
    scale: bool = Field(True, description="Learn a scale.")

    @pydantic.field_validator("axis")
    @classmethod
    def _last_axis(cls, value: int) -> int:
        if value != -1:
            raise ValueError("only -1 (normalise over the features) is supported")
        return value

    @pydantic.model_validator(mode="after")
    def _center_needs_scale(self) -> LayerNormConfig:
        if self.center and not self.scale:
            raise ValueError("center without scale is not supported (torch's LayerNorm "
                             "learns a bias only with a scale)")
        return self


class BatchNormConfig(BaseConfig):
    affine: bool = Field(True, description="Learn scale and shift.")
    momentum: pydantic.PositiveFloat = Field(0.1, le=1.0, description="Weight of the newest "
                                             "batch in the running statistics (torch's sense).")


class MlpConfig(BaseConfig):
    """Linear layers of `layer_sizes`, each but the last (or all, with
    final_layer_activation) followed by batch norm, ReLU and dropout when configured."""

    layer_sizes: list[pydantic.PositiveInt] = Field(..., min_length=1)
    batch_norm: BatchNormConfig | None = Field(None, description="Batch norm after each hidden "
                                               "linear layer.")
    dropout: DropoutConfig | None = Field(None, description="Dropout after each hidden layer.")
    final_layer_activation: bool = Field(False, description="ReLU (and norm, dropout) after "
                                         "the last layer too.")


class DcnConfig(BaseConfig):
    poly_degree: pydantic.PositiveInt
    projection_dim: pydantic.PositiveInt | None = None
    parallel_mlp: MlpConfig | None = None
    use_parallel: bool = True
    output_mlp: MlpConfig | None = None


class DLRMConfig(BaseConfig):
    bottom_mlp: MlpConfig
    top_mlp: MlpConfig


class MaskBlockConfig(BaseConfig):
    output_size: pydantic.PositiveInt
    reduction_factor: pydantic.PositiveFloat | None = Field(None, one_of="aggregation_size")
    aggregation_size: pydantic.PositiveInt | None = Field(None, one_of="aggregation_size")
    input_layer_norm: bool


class MaskNetConfig(BaseConfig):
    mask_blocks: list[MaskBlockConfig] = Field(..., min_length=1)
    mlp: MlpConfig | None = Field(None, description="MLP over the mask blocks' output.")
    use_parallel: bool = Field(False, description="Parallel blocks (concatenated) instead of "
                               "a chain of blocks.")


class AffineMap(BaseConfig):
    scale: float = 1.0
    bias: float = 0.0


class TaskModel(BaseConfig):
    mlp_config: MlpConfig | None = Field(None, one_of="architecture")
    dcn_config: DcnConfig | None = Field(None, one_of="architecture")
    dlrm_config: DLRMConfig | None = Field(None, one_of="architecture")
    mask_net_config: MaskNetConfig | None = Field(None, one_of="architecture")
    affine_map: AffineMap | None = Field(None, description="logit * scale + bias.")
    pos_weight: float = Field(1.0, gt=0.0, description="Weight of positives in the loss.")

    refuse_dcn_dlrm = refuse_when_set("dcn_config", "dlrm_config")


class PositionDebiasConfig(BaseConfig):
    max_position: pydantic.PositiveInt = Field(256, description="Later positions share one "
                                               "bucket.")
    num_dims: pydantic.PositiveInt = Field(64, description="Dimensions of the position "
                                           "embedding.")
    drop_probability: float = Field(0.5, ge=0.0, le=1.0, description="In training, share of "
                                    "rows whose position is replaced by 'unknown'.")
    position_feature_index: pydantic.NonNegativeInt = Field(
        ..., description="Column of the position in the discrete features.")


class Log1pAbsConfig(BaseConfig):
    """sign(x) * log1p(|x|) only."""


class ClipLog1pAbsConfig(BaseConfig):
    clip_magnitude: pydantic.NonNegativeFloat = Field(3e38, description="Clip to +-this first.")


class ZScoreLogConfig(BaseConfig):
    analysis_path: str
    schema_path: str | None = None
    clip_magnitude: float = 5.0
    use_batch_norm: bool = False
    use_renorm: bool = False
    use_bq_stats: bool = False


class DoubleNormLogConfig(BaseConfig):
    batch_norm_config: BatchNormConfig | None = None
    clip_magnitude: float = Field(5.0, gt=0.0, description="Clip to +-this after batch norm.")
    layer_norm_config: LayerNormConfig | None = None


class FeaturizationConfig(BaseConfig):
    log1p_abs_config: Log1pAbsConfig | None = Field(None, one_of="featurization")
    clip_log1p_abs_config: ClipLog1pAbsConfig | None = Field(None, one_of="featurization")
    z_score_log_config: ZScoreLogConfig | None = Field(None, one_of="featurization")
    double_norm_log_config: DoubleNormLogConfig | None = Field(None, one_of="featurization")
    feature_names_to_concat: list[str] = Field(["binary"], description="Raw features "
                                               "concatenated after the continuous ones "
                                               "(only 'binary').")

    refuse_z_score = refuse_when_set("z_score_log_config", why="not supported by tml's recap "
                                     "(it needs the original's feature-statistics files)")

    @pydantic.field_validator("feature_names_to_concat")
    @classmethod
    def _only_binary(cls, names: list[str]) -> list[str]:
        if names != ["binary"]:
            raise ValueError("only ['binary'] is supported")
        return names


class MultiTaskType(str, enum.Enum):
    SHARE_NONE = "share_none"          # every task its own tower on the features
    SHARE_ALL = "share_all"            # towers on one shared backbone's output
    SHARE_PARTIAL = "share_partial"    # towers on the features and the backbone's output
    SEPARATE = "separate"              # another name for share_none


class ModelConfig(BaseConfig):
    tasks: dict[str, TaskModel] = Field(..., description="Architecture of each task's tower.")
    large_embeddings: LargeEmbeddingsConfig | None = None
    small_embeddings: SmallEmbeddingsConfig | None = None
    position_debias_config: PositionDebiasConfig | None = None
    featurization_config: FeaturizationConfig | None = None
    multi_task_type: MultiTaskType = Field(MultiTaskType.SHARE_NONE)
    backbone: TaskModel | None = Field(None, description="Shared part (share_all / "
                                       "share_partial).")
    stratifiers: list[StratifierConfig] | None = Field(None, description="Not supported.")

    refuse_stratifiers = refuse_when_set("stratifiers")

    @pydantic.field_validator("tasks")
    @classmethod
    def _some_tasks(cls, tasks: dict[str, TaskModel]) -> dict[str, TaskModel]:
        if not tasks:
            raise ValueError("at least one task is required")
        return tasks

    @pydantic.model_validator(mode="after")
    def _backbone_matches_type(self) -> ModelConfig:
        shared = self.multi_task_type in (MultiTaskType.SHARE_ALL, MultiTaskType.SHARE_PARTIAL)
        if shared and self.backbone is None:
            raise ValueError(f"multi_task_type {self.multi_task_type.value} needs a backbone")
        if not shared and self.backbone is not None:
            raise ValueError(f"multi_task_type {self.multi_task_type.value} takes no backbone")
        return self
