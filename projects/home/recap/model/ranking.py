"""The multi-task ranking model and its loss.

Inputs, concatenated: the featurized continuous + binary features, the large (sharded)
embeddings of the id features, the small embeddings, the TwHIN vectors of the example
(user, user engagement, author; each layer-normed) and the position embedding. Then,
by `multi_task_type`:

* share_all: one backbone; every task's tower reads its output;
* share_partial: every tower reads the inputs and the backbone's output;
* share_none / separate: every tower reads the inputs, no backbone.

Each tower ends in one logit, optionally scaled by an affine map. Probabilities are also
reported calibrated for the data's down-sampling (`p * r / (1 - p + r p)`, r = neg/pos rate).
The loss is the mean over tasks of each task's weighted binary cross-entropy (with its
`pos_weight`); labels are matched to towers by task name.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from tml.errors import ConfigError

from ..data.batch import RecapBatch
from ..data.config import RecapDataConfig
from .config import ModelConfig, MultiTaskType, TaskModel
from .embeddings import LargeEmbeddings, SmallEmbeddings
from .feature_transform import Featurizer
from .mask_net import MaskNet
from .mlp import Mlp
from .position_debias import PositionDebias

_TWHIN_INPUTS = ("user_embedding", "user_eng_embedding", "author_embedding")


def sanitize(task: str) -> str:
    """A task name usable as a module name (no dots)."""
    return task.replace(".", "__")


def build_architecture(config: TaskModel, in_features: int, where: str) -> nn.Module:
    if config.mlp_config is not None:
        return Mlp(in_features, config.mlp_config)
    if config.mask_net_config is not None:
        return MaskNet(config.mask_net_config, in_features)
    raise ConfigError(f"{where}: needs mlp_config or mask_net_config")


class RankingModel(nn.Module):
    """Logits `[B, tasks]` in `config.tasks` order (see the module docstring).

    `input_shapes`: widths of the dense inputs (`InputSpec.input_shapes()`).
    """

    def __init__(self, config: ModelConfig, data: RecapDataConfig,
                 input_shapes: dict[str, int], embedding_device: str = "meta") -> None:
        super().__init__()
        self.tasks = list(config.tasks)
        self.multi_task_type = config.multi_task_type
        self.featurizer = Featurizer(config.featurization_config, input_shapes["continuous"],
                                     input_shapes["binary"])
        width = self.featurizer.out_features
        self.large_embeddings = None
        if config.large_embeddings is not None:
            self.large_embeddings = LargeEmbeddings(config.large_embeddings, embedding_device)
            width += self.large_embeddings.out_features
        self.small_embeddings = None
        if config.small_embeddings is not None:
            self.small_embeddings = SmallEmbeddings(config.small_embeddings)
            width += self.small_embeddings.out_features
        self.twhin_norms = nn.ModuleDict()
        for name in _TWHIN_INPUTS:
            if name in input_shapes:
                self.twhin_norms[name] = nn.LayerNorm(input_shapes[name])
                width += input_shapes[name]
        self.position_debias = None
        if config.position_debias_config is not None:
            self.position_debias = PositionDebias(config.position_debias_config)
            width += self.position_debias.out_features
        self.in_features = width
        self.backbone = None
        tower_inputs = width
        if config.multi_task_type in (MultiTaskType.SHARE_ALL, MultiTaskType.SHARE_PARTIAL):
            assert config.backbone is not None
            self.backbone = build_architecture(config.backbone, width, "model.backbone")
            tower_inputs = self.backbone.out_features  # type: ignore[assignment]
            if config.multi_task_type is MultiTaskType.SHARE_PARTIAL:
                tower_inputs += width
        self.towers = nn.ModuleDict()
        scales, biases = [], []
        for task, architecture in config.tasks.items():
            tower = build_architecture(architecture, tower_inputs, f"model.tasks.{task}")
            if tower.out_features != 1:
                raise ConfigError(f"model.tasks.{task}: the tower must end in 1 output, not "
                                  f"{tower.out_features}")
            self.towers[sanitize(task)] = tower
            affine = architecture.affine_map
            scales.append(affine.scale if affine else 1.0)
            biases.append(affine.bias if affine else 0.0)
        self.register_buffer("affine_scale", torch.tensor(scales))
        self.register_buffer("affine_bias", torch.tensor(biases))
        ratio = [data.tasks[t].neg_downsampling_rate / data.tasks[t].pos_downsampling_rate
                 for t in self.tasks]
        self.register_buffer("calibration_ratio", torch.tensor(ratio))
        self.register_buffer("pos_weight", torch.tensor([config.tasks[t].pos_weight
                                                         for t in self.tasks]))

    def features(self, batch: RecapBatch) -> torch.Tensor:
        parts = [self.featurizer(batch.continuous_features, batch.binary_features)]
        if self.large_embeddings is not None:
            assert batch.sparse_features is not None
            parts.append(self.large_embeddings(batch.sparse_features))
        if self.small_embeddings is not None:
            parts.append(self.small_embeddings(batch.discrete_features))
        for name, norm in self.twhin_norms.items():
            parts.append(norm(getattr(batch, name)))
        if self.position_debias is not None:
            parts.append(self.position_debias(batch.discrete_features))
        return torch.cat(parts, dim=1)

    def forward(self, batch: RecapBatch) -> dict[str, torch.Tensor]:
        x = self.features(batch)
        if self.backbone is not None:
            shared = self.backbone(x)
            x = shared if self.multi_task_type is MultiTaskType.SHARE_ALL \
                else torch.cat([x, shared], dim=1)
        logits = torch.cat([self.towers[sanitize(t)](x) for t in self.tasks], dim=1)
        logits = logits * self.affine_scale + self.affine_bias
        probabilities = torch.sigmoid(logits)
        ratio = self.calibration_ratio
        calibrated = probabilities * ratio / (1.0 - probabilities + ratio * probabilities)
        return {"logits": logits, "probabilities": probabilities,
                "calibrated_probabilities": calibrated}


def multi_task_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                    pos_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean over tasks, per-task losses): weighted BCE with logits, mean over examples."""
    per_example = F.binary_cross_entropy_with_logits(logits, labels, weight=weights,
                                                     pos_weight=pos_weight, reduction="none")
    per_task = per_example.mean(dim=0)
    return per_task.mean(), per_task


class RankingModelAndLoss(nn.Module):
    """`forward(batch) -> (loss, outputs)`, what tml's training loop calls."""

    def __init__(self, model: RankingModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: RecapBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        outputs = self.model(batch)
        loss, per_task = multi_task_loss(outputs["logits"], batch.labels, batch.weights,
                                         self.model.pos_weight)
        return loss, {**outputs, "loss": loss.detach(), "task_losses": per_task.detach(),
                      "labels": batch.labels, "weights": batch.weights}
