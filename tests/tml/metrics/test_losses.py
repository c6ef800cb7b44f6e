"""`positives_then_negatives_bce` against torch's weighted BCE over the full labels and
weights it stands for."""

import pytest
import torch
from torch.nn import functional

from tests.conftest import require
from tml.metrics.losses import bce_kernel, positives_then_negatives_bce


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


@pytest.mark.parametrize("num_positives,num_negatives", [(37, 370), (16, 32), (5, 0), (0, 21),
                                                         (1, 1)])
def test_the_compiled_loss_agrees_with_float64_over_the_whole_range(num_positives,
                                                                    num_negatives,
                                                                    monkeypatch):
    """`bce_kernel.c` (float32 on CPU) against the torch ops in float64: logits from -120
    to 120 (softplus's exp underflows and its linear range), sizes that are and are not
    multiples of its 16-float vectors."""
    require(bce_kernel() is not None, "a C compiler for the BCE kernel")
    generator = torch.Generator().manual_seed(num_positives + num_negatives)
    num = num_positives + num_negatives
    logits = torch.cat([torch.linspace(-120, 120, num // 2),
                        torch.randn(num - num // 2, generator=generator) * 4])
    logits = logits[torch.randperm(num, generator=generator)]
    labels = torch.rand(num_positives, generator=generator)          # soft labels too
    weights = torch.rand(num_positives, generator=generator) + 0.5
    negative_weight = 0.37

    def loss_and_grad(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.clone().requires_grad_()
        loss = positives_then_negatives_bce(x, labels, weights, negative_weight)
        (loss * 1.7).backward()
        return loss.detach(), x.grad

    got_loss, got_grad = loss_and_grad(logits)
    monkeypatch.setenv("TML_NATIVE", "0")
    want_loss, want_grad = loss_and_grad(logits.double())
    assert got_loss.dtype == torch.float32
    torch.testing.assert_close(got_loss.double(), want_loss, rtol=2e-6, atol=1e-30)
    torch.testing.assert_close(got_grad.double(), want_grad, rtol=1e-5, atol=1e-9 / num)
    # NaN comes through, and so does a negative's infinite logit (an infinite loss).
    monkeypatch.setenv("TML_NATIVE", "1")
    for bad, expect in ((float("nan"), torch.isnan), (float("inf"), torch.isinf)
                        )[:2 if num_negatives else 1]:
        x = logits.clone()
        x[-1] = bad
        assert expect(positives_then_negatives_bce(x, labels, weights, negative_weight))
