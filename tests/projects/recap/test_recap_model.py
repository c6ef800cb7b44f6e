"""Heavy Ranker model: MaskNet (parallel, serial), MLP backbones, the multi-task types,
towers, featurizations, position debiasing, small and large embeddings (a table started
from a twhin export, frozen), the multi-task loss and the per-tower learning rates."""


import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.nn import functional as F
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from projects.home.recap.config import RecapConfig
from projects.home.recap.data.batch import RecapBatch
from projects.home.recap.model.config import MaskNetConfig, PositionDebiasConfig
from projects.home.recap.model.embeddings import init_tables_from_exports, trainer_tables
from projects.home.recap.model.mask_net import MaskNet
from projects.home.recap.model.position_debias import PositionDebias
from projects.home.recap.model.ranking import RankingModel, RankingModelAndLoss, multi_task_loss
from projects.home.recap.optimizer.optimizer import build_optimizer
from tests.recap_setup import TASKS, config_dict
from tml.core.config import parse_config
from tml.errors import DataError
from tml.trainer.fused_tables import apply_table_optimizers

SHAPES = {"continuous": 20, "binary": 16, "discrete": 8, "user_embedding": 8}
B = 32


def _config(edit=None):
    data = config_dict("/unused/segdense.json", "/unused/*.parquet")
    if edit:
        edit(data)
    return parse_config(RecapConfig, data)


def _batch(n=B, users=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, users, (n,), generator=g)
    return RecapBatch(
        continuous_features=torch.randn(n, 20, generator=g) * 10,
        binary_features=(torch.rand(n, 16, generator=g) < 0.3).float(),
        discrete_features=torch.randint(0, 100, (n, 8), generator=g),
        labels=(torch.rand(n, 3, generator=g) < 0.4).float(),
        weights=torch.ones(n, 3),
        user_embedding=torch.randn(n, 8, generator=g),
        sparse_features=KeyedJaggedTensor.from_lengths_sync(
            keys=["user"], values=ids, lengths=torch.ones(n, dtype=torch.int32)))


def _model(config):
    model = RankingModel(config.model, config.train_data, SHAPES, embedding_device="cpu")
    return apply_table_optimizers(model, trainer_tables(config.model.large_embeddings))


@pytest.mark.parametrize("kind", ["share_all", "share_partial", "share_none", "separate"])
def test_multi_task_types(kind):
    def edit(c):
        c["model"]["multi_task_type"] = kind
        if kind in ("share_none", "separate"):
            del c["model"]["backbone"]
    model = _model(_config(edit))
    out = model(_batch())
    assert out["logits"].shape == (B, 3)
    width = 20 + 16 + 8                                  # features + TwHIN user vector
    first = next(iter(model.towers.values())).layers[0]
    assert first.in_features == {"share_all": 32, "share_partial": 32 + width}.get(kind, width)
    assert (model.backbone is None) == (kind in ("share_none", "separate"))


def test_parallel_and_serial_masknet():
    blocks = [{"aggregation_size": 12, "input_layer_norm": True, "output_size": 10},
              {"reduction_factor": 0.5, "input_layer_norm": False, "output_size": 6}]
    parallel = MaskNet(MaskNetConfig(mask_blocks=blocks, use_parallel=True), 40)
    serial = MaskNet(MaskNetConfig(mask_blocks=blocks, use_parallel=False,
                                   mlp={"layer_sizes": [5]}), 40)
    x = torch.randn(7, 40)
    assert parallel(x).shape == (7, 16) and parallel.out_features == 16
    assert serial(x).shape == (7, 5) and serial.out_features == 5
    # serial: the second block masks the first block's 10 outputs with the 40 features
    assert serial.blocks[1].mask[0].in_features == 40 and serial.blocks[1].hidden.in_features == 10
    assert parallel.blocks[1].mask[0].out_features == 20       # 40 * 0.5
    # the mask is instance-guided: zeroing the mask input changes the output
    block = parallel.blocks[0]
    assert not torch.allclose(block(x, x), block(x, torch.zeros_like(x)))


def test_mlp_backbone_and_towers_with_batch_norm_and_dropout():
    def edit(c):
        c["model"]["backbone"] = {"mlp_config": {"layer_sizes": [24, 12],
                                                 "final_layer_activation": True}}
        c["model"]["tasks"][TASKS[1]]["mlp_config"]["dropout"] = {"rate": 0.5}
    model = _model(_config(edit))
    tower = model.towers[TASKS[1].replace(".", "__")]
    kinds = [type(m).__name__ for m in tower.layers]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear"]
    assert model(_batch())["logits"].shape == (B, 3)
    model.eval()
    batch = _batch()
    assert torch.equal(model(batch)["logits"], model(batch)["logits"])   # no dropout in eval


@pytest.mark.parametrize("featurization", ["double_norm_log_config", "log1p_abs_config",
                                           "clip_log1p_abs_config", None])
def test_featurizations(featurization):
    def edit(c):
        options = {"double_norm_log_config": c["model"]["featurization_config"][
            "double_norm_log_config"], "log1p_abs_config": {},
            "clip_log1p_abs_config": {"clip_magnitude": 3.0}}
        c["model"]["featurization_config"] = None if featurization is None else \
            {featurization: options[featurization]}
    model = _model(_config(edit))
    batch = _batch()
    batch.continuous_features[0, 0] = float("nan")
    x = model.featurizer(batch.continuous_features, batch.binary_features)
    assert x.shape == (B, 36) and torch.isfinite(x).all()
    cont = batch.continuous_features[1:, 1:20]
    if featurization == "double_norm_log_config":
        assert torch.allclose(x.mean(1), torch.zeros(B), atol=1e-4)     # layer-normed
    elif featurization == "log1p_abs_config":
        assert torch.allclose(x[1:, 1:20], torch.sign(cont) * torch.log1p(cont.abs()))
    elif featurization == "clip_log1p_abs_config":
        assert x[:, :20].abs().max() <= np.log1p(3.0) + 1e-6
    else:
        assert torch.allclose(x[1:, 1:20], cont)
    assert torch.equal(x[:, 20:] if featurization != "double_norm_log_config"
                       else batch.binary_features, batch.binary_features)


def test_position_debias_buckets_and_drops_only_in_training():
    debias = PositionDebias(PositionDebiasConfig(max_position=10, num_dims=4,
                                                 drop_probability=0.5, position_feature_index=2))
    discrete = torch.zeros(1000, 4, dtype=torch.long)
    discrete[:, 2] = torch.arange(1000) % 30 - 1           # -1 .. 28
    debias.eval()
    rows = debias.positions(discrete)
    assert rows[0] == 11 and rows[1] == 0 and rows[5] == 4 and rows[20] == 10  # -1, 0, 4, 19
    debias.train()
    dropped = (debias.positions(discrete) == 11).float().mean()
    assert 0.4 < dropped < 0.6
    assert debias(discrete).shape == (1000, 4)

    def edit(c):
        c["model"]["position_debias_config"] = {"max_position": 16, "num_dims": 5,
                                                "position_feature_index": 3}
        c["model"]["small_embeddings"] = {"tables": [{"name": "d0", "num_embeddings": 100,
                                                      "embedding_dim": 3, "index": 0}]}
    model = _model(_config(edit))
    assert model.in_features == 20 + 16 + 8 + 5 + 3
    assert model(_batch())["logits"].shape == (B, 3)


def test_affine_map_calibration_and_loss():
    def edit(c):
        c["model"]["tasks"][TASKS[0]]["affine_map"] = {"scale": 2.0, "bias": -1.0}
        c["model"]["tasks"][TASKS[2]]["pos_weight"] = 3.0
        c["train_data"]["tasks"][TASKS[1]] = {"pos_downsampling_rate": 1.0,
                                              "neg_downsampling_rate": 0.1}
    model = RankingModelAndLoss(_model(_config(edit)))
    batch = _batch()
    batch.weights[:, 1] = torch.where(batch.labels[:, 1] > 0, 1.0, 10.0)
    loss, out = model(batch)
    p = out["probabilities"][:, 1]
    assert torch.allclose(out["calibrated_probabilities"][:, 1], p * 0.1 / (1 - p + 0.1 * p))
    expected = torch.stack([F.binary_cross_entropy_with_logits(
        out["logits"][:, t], batch.labels[:, t], weight=batch.weights[:, t],
        pos_weight=torch.tensor([1.0, 1.0, 3.0][t])) for t in range(3)])
    assert torch.allclose(out["task_losses"], expected) and torch.allclose(loss, expected.mean())
    # the affine map scales the first tower's raw logit
    raw = model.model.towers[TASKS[0].replace(".", "__")]
    model.eval()
    x = model.model.features(batch)
    assert torch.allclose(model.model(batch)["logits"][:, 0],
                          2.0 * raw(model.model.backbone(x))[:, 0] - 1.0, atol=1e-6)
    loss_all, _ = multi_task_loss(torch.zeros(4, 2), torch.ones(4, 2), torch.ones(4, 2),
                                  torch.ones(2))
    assert torch.isclose(loss_all, torch.tensor(np.log(2.0), dtype=torch.float32))


def _export(path, rows, dim, seed=0):
    vectors = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)
    pq.write_table(pa.table({"id": [str(i) for i in range(rows)], "vector": column}), path)
    return vectors


def _with_tables(export, frozen=True):
    def edit(c):
        c["model"]["large_embeddings"] = {
            "tables": [{"name": "user", "num_embeddings": 20, "embedding_dim": 4,
                        "feature": "meta__user_id",
                        "init_from_export": {"path": str(export), "frozen": frozen}},
                       {"name": "author", "num_embeddings": 20, "embedding_dim": 4}],
            "optimizer": {"init_learning_rate": 0.5}}
    return _config(edit)


def test_table_from_twhin_export_stays_frozen(tmp_path):
    vectors = _export(tmp_path / "user.parquet", 20, 4)
    config = _with_tables(tmp_path / "user.parquet")
    model = RankingModelAndLoss(_model(config))
    assert init_tables_from_exports(model, config.model.large_embeddings) == ["user"]
    tables = model.model.large_embeddings.ebc.embedding_bags
    author_before = tables["author"].weight.detach().clone()
    optimizer, scheduler = build_optimizer(model, config.optimizer, config.model)
    for step in range(5):
        batch = _batch(seed=step)
        batch.sparse_features = KeyedJaggedTensor.from_lengths_sync(
            keys=["user", "author"], values=torch.randint(0, 20, (2 * B,)),
            lengths=torch.ones(2 * B, dtype=torch.int32))
        loss, _ = model(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    assert torch.equal(tables["user"].weight.detach(), torch.from_numpy(vectors))
    assert not torch.equal(tables["author"].weight.detach(), author_before)


def test_trainable_export_table_moves_and_bad_exports_are_named(tmp_path):
    vectors = _export(tmp_path / "user.parquet", 20, 4)
    config = _with_tables(tmp_path / "user.parquet", frozen=False)
    model = RankingModelAndLoss(_model(config))
    init_tables_from_exports(model, config.model.large_embeddings)
    optimizer, _ = build_optimizer(model, config.optimizer, config.model)
    batch = _batch()
    batch.sparse_features = KeyedJaggedTensor.from_lengths_sync(
        keys=["user", "author"], values=torch.arange(2 * B) % 20,
        lengths=torch.ones(2 * B, dtype=torch.int32))
    model(batch)[0].backward()
    optimizer.step()
    assert not torch.equal(model.model.large_embeddings.ebc.embedding_bags["user"].weight
                           .detach(), torch.from_numpy(vectors))
    _export(tmp_path / "short.parquet", 19, 4)
    config = _with_tables(tmp_path / "short.parquet")
    with pytest.raises(DataError, match=r"short.parquet: 19 vectors; model.large_embeddings "
                                        r"table 'user' has 20 rows"):
        init_tables_from_exports(_model(config), config.model.large_embeddings)
    _export(tmp_path / "wide.parquet", 20, 5)
    config = _with_tables(tmp_path / "wide.parquet")
    with pytest.raises(DataError, match=r"wide.parquet: vectors are not all of 4 values"):
        init_tables_from_exports(_model(config), config.model.large_embeddings)


def test_each_tower_has_its_learning_rate():
    def edit(c):
        tower = {t: {"constant": 0.001 * (i + 1)} for i, t in enumerate(TASKS)}
        c["optimizer"] = {"adam": {}, "multi_task_learning_rates": {
            "tower_learning_rates": tower,
            "backbone_learning_rate": {"linear_ramp_to_constant": {"learning_rate": 0.01,
                                                                   "num_ramp_steps": 10}}}}
    config = _config(edit)
    model = RankingModelAndLoss(_model(config))
    optimizer, scheduler = build_optimizer(model, config.optimizer, config.model)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == pytest.approx({"backbone": 0.005, TASKS[0]: 0.001, TASKS[1]: 0.002,
                                 TASKS[2]: 0.003})
    towers = {id(p) for p in model.model.towers.parameters()}
    backbone = next(g for g in optimizer.param_groups if g["name"] == "backbone")
    assert not towers & {id(p) for p in backbone["params"]}


def test_task_metrics_auroc_and_rce():
    from projects.home.recap.metrics import rce, task_metrics

    labels = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    logits = torch.tensor([[3.0, 0.0], [-3.0, 1.0], [2.0, 2.0], [-1.0, 3.0]])
    metrics = task_metrics(logits, labels, torch.ones(4, 2), ["a", "b"], [0, 1])
    assert metrics["auc/a"] == 1.0 and np.isnan(metrics["auc/b"]) and metrics["auc"] == 1.0
    # predicting the base rate is RCE 0; a perfect confident model approaches 100
    base = torch.full((4,), float(np.log(0.5 / 0.5)))
    assert abs(rce(base, labels[:, 0], torch.ones(4))) < 1e-6
    assert rce(torch.tensor([20.0, -20.0, 20.0, -20.0]), labels[:, 0], torch.ones(4)) > 99.9
    assert metrics["rce/a"] > 0 > metrics["rce/b"]
