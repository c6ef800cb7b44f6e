"""Functions that run inside real worker processes (2 x gloo) for the distributed tests.

Each check returns plain numbers; the tests (in the launching process) assert on them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn import functional as F

from projects.twhin.data.config import TwhinDataConfig
from projects.twhin.data.edges import EdgeBatch, edges_to_kjt, relation_tables
from projects.twhin.models.config import TwhinModelConfig
from projects.twhin.models.models import (
    TwhinModel,
    TwhinModelAndLoss,
    apply_optimizers,
    global_negative_logits,
    in_batch_negative_logits,
    labels_and_weights,
    operator_code,
    score,
)
from projects.twhin.optimizer import build_optimizer
from tml.common.device import setup_and_get_device
from tml.common.sharding import maybe_shard_model

TABLES = {"user": 60, "tweet": 40}
LR = {"user": 5.0, "tweet": 3.0}
TRANSLATION_LR = 2.0
DIM = 8
NEGATIVES = 3
BATCH = 24


def _model_config(operators: tuple[str, ...] = ("translation",) * 3) -> TwhinModelConfig:
    return TwhinModelConfig.model_validate({
        "embeddings": {"tables": [
            {"name": name, "num_embeddings": rows, "embedding_dim": DIM,
             "optimizer": {"sgd": {"lr": LR[name]}}} for name, rows in TABLES.items()]},
        "relations": [{"name": name, "lhs": lhs, "rhs": rhs, "operator": op}
                      for (name, lhs, rhs), op in zip(
                          [("fav", "user", "tweet"), ("follows", "user", "user"),
                           ("authored_by", "tweet", "user")], operators)],
        "translation_optimizer": {"sgd": {"lr": TRANSLATION_LR}},
    })


def _edges(seed: int, config: TwhinModelConfig, global_negatives: int = 0):  # noqa: ANN202
    g = torch.Generator().manual_seed(seed)
    rel = torch.randint(0, len(config.relations), (BATCH,), generator=g)
    rt = relation_tables(config.relations, list(TABLES))
    sizes = torch.tensor(list(TABLES.values()))
    lhs = (torch.rand(BATCH, generator=g) * sizes[rt[rel, 0]]).long()
    rhs = (torch.rand(BATCH, generator=g) * sizes[rt[rel, 1]]).long()
    shape = (BATCH, global_negatives)
    neg_lhs = (torch.rand(shape, generator=g) * sizes[rt[rel, 0]].unsqueeze(1)).long()
    neg_rhs = (torch.rand(shape, generator=g) * sizes[rt[rel, 1]].unsqueeze(1)).long()
    batch = EdgeBatch(nodes=edges_to_kjt(lhs, rhs, rel, rt, list(TABLES), neg_lhs, neg_rhs),
                      labels=torch.ones(BATCH), rels=rel, weights=torch.ones(BATCH))
    return lhs, rhs, rel, rt, batch, neg_lhs, neg_rhs


def _full_tables(dmp: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every table assembled from its shards, on every rank."""
    full = {}
    state = dmp.state_dict()
    for name, rows in TABLES.items():
        sharded = state[f"model.large_embeddings.ebc.embedding_bags.{name}.weight"]
        local = [(list(s.metadata.shard_offsets), s.tensor.detach().clone())
                 for s in sharded.local_shards()]
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        table = torch.full((rows, DIM), float("nan"))
        for shards in gathered:
            for (r0, c0), tensor in shards:
                table[r0:r0 + tensor.shape[0], c0:c0 + tensor.shape[1]] = tensor
        full[name] = table
    return full


def _reference(weights, translations, lhs, rhs, rel, rt, seed, neg_lhs=None,  # noqa: ANN001, ANN202
               neg_rhs=None, codes=None):
    """Loss and gradients of one batch computed with plain torch on full tables."""
    names = list(TABLES)
    w = {k: v.clone().requires_grad_() for k, v in weights.items()}
    t = translations.clone().requires_grad_()
    lhs_vec = torch.zeros(BATCH, DIM)
    rhs_vec = torch.zeros(BATCH, DIM)
    for index, name in enumerate(names):
        lhs_vec = torch.where((rt[rel, 0] == index)[:, None], w[name][lhs.clamp(max=TABLES[name] - 1)], lhs_vec)
        rhs_vec = torch.where((rt[rel, 1] == index)[:, None], w[name][rhs.clamp(max=TABLES[name] - 1)], rhs_vec)
    torch.manual_seed(seed)
    if codes is None:
        positives = (lhs_vec * (rhs_vec + t[rel])).sum(-1)
        negatives = in_batch_negative_logits(lhs_vec, rhs_vec, rel, t, NEGATIVES)
        logits = torch.cat([positives, negatives])
    else:
        # Operators and global negatives: plain per-lookup indexing of the full tables.
        def rows(side, ids):  # noqa: ANN001, ANN202
            out = torch.zeros(*ids.shape, DIM)
            for index, name in enumerate(names):
                mask = (rt[rel, side] == index).view(-1, *[1] * (ids.dim() - 1))
                out = torch.where(mask.unsqueeze(-1), w[name][ids.clamp(max=TABLES[name] - 1)],
                                  out)
            return out

        positives = score(lhs_vec, t[rel], rhs_vec, codes[rel])
        negatives = in_batch_negative_logits(lhs_vec, rhs_vec, rel, t, NEGATIVES, codes)
        global_logits = global_negative_logits(lhs_vec, rhs_vec, rows(0, neg_lhs),
                                               rows(1, neg_rhs), t[rel], codes[rel])
        logits = torch.cat([positives, negatives, global_logits])
    labels, loss_weights = labels_and_weights(logits, torch.ones(BATCH), torch.ones(BATCH))
    loss = F.binary_cross_entropy_with_logits(logits, labels, loss_weights)
    loss.backward()
    return float(loss.detach()), {k: v.grad for k, v in w.items()}, t.grad


def sharded_matches_unsharded(sharding_types: list[str], global_negatives: int = 0,
                              operators: tuple[str, ...] | None = None
                              ) -> dict[str, dict[str, float]]:
    """For each sharding type: |sharded - reference| of loss, updated tables, translations.

    With `global_negatives` and `operators` the batches carry global negative lookups and
    the relations use the given operators.
    """
    device = setup_and_get_device()
    rank = dist.get_rank()
    config = _model_config(tuple(operators)) if operators else _model_config()
    codes = None
    if operators or global_negatives:
        codes = torch.tensor([operator_code(r.operator) for r in config.relations])
    data_config = TwhinDataConfig(data_root="unused", per_replica_batch_size=BATCH,
                                  in_batch_negatives=NEGATIVES,
                                  global_negatives=global_negatives)
    results = {}
    for sharding_type in sharding_types:
        torch.manual_seed(0)
        model = TwhinModelAndLoss(apply_optimizers(TwhinModel(config, data_config), config))
        dmp = maybe_shard_model(model, device, dict.fromkeys(TABLES, sharding_type))
        translations = dmp.module.model.all_trans_embs
        with torch.no_grad():
            translations.copy_(torch.randn(translations.shape,
                                           generator=torch.Generator().manual_seed(7)))
        optimizer, _ = build_optimizer(dmp, config)
        before = _full_tables(dmp)
        trans_before = translations.detach().clone()
        edges = [_edges(seed, config, global_negatives)
                 for seed in range(dist.get_world_size())]

        optimizer.zero_grad()
        torch.manual_seed(100 + rank)
        loss, _ = dmp(edges[rank][4])
        loss.backward()
        optimizer.step()
        after = _full_tables(dmp)
        trans_after = translations.detach().clone()

        refs = [_reference(before, trans_before, *e[:4], seed=100 + r, neg_lhs=e[5],
                           neg_rhs=e[6], codes=codes)
                for r, e in enumerate(edges)]
        world = len(refs)
        diffs = {"loss": abs(float(loss) - refs[rank][0]), "changed": 0.0}
        for name in TABLES:
            grad = sum(ref[1][name] for ref in refs) / world
            expected = before[name] - LR[name] * grad
            diffs[f"table_{name}"] = float((after[name] - expected).abs().max())
            diffs["changed"] = max(diffs["changed"],
                                   float((after[name] - before[name]).abs().max()))
        trans_grad = sum(ref[2] for ref in refs) / world
        diffs["translations"] = float(
            (trans_after - (trans_before - TRANSLATION_LR * trans_grad)).abs().max())
        results[sharding_type] = diffs
        dist.barrier()
    return results


def adam_tables_train() -> float:
    """One sharded step with Adam on the tables: how far the user table moved (CUDA only;
    on CPU sharding refuses it with a ConfigError naming the table)."""
    device = setup_and_get_device()
    config = _model_config()
    for table in config.embeddings.tables:
        table.optimizer = type(table.optimizer).model_validate({"adam": {"lr": 0.1}})
    data_config = TwhinDataConfig(data_root="unused", per_replica_batch_size=BATCH,
                                  in_batch_negatives=NEGATIVES)
    model = TwhinModelAndLoss(apply_optimizers(TwhinModel(config, data_config), config))
    dmp = maybe_shard_model(model, device)
    optimizer, _ = build_optimizer(dmp, config)
    before = _full_tables(dmp)["user"]
    loss, _ = dmp(_edges(0, config)[4])
    loss.backward()
    optimizer.step()
    return float((_full_tables(dmp)["user"] - before).abs().max())
