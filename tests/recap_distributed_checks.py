"""Run in 2 gloo workers by tests/projects/recap/test_recap_sharded.py: one training step of the ranker on
sharded tables (row_wise and column_wise) against the same model unsharded in one process."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from projects.home.recap.config import RecapConfig
from projects.home.recap.data.batch import RecapBatch
from projects.home.recap.model.embeddings import (
    init_tables_from_exports,
    local_shards,
    trainer_tables,
)
from projects.home.recap.model.ranking import RankingModel, RankingModelAndLoss
from projects.home.recap.optimizer.optimizer import build_optimizer
from tests.recap_setup import config_dict
from tml.common.device import setup_and_get_device
from tml.common.sharding import shard_model
from tml.core.config import parse_config
from tml.trainer.fused_tables import apply_table_optimizers

SHAPES = {"continuous": 20, "binary": 16, "discrete": 8, "user_embedding": 8}
ROWS = {"user": 20, "author": 12}


def _batch(seed: int, n: int = 16) -> RecapBatch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.randint(0, ROWS[t], (n,), generator=g) for t in ROWS])
    return RecapBatch(
        continuous_features=torch.randn(n, 20, generator=g) * 5,
        binary_features=(torch.rand(n, 16, generator=g) < 0.3).float(),
        discrete_features=torch.zeros(n, 8, dtype=torch.long),
        labels=(torch.rand(n, 3, generator=g) < 0.4).float(), weights=torch.ones(n, 3),
        user_embedding=torch.randn(n, 8, generator=g),
        sparse_features=KeyedJaggedTensor.from_lengths_sync(
            keys=list(ROWS), values=ids, lengths=torch.ones(2 * n, dtype=torch.int32)))


def _config(directory: str) -> RecapConfig:
    data = config_dict("/unused/segdense.json", "/unused/*.parquet")
    tables = []
    for index, (name, sharding) in enumerate([("user", "row_wise"), ("author", "column_wise")]):
        vectors = np.random.default_rng(index).standard_normal((ROWS[name], 8))
        path = os.path.join(directory, f"{name}.parquet")
        pq.write_table(pa.table({"vector": pa.FixedSizeListArray.from_arrays(
            pa.array(vectors.astype(np.float32).reshape(-1)), 8)}), path)
        tables.append({"name": name, "num_embeddings": ROWS[name], "embedding_dim": 8,
                       "sharding_type": sharding,
                       "init_from_export": {"path": path, "frozen": False}})
    data["model"]["large_embeddings"] = {"tables": tables,
                                         "optimizer": {"init_learning_rate": 0.5}}
    data["optimizer"] = {"adam": {"epsilon": 1e-3}, "single_task_learning_rate":
                         {"constant": 0.01}}
    return parse_config(RecapConfig, data)


def _build(config: RecapConfig, device: str) -> RankingModelAndLoss:
    model = RankingModelAndLoss(RankingModel(config.model, config.train_data, SHAPES, device))
    return apply_table_optimizers(model, trainer_tables(config.model.large_embeddings))


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
          batches: list[RecapBatch]) -> list[torch.Tensor]:
    optimizer.zero_grad()
    outputs = [model(batch) for batch in batches]
    loss = sum(loss for loss, _ in outputs) / len(outputs)
    loss.backward()
    optimizer.step()
    return [out["logits"].detach() for _, out in outputs]


def recap_sharded_matches_unsharded() -> dict[str, float]:
    """Max |sharded - unsharded| of the logits, the updated tables and dense weights."""
    setup_and_get_device()
    rank, world = dist.get_rank(), dist.get_world_size()
    with tempfile.TemporaryDirectory() as directory:
        config = _config(directory)
        torch.manual_seed(0)
        sharded = shard_model(_build(config, "meta"), torch.device("cpu"),
                              {"user": "row_wise", "author": "column_wise"},
                              output_dtensor=True)
        init_tables_from_exports(sharded, config.model.large_embeddings)
        reference = _build(config, "cpu")
        init_tables_from_exports(reference, config.model.large_embeddings)
    state = sharded.state_dict()
    dense = {k: v for k, v in reference.state_dict().items() if "embedding_bags" not in k}
    missing = [k for k in dense if k not in state]
    assert not missing, (missing[:3], list(state)[:5])
    reference.load_state_dict({**reference.state_dict(), **{k: state[k] for k in dense}})

    batches = [_batch(seed) for seed in range(world)]
    optimizer, _ = build_optimizer(sharded, config.optimizer, config.model)
    ref_optimizer, _ = build_optimizer(reference, config.optimizer, config.model)
    logits = _step(sharded, optimizer, [batches[rank]])[0]
    ref_logits = _step(reference, ref_optimizer, batches)[rank]

    diffs = {"logits": float((logits - ref_logits).abs().max()), "tables_changed": 0.0}
    sharded_state = sharded.state_dict()
    parameters = {name for name, _ in reference.named_parameters()}
    for name, value in reference.state_dict().items():
        if name not in parameters:
            continue    # batch-norm running statistics: one update per forward pass
        if "embedding_bags" in name:
            for shard, (row, column) in local_shards(sharded_state[name]):
                rows, columns = shard.shape
                expected = value[row:row + rows, column:column + columns]
                diffs[f"table {name} @{row},{column}"] = float((shard - expected).abs().max())
        elif value.is_floating_point():
            diffs[name] = float((sharded_state[name] - value).abs().max())
    user = reference.model.large_embeddings.ebc.embedding_bags["user"].weight.detach()
    with tempfile.TemporaryDirectory() as directory:
        fresh = _config(directory)
        start = _build(fresh, "cpu")
        init_tables_from_exports(start, fresh.model.large_embeddings)
    before = start.model.large_embeddings.ebc.embedding_bags["user"].weight.detach()
    diffs["tables_changed"] = float((user - before).abs().max())
    dist.barrier()
    return diffs
