"""Optimizer configuration: one of sgd / adagrad / adam, plus a learning-rate schedule."""

from __future__ import annotations

import pydantic

from tml.core.config.base_config import BaseConfig, Field


class PiecewiseConstant(BaseConfig):
    """`learning_rate_values[i]` until step `learning_rate_boundaries[i]`, then the next."""

    learning_rate_boundaries: list[int] = Field(..., description="Ascending step boundaries.")
    learning_rate_values: list[float] = Field(..., description="One more value than boundaries.")

    @pydantic.model_validator(mode="after")
    def _check_lengths(self) -> PiecewiseConstant:
        if len(self.learning_rate_values) != len(self.learning_rate_boundaries) + 1:
            raise ValueError("learning_rate_values must have one more entry than "
                             "learning_rate_boundaries")
        if sorted(self.learning_rate_boundaries) != self.learning_rate_boundaries:
            raise ValueError("learning_rate_boundaries must be ascending")
        return self


class LinearRampToConstant(BaseConfig):
    learning_rate: float
    num_ramp_steps: pydantic.PositiveInt = Field(..., description="Steps to ramp up from zero.")


class LinearRampToCosine(BaseConfig):
    learning_rate: float
    final_learning_rate: float
    num_ramp_steps: pydantic.PositiveInt = Field(..., description="Steps to ramp up from zero.")
    final_num_steps: pydantic.PositiveInt = Field(..., description="Step where decay stops.")


class LearningRate(BaseConfig):
    """The learning-rate schedule; exactly one kind."""

    constant: float | None = Field(None, one_of="lr")
    linear_ramp_to_cosine: LinearRampToCosine | None = Field(None, one_of="lr")
    linear_ramp_to_constant: LinearRampToConstant | None = Field(None, one_of="lr")
    piecewise_constant: PiecewiseConstant | None = Field(None, one_of="lr")


class OptimizerAlgorithmConfig(BaseConfig):
    lr: float


class AdamConfig(OptimizerAlgorithmConfig):
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-7


class SgdConfig(OptimizerAlgorithmConfig):
    momentum: float = 0.0


class AdagradConfig(OptimizerAlgorithmConfig):
    """Adagrad: lr * g / (sqrt(sum of g^2) + eps), per element."""

    # Not 0: a row whose first gradient is exactly zero (a saturated negative) would get
    # 0 / 0 = NaN, and the NaN reaches the loss. 1e-8 is fbgemm's default.
    eps: float = Field(1e-8, gt=0, description="Added to the root of the squared-gradient "
                       "sum; must be > 0 (0 turns a zero gradient on a fresh row into NaN).")


class OptimizerConfig(BaseConfig):
    """An optimizer (exactly one of adam / sgd / adagrad) and its learning-rate schedule.

    Without `learning_rate`, the optimizer's own `lr` is used as a constant.
    """

    learning_rate: LearningRate | None = Field(None, description="Learning-rate schedule.")
    adam: AdamConfig | None = Field(None, one_of="optimizer")
    sgd: SgdConfig | None = Field(None, one_of="optimizer")
    adagrad: AdagradConfig | None = Field(None, one_of="optimizer")


def get_optimizer_algorithm_config(optimizer_config: OptimizerConfig) -> OptimizerAlgorithmConfig:
    """The chosen algorithm's config (the `one_of` check guarantees there is exactly one)."""
    for algorithm in (optimizer_config.adam, optimizer_config.sgd, optimizer_config.adagrad):
        if algorithm is not None:
            return algorithm
    raise ValueError("no optimizer selected")


def learning_rate_of(optimizer_config: OptimizerConfig) -> LearningRate:
    """The schedule; a missing one means a constant at the optimizer's `lr`."""
    if optimizer_config.learning_rate is not None:
        return optimizer_config.learning_rate
    return LearningRate(constant=get_optimizer_algorithm_config(optimizer_config).lr)
