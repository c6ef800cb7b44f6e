"""The fused translation scores (`models.translation_scores`) against the generic path.

With translation relations and in-batch negatives only, a grouped batch's logits come from
`TranslationScores` (the relation vector enters each relation's block as a bias; both sides'
gradients written into one tensor). The generic path (`fused_translation` off) builds the
translation queries and scores them with `_BlockScores`. Both must give the same logits,
loss and gradients of the tables and relation vectors (float rounding apart), for the BCE
and softmax losses, in training and evaluation; and the function passes gradcheck.
"""

import pytest
import torch

from projects.twhin.models.models import TwhinModel, _in_batch_sample
from projects.twhin.models.translation_scores import (
    TranslationScores,
    _uses_kernel,
    translation_kernel,
)
from tests import distributed_checks
from tests.conftest import require
from tests.distributed_checks import BATCH, TABLES, _edges, _model_config
from tests.projects.twhin.test_twhin_grouped_batches import _batch, _grouped, _model, _step


def _outputs(model: TwhinModel, batch, seed: int) -> dict:  # noqa: ANN001
    torch.manual_seed(seed)
    return model(batch)


@pytest.mark.parametrize("loss", ["bce", "softmax"])
@pytest.mark.parametrize("dim", [8, 16])
def test_fused_translation_equals_the_generic_path(loss, dim, monkeypatch):
    """dim 8: the fused scores in torch ops; dim 16: in the compiled kernel."""
    monkeypatch.setattr(distributed_checks, "DIM", dim)
    config = _model_config(("translation",) * 3)
    if dim % 16 == 0:
        require(translation_kernel() is not None, "a C compiler for the translation kernel")
    fused, generic = _model(config, loss=loss), _model(config, loss=loss)
    generic.load_state_dict(fused.state_dict())
    generic.fused_translation = False
    assert fused.fused_translation
    for seed in range(3):
        lhs, rhs, rel, rt, neg_lhs, neg_rhs, weights = _grouped(
            _edges(seed, config), torch.rand(BATCH, generator=torch.Generator().manual_seed(seed)))
        batch = _batch(lhs, rhs, rel, rt, neg_lhs, neg_rhs, weights)
        assert _in_batch_sample(rel, 4).counts is not None
        got, want = _outputs(fused, batch, seed), _outputs(generic, batch, seed)
        assert set(got) == set(want)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)
        loss_f, grads_f = _step(fused, batch, seed)
        loss_g, grads_g = _step(generic, batch, seed)
        assert loss_f == pytest.approx(loss_g, rel=1e-6)
        for key in [*TABLES, "relations"]:
            assert grads_g[key].abs().max() > 0, key          # the step reaches each part
            torch.testing.assert_close(grads_f[key], grads_g[key], rtol=1e-5, atol=1e-6,
                                       msg=key)
        fused.eval(), generic.eval()
        with torch.no_grad():
            got, want = _outputs(fused, batch, seed), _outputs(generic, batch, seed)
        torch.testing.assert_close(got["probabilities"], want["probabilities"])
        fused.train(), generic.train()


def test_the_fused_path_is_left_when_the_config_or_batch_needs_the_generic_one():
    config = _model_config(("translation",) * 3)
    assert not _model(config, global_negatives=2).fused_translation
    assert not _model(config, reciprocal=True).fused_translation
    assert not _model(_model_config(("diagonal", "complex_diagonal", "translation"))
                      ).fused_translation
    # An ungrouped batch (rows not in relation order) takes the generic gather path.
    model = _model(config)
    lhs, rhs, rel, rt, _, neg_lhs, neg_rhs = _edges(0, config)
    assert _in_batch_sample(rel, 4).counts is None
    out = _outputs(model, _batch(lhs, rhs, rel, rt, neg_lhs, neg_rhs, torch.ones(BATCH)), 0)
    assert out["logits"].shape == (BATCH * (1 + 2 * model.in_batch_negatives),)


def test_translation_scores_gradcheck():
    generator = torch.Generator().manual_seed(3)
    num_edges, dim, n = 9, 4, 3
    pair = torch.randn(num_edges, 2, dim, dtype=torch.float64, generator=generator,
                       requires_grad=True)
    vectors = torch.randn(5, dim, dtype=torch.float64, generator=generator, requires_grad=True)
    relations, counts = [0, 2, 4], [4, 2, 3]        # relation 2's block is smaller than n
    lhs_rows = torch.tensor([1, 3, 0, 4, 5, 4, 6, 8, 7])
    rhs_rows = torch.tensor([2, 2, 1, 5, 4, 5, 8, 6, 7])
    assert torch.autograd.gradcheck(
        lambda p, v: TranslationScores.apply(p, v, relations, counts, lhs_rows, rhs_rows, n),
        (pair, vectors))


def _blocks(generator: torch.Generator, counts: list[int], n: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each block's n head and tail candidates: rows of that block (repeated when the
    block is smaller than n), as `_in_batch_sample` draws them."""
    lhs, rhs, start = [], [], 0
    for count in counts:
        for side in (lhs, rhs):
            side.append(start + torch.randint(0, count, (n,), generator=generator))
        start += count
    return torch.cat(lhs), torch.cat(rhs)


def _scores_and_grads(pair: torch.Tensor, vectors: torch.Tensor, grad: torch.Tensor,
                      *args) -> tuple[torch.Tensor, ...]:  # noqa: ANN002
    pair, vectors = pair.detach().requires_grad_(), vectors.detach().requires_grad_()
    out = TranslationScores.apply(pair, vectors, *args)
    out.backward(grad.to(out.dtype))
    return out.detach(), pair.grad, vectors.grad


@pytest.mark.parametrize("dim", [16, 32, 64, 128, 144, 256])
def test_the_compiled_kernel_gives_torch_s_scores_and_gradients(dim, monkeypatch):
    """`translation_kernel.c` against the torch ops in float64, over dims with their own
    loop (16-128), the generic one (144), and one wider than its registers (256)."""
    require(translation_kernel() is not None, "a C compiler for the translation kernel")
    generator = torch.Generator().manual_seed(dim)
    relations, counts, n = [0, 2, 3, 5], [37, 3, 1, 59], 7        # blocks smaller than n too
    num_edges = sum(counts)
    lhs_rows, rhs_rows = _blocks(generator, counts, n)
    pair = torch.randn(num_edges, 2, dim, generator=generator)
    vectors = torch.randn(6, dim, generator=generator)
    grad = torch.randn(num_edges * (1 + 2 * n), generator=generator)
    args = (relations, counts, lhs_rows, rhs_rows, n)
    got = _scores_and_grads(pair, vectors, grad, *args)
    monkeypatch.setenv("TML_NATIVE", "0")
    want = _scores_and_grads(pair.double(), vectors.double(), grad, *args)
    for name, g, w in zip(("logits", "d_pair", "d_vectors"), got, want):
        assert g.dtype == torch.float32
        assert w.abs().max() > 0, name
        torch.testing.assert_close(g, w.float(), rtol=1e-4, atol=1e-4 * dim ** 0.5, msg=name)
    unused = [r for r in range(6) if r not in relations]
    assert got[2][unused].abs().max() == 0


def test_the_kernel_is_used_where_it_can_be_and_refuses_rows_outside_their_block():
    require(translation_kernel() is not None, "a C compiler for the translation kernel")
    pair, vectors = torch.randn(5, 2, 16), torch.randn(2, 16)
    assert _uses_kernel(pair, vectors) is not None
    assert _uses_kernel(pair[..., :8], vectors[:, :8]) is None        # dim not a multiple of 16
    assert _uses_kernel(pair.double(), vectors.double()) is None
    # Block 0 is rows 0-2; row 3 belongs to block 1.
    for lhs_rows, rhs_rows in ([[0, 3], [3, 4]], [[0, 1], [3, 4]]), ([[0, 1], [3, 5]],) * 2:
        with pytest.raises(ValueError, match="out of range"):
            TranslationScores.apply(pair, vectors, [0, 1], [3, 2], torch.tensor(lhs_rows[0] + lhs_rows[1]),
                                    torch.tensor(rhs_rows[0] + rhs_rows[1]), 2)
    with pytest.raises(ValueError, match="out of range"):            # blocks do not cover B
        TranslationScores.apply(pair, vectors, [0, 1], [3, 1], torch.tensor([0, 1, 3, 3]),
                                torch.tensor([0, 1, 3, 3]), 2)
