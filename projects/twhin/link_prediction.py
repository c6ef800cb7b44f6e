"""`twhin evaluate`: filtered rank-based link prediction of a checkpoint.

For every evaluated edge (h, r, t) the true tail is ranked against every entity of r's rhs
table and the true head against every entity of r's lhs table, after removing from the
candidates the other known true edges (all of train, validation and test: the "filtered"
setting). Ties count at the mean: rank = 1 + #greater + #equal / 2 among the remaining
candidates. Reported: MRR, Hits@1/3/10 and mean rank, per side (head, tail) and both, per
relation and overall, plus the AUC of the true edges against in-batch negatives (scored by
the model's own `in_batch_negative_logits`).

How it scales: candidates are scored with the model's `relation_query` as one matrix
product per (query chunk x candidate chunk), so memory is bounded by `query_chunk *
candidate_chunk` scores whatever the table size. The true entity's score is taken from the
same matrix product as the candidates' (a first pass over the chunks), so rounding cannot
make it beat or lose to itself. With several workers, each loads the checkpoint's tables
whole (DCP reassembles any sharding: a checkpoint from N workers loads anywhere), takes a
contiguous share of the evaluated edges, and the metric sums are all-reduced; the filter
index (all known edges) is on every worker, so its memory is 24 bytes per known edge.

Edges whose head, tail or relation never occur in the training split are skipped and
counted (their vectors are untrained), or rejected with `strict`.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pyarrow.parquet as pq
import torch

from projects.twhin.config import TwhinConfig
from projects.twhin.data.config import TwhinDataConfig
from projects.twhin.data.dataset import _resolve
from projects.twhin.models.config import Relation
from projects.twhin.models.models import (
    in_batch_negative_logits,
    operator_code,
    relation_query,
    score,
)
from tml.errors import DataError

logger = logging.getLogger(__name__)

COLUMNS = ("count", "reciprocal_rank", "rank", "hits_at_1", "hits_at_3", "hits_at_10")
SIDES = ("head", "tail")
AUC_NEGATIVES = 10
Edges = tuple[np.ndarray, np.ndarray, np.ndarray]   # lhs, rel, rhs (int64)


def read_edges(data_root: str) -> Edges:
    """All (lhs, rel, rhs) of the parquet files that `data_root` names."""
    fs, paths = _resolve(data_root)
    parts = []
    for path in paths:
        with fs.open(path, "rb") as handle:
            table = pq.read_table(handle, columns=["lhs", "rel", "rhs"])
        parts.append([table.column(c).to_numpy().astype(np.int64) for c in ("lhs", "rel",
                                                                             "rhs")])
    return tuple(np.concatenate(column) for column in zip(*parts))  # type: ignore[return-value]


class KnownEdges:
    """Every known true edge, indexed to answer "which tails of (h, r)?" and "heads of (r, t)?"."""

    def __init__(self, edges: Edges, num_rows: int) -> None:
        lhs, rel, rhs = edges
        self._stride = np.int64(num_rows + 1)
        self._index = {}
        for side, anchor, other in (("tail", lhs, rhs), ("head", rhs, lhs)):
            keys = rel * self._stride + anchor
            order = np.argsort(keys, kind="stable")
            self._index[side] = (keys[order], other[order])

    def lookup(self, side: str, relation: int, anchors: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
        """(query position, entity) pairs: the known `side` entities of each anchor."""
        keys, values = self._index[side]
        wanted = relation * self._stride + anchors
        start = np.searchsorted(keys, wanted, side="left")
        end = np.searchsorted(keys, wanted, side="right")
        counts = end - start
        positions = np.repeat(np.arange(len(anchors)), counts)
        offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        return positions, values[np.repeat(start, counts) + offsets]


@torch.no_grad()
def filtered_ranks(anchor_vectors: torch.Tensor, relation_vector: torch.Tensor, code: int,
                   side: str, candidates: torch.Tensor, truths: np.ndarray,
                   filter_positions: np.ndarray, filter_entities: np.ndarray,
                   candidate_chunk: int = 8192) -> np.ndarray:
    """Realistic filtered ranks of `truths` among `candidates` for one chunk of queries.

    anchor_vectors: (Q, D) the known side of each query; side "tail" ranks rhs candidates
    for lhs anchors, "head" lhs candidates for rhs anchors. (filter_positions,
    filter_entities): candidates to remove per query (the true entity is always removed and
    compared against separately).
    """
    q_count = anchor_vectors.shape[0]
    rv = relation_vector.expand(q_count, -1)
    q, b = relation_query(anchor_vectors, rv, torch.full((q_count,), code), side)
    truths_t = torch.from_numpy(truths)
    rows = torch.arange(q_count)
    true_score = torch.full((q_count,), float("nan"))
    num = candidates.shape[0]
    for start in range(0, num, candidate_chunk):
        end = min(num, start + candidate_chunk)
        inside = (truths_t >= start) & (truths_t < end)
        if inside.any():
            s = q @ candidates[start:end].T + b.unsqueeze(1)
            true_score[inside] = s[rows[inside], truths_t[inside] - start]
    positions = torch.from_numpy(np.concatenate([filter_positions, np.arange(q_count)]))
    entities = torch.from_numpy(np.concatenate([filter_entities, truths]))
    greater = torch.zeros(q_count, dtype=torch.float64)
    equal = torch.zeros(q_count, dtype=torch.float64)
    for start in range(0, num, candidate_chunk):
        end = min(num, start + candidate_chunk)
        s = q @ candidates[start:end].T + b.unsqueeze(1)
        sel = (entities >= start) & (entities < end)
        s[positions[sel], entities[sel] - start] = float("-inf")
        greater += (s > true_score.unsqueeze(1)).sum(1)
        equal += (s == true_score.unsqueeze(1)).sum(1)
    return (1.0 + greater + equal / 2.0).numpy()


def _add(sums: np.ndarray, ranks: np.ndarray) -> None:
    sums += [len(ranks), (1.0 / ranks).sum(), ranks.sum(), (ranks <= 1).sum(),
             (ranks <= 3).sum(), (ranks <= 10).sum()]


def rank_sums(tables: dict[str, torch.Tensor], relation_vectors: torch.Tensor,
              relations: list[Relation], edges: Edges, known: KnownEdges,
              query_chunk: int = 1024, candidate_chunk: int = 8192) -> np.ndarray:
    """(R, 2, len(COLUMNS)) metric sums of `edges`, per relation and side (head, tail)."""
    lhs, rel, rhs = edges
    sums = np.zeros((len(relations), 2, len(COLUMNS)))
    for r, relation in enumerate(relations):
        chosen = np.nonzero(rel == r)[0]
        code = operator_code(relation.operator)
        for side_index, side in enumerate(SIDES):
            if side == "tail":
                anchors, truths = lhs[chosen], rhs[chosen]
                anchor_table, candidates = tables[relation.lhs], tables[relation.rhs]
            else:
                anchors, truths = rhs[chosen], lhs[chosen]
                anchor_table, candidates = tables[relation.rhs], tables[relation.lhs]
            for start in range(0, len(chosen), query_chunk):
                a = anchors[start:start + query_chunk]
                t = truths[start:start + query_chunk]
                positions, entities = known.lookup(side, r, a)
                ranks = filtered_ranks(anchor_table[torch.from_numpy(a)], relation_vectors[r],
                                       code, side, candidates, t, positions, entities,
                                       candidate_chunk)
                _add(sums[r, side_index], ranks)
    return sums


@torch.no_grad()
def auc_scores(tables: dict[str, torch.Tensor], relation_vectors: torch.Tensor,
               relations: list[Relation], edges: Edges, chunk: int = 1000,
               seed: int = 1234) -> tuple[np.ndarray, np.ndarray]:
    """Scores of the true edges and of their in-batch negatives (as in training)."""
    lhs, rel, rhs = edges
    codes = torch.tensor([operator_code(r.operator) for r in relations])
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    positives, negatives = [], []
    try:
        for r, relation in enumerate(relations):
            chosen = np.nonzero(rel == r)[0]
            for start in range(0, len(chosen), chunk):
                idx = chosen[start:start + chunk]
                lv = tables[relation.lhs][torch.from_numpy(lhs[idx])]
                rv = tables[relation.rhs][torch.from_numpy(rhs[idx])]
                rels = torch.from_numpy(rel[idx])
                positives.append(score(lv, relation_vectors[rels], rv, codes[rels]).numpy())
                if len(idx) > 1:
                    negatives.append(in_batch_negative_logits(
                        lv, rv, rels, relation_vectors, AUC_NEGATIVES, codes).numpy())
    finally:
        torch.random.set_rng_state(generator_state)
    empty = np.empty(0, np.float32)
    return (np.concatenate(positives) if positives else empty,
            np.concatenate(negatives) if negatives else empty)


def auc(positives: np.ndarray, negatives: np.ndarray) -> float | None:
    """Area under the ROC curve (ties count half), by the rank-sum formula."""
    if not len(positives) or not len(negatives):
        return None
    values = np.concatenate([positives, negatives])
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    average_rank = (ends - (counts - 1) / 2.0)[inverse]   # 1-based, ties averaged
    n_pos, n_neg = len(positives), len(negatives)
    return float((average_rank[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _metrics(sums: np.ndarray) -> dict[str, float]:
    count = sums[..., 0].sum()
    if not count:
        return {"count": 0}
    total = sums.reshape(-1, len(COLUMNS)).sum(0)
    return {"mrr": total[1] / count, "hits_at_1": total[3] / count,
            "hits_at_3": total[4] / count, "hits_at_10": total[5] / count,
            "mean_rank": total[2] / count, "count": int(count)}


def summarize(sums: np.ndarray, relations: list[Relation]) -> dict:
    """Overall, per side and per relation metrics from `rank_sums`."""
    result: dict = dict(_metrics(sums))
    for side_index, side in enumerate(SIDES):
        result[side] = _metrics(sums[:, side_index])
    result["per_relation"] = {
        relation.name: {**_metrics(sums[r]), **{side: _metrics(sums[r, i])
                                                for i, side in enumerate(SIDES)}}
        for r, relation in enumerate(relations)}
    return result


def _data_config(config: TwhinConfig, split: str) -> TwhinDataConfig:
    data = {"train": config.train_data, "validation": config.validation_data,
            "test": config.test_data}
    if split not in data:
        raise DataError(f"--split {split!r}: expected one of train, validation, test")
    if data[split] is None:
        raise DataError(f"--split {split}: the config has no {split}_data section")
    return data[split]  # type: ignore[return-value]


def prepare(config: TwhinConfig, split: str, strict: bool = False
            ) -> tuple[Edges, KnownEdges, dict[str, int]]:
    """The edges to evaluate (unseen ones removed), the filter index, and counts."""
    sizes = {t.name: t.num_embeddings for t in config.model.embeddings.tables}
    relations = config.model.relations
    evaluated_root = _data_config(config, split).data_root
    evaluated = read_edges(evaluated_root)
    if not len(evaluated[0]):
        raise DataError(f"{evaluated_root}: holds no edges to evaluate")
    known_parts = []
    train = None
    for name in ("train", "validation", "test"):
        data = getattr(config, f"{name}_data")
        if data is None:
            continue
        edges = evaluated if data.data_root == evaluated_root else read_edges(data.data_root)
        _check_range(edges, sizes, relations, data.data_root)
        known_parts.append(edges)
        if name == "train":
            train = edges
    known = KnownEdges(tuple(np.concatenate(c) for c in zip(*known_parts)),  # type: ignore[arg-type]
                       max(sizes.values()))
    assert train is not None
    seen = {name: np.zeros(size, bool) for name, size in sizes.items()}
    seen_relations = np.zeros(len(relations), bool)
    seen_relations[np.unique(train[1])] = True
    for r, relation in enumerate(relations):
        chosen = train[1] == r
        seen[relation.lhs][train[0][chosen]] = True
        seen[relation.rhs][train[2][chosen]] = True
    lhs, rel, rhs = evaluated
    ok = seen_relations[rel].copy()
    for r, relation in enumerate(relations):
        chosen = rel == r
        ok[chosen] &= seen[relation.lhs][lhs[chosen]] & seen[relation.rhs][rhs[chosen]]
    skipped = int((~ok).sum())
    if skipped and strict:
        first = int(np.nonzero(~ok)[0][0])
        raise DataError(f"{evaluated_root}: {skipped} edge(s) name an entity or relation that "
                        f"never occurs in training (first: row {first}, lhs={lhs[first]}, "
                        f"rel={rel[first]}, rhs={rhs[first]}); drop --strict to skip them")
    if skipped:
        logger.warning("%s: skipping %d of %d edges whose entity or relation never occurs in "
                       "training", evaluated_root, skipped, len(lhs))
    counts = {"num_edges": len(lhs), "num_skipped_unseen": skipped}
    return (lhs[ok], rel[ok], rhs[ok]), known, counts


def _check_range(edges: Edges, sizes: dict[str, int], relations: list[Relation],
                 where: str) -> None:
    lhs, rel, rhs = edges
    bad = (rel < 0) | (rel >= len(relations))
    if bad.any():
        row = int(np.nonzero(bad)[0][0])
        raise DataError(f"{where}: row {row}: rel={rel[row]} is outside the "
                        f"{len(relations)} configured relations")
    lhs_sizes = np.array([sizes[r.lhs] for r in relations])[rel]
    rhs_sizes = np.array([sizes[r.rhs] for r in relations])[rel]
    bad = (lhs < 0) | (lhs >= lhs_sizes) | (rhs < 0) | (rhs >= rhs_sizes)
    if bad.any():
        row = int(np.nonzero(bad)[0][0])
        raise DataError(f"{where}: row {row}: lhs={lhs[row]}, rhs={rhs[row]} is outside the "
                        f"tables of relation '{relations[rel[row]].name}'")


def evaluate_checkpoint(config_path: str, checkpoint: str, split: str = "test",
                        strict: bool = False, query_chunk: int = 1024,
                        candidate_chunk: int = 8192) -> dict:
    """Evaluate in this process; one of WORLD_SIZE workers when started by torch elastic."""
    import torch.distributed as dist

    from projects.twhin.export import load_embeddings, resolve_checkpoint
    from tml.core.config import load_config_from_yaml

    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    config = load_config_from_yaml(TwhinConfig, config_path)
    path = resolve_checkpoint(checkpoint)
    tables, relation_vectors = load_embeddings(config, path)
    edges, known, counts = prepare(config, split, strict)
    share = len(edges[0]) // world
    start = rank * share
    end = len(edges[0]) if rank == world - 1 else start + share
    mine = tuple(column[start:end] for column in edges)
    relations = config.model.relations
    sums = rank_sums(tables, relation_vectors, relations, mine, known, query_chunk,
                     candidate_chunk)
    positives, negatives = auc_scores(tables, relation_vectors, relations, mine)
    if distributed:
        total = torch.from_numpy(sums)
        dist.all_reduce(total)
        sums = total.numpy()
        gathered: list = [None] * world
        dist.all_gather_object(gathered, (positives, negatives))
        positives = np.concatenate([g[0] for g in gathered])
        negatives = np.concatenate([g[1] for g in gathered])
    result = summarize(sums, relations)
    result.update(counts)
    result["auc"] = auc(positives, negatives)
    result["split"] = split
    result["checkpoint"] = os.path.abspath(path)
    result["workers"] = world
    return result
