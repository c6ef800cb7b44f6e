"""The TwHIN model, its loss wrapper and its per-table fused optimizers.

Each relation has one learned vector r (a row of `all_trans_embs`, named so for checkpoint
compatibility) and an operator (`models.config.Operator`) saying how r combines an edge's
lhs and rhs: translation dot(lhs, rhs + r) (the default), identity dot(lhs, rhs), diagonal
sum(lhs * r * rhs) (DistMult), complex_diagonal Re(sum(lhs * r * conj(rhs))) (ComplEx).

All scoring goes through `relation_query`: every operator is linear in each side, so
score(lhs, r, rhs) = dot(q, rhs) + b with (q, b) = relation_query(lhs, r, "tail"), and
= dot(q', lhs) + b' with (q', b') = relation_query(rhs, r, "head"). Positives, in-batch and
global negatives, link-prediction ranking and nearest-neighbour queries all use it, so they
cannot disagree; ranking a million candidates is then one matrix product.

Negatives: in-batch (for every relation in the batch, `in_batch_negatives` rows of that
relation's lhs and rhs are sampled and each positive's lhs is scored against the sampled
rhs and each rhs against the sampled lhs) and global (ids drawn uniformly from the right
table by the dataset and looked up with the batch, see `data.edges`) and shared (K ids per
table drawn once per batch; every positive's tail query is scored against the K rows of its
relation's rhs table, its head query against those of the lhs table: one B x T*K matrix
product per side, so hundreds of negatives per positive cost K lookups per table). Loss
(`models.config.Loss`): weighted BCE, or a per-side softmax cross-entropy of the positive
against its negatives (Lacroix et al. 2018; PBG's "softmax"), with the logQ correction for
the in-batch negatives (drawn by popularity) and shared negatives that happen to be the
positive itself left out. Optional N3 / L2 penalty on the positives' vectors. Optional
entity bias (`entity_bias`: each vector's last coordinate, added to every score the entity
takes part in; `relation_query` folds it into q and b, so every path above takes it in).
Fixes against the
original tml: the translation is a trained parameter (the original read `.data`, so it never
learned), negatives use the relation's operator, and negatives are labelled 0 (the original
labelled them 1).
"""

from __future__ import annotations

import ctypes
import math
import os
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tml.common import native
from tml.common.modules.embedding.embedding import LargeEmbeddings
from tml.metrics.losses import positives_then_negatives_bce
from tml.trainer.fused_tables import apply_table_optimizers

from ..data.config import TwhinDataConfig
from ..data.edges import EdgeBatch, relation_tables
from .config import Loss, Operator, Regularizer, TwhinModelConfig
from .translation_scores import TranslationScores

# Operator codes as stored in tensors (position in this tuple).
OPERATORS: tuple[Operator, ...] = (Operator.TRANSLATION, Operator.IDENTITY, Operator.DIAGONAL,
                                   Operator.COMPLEX_DIAGONAL)


def operator_code(operator: Operator | str) -> int:
    """The integer code of an operator (its position in `OPERATORS`)."""
    return OPERATORS.index(Operator(operator))


def bias_core(dim: int) -> int:
    """With `entity_bias`, the coordinates the operators use: the first `dim - 2`.

    Coordinate `dim - 1` is the entity's bias and `dim - 2` stays unused, so that
    complex_diagonal keeps an even count on every even dim (its halves must pair up).
    """
    return dim - 2


def initial_relation_vector(operator: Operator | str, dim: int,
                            entity_bias: bool = False) -> torch.Tensor:
    """The neutral r of an operator: the score starts as dot(lhs, rhs) whichever it is
    (with `entity_bias`, on the operator's coordinates; r's last two are never read)."""
    if entity_bias:
        return torch.cat([initial_relation_vector(operator, bias_core(dim)), torch.zeros(2)])
    operator = Operator(operator)
    if operator == Operator.DIAGONAL:
        return torch.ones(dim)
    if operator == Operator.COMPLEX_DIAGONAL:
        return torch.cat([torch.ones(dim // 2), torch.zeros(dim - dim // 2)])
    return torch.zeros(dim)


def _query_one(x: torch.Tensor, r: torch.Tensor, code: int,
               side: str) -> tuple[torch.Tensor, torch.Tensor]:
    operator = OPERATORS[code]
    if operator == Operator.TRANSLATION and side == "tail":
        # tail: dot(lhs, rhs + r) = dot(lhs, rhs) + dot(lhs, r); head: dot(rhs + r, lhs).
        return x, (x * r).sum(-1)
    zero = x.new_zeros(x.shape[:-1])
    if operator == Operator.IDENTITY:
        return x, zero
    if operator == Operator.TRANSLATION:
        return x + r, zero
    if operator == Operator.DIAGONAL:
        return x * r, zero
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    re, im = r[..., :half], r[..., half:]
    if side == "tail":   # lhs * r, as a complex product: then Re(<., conj(rhs)>) is a dot
        return torch.cat([a * re - b * im, a * im + b * re], dim=-1), zero
    # head: r * conj(rhs), then Re(<lhs, .>) is a dot
    return torch.cat([re * a + im * b, re * b - im * a], dim=-1), zero


def relation_query(x: torch.Tensor, relation_vectors: torch.Tensor,
                   codes: torch.Tensor | int, side: str = "tail", entity_bias: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, b) with score = dot(q, other side) + b: THE scoring function of TwHIN.

    Args:
      x: (N, D) the known side: lhs vectors when `side="tail"` (scoring candidate rhs),
        rhs vectors when `side="head"` (scoring candidate lhs).
      relation_vectors: (N, D) each row's relation vector.
      codes: (N,) each row's operator code (`operator_code`), or one int code for all rows
        (skips finding which operators are present: a sort per call).
      side: "tail" or "head".
      entity_bias: the last coordinate of every vector is its entity's bias
        (`TwhinModelConfig.entity_bias`): the operator acts on the first `bias_core(D)`
        coordinates, q gets (0, 1) in the last two, so dot(q, other) adds the other
        entity's bias, and b adds x's own.
    Returns q (N, D) and b (N,).
    """
    if side not in ("tail", "head"):
        raise ValueError(f"side must be 'tail' or 'head', got {side!r}")
    if entity_bias:
        core = bias_core(x.shape[-1])
        q, b = _relation_query(x[..., :core], relation_vectors[..., :core], codes, side)
        ends = torch.cat([torch.zeros_like(x[..., -1:]), torch.ones_like(x[..., -1:])], -1)
        return torch.cat([q, ends], -1), b + x[..., -1]
    return _relation_query(x, relation_vectors, codes, side)


def _relation_query(x: torch.Tensor, relation_vectors: torch.Tensor, codes: torch.Tensor | int,
                    side: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(codes, int):
        return _query_one(x, relation_vectors, codes, side)
    present = torch.unique(codes).tolist()
    if len(present) == 1:
        return _query_one(x, relation_vectors, int(present[0]), side)
    q = torch.zeros_like(x)
    b = x.new_zeros(x.shape[:-1])
    for code in present:
        mask = codes == code
        q_code, b_code = _query_one(x, relation_vectors, int(code), side)
        q = torch.where(mask.unsqueeze(-1), q_code, q)
        b = torch.where(mask, b_code, b)
    return q, b


def score(lhs: torch.Tensor, relation_vectors: torch.Tensor, rhs: torch.Tensor,
          codes: torch.Tensor | int, entity_bias: bool = False) -> torch.Tensor:
    """(N,) scores of N edges (row i: lhs[i], relation_vectors[i], rhs[i], codes[i])."""
    q, b = relation_query(lhs, relation_vectors, codes, "tail", entity_bias)
    return (q * rhs).sum(-1) + b


class TwhinModel(nn.Module):
    """Embedding tables (one per entity type) plus a vector and an operator per relation."""

    def __init__(self, model_config: TwhinModelConfig, data_config: TwhinDataConfig) -> None:
        super().__init__()
        self.table_names = [table.name for table in model_config.embeddings.tables]
        self.embedding_dim = model_config.embeddings.tables[0].embedding_dim
        self.num_relations = len(model_config.relations)
        self.in_batch_negatives = data_config.in_batch_negatives
        self.global_negatives = data_config.global_negatives
        self.shared_negatives = data_config.shared_negatives
        self.loss = Loss(model_config.loss)
        self.regularizer = Regularizer(model_config.regularizer)
        self.regularization = model_config.regularization
        self.reciprocal = model_config.reciprocal
        self.entity_bias = model_config.entity_bias
        self.operators = [Operator(r.operator) for r in model_config.relations]
        self.large_embeddings = LargeEmbeddings(model_config.embeddings)
        # Reciprocal: rows R..2R-1 hold the inverse relations (`relation_vector_rows`).
        self.all_trans_embs = nn.Parameter(torch.empty(
            relation_vector_rows(self.num_relations, self.reciprocal), self.embedding_dim))
        # Not a parameter, not in the state dict: the config says it.
        self.register_buffer("operator_codes", torch.tensor(
            [operator_code(op) for op in self.operators], dtype=torch.long), persistent=False)
        # (R, 2): the table index of each relation's lhs and rhs (shared negatives' rows).
        self.register_buffer("relation_tables", relation_tables(
            model_config.relations, self.table_names), persistent=False)
        # One operator for every relation (the usual case): dispatch on an int, no sort.
        codes = {operator_code(op) for op in self.operators}
        self.single_operator_code = codes.pop() if len(codes) == 1 else None
        # Translation everywhere, in-batch negatives only, no penalty: the positives' and
        # negatives' logits in one autograd step (`translation_scores`) when the batch is
        # grouped by relation.
        self.fused_translation = bool(
            self.single_operator_code == operator_code(Operator.TRANSLATION)
            and self.in_batch_negatives and not self.global_negatives
            and not self.shared_negatives and not self.reciprocal and not self.regularization
            and not self.entity_bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each relation vector (and inverse) starts neutral for its operator: the score is
        dot(lhs, rhs)."""
        with torch.no_grad():
            for index in range(self.all_trans_embs.shape[0]):
                self.all_trans_embs[index].copy_(initial_relation_vector(
                    self.operators[index % self.num_relations], self.embedding_dim,
                    self.entity_bias))

    def lookup(self, batch: EdgeBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(lhs, rhs) embeddings, each (B, D), read from the tables by name."""
        lhs, rhs = self.lookup_all(batch)[:2]
        return lhs, rhs

    def lookup_all(self, batch: EdgeBatch) -> tuple[torch.Tensor, ...]:
        """(lhs, rhs) (B, D), the global negatives (negative_lhs, negative_rhs) (B, G, D)
        and the shared negatives (T, K, D).

        Each table sees only its own ids (`data.edges`): every lookup's vector is one row of
        the pooled output, found by its slot (`lookup_rows`).
        """
        lhs, rhs, negative_lhs, negative_rhs, shared = self._split_lookups(
            self._looked_up(batch), batch)
        if batch.negatives.numel():   # gathered: the shared rows are the whole tables
            tables = self.relation_tables[batch.rels]                        # (B, 2)
            negative_lhs, negative_rhs = (shared[tables[:, side, None], batch.negatives[side]]
                                          for side in (0, 1))
            shared = shared[:, :0]
        return lhs, rhs, negative_lhs, negative_rhs, shared

    def _looked_up(self, batch: EdgeBatch) -> torch.Tensor:
        """(L, D): every lookup's vector in lookup order (lhs, rhs of each edge, then the
        global and the shared negatives)."""
        pooled = self.large_embeddings(batch.nodes)
        return lookup_rows(pooled.values(), batch.slots, pooled.keys(), self.table_names,
                           self.embedding_dim)

    def _split_lookups(self, x: torch.Tensor, batch: EdgeBatch) -> tuple[torch.Tensor, ...]:
        x, shared = split_shared(x, batch.shared)
        lhs, rhs, negative_lhs, negative_rhs = split_lookups(x, batch.rels)
        return lhs, rhs, negative_lhs, negative_rhs, shared

    def _fused_translation_outputs(self, x: torch.Tensor, batch: EdgeBatch,
                                   sample: InBatchSample) -> dict[str, torch.Tensor]:
        """`forward`'s outputs when `fused_translation` and the batch is grouped."""
        num_edges, n = batch.rels.shape[0], self.in_batch_negatives
        logits = translation_logits(x, self.all_trans_embs, sample, n)
        outputs = {"logits": logits}
        outputs["tail_negatives"], outputs["head_negatives"] = \
            logits[num_edges:].view(2, num_edges, n).unbind(0)
        if self.loss == Loss.SOFTMAX:
            outputs["negative_offsets"] = negative_offsets(
                positive_ids(batch.nodes, batch.slots, num_edges), batch.shared,
                self.relation_tables, batch.rels, 0, sample)
        if not self.training:
            outputs["probabilities"] = torch.sigmoid(logits)
        return outputs

    def forward(self, batch: EdgeBatch) -> dict[str, torch.Tensor]:
        """Logits of the B positives, the in-batch, global, then shared negatives.

        Each side's query (`relation_query`) is computed once and shared by the positives and
        every kind of negative: the same scores as calling `score`,
        `in_batch_negative_logits`, `global_negative_logits` and `shared_negative_logits`.
        Besides the flat `logits`, `tail_negatives` / `head_negatives` (B, M) hold each
        positive's M negatives per side (in-batch, global, shared), `negative_offsets`
        (2, B, M) what the softmax loss adds to them (-log q for in-batch ones, -inf for a
        shared negative that is the positive itself, else 0), and `penalty` the weighted
        regulariser. With `reciprocal` the head side is scored by the inverse relation:
        the head query is the tail query of (rhs, r^-1), and `head_positives` (B,) holds the
        positives' scores that way (the softmax's head side compares those). In eval mode
        `probabilities` holds the logits' sigmoid.
        """
        x = self._looked_up(batch)
        sample = None
        if self.fused_translation:
            sample = _in_batch_sample(batch.rels, self.in_batch_negatives)
            if sample.counts is not None:
                return self._fused_translation_outputs(x, batch, sample)
        lhs, rhs, negative_lhs, negative_rhs, shared = self._split_lookups(x, batch)
        relation_vectors = relation_rows(self.all_trans_embs, batch.rels)
        codes = self.single_operator_code
        if codes is None:
            codes = self.operator_codes[batch.rels]
        bias = self.entity_bias
        tail_query = relation_query(lhs, relation_vectors, codes, "tail", bias)
        factors = (lhs, relation_vectors, rhs)
        inverse_vectors = None
        if self.reciprocal:
            inverse_vectors = relation_rows(self.all_trans_embs, batch.rels + self.num_relations)
            factors = (*factors, inverse_vectors)
        outputs = {}
        # Decided by the config, not by shapes: torch.fx traces this method.
        if self.in_batch_negatives or self.global_negatives or self.shared_negatives:
            softmax = self.loss == Loss.SOFTMAX
            num_edges = batch.rels.shape[0]
            if inverse_vectors is not None:
                head_query = relation_query(rhs, inverse_vectors, codes, "tail", bias)
                outputs["head_positives"] = (head_query[0] * lhs).sum(-1) + head_query[1]
            else:
                head_query = relation_query(rhs, relation_vectors, codes, "head", bias)
            if self.in_batch_negatives and sample is None:
                sample = _in_batch_sample(batch.rels, self.in_batch_negatives)
            if self.global_negatives or self.shared_negatives:
                positives = (tail_query[0] * rhs).sum(-1) + tail_query[1]
                in_batch = _in_batch_logits(lhs, rhs, batch.rels, tail_query, head_query,
                                            self.in_batch_negatives, sample)
                global_, shared_tails, shared_heads = _global_and_shared_logits(
                    negative_lhs, negative_rhs, shared, batch.negatives, self.relation_tables,
                    batch.rels, tail_query, head_query)
                logits = cat_nonempty([positives, in_batch, global_.reshape(-1),
                                       shared_tails.reshape(-1), shared_heads.reshape(-1)])
                negatives = cat_nonempty([
                    in_batch.view(2, num_edges, self.in_batch_negatives), global_,
                    torch.stack([shared_tails, shared_heads])], dim=2)
            else:
                # In-batch negatives only (the default): the positives and both sides'
                # in-batch logits are made as one tensor.
                logits = _positive_and_in_batch_logits(lhs, rhs, batch.rels, tail_query,
                                                       head_query, self.in_batch_negatives,
                                                       sample)
                negatives = logits[num_edges:].view(2, num_edges, self.in_batch_negatives)
            outputs["tail_negatives"], outputs["head_negatives"] = negatives.unbind(0)
            if softmax:
                shared_ids, num_global = _offset_negatives(batch.shared, batch.negatives,
                                                           negative_lhs)
                outputs["negative_offsets"] = negative_offsets(
                    positive_ids(batch.nodes, batch.slots, num_edges), shared_ids,
                    self.relation_tables, batch.rels, num_global, sample)
        else:
            logits = (tail_query[0] * rhs).sum(-1) + tail_query[1]
        if self.regularization:
            if bias:   # the operators' coordinates only: not the bias, not the unused one
                core = bias_core(self.embedding_dim)
                factors = tuple(factor[..., :core] for factor in factors)
            outputs["penalty"] = self.regularization * regularizer_penalty(
                factors, self.regularizer,
                self.single_operator_code == operator_code(Operator.COMPLEX_DIAGONAL))
        outputs["logits"] = logits
        if not self.training:
            # For metrics that read probabilities; training reads the loss only, and a
            # sigmoid over every logit is 1% of a step.
            outputs["probabilities"] = torch.sigmoid(logits)
        return outputs


def translation_logits(x: torch.Tensor, vectors: torch.Tensor, sample: InBatchSample,
                       n: int) -> torch.Tensor:
    """(B + 2 B n,) the positives' and in-batch logits of a grouped batch whose relations are
    all translations, from the 2B looked-up rows `x` (lhs, rhs of each edge; no global or
    shared negatives) and the relation vectors (`translation_scores.TranslationScores`)."""
    num_edges = x.shape[0] // 2
    return TranslationScores.apply(x.view(num_edges, 2, x.shape[1]), vectors,
                                   sample.present.tolist(), sample.counts, sample.lhs_rows,
                                   sample.rhs_rows, n)


def relation_rows(vectors: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`vectors[rows]` (B, D), as the product of a one-hot (B, R) matrix with `vectors`.

    Why a product and not an index: the forward is exact (one 1.0 per row), and the backward
    is one (R, B) x (B, D) product, where an index's backward is an accumulating
    `index_put_` of B rows into a handful of rows (serial on CPU): measured 2x cheaper
    forward + backward for a 4000-edge batch.
    """
    one_hot = nn.functional.one_hot(rows, vectors.shape[0]).to(vectors.dtype)
    return one_hot @ vectors


def cat_nonempty(tensors: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """`torch.cat` of the non-empty `tensors` along `dim`; the tensor itself when only one is
    (no copy, and no copy in backward: the negatives are often one kind only)."""
    kept = [t for t in tensors if t.shape[dim]]
    if len(kept) == 1:
        return kept[0]
    return torch.cat(kept or tensors, dim=dim)


def relation_vector_rows(num_relations: int, reciprocal: bool) -> int:
    """Rows of the relation vectors: R, or 2R with reciprocal relations (r's inverse at row
    R + r)."""
    return 2 * num_relations if reciprocal else num_relations


def directed_vector(relation_vectors: torch.Tensor, relation: int, side: str,
                    num_relations: int) -> tuple[torch.Tensor, str]:
    """(vector, side) to pass to `relation_query` for `side` queries of `relation`.

    `relation_vectors` (R or 2R, D), as trained: with 2R rows (reciprocal) the head side is
    the tail query of the inverse relation, row R + relation; otherwise row `relation` with
    `side`. Link prediction ranks with this, so it scores as training did.
    """
    if side == "head" and relation_vectors.shape[0] == 2 * num_relations:
        return relation_vectors[num_relations + relation], "tail"
    return relation_vectors[relation], side


class _TakeRows(torch.autograd.Function):
    """`x[rows]` for distinct `rows`, with a backward that gathers, not scatters.

    torch's own backward of an index is an `index_add_` (one small kernel per row on CPU,
    since rows could repeat) into a zero-filled gradient. Slots never repeat, so each row
    of x's gradient is one row of the output's gradient or zero: the backward is one
    `index_select` through the inverse map (measured 4x cheaper than an `index_copy_` for
    8000 x 64 rows), with a zero row appended only when some bags are empty.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(rows)
        ctx.num_rows = x.shape[0]
        return x.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        (rows,) = ctx.saved_tensors
        num_taken = rows.numel()
        if num_taken == ctx.num_rows:        # a permutation: every row of x was taken
            inverse = torch.empty_like(rows)
        else:                                # the rows not taken read the zero row
            inverse = torch.full((ctx.num_rows,), num_taken, dtype=rows.dtype,
                                 device=rows.device)
            grad = torch.cat([grad, grad.new_zeros(1, *grad.shape[1:])])
        inverse.index_copy_(0, rows, torch.arange(num_taken, device=rows.device))
        return grad.index_select(0, inverse), None


def lookup_rows(values: torch.Tensor, slots: torch.Tensor, keys: list[str],
                table_names: list[str], dim: int) -> torch.Tensor:
    """(L, D): each lookup's vector, in lookup order, from the pooled (N, T*D) output.

    `slots` index the output viewed as (N*T, D) with the tables in the KJT's key order
    (`table_names`, the config's); sharding may order the output's column blocks (`keys`)
    otherwise, and then each slot's table is mapped to its block. All tables share `dim`.
    """
    num_tables = len(table_names)
    if list(keys) != list(table_names):
        block = torch.tensor([list(keys).index(name) for name in table_names],
                             device=slots.device)
        table = slots % num_tables
        slots = slots - table + block[table]
    rows = values.reshape(-1, dim)
    if slots.numel() == rows.shape[0] and bool(
            torch.equal(slots, torch.arange(slots.numel(), device=slots.device))):
        # Every relation maps table 0 -> table 1 (a user -> item graph, `make bench`'s): the
        # output already holds the lookups in order, lhs and rhs of edge i side by side in
        # its row i. A view: no copy forward, none backward (two (2B, D) copies a step).
        return rows
    return _TakeRows.apply(rows, slots)


def split_lookups(x: torch.Tensor, rels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(lhs, rhs, negative_lhs, negative_rhs) from the 2B(1 + G) looked-up vectors.

    Views and one `unbind` (whose backward is one stack): slicing or selecting instead
    builds a zero-filled gradient of all of `x` per slice in backward.
    """
    num_edges, dim = rels.shape[0], x.shape[-1]
    g = (x.shape[0] - 2 * num_edges) // (2 * num_edges) if num_edges else 0
    if g == 0:
        lhs, rhs = x.view(num_edges, 2, dim).unbind(1)
        empty = x.new_zeros(num_edges, 0, dim)
        return lhs, rhs, empty, empty
    positives, negatives = x.split([2 * num_edges, x.shape[0] - 2 * num_edges])
    lhs, rhs = positives.view(num_edges, 2, dim).unbind(1)
    negative_lhs, negative_rhs = negatives.view(num_edges, 2, g, dim).unbind(1)
    return lhs, rhs, negative_lhs, negative_rhs


Query = tuple[torch.Tensor, torch.Tensor]


def split_shared(x: torch.Tensor, shared: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the other lookups, the shared negatives (T, K, D)): the T*K last rows of `x`."""
    num_tables, k = shared.shape
    if not k:
        return x, x.new_zeros(num_tables, 0, x.shape[-1])
    rest, tail = x.split([x.shape[0] - num_tables * k, num_tables * k])
    return rest, tail.view(num_tables, k, x.shape[-1])


def shared_negative_logits(shared: torch.Tensor, relation_tables_t: torch.Tensor,
                           rels: torch.Tensor, tail_query: Query,
                           head_query: Query) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K) tail-side and head-side logits against the shared negatives.

    `shared` (T, K, D): K vectors per table. Row i's tail query is scored against the K
    vectors of its relation's rhs table, its head query against those of its lhs table:
    one (B, D) x (D, T*K) product per side, then each row keeps its table's K columns.
    """
    return _shared_logits(shared, relation_tables_t, rels, tail_query, head_query)


def _shared_logits(shared: torch.Tensor, relation_tables_t: torch.Tensor, rels: torch.Tensor,
                   tail_query: Query, head_query: Query) -> tuple[torch.Tensor, torch.Tensor]:
    num_tables, k, dim = shared.shape
    num_edges = rels.shape[0]
    if not k:
        empty = shared.new_zeros(num_edges, 0)
        return empty, empty
    out = []
    for query, side in ((tail_query, 1), (head_query, 0)):
        q, b = query
        if num_tables == 1:
            scores = q @ shared[0].T                                  # (B, K)
        else:
            # Each row against its own table's K vectors only: one product per table
            # present on this side (a user-item graph: one per side), not one against
            # all T*K of which each row keeps K (T times the work, forward and backward).
            tables = relation_tables_t[rels, side]
            present = torch.unique(tables).tolist()
            if len(present) == 1:
                scores = q @ shared[present[0]].T
            else:
                scores = q.new_zeros(num_edges, k)
                for table in present:
                    rows = torch.nonzero(tables == table).squeeze(1)
                    scores = scores.index_copy(0, rows, q[rows] @ shared[table].T)
        out.append(scores + b.unsqueeze(1))
    return out[0], out[1]


def positive_ids(nodes: KeyedJaggedTensor, slots: torch.Tensor,
                 num_edges: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lhs rows, rhs rows) (B,) of the positives, read back from the lookup KJT.

    `edges_to_kjt` groups the values by table, in lookup order within a table; a slot says
    a lookup's table t and its rank r in it, so its id is value number start_t + r. The
    first 2B lookups are lhs, rhs of each edge.
    """
    num_tables = len(nodes.keys())
    slots = slots[:2 * num_edges]
    counts = nodes.lengths().view(num_tables, -1).sum(1)
    starts = torch.cumsum(counts, 0) - counts
    rows = nodes.values()[starts[slots % num_tables] + slots // num_tables]
    return rows[0::2], rows[1::2]


def in_batch_log_q(lhs_ids: torch.Tensor, rhs_ids: torch.Tensor,
                   rels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rhs offsets, lhs offsets) (B,): -log q of each row as an in-batch candidate.

    In-batch negatives of relation r are rows of r drawn evenly, so entity e comes up with
    probability q = (rows of r with e on that side) / (rows of r): popular entities more
    often. Adding -log q to a candidate's logit (the logQ correction) keeps the softmax from
    learning to rank popular entities down.
    """
    per_relation = torch.bincount(rels).float()[rels]
    out = []
    for ids in (rhs_ids, lhs_ids):
        key = rels * (int(ids.max()) + 1 if ids.numel() else 1) + ids
        _, inverse, counts = torch.unique(key, return_inverse=True, return_counts=True)
        out.append(-torch.log(counts[inverse].float() / per_relation))
    return out[0], out[1]


def negative_offsets(ids: tuple[torch.Tensor, torch.Tensor], shared_ids: torch.Tensor,
                     relation_tables_t: torch.Tensor, rels: torch.Tensor, num_global: int,
                     sample: InBatchSample | None) -> torch.Tensor:
    """(2, B, M) added to the negatives' logits by the softmax loss (see `forward`).

    Tail side first, then head side; columns in-batch, global, shared as in `forward`.
    In-batch: -log q of the candidate drawn (`in_batch_log_q`); global: 0; in-batch and
    shared: -inf where the candidate is the positive's own entity (not a negative).
    """
    num_edges = rels.shape[0]
    lhs_ids, rhs_ids = ids
    pieces = []
    if sample is not None:
        rhs_rows, lhs_rows, columns = sample.rhs_rows, sample.lhs_rows, sample.columns(
            rels, sample.lhs_rows.numel() // sample.present.numel())
        rhs_log_q, lhs_log_q = in_batch_log_q(lhs_ids, rhs_ids, rels)
        offsets = torch.stack([rhs_log_q[rhs_rows][columns], lhs_log_q[lhs_rows][columns]])
        # A candidate holding the positive's own entity (its own row, or a duplicate) is
        # not a negative.
        hits = torch.stack([rhs_ids[rhs_rows][columns] == rhs_ids.unsqueeze(1),
                            lhs_ids[lhs_rows][columns] == lhs_ids.unsqueeze(1)])
        pieces.append(offsets.masked_fill(hits, float("-inf")))
    pieces.append(torch.zeros(2, num_edges, num_global, device=rels.device))
    if shared_ids.shape[1]:
        hits = [shared_ids[relation_tables_t[rels, side]] == positive.unsqueeze(1)
                for side, positive in ((1, rhs_ids), (0, lhs_ids))]
        pieces.append(torch.zeros(2, num_edges, shared_ids.shape[1], device=rels.device)
                      .masked_fill(torch.stack(hits), float("-inf")))
    return torch.cat(pieces, dim=2)


def global_negative_logits(lhs: torch.Tensor, rhs: torch.Tensor, negative_lhs: torch.Tensor,
                           negative_rhs: torch.Tensor, relation_vectors: torch.Tensor,
                           codes: torch.Tensor | int, entity_bias: bool = False) -> torch.Tensor:
    """`2 * B * G` logits: each lhs against its G negative rhs, each rhs against G lhs."""
    if negative_lhs.shape[1] == 0:
        return lhs.new_zeros(0)
    return _global_logits(negative_lhs, negative_rhs,
                          relation_query(lhs, relation_vectors, codes, "tail", entity_bias),
                          relation_query(rhs, relation_vectors, codes, "head", entity_bias))


def _global_logits(negative_lhs: torch.Tensor, negative_rhs: torch.Tensor,
                   tail_query: Query, head_query: Query) -> torch.Tensor:
    if negative_lhs.shape[1] == 0:
        return negative_lhs.new_zeros(0)
    return _per_edge_global_logits(negative_lhs, negative_rhs, tail_query,
                                   head_query).reshape(-1)


def _per_edge_global_logits(negative_lhs: torch.Tensor, negative_rhs: torch.Tensor,
                            tail_query: Query, head_query: Query) -> torch.Tensor:
    """(2, B, G): tail side (the rhs negatives), then head side.

    A (G, D) x (D, 1) product per edge: its backward writes each negative's gradient
    contiguous, where an einsum's came out transposed and the split's backward copied it
    element by element (measured 1.3x cheaper forward + backward for B=260, G=32, D=32).
    """
    out = [torch.matmul(negatives, q.unsqueeze(-1)).squeeze(-1) + b.unsqueeze(1)
           for negatives, (q, b) in ((negative_rhs, tail_query), (negative_lhs, head_query))]
    return torch.stack(out)


def _global_and_shared_logits(negative_lhs: torch.Tensor, negative_rhs: torch.Tensor,
                              shared: torch.Tensor, gathered: torch.Tensor,
                              relation_tables_t: torch.Tensor, rels: torch.Tensor,
                              tail_query: Query, head_query: Query
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(global (2, B, G), shared tails (B, K), shared heads (B, K)) logits.

    With gathered global negatives (`gathered` (2, B, G) ids, `data.edges`), `shared` holds
    every row of each table: each query is scored against all rows of its table
    (`_shared_logits`) and keeps its G drawn columns; there are no shared negatives then.
    """
    num_edges = rels.shape[0]
    if gathered.numel():
        tails, heads = _shared_logits(shared, relation_tables_t, rels, tail_query, head_query)
        empty = tails.new_zeros(num_edges, 0)
        return torch.stack([tails.gather(1, gathered[1]), heads.gather(1, gathered[0])]), \
            empty, empty
    if negative_lhs.shape[1]:
        global_ = _per_edge_global_logits(negative_lhs, negative_rhs, tail_query, head_query)
    else:
        global_ = negative_lhs.new_zeros(2, num_edges, 0)
    tails, heads = _shared_logits(shared, relation_tables_t, rels, tail_query, head_query)
    return global_, tails, heads


def _offset_negatives(shared_ids: torch.Tensor, gathered: torch.Tensor,
                      negative_lhs: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the shared negatives' ids, G) for `negative_offsets`: with gathered global negatives
    the shared rows are the whole tables, not negatives of their own."""
    if gathered.numel():
        return shared_ids[:, :0], gathered.shape[2]
    return shared_ids, negative_lhs.shape[1]


def in_batch_negative_logits(lhs: torch.Tensor, rhs: torch.Tensor, rels: torch.Tensor,
                             translations: torch.Tensor, n: int,
                             operator_codes: torch.Tensor | None = None,
                             entity_bias: bool = False) -> torch.Tensor:
    """Logits of `n` in-batch negatives per positive and side, relation by relation.

    For each relation in the batch: every lhs row is scored against `n` sampled rhs rows of
    the same relation and every rhs row against `n` sampled lhs rows (a permutation,
    repeated when the relation has fewer than `n` rows), with the relation's vector
    (`translations`, (R, D)) and operator (`operator_codes`, (R,); default translation).
    Returns `2 * B * n` logits: the B x n tail-side ones, then the B x n head-side ones.
    """
    if not n:
        return lhs.new_zeros(0)
    if operator_codes is None:
        operator_codes = torch.zeros(translations.shape[0], dtype=torch.long,
                                     device=translations.device)
    relation_vectors, codes = translations[rels], operator_codes[rels]
    return _in_batch_logits(
        lhs, rhs, rels, relation_query(lhs, relation_vectors, codes, "tail", entity_bias),
        relation_query(rhs, relation_vectors, codes, "head", entity_bias), n)


class InBatchSample(NamedTuple):
    """The in-batch candidates of `_in_batch_logits`, for each relation present.

    rhs_rows, lhs_rows: (P*n,) the n sampled rows of each present relation, relation by
      relation (ascending), for the tail and head sides.
    present: (P,) the relations present, ascending.
    counts: when the batch is grouped by relation (the reader's order, `data.dataset`):
      the number of rows of each present relation, whose rows are then consecutive; else
      None.
    """

    rhs_rows: torch.Tensor
    lhs_rows: torch.Tensor
    present: torch.Tensor
    counts: list[int] | None

    def columns(self, rels: torch.Tensor, n: int) -> torch.Tensor:
        """(B, n): row i's n candidates, as positions in rhs_rows / lhs_rows."""
        return torch.searchsorted(self.present, rels).unsqueeze(1) * n + \
            torch.arange(n, device=rels.device).unsqueeze(0)


def _in_batch_sample(rels: torch.Tensor, n: int) -> InBatchSample:
    """Per relation present, n rows of that relation for each side (a permutation, repeated
    when the relation has fewer than n rows).

    The same draws whether or not the batch is grouped by relation: the relations are
    visited in ascending order and each draws its lhs then its rhs permutation of its rows
    in batch order, so a stable regrouping of a batch samples the same edges. On CPU a
    grouped batch's blocks and candidate rows are assembled in C around the same draws
    (`_grouped_sample_in_c`).
    """
    if rels.device.type == "cpu" and rels.dtype == torch.int64:
        kernel = in_batch_sample_kernel()
        if kernel is not None:
            sample = _grouped_sample_in_c(kernel, rels, n)
            if sample is not None:
                return sample
    grouped = rels.numel() < 2 or bool((rels[1:] >= rels[:-1]).all())
    if grouped:
        present, counts_t = torch.unique_consecutive(rels, return_counts=True)
        counts = counts_t.tolist()
    else:
        present = torch.unique(rels)
    samples: tuple[list, list] = ([], [])
    offsets = []
    start = 0
    for index, relation in enumerate(present.tolist()):
        rows = None if grouped else torch.nonzero(rels == relation).squeeze(1)
        count = counts[index] if grouped else rows.numel()
        repeats = math.ceil(n / count)
        for side in samples:                     # lhs, then rhs
            pick = torch.randperm(count, device=rels.device)
            pick = pick[:n] if repeats == 1 else pick.repeat(repeats)[:n]
            side.append(pick if rows is None else rows[pick])
        offsets += [start] * n
        start += count
    lhs_rows, rhs_rows = torch.cat(samples[0]), torch.cat(samples[1])
    if grouped and start:                        # rows of relation k start at its offset
        shift = torch.tensor(offsets, device=rels.device)
        lhs_rows, rhs_rows = lhs_rows + shift, rhs_rows + shift
    return InBatchSample(rhs_rows, lhs_rows, present, counts if grouped else None)


SAMPLE_KERNEL_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                    "in_batch_sample.c")
_SAMPLE_SIGNATURES = {
    "tml_relation_blocks": [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p],
    "tml_block_candidates": [ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                             ctypes.c_void_p, ctypes.c_void_p],
}


def in_batch_sample_kernel() -> ctypes.CDLL | None:
    """The compiled `in_batch_sample.c` (`tml.common.native`), or None: torch ops then."""
    return native.load_functions(SAMPLE_KERNEL_SOURCE, _SAMPLE_SIGNATURES)


def _grouped_sample_in_c(kernel: ctypes.CDLL, rels: torch.Tensor, n: int
                         ) -> InBatchSample | None:
    """`_in_batch_sample` of a grouped batch with the same `randperm` draws, its blocks found
    and its candidate rows assembled by `in_batch_sample.c`; None if `rels` is not grouped."""
    rels = rels.contiguous()
    num_edges = rels.numel()
    blocks = torch.empty(2, max(1, num_edges), dtype=torch.int64)
    num_blocks = kernel.tml_relation_blocks(rels.data_ptr(), num_edges, blocks[0].data_ptr(),
                                            blocks[1].data_ptr())
    if num_blocks < 0:
        return None
    counts = blocks[1, :num_blocks].tolist()
    picks = [torch.randperm(count) for count in counts for _ in (0, 1)]   # lhs, then rhs
    rows = torch.empty(2, num_blocks * n, dtype=torch.int64)
    status = kernel.tml_block_candidates(
        num_blocks, n, (ctypes.c_void_p * len(picks))(*[p.data_ptr() for p in picks]),
        blocks[1].data_ptr(), rows[0].data_ptr(), rows[1].data_ptr())
    if status:
        raise ValueError(f"in-batch sample: a permutation outside its block (status {status})")
    return InBatchSample(rows[1], rows[0], blocks[0, :num_blocks], counts)


class _BlockScores(torch.autograd.Function):
    """Both sides' in-batch logits of a batch grouped by relation, flat (2 * B * n,), after
    the B positives' logits when `positives` is set.

    Relation r's rows are the consecutive block [a_r, a_r + c_r) of the batch and its n
    candidates per side rows [r n, (r + 1) n) of the sampled rows (`rhs[rhs_rows]` for the
    tail side, `lhs[lhs_rows]` for the head side), so each side is one (c_r, D) x (D, n)
    product per relation written in place into the output, plus the bias: with R
    relations, 1/R of the multiply-adds of scoring every row against every relation's
    candidates, and no gather of the own relation's columns (nor its scatter-add in
    backward). The positives, dot(tail query, rhs) + tail bias, go in the same output (no
    `cat` of the logits, forward or backward). Backward: two products per relation and
    side, written into the gradients' blocks (every row is in one block: nothing to
    zero-fill), and the candidates' gradients added into the rows they were drawn from
    (`index_add_` of P*n rows into the rhs gradient, and into the tail query's when it is
    lhs itself, as for translation: no zero-filled (B, D) gradient per gather).
    """

    @staticmethod
    def forward(ctx, tail_q: torch.Tensor, tail_b: torch.Tensor,  # noqa: ANN001
                head_q: torch.Tensor, head_b: torch.Tensor, lhs: torch.Tensor,
                rhs: torch.Tensor, lhs_rows: torch.Tensor, rhs_rows: torch.Tensor,
                counts: list[int], n: int, positives: bool) -> torch.Tensor:
        num_edges = tail_q.shape[0]
        first = num_edges if positives else 0
        tail_c, head_c = rhs.index_select(0, rhs_rows), lhs.index_select(0, lhs_rows)
        out = tail_q.new_empty(first + 2 * num_edges * n)
        if positives:
            torch.sum(tail_q * rhs, dim=1, out=out[:first])
            out[:first].add_(tail_b)
        blocks = out[first:].view(2, num_edges, n)
        for side, (q, c) in enumerate(((tail_q, tail_c), (head_q, head_c))):
            start = 0
            for block, count in enumerate(counts):
                torch.mm(q[start:start + count], c[block * n:(block + 1) * n].T,
                         out=blocks[side, start:start + count])
                start += count
        blocks[0].add_(tail_b.unsqueeze(1))
        blocks[1].add_(head_b.unsqueeze(1))
        ctx.save_for_backward(tail_q, tail_c, head_q, head_c, rhs, lhs_rows, rhs_rows)
        ctx.counts, ctx.n, ctx.first = counts, n, first
        ctx.tail_is_lhs = tail_q is lhs
        ctx.lhs_shape = lhs.shape
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
        tail_q, tail_c, head_q, head_c, rhs, lhs_rows, rhs_rows = ctx.saved_tensors
        counts, n, first = ctx.counts, ctx.n, ctx.first
        blocks = grad[first:].view(2, tail_q.shape[0], n)
        grads: list[torch.Tensor | None] = []
        for side, (q, c) in enumerate(((tail_q, tail_c), (head_q, head_c))):
            g = blocks[side]
            dq = torch.empty_like(q, memory_format=torch.contiguous_format)
            dc = torch.empty_like(c, memory_format=torch.contiguous_format)
            start = 0
            for block, count in enumerate(counts):
                rows, cols = slice(start, start + count), slice(block * n, (block + 1) * n)
                torch.mm(g[rows], c[cols], out=dq[rows])
                torch.mm(g[rows].T, q[rows], out=dc[cols])
                start += count
            db = g.sum(1) if ctx.needs_input_grad[2 * side + 1] else None
            grads += [dq, db, dc]
        d_tail_q, d_tail_b, d_tail_c, d_head_q, d_head_b, d_head_c = grads
        if first:
            g = grad[:first]
            d_tail_q.addcmul_(g.unsqueeze(1), rhs)
            if d_tail_b is not None:
                d_tail_b.add_(g)
            d_rhs = g.unsqueeze(1) * tail_q
        else:
            d_rhs = torch.zeros_like(rhs, memory_format=torch.contiguous_format)
        d_rhs.index_add_(0, rhs_rows, d_tail_c)
        if ctx.tail_is_lhs:        # one tensor, two inputs: its gradient goes in one slot
            d_tail_q.index_add_(0, lhs_rows, d_head_c)
            d_lhs = None
        else:
            d_lhs = tail_q.new_zeros(ctx.lhs_shape).index_add_(0, lhs_rows, d_head_c)
        return (d_tail_q, d_tail_b, d_head_q, d_head_b, d_lhs, d_rhs,
                None, None, None, None, None)


def _positive_and_in_batch_logits(lhs: torch.Tensor, rhs: torch.Tensor, rels: torch.Tensor,
                                  tail_query: Query, head_query: Query, n: int,
                                  sample: InBatchSample | None = None) -> torch.Tensor:
    """(B + 2 B n,): the positives' logits, then `_in_batch_logits`; one tensor from the
    start when the batch is grouped by relation (`_BlockScores`)."""
    if sample is None:
        sample = _in_batch_sample(rels, n)
    if sample.counts is not None and n:
        return _BlockScores.apply(tail_query[0], tail_query[1], head_query[0], head_query[1],
                                  lhs, rhs, sample.lhs_rows, sample.rhs_rows, sample.counts,
                                  n, True)
    positives = (tail_query[0] * rhs).sum(-1) + tail_query[1]
    return torch.cat([positives, _in_batch_logits(lhs, rhs, rels, tail_query, head_query, n,
                                                  sample)])


def _in_batch_logits(lhs: torch.Tensor, rhs: torch.Tensor, rels: torch.Tensor,
                     tail_query: Query, head_query: Query, n: int,
                     sample: InBatchSample | None = None) -> torch.Tensor:
    if not n:
        return lhs.new_zeros(0)
    # Sampling touches index tensors only; the vectors are then gathered once per side.
    # A batch grouped by relation is scored block by block (`_BlockScores`); otherwise
    # with one matrix product against every relation's samples, of which each row keeps
    # its own relation's n columns. (Gathering per relation costs a zero-filled gradient
    # buffer of the whole batch per gather in backward: measured 2x slower.)
    if sample is None:
        sample = _in_batch_sample(rels, n)
    if sample.counts is not None:
        return _BlockScores.apply(tail_query[0], tail_query[1], head_query[0], head_query[1],
                                  lhs, rhs, sample.lhs_rows, sample.rhs_rows, sample.counts,
                                  n, False)
    columns = sample.columns(rels, n)
    q, b = tail_query
    tails = (q @ rhs[sample.rhs_rows].T).gather(1, columns) + b.unsqueeze(1)
    q, b = head_query
    heads = (q @ lhs[sample.lhs_rows].T).gather(1, columns) + b.unsqueeze(1)
    return torch.cat([tails.reshape(-1), heads.reshape(-1)])


def regularizer_penalty(factors: tuple[torch.Tensor, ...], regularizer: Regularizer,
                        complex_: bool = False) -> torch.Tensor:
    """Mean over the B rows of sum over `factors` (each (B, D)) of the penalty of the row.

    n3: sum |x|^3, with |x| the modulus of each complex coordinate (real half, imaginary
    half) when `complex_` (Lacroix et al. 2018: the nuclear 3-norm bound of ComplEx); l2:
    sum x^2.
    """
    total = factors[0].new_zeros(())
    num_rows = max(1, factors[0].shape[0])
    for x in factors:
        if regularizer == Regularizer.L2:
            total = total + (x * x).sum()
            continue
        if complex_:
            half = x.shape[-1] // 2
            x = torch.sqrt(x[..., :half] ** 2 + x[..., half:] ** 2 + 1e-12)
        total = total + (x.abs() ** 3).sum()
    return total / num_rows


def softmax_loss(positives: torch.Tensor, tail_negatives: torch.Tensor,
                 head_negatives: torch.Tensor, offsets: torch.Tensor,
                 weights: torch.Tensor, head_positives: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """Mean over positives of weight * (CE_tail + CE_head) / 2.

    CE of a side: -log softmax of the positive among [positive, negatives + offsets]:
    logsumexp([p, n_1 + o_1, ...]) - p. A row's -inf offsets drop those negatives.
    `head_positives`: the positives' scores on the head side when they differ from the
    tail side's (reciprocal relations); by default `positives` on both.
    """
    num_edges = positives.shape[0]
    if not num_edges:
        return positives.new_zeros(())
    if head_positives is None:
        head_positives = positives
    total = positives.new_zeros(num_edges)
    for scores, negatives, offset in ((positives, tail_negatives, offsets[0]),
                                      (head_positives, head_negatives, offsets[1])):
        row = torch.cat([scores.unsqueeze(1), negatives + offset], dim=1)
        total = total + torch.logsumexp(row, dim=1) - scores
    return (weights.float() * total).sum() / (2 * num_edges)


def labels_and_weights(logits: torch.Tensor, positive_labels: torch.Tensor,
                       positive_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (1 positives, 0 negatives) and weights (negatives together weigh B)."""
    num_positives = positive_labels.numel()
    num_negatives = logits.numel() - num_positives
    labels = torch.cat([positive_labels.float(), logits.new_zeros(num_negatives)])
    negative_weight = num_positives / max(1, num_negatives)
    weights = torch.cat([positive_weights.float(),
                         logits.new_full((num_negatives,), negative_weight)])
    return labels, weights


def edge_bce(logits: torch.Tensor, positive_labels: torch.Tensor,
             positive_weights: torch.Tensor) -> torch.Tensor:
    """torch's weighted BCE of `logits` against `labels_and_weights`' labels and weights,
    without building them (`tml.metrics.losses.positives_then_negatives_bce`)."""
    num_positives = positive_labels.numel()
    return positives_then_negatives_bce(logits, positive_labels, positive_weights,
                                        num_positives / max(1, logits.numel() - num_positives))


def cached_labels_and_weights(logits: torch.Tensor, positive_labels: torch.Tensor,
                              positive_weights: torch.Tensor,
                              cache: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """`labels_and_weights`, built once per batch shape for unweighted positives (labels
    and weights all 1, the usual case) and kept in `cache`: two (B + negatives,) `cat`s
    and fills a step otherwise. The tensors are shared between steps, so callers must not
    change them in place (the loss and the metrics only read them)."""
    if not (bool(positive_labels.eq(1).all()) and bool(positive_weights.eq(1).all())):
        return labels_and_weights(logits, positive_labels, positive_weights)
    key = (positive_labels.numel(), logits.numel(), positive_labels.dtype,
           positive_weights.dtype, logits.device)
    if cache.get("key") != key:
        cache["key"] = key
        cache["value"] = labels_and_weights(logits.detach(), positive_labels, positive_weights)
    return cache["value"]


# TorchRec's train pipeline traces the model with torch.fx to find the sharded lookups;
# these functions hold data-dependent shapes, so the tracer records them as calls.
torch.fx.wrap("in_batch_negative_logits")
torch.fx.wrap("labels_and_weights")
torch.fx.wrap("cached_labels_and_weights")
torch.fx.wrap("edge_bce")
torch.fx.wrap("relation_query")
torch.fx.wrap("split_lookups")
torch.fx.wrap("lookup_rows")
torch.fx.wrap("global_negative_logits")
torch.fx.wrap("_in_batch_logits")
torch.fx.wrap("_positive_and_in_batch_logits")
torch.fx.wrap("_global_logits")
torch.fx.wrap("_global_and_shared_logits")
torch.fx.wrap("_offset_negatives")
torch.fx.wrap("_in_batch_sample")
torch.fx.wrap("_shared_logits")
torch.fx.wrap("split_shared")
torch.fx.wrap("positive_ids")
torch.fx.wrap("negative_offsets")
torch.fx.wrap("regularizer_penalty")
torch.fx.wrap("translation_logits")
torch.fx.wrap("softmax_loss")
torch.fx.wrap("relation_rows")
torch.fx.wrap("cat_nonempty")


def apply_optimizers(model: TwhinModel, model_config: TwhinModelConfig) -> TwhinModel:
    """Attach each table's optimizer to its weights (`tml.trainer.fused_tables`)."""
    apply_table_optimizers(model, model_config.embeddings.tables)
    return model


class TwhinModelAndLoss(nn.Module):
    """The model plus its loss (`model.loss`) and penalty; returns `(loss, outputs)`.

    bce: labels 1 for positives, 0 for negatives; weights: the batch's edge weights for
    positives, each negative `B / num_negatives`, so negatives as a whole weigh as much as
    the positives. softmax: `softmax_loss` of each positive against its negatives, weighted
    by the edge weight. `outputs` always has `labels` and `weights` in the bce layout (for
    the held-out AUC). The model's `penalty` (regularisation), if any, is added.
    """

    def __init__(self, model: TwhinModel,
                 loss_fn: Callable[..., torch.Tensor] = nn.functional.binary_cross_entropy_with_logits,
                 data_config: TwhinDataConfig | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.softmax = getattr(model, "loss", Loss.BCE) == Loss.SOFTMAX
        # The labels and weights of unweighted batches (`cached_labels_and_weights`).
        self._labels_cache: dict = {}

    def forward(self, batch: EdgeBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        outputs = self.model(batch)
        labels, weights = cached_labels_and_weights(outputs["logits"], batch.labels,
                                                    batch.weights, self._labels_cache)
        if self.softmax and "tail_negatives" in outputs:
            num_edges = batch.labels.shape[0]
            loss = softmax_loss(outputs["logits"][:num_edges], outputs["tail_negatives"],
                                outputs["head_negatives"], outputs["negative_offsets"],
                                batch.weights, outputs.get("head_positives"))
        elif self.loss_fn is nn.functional.binary_cross_entropy_with_logits:
            loss = edge_bce(outputs["logits"], batch.labels, batch.weights)
        else:
            loss = self.loss_fn(outputs["logits"], labels, weights)
        if "penalty" in outputs:
            loss = loss + outputs["penalty"]
        outputs.update({"loss": loss.detach(), "labels": labels, "weights": weights})
        return loss, outputs
