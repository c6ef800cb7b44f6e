"""An edge batch and the lookup KeyedJaggedTensor built from it.

The lookup layout follows the original tml: each edge gives two lookups, lhs first then rhs,
so a batch of B edges is 2B lookups. The KJT has one key per table; each lookup has length 1
under the key of its table and 0 under the others; values are grouped by table, in lookup
order within a table. Pooled (SUM) output is then (2B, T*D) with zeros in the T-1 tables a
lookup does not use, and summing over tables gives each lookup's vector.

Global negatives (`global_negatives = G > 0`) are more lookups appended after the 2B
positive ones, edge by edge: G ids of the edge's lhs table, then G ids of its rhs table, so
the batch has 2B(1 + G) lookups. They go through the same (sharded) tables as the positives,
which is why they are part of the batch and not drawn inside the model.

Shared negatives (`shared_negatives = K > 0`): K ids per table, drawn once for the whole
batch, appended last: table 0's K ids, then table 1's, ... (T*K lookups). Every positive is
scored against the K candidates of its relation's rhs table (and lhs table for the head
side): many negatives per positive for K lookups per table, not B*K.
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
    labels: (B,) float, 1 for the positive edges read from data.
    rels: (B,) int64 relation index of each edge.
    weights: (B,) float edge weight (1 unless the data has a `weight` column).
    shared: (T, K) int64 the shared negatives' row ids per table (T x 0 or 0 x 0 if none;
      the model reads K from its shape, the lookups are in `nodes`).
    """

    nodes: KeyedJaggedTensor
    labels: torch.Tensor
    rels: torch.Tensor
    weights: torch.Tensor
    shared: torch.Tensor = dataclasses.field(
        default_factory=lambda: torch.zeros(0, 0, dtype=torch.long))


def relation_tables(relations: list, table_names: list[str]) -> torch.Tensor:
    """(R, 2) int64: the table index of each relation's lhs and rhs."""
    return torch.tensor([[table_names.index(r.lhs), table_names.index(r.rhs)]
                         for r in relations], dtype=torch.long).reshape(-1, 2)


def edges_to_kjt(lhs: torch.Tensor, rhs: torch.Tensor, rel: torch.Tensor,
                 relation_tables_t: torch.Tensor, table_names: list[str],
                 negative_lhs: torch.Tensor | None = None,
                 negative_rhs: torch.Tensor | None = None,
                 shared: torch.Tensor | None = None) -> KeyedJaggedTensor:
    """The lookup KJT of a batch of edges (vectorised; no Python loop over edges).

    Args:
      lhs, rhs: (B,) int64 row indices into the relation's lhs and rhs tables.
      rel: (B,) int64 relation indices.
      relation_tables_t: (R, 2) from `relation_tables`.
      table_names: KJT keys, in config order.
      negative_lhs, negative_rhs: optional (B, G) global negatives: rows of each edge's lhs
        and rhs table, appended after the positives (see module docstring).
      shared: optional (T, K) shared negatives, row ids of each table (in `table_names`
        order), appended last.
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
    order = torch.argsort(lookup_tables, stable=True)
    values = lookup_rows[order]
    num_tables = len(table_names)
    lengths = torch.arange(num_tables).unsqueeze(1).eq(lookup_tables.unsqueeze(0))
    return KeyedJaggedTensor(keys=list(table_names), values=values,
                             lengths=lengths.reshape(-1).to(torch.int32))
