"""`twhin evaluate`: filtered rank-based link prediction of a checkpoint.

For every evaluated edge (h, r, t) the true tail is ranked against every entity of r's rhs
table and the true head against every entity of r's lhs table, after removing from the
candidates the other known true edges (all of train, validation and test: the "filtered"
setting). Ties count at the mean: rank = 1 + #greater + #equal / 2 among the remaining
candidates. Reported: MRR, Hits@1/3/10 and mean rank, per side (head, tail) and both, per
relation and overall, plus the AUC of the true edges against in-batch negatives (scored by
the model's own `in_batch_negative_logits`).

How it scales: candidates are scored with the model's `relation_query` as one matrix
product per (query chunk x candidate chunk), so score memory is bounded by `query_chunk *
candidate_chunk` whatever the table size. The true entity's score is taken from the same
matrix product as the candidates' (a first pass over the chunks), so rounding cannot make
it beat or lose to itself.

Sharded over W workers (torch elastic, gloo): each worker reads only its contiguous row
share of every table (`tml.common.checkpoint_rows`, from a checkpoint of any world size and
sharding), so its memory is table_bytes / W plus chunk buffers plus the filter index (all
known edges, 24 bytes each, on every worker). Every worker walks ALL evaluated edges in
the same query chunks. Per chunk: the anchor vectors are assembled by each worker writing
the rows it owns into a zero (Q, D) buffer and all-reducing (sum; adding zeros is exact,
so every worker holds bit-identical queries); each worker scores them against its own
candidate rows (candidate chunks on one global grid); the true entity's score comes from
its owner's matrix product (the others add 0); each worker counts greater / equal among
its candidates after removing the filtered ones; the counts are all-reduced. Ranks are
therefore identical on every worker and equal to one worker's (W = 1 is the same
algorithm with the whole table local). The AUC edges are gathered the same way and scored
identically on every worker (same seed), so it does not depend on W either.

Edges whose head, tail or relation never occur in the training split are skipped and
counted (their vectors are untrained), or rejected with `strict`.

The popularity baseline (`popularity_rank_sums`, reported as `popularity`): every candidate
scored by how often it is the same side of the same relation in the training split, ranked
with the protocol of `filtered_ranks` (same filter, same ties at the mean; counted from the
sorted counts, a test checks it against `filtered_ranks` itself). Embeddings that rank
below it are worse than counting: a user should see that at once, beside the model's MRR.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch

from tml.common.modules.embedding.vectors import table_weight, whole_table
from tml.errors import DataError

from .config import TwhinConfig
from .data.config import TwhinDataConfig
from .data.dataset import _resolve
from .models.config import Relation
from .models.models import (
    directed_vector,
    in_batch_negative_logits,
    operator_code,
    relation_query,
    score,
)

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


Reduce = Callable[[torch.Tensor], None]
"""Sums a tensor in place over the workers (`dist.all_reduce`); None with one worker."""


@dataclass
class TableShard:
    """Rows [start, start + len(rows)) of a `num_rows`-row table, held by this worker."""

    rows: torch.Tensor
    start: int
    num_rows: int

    @property
    def end(self) -> int:
        return self.start + self.rows.shape[0]


def _shard(table: torch.Tensor | TableShard) -> TableShard:
    return table if isinstance(table, TableShard) else TableShard(table, 0, table.shape[0])


def share(num_rows: int, rank: int, world: int) -> tuple[int, int]:
    """Worker `rank`'s contiguous row range [start, end) of a `num_rows`-row table."""
    return num_rows * rank // world, num_rows * (rank + 1) // world


def gather_rows(table: torch.Tensor | TableShard, ids: np.ndarray,
                reduce: Reduce | None = None) -> torch.Tensor:
    """(len(ids), D) rows of a table sharded over the workers, on every worker.

    Each worker fills the rows it owns into zeros and the buffers are summed: adding zeros
    is exact, so every worker gets the same bits as a whole-table lookup.
    """
    shard = _shard(table)
    ids_t = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    if reduce is None and shard.start == 0 and shard.end == shard.num_rows:
        return shard.rows[ids_t]
    out = shard.rows.new_zeros((len(ids_t), shard.rows.shape[1]))
    mine = (ids_t >= shard.start) & (ids_t < shard.end)
    out[mine] = shard.rows[ids_t[mine] - shard.start]
    if reduce is not None:
        reduce(out)
    return out


def _chunks(start: int, end: int, size: int) -> Iterator[tuple[int, int]]:
    """[start, end) cut on the global grid of multiples of `size` (the same cuts whatever
    the shard boundaries)."""
    while start < end:
        stop = min(end, (start // size + 1) * size)
        yield start, stop
        start = stop


@torch.no_grad()
def filtered_ranks(anchor_vectors: torch.Tensor, relation_vector: torch.Tensor, code: int,
                   side: str, candidates: torch.Tensor, truths: np.ndarray,
                   filter_positions: np.ndarray, filter_entities: np.ndarray,
                   candidate_chunk: int = 8192, candidate_start: int = 0,
                   reduce: Reduce | None = None, entity_bias: bool = False) -> np.ndarray:
    """Realistic filtered ranks of `truths` among `candidates` for one chunk of queries.

    anchor_vectors: (Q, D) the known side of each query; side "tail" ranks rhs candidates
    for lhs anchors, "head" lhs candidates for rhs anchors. (filter_positions,
    filter_entities): candidates to remove per query (the true entity is always removed and
    compared against separately). `candidates` are the entities [candidate_start,
    candidate_start + len) of this worker; with `reduce` the true scores and the counts
    are summed over the workers (each owns a disjoint range), so all return the same ranks.
    """
    q_count = anchor_vectors.shape[0]
    rv = relation_vector.expand(q_count, -1)
    q, b = relation_query(anchor_vectors, rv, torch.full((q_count,), code), side, entity_bias)
    lo, hi = candidate_start, candidate_start + candidates.shape[0]
    truths_t = torch.from_numpy(truths)
    rows = torch.arange(q_count)
    # Summed over the workers: 0 where this worker does not own the truth.
    true_score = torch.full((q_count,), float("nan") if reduce is None else 0.0,
                            dtype=q.dtype)
    for start, end in _chunks(lo, hi, candidate_chunk):
        inside = (truths_t >= start) & (truths_t < end)
        if inside.any():
            s = q @ candidates[start - lo:end - lo].T + b.unsqueeze(1)
            true_score[inside] = s[rows[inside], truths_t[inside] - start]
    if reduce is not None:
        reduce(true_score)   # only the owner's value is non-zero: exact
    positions = torch.from_numpy(np.concatenate([filter_positions, np.arange(q_count)]))
    entities = torch.from_numpy(np.concatenate([filter_entities, truths]))
    counts = torch.zeros(2, q_count, dtype=torch.float64)   # greater, equal
    for start, end in _chunks(lo, hi, candidate_chunk):
        s = q @ candidates[start - lo:end - lo].T + b.unsqueeze(1)
        sel = (entities >= start) & (entities < end)
        s[positions[sel], entities[sel] - start] = float("-inf")
        counts[0] += (s > true_score.unsqueeze(1)).sum(1)
        counts[1] += (s == true_score.unsqueeze(1)).sum(1)
    if reduce is not None:
        reduce(counts)
    return (1.0 + counts[0] + counts[1] / 2.0).numpy()


def _add(sums: np.ndarray, ranks: np.ndarray) -> None:
    sums += [len(ranks), (1.0 / ranks).sum(), ranks.sum(), (ranks <= 1).sum(),
             (ranks <= 3).sum(), (ranks <= 10).sum()]


def rank_sums(tables: Mapping[str, torch.Tensor | TableShard], relation_vectors: torch.Tensor,
              relations: list[Relation], edges: Edges, known: KnownEdges,
              query_chunk: int = 1024, candidate_chunk: int = 8192,
              reduce: Reduce | None = None, entity_bias: bool = False) -> np.ndarray:
    """(R, 2, len(COLUMNS)) metric sums of `edges`, per relation and side (head, tail).

    `relation_vectors`: (R, D), or (2R, D) for reciprocal relations (heads are then ranked
    with the inverse relation, `models.directed_vector`).

    `tables`: whole tables, or with `reduce` this worker's `TableShard`s; every worker
    passes all `edges` and gets the same sums.
    """
    lhs, rel, rhs = edges
    sums = np.zeros((len(relations), 2, len(COLUMNS)))
    for r, relation in enumerate(relations):
        chosen = np.nonzero(rel == r)[0]
        code = operator_code(relation.operator)
        for side_index, side in enumerate(SIDES):
            if side == "tail":
                anchors, truths = lhs[chosen], rhs[chosen]
                anchor_table, candidates = tables[relation.lhs], _shard(tables[relation.rhs])
            else:
                anchors, truths = rhs[chosen], lhs[chosen]
                anchor_table, candidates = tables[relation.rhs], _shard(tables[relation.lhs])
            for start in range(0, len(chosen), query_chunk):
                a = anchors[start:start + query_chunk]
                t = truths[start:start + query_chunk]
                positions, entities = known.lookup(side, r, a)
                vector, query_side = directed_vector(relation_vectors, r, side,
                                                     len(relations))
                ranks = filtered_ranks(gather_rows(anchor_table, a, reduce), vector, code,
                                       query_side, candidates.rows, t, positions, entities,
                                       candidate_chunk, candidates.start, reduce,
                                       entity_bias)
                _add(sums[r, side_index], ranks)
    return sums


def popularity_counts(train: Edges, relations: list[Relation], sizes: Mapping[str, int]
                      ) -> list[dict[str, torch.Tensor]]:
    """Per relation and side, (num_candidates, 1) training-edge counts of every candidate."""
    lhs, rel, rhs = train
    out = []
    for r, relation in enumerate(relations):
        chosen = rel == r
        out.append({
            "tail": torch.from_numpy(np.bincount(rhs[chosen], minlength=sizes[relation.rhs])
                                     .astype(np.float64)).unsqueeze(1),
            "head": torch.from_numpy(np.bincount(lhs[chosen], minlength=sizes[relation.lhs])
                                     .astype(np.float64)).unsqueeze(1)})
    return out


def popularity_rank_sums(train: Edges, relations: list[Relation], sizes: Mapping[str, int],
                         edges: Edges, known: KnownEdges, query_chunk: int = 1024,
                         candidate_chunk: int = 8192) -> np.ndarray:
    """`rank_sums` of the popularity baseline: candidate score = its training count.

    The protocol of the model's ranks (`filtered_ranks`: the known entities and the truth
    removed, ties at the mean), counted from sorted counts rather than by scoring every
    candidate: the candidates above and level with the truth's count by binary search,
    minus the removed ones above and level. Brute force over 818k candidates cost as much
    as ranking the model; this costs a binary search per query and a sort of the removed
    (query, entity) pairs.
    `candidate_chunk` is unused (kept so callers pass the model's chunking unchanged).
    """
    del candidate_chunk
    counts = popularity_counts(train, relations, sizes)
    lhs, rel, rhs = edges
    sums = np.zeros((len(relations), 2, len(COLUMNS)))
    for r in range(len(relations)):
        chosen = np.nonzero(rel == r)[0]
        for side_index, side in enumerate(SIDES):
            count = counts[r][side].squeeze(1).numpy()
            ordered = np.sort(count)
            anchors, truths = (lhs, rhs) if side == "tail" else (rhs, lhs)
            anchors, truths = anchors[chosen], truths[chosen]
            for start in range(0, len(chosen), query_chunk):
                a = anchors[start:start + query_chunk]
                t = truths[start:start + query_chunk]
                _add(sums[r, side_index], _popularity_ranks(
                    count, ordered, t, *known.lookup(side, r, a)))
    return sums


def _popularity_ranks(count: np.ndarray, ordered: np.ndarray, truths: np.ndarray,
                      filter_positions: np.ndarray, filter_entities: np.ndarray
                      ) -> np.ndarray:
    """Filtered ranks of `truths` when candidate c scores count[c] (`ordered`: sorted)."""
    true_count = count[truths]
    not_above = np.searchsorted(ordered, true_count, side="right")
    above = len(ordered) - not_above
    level = not_above - np.searchsorted(ordered, true_count, side="left")
    # Removed per query: its known entities and its truth, each once.
    queries = len(truths)
    pairs = np.unique(np.concatenate([filter_positions, np.arange(queries)]) * len(count)
                      + np.concatenate([filter_entities, truths]))
    position, entity = pairs // len(count), pairs % len(count)
    removed = count[entity]
    above = above - np.bincount(position[removed > true_count[position]], minlength=queries)
    level = level - np.bincount(position[removed == true_count[position]], minlength=queries)
    return 1.0 + above + level / 2.0


@torch.no_grad()
def auc_scores(tables: Mapping[str, torch.Tensor | TableShard], relation_vectors: torch.Tensor,
               relations: list[Relation], edges: Edges, chunk: int = 1000,
               seed: int = 1234, reduce: Reduce | None = None, entity_bias: bool = False
               ) -> tuple[np.ndarray, np.ndarray]:
    """Scores of the true edges and of their in-batch negatives (as in training).

    With sharded tables (`reduce`) every worker passes all `edges` and gets the same scores.
    """
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
                lv = gather_rows(tables[relation.lhs], lhs[idx], reduce)
                rv = gather_rows(tables[relation.rhs], rhs[idx], reduce)
                rels = torch.from_numpy(rel[idx])
                positives.append(score(lv, relation_vectors[rels], rv, codes[rels],
                                       entity_bias).numpy())
                if len(idx) > 1:
                    negatives.append(in_batch_negative_logits(
                        lv, rv, rels, relation_vectors, AUC_NEGATIVES, codes,
                        entity_bias).numpy())
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
            ) -> tuple[Edges, KnownEdges, dict[str, int], Edges]:
    """The edges to evaluate (unseen ones removed), the filter index, counts, and the
    training edges (for the popularity baseline)."""
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
    return (lhs[ok], rel[ok], rhs[ok]), known, counts, train


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


def load_shards(config: TwhinConfig, checkpoint: str, rank: int = 0, world: int = 1
                ) -> tuple[dict[str, TableShard], torch.Tensor]:
    """Worker `rank`'s row share of every table, and the relation vectors (whole): (R, D),
    or (2R, D) for reciprocal relations."""
    from tml.common.checkpoint_rows import load_row_ranges

    from .export import RELATIONS_KEY, TABLE_KEY, check_checkpoint

    shapes = check_checkpoint(config, checkpoint)
    ranges = {key: share(rows, rank, world) for key, (rows, _) in shapes.items()}
    ranges[RELATIONS_KEY] = (0, shapes[RELATIONS_KEY][0])
    state = load_row_ranges(checkpoint, ranges, torch.float32)
    tables = {t.name: TableShard(state[TABLE_KEY.format(t.name)],
                                 ranges[TABLE_KEY.format(t.name)][0], t.num_embeddings)
              for t in config.model.embeddings.tables}
    return tables, state[RELATIONS_KEY]


def edge_sample(edges: Edges, max_edges: int | None, seed: int) -> Edges:
    """At most `max_edges` of `edges`: a fixed random subset, kept in file order.

    Why: every query is ranked against a whole table, so a split of 1e5 edges over 1e6
    entities costs hours on a CPU; the same seed gives the same subset every time (early
    stopping's evaluations and `twhin evaluate --max_edges` pick theirs alike), so values
    stay comparable between checkpoints.
    """
    if max_edges is None or len(edges[0]) <= max_edges:
        return edges
    chosen = np.sort(np.random.default_rng(seed).choice(len(edges[0]), max_edges,
                                                        replace=False))
    return tuple(e[chosen] for e in edges)  # type: ignore[return-value]


def evaluate_checkpoint(config_path: TwhinConfig | str, checkpoint: str, split: str = "test",
                        strict: bool = False, max_edges: int | None = None,
                        query_chunk: int = 1024, candidate_chunk: int = 8192) -> dict:
    """Evaluate in this process; one of WORLD_SIZE workers when started by torch elastic.

    `config_path`: the YAML's path, or a TwhinConfig already loaded. With several workers
    each holds 1/WORLD_SIZE of every table (see module docstring); every worker returns
    the same result. `max_edges`: rank only a fixed random sample of that many of the
    split's (seen) edges (`edge_sample`, seeded by `training.seed`), model and popularity
    baseline alike.
    """
    from datetime import timedelta

    import torch.distributed as dist

    from tml.common.process_group import init_worker_process_group
    from tml.core.config import load_config_from_yaml

    from .export import resolve_checkpoint

    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if distributed and not dist.is_initialized():
        init_worker_process_group("gloo", timedelta(minutes=30))   # torch's default timeout
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    config = config_path if isinstance(config_path, TwhinConfig) else \
        load_config_from_yaml(TwhinConfig, config_path)
    path = resolve_checkpoint(checkpoint)
    tables, relation_vectors = load_shards(config, path, rank, world)
    edges, known, counts, train = prepare(config, split, strict)
    edges = edge_sample(edges, max_edges, config.training.seed)
    counts["num_evaluated"] = len(edges[0])
    reduce: Reduce | None = None
    if distributed:
        def reduce(tensor: torch.Tensor) -> None:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    relations = config.model.relations
    bias = config.model.entity_bias
    sums = rank_sums(tables, relation_vectors, relations, edges, known, query_chunk,
                     candidate_chunk, reduce, bias)
    positives, negatives = auc_scores(tables, relation_vectors, relations, edges,
                                      reduce=reduce, entity_bias=bias)
    result = summarize(sums, relations)
    sizes = {t.name: t.num_embeddings for t in config.model.embeddings.tables}
    popular = summarize(popularity_rank_sums(train, relations, sizes, edges, known,
                                             query_chunk, candidate_chunk), relations)
    result["popularity"] = {key: popular[key] for key in popular if key != "per_relation"}
    result.update(counts)
    result["auc"] = auc(positives, negatives)
    result["split"] = split
    result["checkpoint"] = os.path.abspath(path)
    result["workers"] = world
    return result


# --- link prediction during training (early stopping on validation MRR) -------------------
RELATIONS_SUFFIX = "all_trans_embs"


def live_weights(model: torch.nn.Module, config: TwhinConfig
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every table (whole, fp32) and the relation vectors of the model being trained.

    Collective (`whole_table`): every worker calls it, in the same order.
    """
    tables = {t.name: whole_table(table_weight(model, t.name, f"table '{t.name}'"))
              for t in sorted(config.model.embeddings.tables, key=lambda t: t.name)}
    state = model.state_dict(keep_vars=True)
    relations = [v for k, v in state.items()
                 if k == RELATIONS_SUFFIX or k.endswith("." + RELATIONS_SUFFIX)]
    if len(relations) != 1:
        raise KeyError(f"the model has no single parameter '*{RELATIONS_SUFFIX}'")
    return tables, whole_table(relations[0])


def validation_evaluate(config: TwhinConfig, max_edges: int, seed: int = 0
                        ) -> Callable[..., dict[str, float]]:
    """The trainer's `evaluate` for TwHIN: the default metrics (AUC, RCE, loss) plus the
    filtered MRR and Hits@10 (`mrr`, `hits_at_10`) of the validation split.

    So `training.early_stopping.metric: mrr` stops on what `twhin evaluate` reports: the
    same ranks (`rank_sums`: filtered over train + validation + test, ties at the mean,
    both sides), computed from the live weights (`live_weights`: every worker holds every
    table for the length of the evaluation). At most `max_edges` validation edges (a fixed
    random subset, the same at every evaluation, so values are comparable) bound its cost:
    2 * max_edges queries, each scored against a whole table.
    """
    from tml.metrics.evaluation import evaluate as default_evaluate

    cache: dict[str, object] = {}

    def evaluate(model: torch.nn.Module, batches: object, device: torch.device,
                 num_steps: int) -> dict[str, float]:
        metrics = default_evaluate(model, batches, device, num_steps)  # type: ignore[arg-type]
        if "edges" not in cache:
            edges, known, _, _ = prepare(config, "validation")
            cache["edges"], cache["known"] = edge_sample(edges, max_edges, seed), known
        tables, relation_vectors = live_weights(model, config)
        sums = rank_sums(tables, relation_vectors, config.model.relations,
                         cache["edges"], cache["known"],  # type: ignore[arg-type]
                         entity_bias=config.model.entity_bias)
        ranked = _metrics(sums)
        if ranked.get("count"):
            metrics["mrr"], metrics["hits_at_10"] = ranked["mrr"], ranked["hits_at_10"]
        return metrics

    return evaluate
