"""Batches grouped by relation (issue 13): the reader's order and the model's block scoring.

The reader reorders each batch's edges by relation (stably, global negatives following
their edges); the model then scores each relation's in-batch negatives as one block
(`_BlockScores`: one product per relation and side) instead of one product against every
relation's sample followed by a gather of the own relation's columns. Checked against the
edge-by-edge reference of tests/distributed_checks.py, against the ungrouped order of the
same edges (which takes the gather path), and by gradcheck.
"""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from projects.twhin.data.config import TwhinDataConfig
from projects.twhin.data.dataset import EdgesDataset
from projects.twhin.data.edges import EdgeBatch, edges_to_kjt
from projects.twhin.models.models import (
    TwhinModel,
    TwhinModelAndLoss,
    _BlockScores,
    _in_batch_sample,
    in_batch_sample_kernel,
)
from tests.conftest import require
from tests.distributed_checks import BATCH, NEGATIVES, TABLES, _edges, _model_config, _reference
from tml.common.modules.embedding.embedding import LargeEmbeddings


def _model(config, global_negatives=0, loss="bce", reciprocal=False):  # noqa: ANN001, ANN202
    config = config.model_copy(update={"loss": loss, "reciprocal": reciprocal})
    data = TwhinDataConfig(data_root="x", per_replica_batch_size=BATCH,
                           in_batch_negatives=NEGATIVES, global_negatives=global_negatives)
    torch.manual_seed(0)
    model = TwhinModel(config, data)
    model.large_embeddings = LargeEmbeddings(config.embeddings, device="cpu")
    with torch.no_grad():                     # relation vectors away from their neutral start
        model.all_trans_embs.add_(0.3 * torch.randn_like(model.all_trans_embs))
    return model


def _batch(lhs, rhs, rel, rt, neg_lhs, neg_rhs, weights):  # noqa: ANN001, ANN202
    nodes, slots = edges_to_kjt(lhs, rhs, rel, rt, list(TABLES), neg_lhs, neg_rhs)
    return EdgeBatch(nodes=nodes, slots=slots, labels=torch.ones(len(rel)), rels=rel,
                     weights=weights)


def _grouped(edges, weights):  # noqa: ANN001, ANN202
    """The same edges, stably grouped by relation, as the reader delivers them."""
    lhs, rhs, rel, rt, _, neg_lhs, neg_rhs = edges
    order = torch.argsort(rel, stable=True)
    assert not torch.equal(order, torch.arange(len(rel)))       # the order does change
    return (lhs[order], rhs[order], rel[order], rt, neg_lhs[order], neg_rhs[order],
            weights[order])


def _step(model, batch, seed):  # noqa: ANN001, ANN202
    """Loss and the gradients of the tables and relation vectors."""
    model.zero_grad()
    torch.manual_seed(seed)                   # the in-batch sample
    loss, _ = TwhinModelAndLoss(model)(batch)
    loss.backward()
    bags = model.large_embeddings.ebc.embedding_bags
    return loss.item(), {**{name: bags[name].weight.grad.clone() for name in TABLES},
                         "relations": model.all_trans_embs.grad.clone()}


@pytest.mark.parametrize("operators", [("translation",) * 3,
                                       ("diagonal", "complex_diagonal", "translation")])
def test_grouped_batch_equals_the_edge_by_edge_reference(operators):
    config = _model_config(operators)
    model = _model(config)
    for seed in range(3):
        lhs, rhs, rel, rt, neg_lhs, neg_rhs, _ = _grouped(_edges(seed, config),
                                                          torch.ones(BATCH))
        assert _in_batch_sample(rel, NEGATIVES).counts is not None     # the block path
        loss, grads = _step(model, _batch(lhs, rhs, rel, rt, neg_lhs, neg_rhs,
                                          torch.ones(BATCH)), seed=seed)
        bags = model.large_embeddings.ebc.embedding_bags
        ref_loss, ref_grads, ref_translation = _reference(
            {name: bags[name].weight.detach() for name in TABLES},
            model.all_trans_embs.detach(), lhs, rhs, rel, rt, seed, operators=operators)
        assert loss == pytest.approx(ref_loss, rel=1e-6)
        for name in TABLES:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(grads["relations"], ref_translation, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss_name,global_negatives,reciprocal", [
    ("bce", 0, False), ("bce", 2, False), ("softmax", 2, False), ("softmax", 0, True),
    ("bce", 0, True)])
def test_grouping_a_batch_changes_neither_loss_nor_gradients(loss_name, global_negatives,
                                                             reciprocal):
    config = _model_config()
    model = _model(config, global_negatives, loss_name, reciprocal)
    for seed in range(3):
        edges = _edges(seed, config, global_negatives)
        weights = torch.rand(BATCH, generator=torch.Generator().manual_seed(seed)) + 0.5
        lhs, rhs, rel, rt, _, neg_lhs, neg_rhs = edges
        assert _in_batch_sample(rel, NEGATIVES).counts is None       # the gather path
        loss, grads = _step(model, _batch(lhs, rhs, rel, rt, neg_lhs, neg_rhs, weights), seed)
        grouped_loss, grouped_grads = _step(model, _batch(*_grouped(edges, weights)), seed)
        assert grouped_loss == pytest.approx(loss, rel=1e-6)
        for name, grad in grads.items():
            assert grad.abs().sum() > 0, name
            torch.testing.assert_close(grouped_grads[name], grad, rtol=1e-5, atol=1e-7,
                                       msg=name)


@pytest.mark.parametrize("tail_is_lhs,positives", [(False, False), (True, True),
                                                    (False, True), (True, False)])
def test_block_scores_gradients_and_per_row_definition(tail_is_lhs, positives):
    g = torch.Generator().manual_seed(0)
    counts, n, dim = [3, 1, 4], 2, 5
    rows = sum(counts)

    def randn(*shape):  # noqa: ANN001, ANN202
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)

    block = torch.repeat_interleave(torch.arange(3), torch.tensor(counts))
    # Each relation's n candidate rows are rows of that relation (as `_in_batch_sample`).
    starts = torch.tensor([0, 3, 4])
    lhs_rows = (starts.repeat_interleave(n) + torch.tensor([2, 0, 0, 0, 3, 1])).long()
    rhs_rows = (starts.repeat_interleave(n) + torch.tensor([1, 1, 0, 0, 0, 2])).long()
    inputs = (randn(rows, dim), randn(rows), randn(rows, dim), randn(rows), randn(rows, dim),
              randn(rows, dim))

    def scores(tail_q, tail_b, head_q, head_b, lhs, rhs):  # noqa: ANN001, ANN202
        # The translation case: the tail query is lhs itself (one tensor, two inputs).
        return _BlockScores.apply(lhs if tail_is_lhs else tail_q, tail_b, head_q, head_b,
                                  lhs, rhs, lhs_rows, rhs_rows, counts, n, positives)

    torch.autograd.gradcheck(scores, inputs)
    out = scores(*inputs)
    tail_q, tail_b, head_q, head_b, lhs, rhs = inputs
    tail_q = lhs if tail_is_lhs else tail_q
    first = rows if positives else 0
    assert out.shape == (first + 2 * rows * n,)
    if positives:
        torch.testing.assert_close(out[:rows], (tail_q * rhs).sum(1) + tail_b)
    blocks = out[first:].view(2, rows, n)
    for i in range(rows):
        own = slice(int(block[i]) * n, (int(block[i]) + 1) * n)
        torch.testing.assert_close(blocks[0, i], rhs[rhs_rows[own]] @ tail_q[i] + tail_b[i])
        torch.testing.assert_close(blocks[1, i], lhs[lhs_rows[own]] @ head_q[i] + head_b[i])


def test_the_reader_groups_each_batch_by_relation_stably(tmp_path):
    from projects.twhin.models.config import Relation

    relations = [Relation(name="fav", lhs="user", rhs="tweet"),
                 Relation(name="follow", lhs="user", rhs="user"),
                 Relation(name="by", lhs="tweet", rhs="user")]
    num_rows = 40
    rel = np.array([(i * 7) % 3 for i in range(num_rows)], np.int64)
    lhs = np.arange(num_rows, dtype=np.int64)                    # row i has lhs = i
    rhs = (lhs * 5 + 1) % 30
    weight = np.linspace(0.5, 2.0, num_rows)
    pq.write_table(pa.table({"lhs": lhs, "rhs": rhs, "rel": rel, "weight": weight}),
                   str(tmp_path / "e.parquet"))
    kwargs = dict(table_sizes={"user": 50, "tweet": 40}, relations=relations, batch_size=8,
                  global_negatives=2, seed=3)
    batches = list(EdgesDataset(str(tmp_path / "e.parquet"), **kwargs))
    assert len(batches) == 5
    for index, batch in enumerate(batches):
        kjt, num_tables = batch.nodes, len(TABLES)
        per_key = kjt.to_dict()
        ids = torch.stack([per_key[kjt.keys()[int(s) % num_tables]].values()[
            int(s) // num_tables] for s in batch.slots])
        rows = ids[0:16:2]                                           # each edge's lhs
        file_rows = list(range(8 * index, 8 * index + 8))
        # Grouped by relation, in file order within a relation.
        assert rows.tolist() == sorted(file_rows, key=lambda i: rel[i])
        assert batch.rels.tolist() == rel[rows.numpy()].tolist()
        assert ids[1:16:2].tolist() == rhs[rows.numpy()].tolist()
        assert torch.allclose(batch.weights, torch.tensor(weight[rows.numpy()],
                                                          dtype=torch.float32))
        # The global negatives follow their edge: the draws of the file order, permuted.
        # (seed, rank, epoch, batch): the position after the batch, as the dataset keeps it.
        rng = np.random.default_rng([3, 0, *((0, index + 1) if index < 4 else (1, 0))])
        sizes = {0: (50, 40), 1: (50, 50), 2: (40, 50)}
        draws = rng.random((8, 2))
        expected_lhs = (draws * np.array([sizes[rel[i]][0] for i in file_rows])[:, None]
                        ).astype(np.int64)
        draws = rng.random((8, 2))
        expected_rhs = (draws * np.array([sizes[rel[i]][1] for i in file_rows])[:, None]
                        ).astype(np.int64)
        position = {row: k for k, row in enumerate(file_rows)}
        negatives = ids[16:].view(8, 2, 2)                          # per edge: G lhs, G rhs
        for k, row in enumerate(rows.tolist()):
            assert negatives[k, 0].tolist() == expected_lhs[position[row]].tolist()
            assert negatives[k, 1].tolist() == expected_rhs[position[row]].tolist()


@pytest.mark.parametrize("rels", [[0, 0, 0, 2, 2, 5, 5, 5, 5, 5, 5, 5], [3], [1, 1],
                                  [0, 2, 1, 1]])
def test_the_compiled_sample_bookkeeping_draws_what_torch_s_does(rels, monkeypatch):
    """`in_batch_sample.c` finds the blocks and assembles the candidates of the same
    `randperm` draws as the torch ops (blocks smaller and larger than n); an ungrouped
    batch goes to the torch path."""
    require(in_batch_sample_kernel() is not None, "a C compiler for the sample kernel")
    rels = torch.tensor(rels, dtype=torch.int64)
    torch.manual_seed(7)
    got = _in_batch_sample(rels, 4)
    monkeypatch.setenv("TML_NATIVE", "0")
    torch.manual_seed(7)
    want = _in_batch_sample(rels, 4)
    for name in ("rhs_rows", "lhs_rows", "present"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert got.counts == want.counts
    assert (got.counts is None) == bool((rels[1:] < rels[:-1]).any())
