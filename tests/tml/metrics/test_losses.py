"""`positives_then_negatives_bce` against torch's weighted BCE over the full labels and
weights it stands for."""

import pytest
import torch
from torch.nn import functional

from tml.metrics.losses import positives_then_negatives_bce


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_same_loss_and_gradient_as_torch_s_weighted_bce(dtype):
    generator = torch.Generator().manual_seed(0)
    num_positives, num_negatives = 37, 370
    # Wide logits: softplus's linear range (> 20) and its far negative tail included.
    logits = (torch.randn(num_positives + num_negatives, generator=generator) * 12).to(dtype)
    logits[:3] = torch.tensor([30.0, -30.0, 0.0], dtype=dtype)
    labels = torch.rand(num_positives, generator=generator).round()      # 0/1 positives' labels
    weights = torch.rand(num_positives, generator=generator) + 0.5
    negative_weight = num_positives / num_negatives
    full_labels = torch.cat([labels, torch.zeros(num_negatives)]).to(dtype)
    full_weights = torch.cat([weights, torch.full((num_negatives,), negative_weight)]).to(dtype)

    got_x, want_x = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    got = positives_then_negatives_bce(got_x, labels, weights, negative_weight)
    want = functional.binary_cross_entropy_with_logits(want_x, full_labels, full_weights)
    torch.testing.assert_close(got, want)
    (got * 3).backward()
    (want * 3).backward()
    torch.testing.assert_close(got_x.grad, want_x.grad)
    assert want_x.grad[num_positives:].abs().min() > 0
    assert got.dtype == dtype and got_x.grad.dtype == dtype
