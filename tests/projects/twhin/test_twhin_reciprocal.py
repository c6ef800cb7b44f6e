"""Reciprocal relations (`model.reciprocal`, issue 20): heads scored by the inverse relation.

Checked against formulas written here, not the model's code: the head side of (h, r, t)
is the ComplEx / DistMult / translation score of (t, r^-1, h) with r^-1 the relation's
second vector; the loss is the textbook cross-entropy per side; link prediction's head
ranks are brute-force filtered ranks with that score.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from projects.twhin import link_prediction as lp
from projects.twhin.data.config import TwhinDataConfig
from projects.twhin.models.config import TwhinModelConfig
from projects.twhin.models.models import TwhinModel, TwhinModelAndLoss, softmax_loss
from tests.projects.twhin.test_twhin_operators import _formula, _model_config
from tests.projects.twhin.test_twhin_softmax import NAMES, _batch, _weights
from tml.common.modules.embedding.embedding import LargeEmbeddings
from tml.core.config.config_load import parse_config
from tml.errors import ConfigError


def _model(shared=4, regularization=0.0, reciprocal=True):
    config = parse_config(TwhinModelConfig, {**_model_config(), "loss": "softmax",
                                             "regularization": regularization,
                                             "reciprocal": reciprocal})
    data = TwhinDataConfig(data_root="x", per_replica_batch_size=8, in_batch_negatives=0,
                           global_negatives=0, shared_negatives=shared)
    torch.manual_seed(0)
    model = TwhinModel(config, data)
    model.large_embeddings = LargeEmbeddings(config.embeddings, device="cpu")
    with torch.no_grad():
        model.all_trans_embs.normal_()
    return config, model


def test_reciprocal_relations_have_an_inverse_vector_each_starting_neutral():
    config, _ = _model()
    model = TwhinModel(config, TwhinDataConfig(data_root="x", per_replica_batch_size=8,
                                               in_batch_negatives=0, shared_negatives=4))
    num_relations = len(config.relations)
    assert model.all_trans_embs.shape == (2 * num_relations, model.embedding_dim)
    # Row R + i starts as row i (the neutral vector of relation i's operator).
    assert torch.equal(model.all_trans_embs[num_relations:], model.all_trans_embs[:num_relations])


def test_head_side_is_scored_with_the_inverse_relation():
    config, model = _model()
    batch, lhs, rhs, rel, shared_ids, rt = _batch(config)
    out = model(batch)
    weights = _weights(model)
    num_relations = len(config.relations)
    vectors = model.all_trans_embs.detach()
    for i in range(len(rel)):
        r = int(rel[i])
        op = config.relations[r].operator
        lhs_table, rhs_table = NAMES[int(rt[r, 0])], NAMES[int(rt[r, 1])]
        h, t = weights[lhs_table][lhs[i]], weights[rhs_table][rhs[i]]
        forward, inverse = vectors[r], vectors[num_relations + r]
        assert torch.allclose(out["logits"][i], _formula(op, h, forward, t), atol=1e-5)
        assert torch.allclose(out["head_positives"][i], _formula(op, t, inverse, h), atol=1e-5)
        heads = torch.stack([_formula(op, t, inverse, weights[lhs_table][c])
                             for c in shared_ids[NAMES.index(lhs_table)]])
        tails = torch.stack([_formula(op, h, forward, weights[rhs_table][c])
                             for c in shared_ids[NAMES.index(rhs_table)]])
        assert torch.allclose(out["head_negatives"][i], heads, atol=1e-5)
        assert torch.allclose(out["tail_negatives"][i], tails, atol=1e-5)


def test_loss_is_cross_entropy_per_side_each_with_its_own_positive():
    g = torch.Generator().manual_seed(1)
    tails_pos, heads_pos = torch.randn(5, generator=g), torch.randn(5, generator=g)
    tail_neg, head_neg = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    weights = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0])
    offsets = torch.zeros(2, 5, 3)
    got = softmax_loss(tails_pos, tail_neg, head_neg, offsets, weights, heads_pos)
    target = torch.zeros(5, dtype=torch.long)
    ce_tail = F.cross_entropy(torch.cat([tails_pos[:, None], tail_neg], 1), target,
                              reduction="none")
    ce_head = F.cross_entropy(torch.cat([heads_pos[:, None], head_neg], 1), target,
                              reduction="none")
    assert torch.allclose(got, (weights * (ce_tail + ce_head)).sum() / 10)


def test_training_step_moves_each_direction_by_its_own_side_only():
    config, model = _model()
    batch, _, _, rel, _, _ = _batch(config)
    loss, _ = TwhinModelAndLoss(model)(batch)
    loss.backward()
    grad = model.all_trans_embs.grad
    num_relations = len(config.relations)
    used = torch.unique(rel)
    unused = [r for r in range(num_relations) if r not in used.tolist()]
    assert (grad[used].abs().sum(1) > 0).all()                  # tail side: forward rows
    assert (grad[num_relations + used].abs().sum(1) > 0).all()  # head side: inverse rows
    for r in unused:
        assert not grad[r].any() and not grad[num_relations + r].any()


def test_n3_penalises_the_inverse_vectors_too():
    config, model = _model(regularization=0.5)
    batch, lhs, rhs, rel, _, rt = _batch(config)
    out = model(batch)
    weights = _weights(model)
    num_relations = len(config.relations)
    total = 0.0
    for i in range(len(rel)):
        r = int(rel[i])
        rows = [weights[NAMES[int(rt[r, 0])]][lhs[i]], weights[NAMES[int(rt[r, 1])]][rhs[i]],
                model.all_trans_embs[r].detach(),
                model.all_trans_embs[num_relations + r].detach()]
        total += sum(float((x.abs() ** 3).sum()) for x in rows)   # mixed operators: real N3
    assert out["penalty"].item() == pytest.approx(0.5 * total / len(rel), rel=1e-5)


def test_link_prediction_ranks_heads_with_the_inverse_relation():
    """`rank_sums` with 2R relation vectors against brute-force filtered ranks."""
    config, model = _model()
    weights = _weights(model)
    vectors = model.all_trans_embs.detach()
    num_relations = len(config.relations)
    rng = np.random.default_rng(0)
    edges = []
    for r, relation in enumerate(config.relations):
        n_l, n_r = weights[relation.lhs].shape[0], weights[relation.rhs].shape[0]
        edges += [(int(rng.integers(n_l)), r, int(rng.integers(n_r))) for _ in range(6)]
    lhs, rel, rhs = (np.array(c, np.int64) for c in zip(*edges))
    known = lp.KnownEdges((lhs, rel, rhs), 20)
    sums = lp.rank_sums(weights, vectors, config.relations, (lhs, rel, rhs), known)
    for side_index, side in enumerate(lp.SIDES):
        expected = np.zeros(num_relations)
        for h, r, t in edges:
            relation = config.relations[r]
            op = relation.operator
            if side == "tail":
                candidates, truth = weights[relation.rhs], t
                scores = _formula(op, weights[relation.lhs][h].expand_as(candidates),
                                  vectors[r].expand_as(candidates), candidates)
                others = {b for a, q, b in edges if a == h and q == r and b != t}
            else:
                candidates, truth = weights[relation.lhs], h
                scores = _formula(op, weights[relation.rhs][t].expand_as(candidates),
                                  vectors[num_relations + r].expand_as(candidates), candidates)
                others = {a for a, q, b in edges if b == t and q == r and a != h}
            keep = torch.ones(len(candidates), dtype=torch.bool)
            keep[list(others)] = False
            keep[truth] = False
            s, mine = scores[keep], scores[truth]
            rank = 1 + (s > mine).sum().item() + (s == mine).sum().item() / 2
            expected[r] += 1 / rank
        assert np.allclose(sums[:, side_index, 1], expected, atol=1e-4), side


def test_reciprocal_needs_the_softmax_loss():
    with pytest.raises(ConfigError, match="reciprocal: true needs loss: softmax") as error:
        parse_config(TwhinModelConfig, {**_model_config(), "reciprocal": True}, source="c.yaml")
    assert "\n" not in str(error.value)


def test_reciprocal_forward_traces_with_torchrec_fx():
    """`twhin train`'s pipeline traces the model: the traced loss must be the eager one."""
    from torchrec.fx import symbolic_trace

    config, model = _model(regularization=0.1)
    wrapped = TwhinModelAndLoss(model)
    batch = _batch(config)[0]
    traced = symbolic_trace(wrapped)
    eager_loss, eager = wrapped(batch)
    traced_loss, traced_out = traced(batch)
    assert torch.equal(eager["head_positives"], traced_out["head_positives"])
    assert torch.allclose(eager_loss, traced_loss)
