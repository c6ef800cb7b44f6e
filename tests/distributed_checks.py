"""Functions that run inside real worker processes (2 x gloo) for the distributed tests.

Each check returns plain numbers; the tests (in the launching process) assert on them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn import functional as F

from projects.twhin.data.config import TwhinDataConfig
from projects.twhin.data.edges import EdgeBatch, edges_to_kjt, relation_tables, whole_tables
from projects.twhin.models.config import TwhinModelConfig
from projects.twhin.models.models import (
    OPERATORS,
    TwhinModel,
    TwhinModelAndLoss,
    apply_optimizers,
    operator_code,
)
from projects.twhin.optimizer import build_optimizer
from tml.common.device import setup_and_get_device
from tml.common.sharding import shard_model

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


def _edges(seed: int, config: TwhinModelConfig, global_negatives: int = 0,  # noqa: ANN202
           gathered: bool = False, grouped: bool = False):
    g = torch.Generator().manual_seed(seed)
    rel = torch.randint(0, len(config.relations), (BATCH,), generator=g)
    rt = relation_tables(config.relations, list(TABLES))
    sizes = torch.tensor(list(TABLES.values()))
    lhs = (torch.rand(BATCH, generator=g) * sizes[rt[rel, 0]]).long()
    rhs = (torch.rand(BATCH, generator=g) * sizes[rt[rel, 1]]).long()
    shape = (BATCH, global_negatives)
    neg_lhs = (torch.rand(shape, generator=g) * sizes[rt[rel, 0]].unsqueeze(1)).long()
    neg_rhs = (torch.rand(shape, generator=g) * sizes[rt[rel, 1]].unsqueeze(1)).long()
    if grouped:     # in relation order, as the reader sends batches (the block paths)
        order = torch.argsort(rel, stable=True)
        rel, lhs, rhs, neg_lhs, neg_rhs = (t[order] for t in (rel, lhs, rhs, neg_lhs, neg_rhs))
    if gathered:    # the same negatives, gathered from whole-table lookups (data.edges)
        whole = whole_tables(list(TABLES.values()))
        nodes, slots = edges_to_kjt(lhs, rhs, rel, rt, list(TABLES), shared=whole)
        batch = EdgeBatch(nodes=nodes, slots=slots, labels=torch.ones(BATCH), rels=rel,
                          weights=torch.ones(BATCH), shared=whole,
                          negatives=torch.stack([neg_lhs, neg_rhs]))
        return lhs, rhs, rel, rt, batch, neg_lhs, neg_rhs
    nodes, slots = edges_to_kjt(lhs, rhs, rel, rt, list(TABLES), neg_lhs, neg_rhs)
    batch = EdgeBatch(nodes=nodes, slots=slots,
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


def edge_score(lhs: torch.Tensor, relation: torch.Tensor, rhs: torch.Tensor,
               operator: str) -> torch.Tensor:
    """The score of ONE edge, written from the operator definitions (models/config.py:Operator), not
    from the model's batched `relation_query`: the reference the model is checked against."""
    if operator == "translation":
        return (lhs * (rhs + relation)).sum()
    if operator == "identity":
        return (lhs * rhs).sum()
    if operator == "diagonal":
        return (lhs * relation * rhs).sum()
    assert operator == "complex_diagonal", operator
    half = lhs.shape[-1] // 2

    def complex_(x: torch.Tensor) -> torch.Tensor:
        return torch.complex(x[:half], x[half:])

    return (complex_(lhs) * complex_(relation) * complex_(rhs).conj()).sum().real


def in_batch_samples(rel: torch.Tensor, n: int, seed: int) -> dict[int, tuple[list, list]]:
    """The rows each relation's edges are contrasted with, drawn as documented: with the
    seed set, for each relation present (ascending) a permutation of its rows for the lhs
    side, then one for the rhs side, repeated when it has fewer than n rows."""
    torch.manual_seed(seed)
    samples = {}
    for relation in sorted(set(rel.tolist())):
        rows = [i for i in range(len(rel)) if int(rel[i]) == relation]
        repeats = -(-n // len(rows))
        lhs_perm = torch.randperm(len(rows)).tolist() * repeats
        rhs_perm = torch.randperm(len(rows)).tolist() * repeats
        samples[relation] = ([rows[p] for p in lhs_perm[:n]], [rows[p] for p in rhs_perm[:n]])
    return samples


def _reference(weights, translations, lhs, rhs, rel, rt, seed, neg_lhs=None,  # noqa: ANN001, ANN202
               neg_rhs=None, operators=None):
    """Loss and gradients of one batch with plain torch on full tables, edge by edge.

    Independent of the model's code: each logit is `edge_score` of one (lhs, relation, rhs)
    in a loop over the batch; in-batch negatives pair each edge with the rows
    `in_batch_samples` draws (B x n tail-side logits, then B x n head-side); global
    negatives with its own G sampled ids per side; labels 1 / 0 and the negatives together
    weighted like the B positives.
    """
    names = list(TABLES)
    ops = list(operators) if operators else ["translation"] * len(rt)
    w = {k: v.clone().requires_grad_() for k, v in weights.items()}
    t = translations.clone().requires_grad_()

    def vector(side: int, i: int, row: int) -> torch.Tensor:
        table = names[int(rt[rel[i], side])]
        return w[table][min(int(row), TABLES[table] - 1)]

    lhs_vec = [vector(0, i, lhs[i]) for i in range(BATCH)]
    rhs_vec = [vector(1, i, rhs[i]) for i in range(BATCH)]
    positives = [edge_score(lhs_vec[i], t[rel[i]], rhs_vec[i], ops[rel[i]])
                 for i in range(BATCH)]
    samples = in_batch_samples(rel, NEGATIVES, seed)
    tails = [edge_score(lhs_vec[i], t[rel[i]], rhs_vec[j], ops[rel[i]])
             for i in range(BATCH) for j in samples[int(rel[i])][1]]
    heads = [edge_score(lhs_vec[j], t[rel[i]], rhs_vec[i], ops[rel[i]])
             for i in range(BATCH) for j in samples[int(rel[i])][0]]
    global_tails, global_heads = [], []
    if neg_lhs is not None and neg_lhs.shape[1]:
        global_tails = [edge_score(lhs_vec[i], t[rel[i]], vector(1, i, neg_rhs[i, g]),
                                   ops[rel[i]])
                        for i in range(BATCH) for g in range(neg_rhs.shape[1])]
        global_heads = [edge_score(vector(0, i, neg_lhs[i, g]), t[rel[i]], rhs_vec[i],
                                   ops[rel[i]])
                        for i in range(BATCH) for g in range(neg_lhs.shape[1])]
    negatives = tails + heads + global_tails + global_heads
    logits = torch.stack(positives + negatives)
    labels = torch.tensor([1.0] * BATCH + [0.0] * len(negatives))
    loss_weights = torch.tensor([1.0] * BATCH + [BATCH / len(negatives)] * len(negatives))
    loss = F.binary_cross_entropy_with_logits(logits, labels, loss_weights)
    loss.backward()
    return float(loss.detach()), {k: v.grad for k, v in w.items()}, t.grad


def sharded_matches_unsharded(sharding_types: list[str], global_negatives: int = 0,
                              operators: tuple[str, ...] | None = None,
                              gathered: bool = False,
                              grouped: bool = False) -> dict[str, dict[str, float]]:
    """For each sharding type: |sharded - reference| of loss, updated tables, translations.

    With `global_negatives` and `operators` the batches carry global negative lookups and
    the relations use the given operators; with `gathered` the same negatives are gathered
    from whole-table lookups instead.
    """
    device = setup_and_get_device()
    rank = dist.get_rank()
    config = _model_config(tuple(operators)) if operators else _model_config()
    operator_names = [OPERATORS[operator_code(r.operator)].value for r in config.relations]
    data_config = TwhinDataConfig(data_root="unused", per_replica_batch_size=BATCH,
                                  in_batch_negatives=NEGATIVES,
                                  global_negatives=global_negatives)
    results = {}
    for sharding_type in sharding_types:
        torch.manual_seed(0)
        model = TwhinModelAndLoss(apply_optimizers(TwhinModel(config, data_config), config))
        dmp = shard_model(model, device, dict.fromkeys(TABLES, sharding_type))
        translations = dmp.module.model.all_trans_embs
        with torch.no_grad():
            translations.copy_(torch.randn(translations.shape,
                                           generator=torch.Generator().manual_seed(7)))
        optimizer, _ = build_optimizer(dmp, config)
        before = _full_tables(dmp)
        trans_before = translations.detach().clone()
        edges = [_edges(seed, config, global_negatives, gathered, grouped)
                 for seed in range(dist.get_world_size())]

        optimizer.zero_grad()
        torch.manual_seed(100 + rank)
        loss, _ = dmp(edges[rank][4])
        loss.backward()
        optimizer.step()
        after = _full_tables(dmp)
        trans_after = translations.detach().clone()

        refs = [_reference(before, trans_before, *e[:4], seed=100 + r, neg_lhs=e[5],
                           neg_rhs=e[6], operators=operator_names)
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
    dmp = shard_model(model, device)
    optimizer, _ = build_optimizer(dmp, config)
    before = _full_tables(dmp)["user"]
    loss, _ = dmp(_edges(0, config)[4])
    loss.backward()
    optimizer.step()
    return float((_full_tables(dmp)["user"] - before).abs().max())


PLAIN_TYPES = ["table_wise", "row_wise", "column_wise"]
OPERATOR_TYPES = ["table_wise", "row_wise"]
OPERATOR_SET = ("translation", "diagonal", "complex_diagonal")


def all_sharded_checks() -> dict[str, object]:
    """The sharded-model checks of tests/projects/twhin/test_twhin_sharded.py in one launch (a torch elastic
    start costs more than the checks): every sharding type against the reference, global
    negatives with three operators, and the message Adam on the tables gets on CPU."""
    from tml.errors import ConfigError

    results: dict[str, object] = {
        "plain": sharded_matches_unsharded(PLAIN_TYPES),
        "operators": sharded_matches_unsharded(OPERATOR_TYPES, 2, OPERATOR_SET),
        "gathered": sharded_matches_unsharded(OPERATOR_TYPES, 2, OPERATOR_SET, gathered=True),
    }
    # dim 16 and batches in relation order: the translation scores run in the compiled
    # kernel, on sharded tables.
    global DIM
    previous_dim, DIM = DIM, 16
    try:
        from projects.twhin.models.translation_scores import translation_kernel

        results["kernel_dim"] = sharded_matches_unsharded(PLAIN_TYPES, grouped=True)
        results["kernel_used"] = translation_kernel() is not None
    finally:
        DIM = previous_dim
    try:
        results["adam"] = adam_tables_train()
    except ConfigError as error:   # refused before any collective: the group stays usable
        results["adam"] = f"ConfigError: {error}"
    dist.barrier()
    return results
