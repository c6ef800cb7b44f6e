"""Several workers train through TorchRec's pipeline, which traces the model with torch.fx:
a model must trace and give, traced, what it gives eagerly."""

from __future__ import annotations

from typing import Any

import torch


def assert_traced_matches_eager(model: torch.nn.Module, batch: Any) -> dict:
    """Trace `model` (a loss-and-outputs module) with TorchRec's fx, run both on `batch` under
    the same seed, check the logits are equal and the losses close; the eager outputs."""
    from torchrec.fx import symbolic_trace

    traced = symbolic_trace(model)
    torch.manual_seed(9)
    eager_loss, eager = model(batch)
    torch.manual_seed(9)
    traced_loss, traced_out = traced(batch)
    assert torch.equal(eager["logits"], traced_out["logits"])
    assert torch.allclose(eager_loss, traced_loss)
    return eager
