"""`twhin neighbors`: the k best-scoring entities for an entity, from an export directory.

With a relation: the best tails t of (ID, REL, t) by the relation's own operator (the
model's `relation_query`, so the ranking is the one training optimised). Without: the
plain dot product with the other rows of ID's table (ID itself left out).

Fast on large tables: candidates are scored in chunks of `_CHUNK_ROWS` rows with one matrix
product each and only each chunk's top k is kept (`np.argpartition`), so memory is the
table plus one chunk of scores.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from tml.errors import TmlError

from .models.models import operator_code, relation_query

_CHUNK_ROWS = 1 << 18


class NeighborsError(TmlError):
    """The entity, relation or export directory named on the command line is not usable."""


def _vectors(table) -> np.ndarray:  # noqa: ANN001 (pyarrow Table)
    column = table.column("vector").combine_chunks()
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)


def _table_files(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        raise NeighborsError(f"{directory}: no such export directory")
    names = sorted(n[:-len(".parquet")] for n in os.listdir(directory)
                   if n.endswith(".parquet") and n != "relations.parquet")
    if not names:
        raise NeighborsError(f"{directory}: holds no exported tables (run `twhin export`)")
    return names


def _find(directory: str, entity: str, tables: list[str]) -> tuple[str, int]:
    found = []
    for name in tables:
        ids = pq.read_table(os.path.join(directory, f"{name}.parquet"), columns=["id"])
        match = pc.index(ids.column("id"), entity).as_py()
        if match >= 0:
            found.append((name, match))
    if not found:
        raise NeighborsError(f"entity '{entity}' is in none of the tables "
                             f"{', '.join(tables)} of {directory}")
    if len(found) > 1:
        raise NeighborsError(f"entity '{entity}' is in several tables "
                             f"({', '.join(n for n, _ in found)}); pass --table")
    return found[0]


def top_k(query: np.ndarray, bias: float, candidates: np.ndarray, k: int,
          exclude: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices and scores of the k largest `candidates @ query + bias`, best first."""
    best_index = np.empty(0, np.int64)
    best_score = np.empty(0, np.float32)
    for start in range(0, len(candidates), _CHUNK_ROWS):
        scores = candidates[start:start + _CHUNK_ROWS] @ query + bias
        index = np.arange(start, start + len(scores))
        if exclude is not None and start <= exclude < start + len(scores):
            keep = index != exclude
            scores, index = scores[keep], index[keep]
        if len(scores) > k:
            part = np.argpartition(-scores, k - 1)[:k]
            scores, index = scores[part], index[part]
        best_index = np.concatenate([best_index, index])
        best_score = np.concatenate([best_score, scores.astype(np.float32)])
        if len(best_score) > k:
            part = np.argpartition(-best_score, k - 1)[:k]
            best_index, best_score = best_index[part], best_score[part]
    order = np.lexsort((best_index, -best_score))
    return best_index[order], best_score[order]


def neighbors(directory: str, entity: str, relation: str | None = None, k: int = 10,
              table: str | None = None) -> list[tuple[str, float]]:
    """[(id, score)] of the k best candidates, best first (see module docstring)."""
    if k < 1:
        raise NeighborsError(f"--k must be >= 1, got {k}")
    tables = _table_files(directory)
    if table is not None and table not in tables:
        raise NeighborsError(f"table '{table}' is not in {directory} (tables: "
                             f"{', '.join(tables)})")
    rel_row = None
    if relation is not None:
        relations = pq.read_table(os.path.join(directory, "relations.parquet"))
        names = relations.column("name").to_pylist()
        if relation not in names:
            raise NeighborsError(f"unknown relation '{relation}' (relations: "
                                 f"{', '.join(names)})")
        rel_row = names.index(relation)
        lhs_table = relations.column("lhs")[rel_row].as_py()
        rhs_table = relations.column("rhs")[rel_row].as_py()
        if table is not None and table != lhs_table:
            raise NeighborsError(f"relation '{relation}' starts at table '{lhs_table}', not "
                                 f"'{table}'")
        source, row = _find(directory, entity, [lhs_table])
        target = rhs_table
    else:
        source, row = _find(directory, entity, [table] if table else tables)
        target = source
    source_table = pq.read_table(os.path.join(directory, f"{source}.parquet"))
    vector = torch.from_numpy(_vectors(source_table)[row:row + 1].copy())
    if rel_row is None:
        query, bias, exclude = vector, torch.zeros(1), row
    else:
        relations_vectors = torch.from_numpy(_vectors(relations)[rel_row:rel_row + 1].copy())
        code = operator_code(relations.column("operator")[rel_row].as_py())
        query, bias = relation_query(vector, relations_vectors, torch.tensor([code]), "tail")
        exclude = None
    target_table = source_table if target == source else pq.read_table(
        os.path.join(directory, f"{target}.parquet"))
    candidates = _vectors(target_table)
    index, scores = top_k(query[0].numpy(), float(bias[0]), candidates, k, exclude)
    ids = target_table.column("id").take(index).to_pylist()
    return list(zip(ids, scores.tolist()))


def format_table(rows: list[tuple[str, float]]) -> str:
    """An aligned text table: rank, id, score."""
    width = max([len("id")] + [len(str(i)) for i, _ in rows])
    lines = [f"{'rank':>4}  {'id':<{width}}  {'score':>10}"]
    lines += [f"{rank:>4}  {str(i):<{width}}  {s:>10.4f}"
              for rank, (i, s) in enumerate(rows, 1)]
    return "\n".join(lines)
