"""`RecapBatch`: one batch of ranker examples, movable by TorchRec's train pipeline."""

from __future__ import annotations

import dataclasses

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable


@dataclasses.dataclass
class RecapBatch(Pipelineable):
    """Features `[B, n]`, `labels` and `weights` `[B, tasks]` (model task order); the
    optional inputs are None when the config does not use them."""

    continuous_features: torch.Tensor
    binary_features: torch.Tensor
    discrete_features: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor
    user_embedding: torch.Tensor | None = None
    user_eng_embedding: torch.Tensor | None = None
    author_embedding: torch.Tensor | None = None
    sparse_features: KeyedJaggedTensor | None = None

    def _map(self, function) -> RecapBatch:  # noqa: ANN001
        return type(self)(**{f.name: None if getattr(self, f.name) is None
                             else function(getattr(self, f.name))
                             for f in dataclasses.fields(self)})

    def to(self, device: torch.device, non_blocking: bool = False) -> RecapBatch:
        return self._map(lambda v: v.to(device=device, non_blocking=non_blocking))

    def record_stream(self, stream: torch.Stream) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                value.record_stream(stream)

    def pin_memory(self) -> RecapBatch:
        return self._map(lambda v: v.pin_memory())

    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])
