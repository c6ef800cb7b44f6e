"""`DataclassBatch`: a dataclass of tensors that TorchRec's train pipeline can move around.

TorchRec's `TrainPipelineSparseDist` needs batches that are `Pipelineable`: `to(device)`,
`record_stream(stream)` and `pin_memory()`. Subclass this with tensor (or
KeyedJaggedTensor) fields and get all three.
"""

from __future__ import annotations

import dataclasses

import torch
from torchrec.streamable import Pipelineable


@dataclasses.dataclass
class DataclassBatch(Pipelineable):
    def _fields(self):  # noqa: ANN202
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)]

    def to(self, device: torch.device, non_blocking: bool = False):  # noqa: ANN201
        return type(self)(**{name: value.to(device=device, non_blocking=non_blocking)
                             for name, value in self._fields()})

    def record_stream(self, stream: torch.Stream) -> None:
        for _, value in self._fields():
            value.record_stream(stream)

    def pin_memory(self):  # noqa: ANN201
        return type(self)(**{name: value.pin_memory() for name, value in self._fields()})
