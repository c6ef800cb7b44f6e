"""`model.entity_bias`: each vector's last coordinate is its entity's bias, added to every
score the entity takes part in (training, ranking, export and neighbours alike)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from projects.twhin import operators_np
from projects.twhin.cli import dispatch
from projects.twhin.data.config import TwhinDataConfig
from projects.twhin.models.config import Operator, TwhinModelConfig
from projects.twhin.models.models import (
    TwhinModel,
    TwhinModelAndLoss,
    initial_relation_vector,
    operator_code,
    relation_query,
    score,
)
from projects.twhin.signature import model_signature, signature_difference
from tests.fx_checks import assert_traced_matches_eager
from tests.projects.twhin.test_twhin_cli import _random_checkpoint, imported  # noqa: F401
from tests.projects.twhin.test_twhin_operators import _formula, _model_config
from tests.projects.twhin.test_twhin_softmax import _batch, _model
from tml.common.modules.embedding.embedding import LargeEmbeddings
from tml.core.config.config_load import parse_config
from tml.errors import ConfigError, TmlError

D = 8


def _biased(operator, lhs, r, rhs):
    """The definition: the operator on the first D - 2 coordinates plus both biases."""
    core = lhs.shape[-1] - 2
    return (_formula(operator, lhs[..., :core], r[..., :core], rhs[..., :core])
            + lhs[..., -1] + rhs[..., -1])


@pytest.mark.parametrize("operator", list(Operator))
def test_every_operator_adds_both_entities_biases_from_either_side(operator):
    g = torch.Generator().manual_seed(0)
    lhs, r, rhs = (torch.randn(9, D, generator=g) for _ in range(3))
    codes = torch.full((9,), operator_code(operator))
    expected = _biased(operator, lhs, r, rhs)
    assert torch.allclose(score(lhs, r, rhs, codes, entity_bias=True), expected, atol=1e-5)
    for side, known, other in (("tail", lhs, rhs), ("head", rhs, lhs)):
        q, b = relation_query(known, r, codes, side, entity_bias=True)
        assert torch.allclose((q * other).sum(-1) + b, expected, atol=1e-5)
        # numpy's copy (export, neighbours) gives the same query
        q_np, b_np = operators_np.relation_query(known.numpy(), r.numpy(), operator.value,
                                                 side, entity_bias=True)
        np.testing.assert_allclose(q_np, q.numpy(), atol=1e-6)
        np.testing.assert_allclose(b_np, b.numpy(), atol=1e-5)
    # the unused coordinate never enters a score
    moved = lhs.clone()
    moved[:, -2] += 5.0
    assert torch.allclose(score(moved, r, rhs, codes, entity_bias=True), expected, atol=1e-5)
    # and the neutral relation vector makes the operator a plain dot on the core
    neutral = initial_relation_vector(operator, D, entity_bias=True).expand(9, -1)
    assert torch.allclose(score(lhs, neutral, rhs, codes, entity_bias=True),
                          (lhs[:, :-2] * rhs[:, :-2]).sum(-1) + lhs[:, -1] + rhs[:, -1],
                          atol=1e-5)


def _biased_model(model_config, regularization, in_batch=0, global_=0):
    """A single-process TwhinModel of `model_config` with its regularization weight."""
    data = TwhinDataConfig(data_root="x", per_replica_batch_size=8, in_batch_negatives=in_batch,
                           global_negatives=global_, shared_negatives=4)
    torch.manual_seed(0)
    model = TwhinModel(model_config.model_copy(update={"regularization": regularization}), data)
    model.large_embeddings = LargeEmbeddings(model_config.embeddings, device="cpu")
    with torch.no_grad():
        model.all_trans_embs.normal_()
    return model


def test_model_scores_with_the_biases_and_leaves_them_out_of_the_penalty():
    """Positives and shared negatives carry the biases; the N3 penalty covers the operators'
    coordinates only; the loss's gradient reaches the bias and never the unused coordinate."""
    config = _model(shared=4, loss="softmax")[0]
    biased = parse_config(TwhinModelConfig, {**config.model_dump(mode="json"),
                                             "entity_bias": True})

    model, unpenalised = _biased_model(biased, 0.5), _biased_model(biased, 0.0)
    batch, _, _, rels, shared_ids, tables = _batch(config, shared=4)
    out = model(batch)
    lhs, rhs = model.lookup(batch)
    r = model.all_trans_embs[rels]
    expected = torch.stack([_biased(config.relations[int(c)].operator, lhs[i], r[i], rhs[i])
                            for i, c in enumerate(rels)])
    assert torch.allclose(out["logits"][:len(rels)], expected, atol=1e-5)
    names = model.table_names
    weights = {n: model.large_embeddings.ebc.embedding_bags[n].weight for n in names}
    for i in range(len(rels)):
        table = weights[names[int(tables[rels[i], 1])]]
        for k in range(4):
            candidate = table[shared_ids[int(tables[rels[i], 1])][k]]
            want = _biased(config.relations[int(rels[i])].operator, lhs[i], r[i], candidate)
            assert torch.allclose(out["tail_negatives"][i, k], want, atol=1e-5)
    core = model.embedding_dim - 2
    penalty = 0.5 * sum((v[:, :core].abs() ** 3).sum() for v in (lhs, r, rhs)) / len(rels)
    loss = TwhinModelAndLoss(model)(batch)[0]
    assert torch.allclose(loss - TwhinModelAndLoss(unpenalised)(batch)[0], penalty, rtol=1e-5)
    loss.backward()
    for table in weights.values():
        assert table.grad[:, -2].abs().max() == 0
    assert any(table.grad[:, -1].abs().max() > 0 for table in weights.values())


def test_entity_bias_needs_room_for_an_operator():
    with pytest.raises(ConfigError, match="entity_bias: true needs embedding_dim >= 4"):
        parse_config(TwhinModelConfig, {**_model_config(dim=2), "entity_bias": True})


def test_a_checkpoint_with_biases_is_not_read_as_one_without():
    with_bias = parse_config(TwhinModelConfig, {**_model_config(), "entity_bias": True})
    without = parse_config(TwhinModelConfig, _model_config())
    assert "entity_bias" not in model_signature(without)   # older checkpoints: no key
    assert signature_difference(model_signature(without), model_signature(without)) is None
    assert signature_difference(model_signature(with_bias), model_signature(without)) == \
        "it was trained with entity_bias true, the config says false"
    assert signature_difference(model_signature(without), model_signature(with_bias)) == \
        "it was trained with entity_bias false, the config says true"


def test_export_and_neighbors_score_with_the_biases(imported, tmp_path):  # noqa: F811
    out, _ = imported
    config = yaml.safe_load((out / "config.yaml").read_text())
    config["model"]["entity_bias"] = True
    path = out / "config_bias.yaml"
    path.write_text(yaml.safe_dump(config))
    _random_checkpoint(config, tmp_path / "save" / "5")
    emb = tmp_path / "emb"
    dispatch(["export", "--config", str(path), "--checkpoint", str(tmp_path / "save"),
              "--out", str(emb)])
    metadata = json.loads((emb / "metadata.json").read_text())
    assert metadata["entity_bias"] is True
    users = pq.read_table(emb / "user.parquet")
    items = pq.read_table(emb / "item.parquet")
    user_vectors = np.array(users.column("vector").to_pylist(), dtype=np.float32)
    item_vectors = torch.tensor(items.column("vector").to_pylist())
    relations = pq.read_table(emb / "relations.parquet").to_pydict()
    position = relations["name"].index("buys")
    r = torch.tensor(relations["vector"][position])
    operator = relations["operator"][position]
    user = users.column("id")[3].as_py()
    rows = dispatch(["neighbors", "--embeddings", str(emb), "--entity", user,
                     "--relation", "buys", "--k", "4"])
    n = len(item_vectors)
    scores = score(torch.from_numpy(user_vectors[3]).expand(n, -1), r.expand(n, -1),
                   item_vectors, torch.full((n,), operator_code(operator)), entity_bias=True)
    best = torch.argsort(scores, descending=True)[:4].tolist()
    item_ids = items.column("id").to_pylist()
    assert [i for i, _ in rows] == [item_ids[b] for b in best]
    np.testing.assert_allclose([s for _, s in rows], scores[best].numpy(), rtol=1e-5)
    # without a relation: likeness of the operators' coordinates only
    rows = dispatch(["neighbors", "--embeddings", str(emb), "--entity", user, "--k", "3"])
    core = user_vectors[:, :-2] @ user_vectors[3, :-2]
    core[3] = -np.inf
    order = np.argsort(-core, kind="stable")[:3]
    assert [i for i, _ in rows] == [users.column("id")[int(o)].as_py() for o in order]
    np.testing.assert_allclose([s for _, s in rows], core[order], rtol=1e-5)
    # an export whose metadata says something else than true or false is refused
    metadata["entity_bias"] = "yes"
    (emb / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(TmlError, match="entity_bias must be true or false, got 'yes'"):
        dispatch(["neighbors", "--embeddings", str(emb), "--entity", user])


def test_forward_with_biases_traces_with_torchrec_fx():
    """Several workers train through TorchRec's pipeline, which fx-traces the model."""
    config = _model(shared=4, loss="softmax")[0]
    biased = parse_config(TwhinModelConfig, {**config.model_dump(mode="json"),
                                             "entity_bias": True})
    wrapped = TwhinModelAndLoss(_biased_model(biased, 0.1, in_batch=2, global_=2))
    batch = _batch(config, shared=4, global_=2)[0]
    assert_traced_matches_eager(wrapped, batch)
