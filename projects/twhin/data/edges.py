"""An edge batch and the lookup KeyedJaggedTensor built from it.

The lookups follow the original tml's order: each edge gives two lookups, lhs first then
rhs, so a batch of B edges is 2B lookups. The KJT has one key per table and gives each table
only its own ids: table t's n_t lookups are its first n_t bags (length 1, in lookup order),
padded with empty bags to the KJT's stride N (`lookup_stride`). The pooled (SUM) output is
then (N, T*D), and `EdgeBatch.slots` says where each lookup's vector is in it: lookup j
(table t_j, the r_j-th lookup of its table) is row r_j * T + t_j of the output viewed as
(N*T, D).

The stride is the most lookups a table can get in a batch of this config, not this batch's
largest n_t: workers must agree on it without talking (TorchRec's row-wise reduce-scatter
needs the same stride on every rank), and it stays the same from batch to batch. When every
relation is user -> tweet, each table gets exactly half the lookups and no bag is empty.

Why not one bag per lookup in every table (the original layout: length 1 under the lookup's
table, 0 under the others, stride 2B): then T-1 of every T pooled rows are zeros, with two
tables half of the forward's output, of the backward's gradient, and of what multi-worker
runs send through the pooled all-to-all. When a table can be both sides of an edge (a
user -> user relation) its bound is 2B again and the stride is the original one.

Global negatives (`global_negatives = G > 0`) are more lookups appended after the 2B
positive ones, edge by edge: G ids of the edge's lhs table, then G ids of its rhs table, so
the batch has 2B(1 + G) lookups. They go through the same (sharded) tables as the positives,
which is why they are part of the batch and not drawn inside the model.

Shared negatives (`shared_negatives = K > 0`): K ids per table, drawn once for the whole
batch, appended last: table 0's K ids, then table 1's, ... (T*K lookups). Every positive is
scored against the K candidates of its relation's rhs table (and lhs table for the head
side): many negatives per positive for K lookups per table, not B*K.

Gathered global negatives (`gathers_global_negatives`): when the tables are small next to
the 2BG global negative lookups (Nations, UMLS, Kinships: 14-135 entities against 16,640
lookups a step), the batch looks up each whole table once instead, in the shared
negatives' place (`shared` = every row id of each table, padded by repeating rows to the
largest table), and carries the drawn ids in `negatives`. The model scores every positive
against its table's rows with one product per side and keeps the drawn columns: the same
negatives, logits and loss, and the same table update (a fused optimizer sums a row's
gradients over the batch either way), for a fraction of the lookups, of the batch building
and of the per-edge (B, G, D) products and copies.
"""

from __future__ import annotations

import dataclasses

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tml.common.batch import DataclassBatch


@dataclasses.dataclass
class EdgeBatch(DataclassBatch):
    """B positive edges.

    nodes: lookup KJT (2B lookups, see module docstring).
    slots: (2B,) int64 where each lookup's vector is in the pooled output viewed as
      (N*T, D): row r * T + t for the r-th lookup of table t (tables in `nodes`' key order).
    labels: (B,) float, 1 for the positive edges read from data.
    rels: (B,) int64 relation index of each edge.
    weights: (B,) float edge weight (1 unless the data has a `weight` column).
    shared: (T, K) int64 the shared negatives' row ids per table (T x 0 or 0 x 0 if none;
      the model reads K from its shape, the lookups are in `nodes`). With gathered global
      negatives: every row of each table (`whole_tables`).
    negatives: (2, B, G) int64 gathered global negatives: row ids of each edge's lhs table
      (index 0) and rhs table (index 1), which are also the columns of `shared`; (2, 0, 0)
      when the global negatives, if any, are lookups of their own.
    """

    nodes: KeyedJaggedTensor
    slots: torch.Tensor
    labels: torch.Tensor
    rels: torch.Tensor
    weights: torch.Tensor
    shared: torch.Tensor = dataclasses.field(
        default_factory=lambda: torch.zeros(0, 0, dtype=torch.long))
    negatives: torch.Tensor = dataclasses.field(
        default_factory=lambda: torch.zeros(2, 0, 0, dtype=torch.long))


# Gather the global negatives from whole tables when all tables' rows together are at most
# 1/GATHER_FRACTION of a batch's 2BG negative lookups. Measured on UMLS's config (batch 260,
# 32 negatives a side: 16,640 lookups), table grown: a step took the same time both ways at
# ~2000 rows (1/8), gathering was 1.3x faster at 1000 and 1.85x at 135 (docs/performance.md);
# 16 keeps it to where it clearly wins.
GATHER_FRACTION = 16


def gathers_global_negatives(table_rows: list[int], num_edges: int, global_negatives: int,
                             shared_negatives: int = 0) -> bool:
    """Whether a batch of `num_edges` edges looks its global negatives up as whole tables
    (module docstring): global negatives only (no shared ones, which have the `shared`
    slot), and the tables' rows at most 1/GATHER_FRACTION of the 2BG negative lookups."""
    if not global_negatives or shared_negatives or not table_rows:
        return False
    return sum(table_rows) * GATHER_FRACTION <= 2 * num_edges * global_negatives


def whole_tables(table_rows: list[int]) -> torch.Tensor:
    """(T, K) every row id of each table, K the largest table; a smaller table's row repeats
    its ids (never gathered: drawn ids are below the table's size; their gradient is 0)."""
    most = max(table_rows)
    return torch.stack([torch.arange(most) % rows for rows in table_rows])


def relation_tables(relations: list, table_names: list[str]) -> torch.Tensor:
    """(R, 2) int64: the table index of each relation's lhs and rhs."""
    return torch.tensor([[table_names.index(r.lhs), table_names.index(r.rhs)]
                         for r in relations], dtype=torch.long).reshape(-1, 2)


def lookup_stride(relation_tables_t: torch.Tensor, num_tables: int, num_edges: int,
                  global_negatives: int = 0, shared_negatives: int = 0) -> int:
    """The most lookups one table can get in a batch: the KJT's stride (bags per table).

    An edge gives a table one lookup per side it is on (times 1 + G with global negatives):
    at most 2 if some relation has the same table on both sides, else 1; the K shared
    negatives add K. Depends on the config and the batch size only.
    """
    if not num_tables or not relation_tables_t.numel():
        return shared_negatives
    sides = 2 if bool((relation_tables_t[:, 0] == relation_tables_t[:, 1]).any()) else 1
    return sides * num_edges * (1 + global_negatives) + shared_negatives


def edges_to_kjt(lhs: torch.Tensor, rhs: torch.Tensor, rel: torch.Tensor,
                 relation_tables_t: torch.Tensor, table_names: list[str],
                 negative_lhs: torch.Tensor | None = None,
                 negative_rhs: torch.Tensor | None = None,
                 shared: torch.Tensor | None = None
                 ) -> tuple[KeyedJaggedTensor, torch.Tensor]:
    """The lookup KJT of a batch of edges and each lookup's slot (vectorised).

    Args:
      lhs, rhs: (B,) int64 row indices into the relation's lhs and rhs tables.
      rel: (B,) int64 relation indices.
      relation_tables_t: (R, 2) from `relation_tables`.
      table_names: KJT keys, in config order.
      negative_lhs, negative_rhs: optional (B, G) global negatives: rows of each edge's lhs
        and rhs table, appended after the positives (see module docstring).
      shared: optional (T, K) shared negatives, row ids of each table (in `table_names`
        order), appended last.
    Returns the KJT and the slots (`EdgeBatch.slots`).
    """
    lookup_tables = relation_tables_t[rel].reshape(-1)          # (2B,) lhs, rhs interleaved
    lookup_rows = torch.stack((lhs, rhs), dim=1).reshape(-1)    # (2B,)
    if negative_lhs is not None and negative_rhs is not None and negative_lhs.shape[1]:
        g = negative_lhs.shape[1]
        tables = relation_tables_t[rel]                          # (B, 2)
        negative_tables = torch.cat([tables[:, :1].expand(-1, g), tables[:, 1:].expand(-1, g)],
                                    dim=1).reshape(-1)           # (2BG,)
        negative_rows = torch.cat([negative_lhs, negative_rhs], dim=1).reshape(-1)
        lookup_tables = torch.cat([lookup_tables, negative_tables])
        lookup_rows = torch.cat([lookup_rows, negative_rows])
    if shared is not None and shared.numel():
        num_shared = shared.shape[1]
        lookup_tables = torch.cat([lookup_tables, torch.arange(shared.shape[0]).repeat_interleave(
            num_shared)])
        lookup_rows = torch.cat([lookup_rows, shared.reshape(-1)])
    num_tables = len(table_names)
    order = torch.argsort(lookup_tables, stable=True)
    values = lookup_rows[order]
    counts = torch.bincount(lookup_tables, minlength=num_tables)         # (T,) n_t
    stride = lookup_stride(relation_tables_t, num_tables, len(rel),
                           negative_lhs.shape[1] if negative_lhs is not None else 0,
                           shared.shape[1] if shared is not None and shared.numel() else 0)
    lengths = torch.arange(stride).unsqueeze(0) < counts.unsqueeze(1)   # (T, N)
    # The r-th lookup of table t is at sorted position start_t + r.
    starts = torch.cumsum(counts, 0) - counts
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel()) - starts[lookup_tables[order]]
    kjt = KeyedJaggedTensor(keys=list(table_names), values=values,
                            lengths=lengths.reshape(-1).to(torch.int32))
    return kjt, ranks * num_tables + lookup_tables
