"""Relation operators, the one scoring function, and global negatives (single process)."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from projects.twhin.data.config import TwhinDataConfig
from projects.twhin.data.dataset import EdgesDataset
from projects.twhin.data.edges import EdgeBatch, edges_to_kjt, relation_tables
from projects.twhin.models.config import Operator, Relation, TwhinModelConfig
from projects.twhin.models.models import (
    OPERATORS,
    TwhinModel,
    TwhinModelAndLoss,
    initial_relation_vector,
    operator_code,
    relation_query,
    score,
)
from tests.fx_checks import assert_traced_matches_eager
from tml.common.modules.embedding.embedding import LargeEmbeddings
from tml.core.config.config_load import parse_config
from tml.errors import ConfigError

D = 6
TABLES = {"user": 20, "item": 15}


def _formula(operator, lhs, r, rhs):
    """Each operator's textbook definition, written independently of the model code."""
    if operator == Operator.TRANSLATION:
        return (lhs * (rhs + r)).sum(-1)
    if operator == Operator.IDENTITY:
        return (lhs * rhs).sum(-1)
    if operator == Operator.DIAGONAL:
        return (lhs * r * rhs).sum(-1)
    h = lhs.shape[-1] // 2
    as_complex = lambda x: torch.complex(x[..., :h].double(), x[..., h:].double())  # noqa: E731
    return (as_complex(lhs) * as_complex(r) * as_complex(rhs).conj()).sum(-1).real.float()


@pytest.mark.parametrize("operator", list(Operator))
def test_each_operator_scores_as_its_formula_from_both_sides(operator):
    g = torch.Generator().manual_seed(0)
    lhs, r, rhs = (torch.randn(9, D, generator=g) for _ in range(3))
    codes = torch.full((9,), operator_code(operator))
    expected = _formula(operator, lhs, r, rhs)
    assert torch.allclose(score(lhs, r, rhs, codes), expected, atol=1e-5)
    q, b = relation_query(rhs, r, codes, "head")   # rank heads: dot(q, lhs) + b
    assert torch.allclose((q * lhs).sum(-1) + b, expected, atol=1e-5)
    # Candidates as a matrix product (what ranking and neighbours do) give the same numbers.
    q, b = relation_query(lhs[:1].expand(9, -1), r[:1].expand(9, -1), codes, "tail")
    assert torch.allclose((q[:1] @ rhs.T + b[:1]).squeeze(0),
                          _formula(operator, lhs[:1], r[:1], rhs), atol=1e-5)


def test_mixed_operators_in_one_batch_score_row_by_row():
    g = torch.Generator().manual_seed(1)
    lhs, r, rhs = (torch.randn(12, D, generator=g) for _ in range(3))
    codes = torch.arange(12) % len(OPERATORS)
    expected = torch.stack([_formula(OPERATORS[int(c)], lhs[i], r[i], rhs[i])
                            for i, c in enumerate(codes)])
    assert torch.allclose(score(lhs, r, rhs, codes), expected, atol=1e-5)


@pytest.mark.parametrize("operator", list(Operator))
def test_initial_relation_vector_makes_every_operator_a_plain_dot(operator):
    g = torch.Generator().manual_seed(2)
    lhs, rhs = torch.randn(5, D, generator=g), torch.randn(5, D, generator=g)
    r = initial_relation_vector(operator, D).expand(5, -1)
    codes = torch.full((5,), operator_code(operator))
    assert torch.allclose(score(lhs, r, rhs, codes), (lhs * rhs).sum(-1), atol=1e-5)


def _model_config(dim=D, operators=("translation", "diagonal", "complex_diagonal")):
    pairs = [("user", "item"), ("user", "user"), ("item", "user")]
    return {
        "embeddings": {"tables": [{"name": n, "num_embeddings": rows, "embedding_dim": dim,
                                   "optimizer": {"sgd": {"lr": 0.1}}}
                                  for n, rows in TABLES.items()]},
        "relations": [{"name": f"r{i}", "lhs": a, "rhs": b, "operator": op}
                      for i, ((a, b), op) in enumerate(zip(pairs, operators))],
        "translation_optimizer": {"sgd": {"lr": 0.1}},
    }


def test_complex_operator_needs_an_even_dim():
    with pytest.raises(ConfigError, match=r"relations\[2\] \('r2'\): operator "
                       r"complex_diagonal needs an even embedding_dim, got 5"):
        parse_config(TwhinModelConfig, _model_config(dim=5), source="x.yaml")
    with pytest.raises(ConfigError, match="relations.0.operator"):
        parse_config(TwhinModelConfig, _model_config(operators=("rotate",) * 3))


def test_global_negatives_zero_is_allowed_and_negative_is_an_error():
    base = {"data_root": "x", "per_replica_batch_size": 4, "in_batch_negatives": 1}
    assert parse_config(TwhinDataConfig, {**base, "global_negatives": 3}).global_negatives == 3
    with pytest.raises(ConfigError, match="global_negatives"):
        parse_config(TwhinDataConfig, {**base, "global_negatives": -1})


def _cpu_model(global_negatives=0, in_batch=2):
    config = parse_config(TwhinModelConfig, _model_config())
    data = TwhinDataConfig(data_root="x", per_replica_batch_size=8,
                           in_batch_negatives=in_batch, global_negatives=global_negatives)
    torch.manual_seed(0)
    model = TwhinModel(config, data)
    model.large_embeddings = LargeEmbeddings(config.embeddings, device="cpu")
    with torch.no_grad():
        model.all_trans_embs.normal_()
    return config, model


def _batch(config, g, negatives=0, num_edges=8):
    rt = relation_tables(config.relations, list(TABLES))
    rel = torch.randint(0, 3, (num_edges,), generator=g)
    sizes = torch.tensor(list(TABLES.values()))
    draw = lambda side, *shape: (torch.rand(*shape, generator=g)  # noqa: E731
                                 * sizes[rt[rel, side]].view(-1, *[1] * (len(shape) - 1))).long()
    lhs, rhs = draw(0, num_edges), draw(1, num_edges)
    neg_lhs, neg_rhs = draw(0, num_edges, negatives), draw(1, num_edges, negatives)
    kjt, slots = edges_to_kjt(lhs, rhs, rel, rt, list(TABLES), neg_lhs, neg_rhs)
    batch = EdgeBatch(nodes=kjt, slots=slots, labels=torch.ones(num_edges), rels=rel,
                      weights=torch.ones(num_edges))
    return batch, lhs, rhs, rel, neg_lhs, neg_rhs, rt


def test_global_negatives_are_scored_with_the_full_tables_and_the_operator():
    config, model = _cpu_model(global_negatives=3, in_batch=0)
    batch, lhs, rhs, rel, neg_lhs, neg_rhs, rt = _batch(config, torch.Generator().manual_seed(3),
                                                        negatives=3)
    logits = model(batch)["logits"].detach()
    assert logits.shape == (8 + 2 * 8 * 3,)
    weights = {n: model.large_embeddings.ebc.embedding_bags[n].weight.detach() for n in TABLES}
    names = list(TABLES)

    def vec(side, i, row):
        return weights[names[int(rt[rel[i], side])]][row]

    expected_pos, expected_tail, expected_head = [], [], []
    for i in range(8):
        op, r = config.relations[int(rel[i])].operator, model.all_trans_embs[rel[i]].detach()
        expected_pos.append(_formula(op, vec(0, i, lhs[i]), r, vec(1, i, rhs[i])))
        for j in range(3):
            expected_tail.append(_formula(op, vec(0, i, lhs[i]), r, vec(1, i, neg_rhs[i, j])))
        for j in range(3):
            expected_head.append(_formula(op, vec(0, i, neg_lhs[i, j]), r, vec(1, i, rhs[i])))
    expected = torch.stack(expected_pos + expected_tail + expected_head)
    assert torch.allclose(logits, expected, atol=1e-5)

    loss, outputs = TwhinModelAndLoss(model)(batch)
    assert outputs["labels"].tolist() == [1.0] * 8 + [0.0] * 48
    assert torch.allclose(outputs["weights"][8:].sum(), torch.tensor(8.0))  # negatives weigh B


def test_forward_traces_with_torchrec_fx_and_matches_eager():
    config, model = _cpu_model(global_negatives=2, in_batch=2)
    wrapped = TwhinModelAndLoss(model)
    batch = _batch(config, torch.Generator().manual_seed(4), negatives=2)[0]
    eager = assert_traced_matches_eager(wrapped, batch)
    assert eager["logits"].shape == (8 + 2 * 8 * 2 + 2 * 8 * 2,)


def test_dataset_appends_global_negatives_from_the_right_tables(tmp_path):
    relations = [Relation(name="fav", lhs="user", rhs="item"),
                 Relation(name="rev", lhs="item", rhs="user")]
    n = 16
    rel = np.arange(n) % 2
    pq.write_table(pa.table({"lhs": np.zeros(n, np.int64), "rel": rel,
                             "rhs": np.zeros(n, np.int64)}), tmp_path / "e.parquet")
    dataset = EdgesDataset(str(tmp_path), TABLES, relations, batch_size=8, global_negatives=5)
    batches = list(dataset)
    assert len(batches) == 2
    kjt = batches[0].nodes
    # 8 edges -> 16 positive lookups + 8 * 2 * 5 negative ones
    assert int(kjt.lengths().sum()) == 16 + 80
    per_table = kjt.to_dict()
    # user lookups: 8 positives (lhs of fav, rhs of rev) + 4*5 (fav lhs) + 4*5 (rev rhs)
    assert per_table["user"].values().numel() == 8 + 40
    assert int(per_table["item"].values().max()) < TABLES["item"]
    assert int(per_table["user"].values().max()) < TABLES["user"]
    assert per_table["user"].values()[8:].unique().numel() > 5  # really drawn, not constant
    again = list(EdgesDataset(str(tmp_path), TABLES, relations, batch_size=8,
                              global_negatives=5))
    assert torch.equal(again[1].nodes.values(), batches[1].nodes.values())  # reproducible
