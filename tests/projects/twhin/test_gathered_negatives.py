"""Global negatives gathered from whole-table lookups (`data.edges.gathers_global_negatives`).

Small tables (Nations, UMLS, Kinships) look each table up once per batch instead of 2BG
negative rows; the model keeps each query's drawn columns of a whole-table product. The
checks: the reader draws the same negatives either way, the model gives the same logits,
softmax offsets, loss and gradients (tables of different sizes, several operators, an
entity bias and reciprocal relations), it traces, and fused Adagrad tables trained a few
steps end where the per-edge lookups take them. The 2-worker sharded step against the
edge-by-edge reference is in test_twhin_sharded.py.
"""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from projects.twhin.data.config import TwhinDataConfig
from projects.twhin.data.dataset import EdgesDataset
from projects.twhin.data.edges import gathers_global_negatives, whole_tables
from projects.twhin.models.config import TwhinModelConfig
from projects.twhin.models.models import TwhinModel, TwhinModelAndLoss
from tests.fx_checks import assert_traced_matches_eager
from tests.launch_checks import launch_checks
from tests.twhin_setup import REPO
from tml.common.modules.embedding.embedding import LargeEmbeddings
from tml.core.config.config_load import parse_config
from tml.errors import ConfigError

TABLES = {"user": 11, "item": 7}
PAIRS = [("user", "item"), ("user", "user"), ("item", "user")]
BATCH, NEGATIVES, DIM = 16, 5, 8


def _model_config(operators=("complex_diagonal", "translation", "diagonal"), loss="bce",
                  entity_bias=False, reciprocal=False, optimizer=None):
    return parse_config(TwhinModelConfig, {
        "embeddings": {"tables": [
            {"name": n, "num_embeddings": rows, "embedding_dim": DIM,
             "optimizer": optimizer or {"sgd": {"lr": 0.1}}} for n, rows in TABLES.items()]},
        "relations": [{"name": f"r{i}", "lhs": a, "rhs": b, "operator": op}
                      for i, ((a, b), op) in enumerate(zip(PAIRS, operators))],
        "translation_optimizer": {"sgd": {"lr": 0.1}},
        "loss": loss, "entity_bias": entity_bias, "reciprocal": reciprocal})


def _write_edges(path, num_edges=64, seed=0):
    rng = np.random.default_rng(seed)
    rel = rng.integers(0, len(PAIRS), num_edges)
    sizes = {name: rows for name, rows in TABLES.items()}
    lhs = np.array([rng.integers(0, sizes[PAIRS[r][0]]) for r in rel])
    rhs = np.array([rng.integers(0, sizes[PAIRS[r][1]]) for r in rel])
    pq.write_table(pa.table({"lhs": lhs, "rel": rel, "rhs": rhs}), os.path.join(path, "e.parquet"))


def _dataset(path, config, gather, batch=BATCH, negatives=NEGATIVES, shared=0):
    return EdgesDataset(str(path), TABLES, config.relations, batch_size=batch,
                        global_negatives=negatives, shared_negatives=shared, seed=5,
                        gather_negatives=gather)


def test_the_rule_gathers_only_small_tables_and_only_global_negatives():
    # UMLS as imported: one table of 135 rows, batches of 260 with 32 negatives a side.
    assert gathers_global_negatives([135], 260, 32)
    assert gathers_global_negatives([135], 40, 32)            # its validation batches
    assert not gathers_global_negatives([135], 260, 0)        # no global negatives
    assert not gathers_global_negatives([135], 260, 32, shared_negatives=8)
    assert not gathers_global_negatives([40000, 30000], 1000, 32)
    assert not gathers_global_negatives([1500, 600], 260, 32)  # over 1/16 of the lookups


def test_whole_tables_pad_the_smaller_table_with_its_own_rows():
    assert whole_tables([3, 5]).tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]


def test_the_reader_draws_the_same_negatives_and_looks_up_each_table_once(tmp_path):
    config = _model_config()
    _write_edges(tmp_path)
    gathered = list(_dataset(tmp_path, config, True))
    looked_up = list(_dataset(tmp_path, config, False))
    assert len(gathered) == len(looked_up) == 4
    for a, b in zip(gathered, looked_up):
        assert a.negatives.shape == (2, BATCH, NEGATIVES)
        assert b.negatives.numel() == 0 and b.shared.numel() == 0
        assert torch.equal(a.shared, whole_tables(list(TABLES.values())))
        assert a.nodes.values().numel() == 2 * BATCH + 2 * max(TABLES.values())
        assert b.nodes.values().numel() == 2 * BATCH * (1 + NEGATIVES)
        # b's negative lookups, edge by edge: G lhs rows then G rhs rows (data.edges).
        per_table = b.nodes.to_dict()
        rows = torch.cat([per_table[name].values() for name in TABLES])
        slots = b.slots[2 * BATCH:]
        order = torch.cat([torch.arange(per_table[name].values().numel()) * len(TABLES) + t
                           for t, name in enumerate(TABLES)])
        ids = rows[torch.argsort(order)][torch.searchsorted(order.sort().values, slots)]
        assert torch.equal(ids.view(BATCH, 2, NEGATIVES).transpose(0, 1), a.negatives)
        for name in ("rels", "labels", "weights"):
            assert torch.equal(getattr(a, name), getattr(b, name))
    # Not told, the rule decides: 18 rows x 16 = 288 against 2 x 16 x G negative lookups.
    assert not next(iter(_dataset(tmp_path, config, None))).negatives.numel()   # G = 5
    assert next(iter(_dataset(tmp_path, config, None, negatives=9))).negatives.numel()


def test_gathering_needs_global_negatives_and_no_shared_ones(tmp_path):
    config = _model_config()
    _write_edges(tmp_path)
    with pytest.raises(ConfigError, match="gathered global negatives need"):
        _dataset(tmp_path, config, True, negatives=0)
    with pytest.raises(ConfigError, match="gathered global negatives need"):
        _dataset(tmp_path, config, True, shared=3)


def _eager_model(config):
    data = TwhinDataConfig(data_root="x", per_replica_batch_size=BATCH, in_batch_negatives=0,
                           global_negatives=NEGATIVES)
    torch.manual_seed(0)
    model = TwhinModel(config, data)
    model.large_embeddings = LargeEmbeddings(config.embeddings, device="cpu")
    with torch.no_grad():
        model.all_trans_embs.normal_()
        for table in model.large_embeddings.ebc.embedding_bags.values():
            table.weight.normal_()
    return TwhinModelAndLoss(model)


@pytest.mark.parametrize("loss,entity_bias,reciprocal", [
    ("bce", False, False), ("softmax", False, False), ("softmax", True, True),
    ("bce", True, False)])
def test_the_model_scores_and_learns_the_same_from_either_layout(tmp_path, loss, entity_bias,
                                                                  reciprocal):
    config = _model_config(loss=loss, entity_bias=entity_bias, reciprocal=reciprocal)
    _write_edges(tmp_path)
    model = _eager_model(config)
    params = [model.model.all_trans_embs,
              *(t.weight for t in model.model.large_embeddings.ebc.embedding_bags.values())]
    batches = [next(iter(_dataset(tmp_path, config, gather))) for gather in (True, False)]
    results = []
    for batch in batches:
        loss_value, out = model(batch)
        results.append((loss_value.detach(), out, torch.autograd.grad(loss_value, params)))
    (loss_a, out_a, grads_a), (loss_b, out_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, atol=1e-5)
    for key in ("logits", "tail_negatives", "head_negatives"):
        assert out_a[key].shape == out_b[key].shape, key
        assert torch.allclose(out_a[key], out_b[key], atol=1e-5), key
    if loss == "softmax":
        assert torch.equal(out_a["negative_offsets"], out_b["negative_offsets"])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads_a, grads_b))
    assert float(grads_a[1].abs().sum()) > 0
    # The same outputs traced with TorchRec's fx (several workers train through it).
    model.eval()
    assert torch.allclose(assert_traced_matches_eager(model, batches[0])["logits"],
                          out_a["logits"].detach(), atol=1e-5)


def test_lookup_all_gives_the_negatives_vectors_in_either_layout(tmp_path):
    config = _model_config()
    _write_edges(tmp_path)
    model = _eager_model(config).model
    a, b = (model.lookup_all(next(iter(_dataset(tmp_path, config, gather))))
            for gather in (True, False))
    assert a[2].shape == b[2].shape == (BATCH, NEGATIVES, DIM)
    assert all(torch.allclose(x, y) for x, y in zip(a[:4], b[:4]))
    assert a[4].shape[1] == 0


def fused_adagrad_checks(path: str) -> dict:
    """In a worker: 6 steps with fused Adagrad tables, from each layout; the tables after."""
    from projects.twhin.models.models import apply_optimizers
    from projects.twhin.optimizer import build_optimizer
    from tml.common.device import setup_and_get_device
    from tml.common.sharding import shard_model

    device = setup_and_get_device()
    config = _model_config(loss="softmax", entity_bias=True,
                           optimizer={"adagrad": {"lr": 0.5}})
    data = TwhinDataConfig(data_root="x", per_replica_batch_size=BATCH, in_batch_negatives=0,
                           global_negatives=NEGATIVES)
    out = {}
    for gather in (True, False):
        torch.manual_seed(0)
        dmp = shard_model(TwhinModelAndLoss(apply_optimizers(TwhinModel(config, data), config)),
                          device)
        optimizer, _ = build_optimizer(dmp, config)
        losses = []
        for _ in range(3):   # epochs
            for batch in _dataset(path, config, gather):
                optimizer.zero_grad()
                loss, _ = dmp(batch)
                loss.backward()
                optimizer.step()
                losses.append(float(loss))
        state = dmp.state_dict()
        tables = {}
        for name in TABLES:
            weight = state[f"model.large_embeddings.ebc.embedding_bags.{name}.weight"]
            shards = weight.local_shards() if hasattr(weight, "local_shards") else None
            tables[name] = (shards[0].tensor if shards else weight).detach().clone()
        out[gather] = {"tables": tables, "losses": losses}
    return out


@pytest.mark.slow
def test_fused_adagrad_tables_train_the_same_from_either_layout(tmp_path, monkeypatch):
    """fbgemm's fused Adagrad sums a row's gradients over the batch before its update, so
    one whole-table lookup per row updates as the per-edge lookups (with repeats) do."""
    monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    _write_edges(tmp_path)
    result = launch_checks(fused_adagrad_checks, 1, str(tmp_path))[0]
    gathered, looked_up = result[True], result[False]
    assert len(gathered["losses"]) == 12
    assert np.allclose(gathered["losses"], looked_up["losses"], atol=1e-4)
    assert gathered["losses"][-1] < gathered["losses"][0]
    for name in TABLES:
        assert torch.allclose(gathered["tables"][name], looked_up["tables"][name], atol=1e-4)
