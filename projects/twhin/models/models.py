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
table by the dataset and looked up with the batch, see `data.edges`). Fixes against the
original tml: the translation is a trained parameter (the original read `.data`, so it never
learned), negatives use the relation's operator, and negatives are labelled 0 (the original
labelled them 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from projects.twhin.data.config import TwhinDataConfig
from projects.twhin.data.edges import EdgeBatch
from projects.twhin.models.config import Operator, TwhinModelConfig
from tml.common.modules.embedding.embedding import LargeEmbeddings
from tml.trainer.fused_tables import apply_table_optimizers

# Operator codes as stored in tensors (position in this tuple).
OPERATORS: tuple[Operator, ...] = (Operator.TRANSLATION, Operator.IDENTITY, Operator.DIAGONAL,
                                   Operator.COMPLEX_DIAGONAL)


def operator_code(operator: Operator | str) -> int:
    """The integer code of an operator (its position in `OPERATORS`)."""
    return OPERATORS.index(Operator(operator))


def initial_relation_vector(operator: Operator | str, dim: int) -> torch.Tensor:
    """The neutral r of an operator: the score starts as dot(lhs, rhs) whichever it is."""
    operator = Operator(operator)
    if operator == Operator.DIAGONAL:
        return torch.ones(dim)
    if operator == Operator.COMPLEX_DIAGONAL:
        return torch.cat([torch.ones(dim // 2), torch.zeros(dim - dim // 2)])
    return torch.zeros(dim)


def _query_one(x: torch.Tensor, r: torch.Tensor, code: int,
               side: str) -> tuple[torch.Tensor, torch.Tensor]:
    operator = OPERATORS[code]
    zero = x.new_zeros(x.shape[:-1])
    if operator == Operator.IDENTITY:
        return x, zero
    if operator == Operator.TRANSLATION:
        # tail: dot(lhs, rhs + r) = dot(lhs, rhs) + dot(lhs, r); head: dot(rhs + r, lhs).
        return (x, (x * r).sum(-1)) if side == "tail" else (x + r, zero)
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
                   codes: torch.Tensor | int, side: str = "tail"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, b) with score = dot(q, other side) + b: THE scoring function of TwHIN.

    Args:
      x: (N, D) the known side: lhs vectors when `side="tail"` (scoring candidate rhs),
        rhs vectors when `side="head"` (scoring candidate lhs).
      relation_vectors: (N, D) each row's relation vector.
      codes: (N,) each row's operator code (`operator_code`), or one int code for all rows
        (skips finding which operators are present: a sort per call).
      side: "tail" or "head".
    Returns q (N, D) and b (N,).
    """
    if side not in ("tail", "head"):
        raise ValueError(f"side must be 'tail' or 'head', got {side!r}")
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
          codes: torch.Tensor | int) -> torch.Tensor:
    """(N,) scores of N edges (row i: lhs[i], relation_vectors[i], rhs[i], codes[i])."""
    q, b = relation_query(lhs, relation_vectors, codes, "tail")
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
        self.operators = [Operator(r.operator) for r in model_config.relations]
        self.large_embeddings = LargeEmbeddings(model_config.embeddings)
        self.all_trans_embs = nn.Parameter(
            torch.empty(self.num_relations, self.embedding_dim))
        # Not a parameter, not in the state dict: the config says it.
        self.register_buffer("operator_codes", torch.tensor(
            [operator_code(op) for op in self.operators], dtype=torch.long), persistent=False)
        # One operator for every relation (the usual case): dispatch on an int, no sort.
        codes = {operator_code(op) for op in self.operators}
        self.single_operator_code = codes.pop() if len(codes) == 1 else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each relation vector starts neutral for its operator: the score is dot(lhs, rhs)."""
        with torch.no_grad():
            for index, operator in enumerate(self.operators):
                self.all_trans_embs[index].copy_(
                    initial_relation_vector(operator, self.embedding_dim))

    def lookup(self, batch: EdgeBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(lhs, rhs) embeddings, each (B, D), read from the tables by name."""
        lhs, rhs, _, _ = self.lookup_all(batch)
        return lhs, rhs

    def lookup_all(self, batch: EdgeBatch) -> tuple[torch.Tensor, ...]:
        """(lhs, rhs) (B, D) and the global negatives (negative_lhs, negative_rhs) (B, G, D).

        Each lookup is non-empty in exactly one table, so summing the pooled output over
        its tables gives the lookup's vector. The sum adds the T column blocks of the
        KeyedTensor's values: independent of the key order (sharding reorders it; all tables
        share one dim), and its backward is one `cat`. (A `view(N, T, D).sum(1)` measured
        1.4x slower: its backward copies from an expanded tensor.)
        """
        values = self.large_embeddings(batch.nodes).values()
        return split_lookups(sum_table_blocks(values, self.embedding_dim), batch.rels)

    def forward(self, batch: EdgeBatch) -> dict[str, torch.Tensor]:
        """Logits of the B positives, the in-batch negatives, then the global negatives.

        Each side's query (`relation_query`) is computed once and shared by the positives and
        both kinds of negatives: the same scores as calling `score`,
        `in_batch_negative_logits` and `global_negative_logits`, with half the work.
        """
        lhs, rhs, negative_lhs, negative_rhs = self.lookup_all(batch)
        relation_vectors = self.all_trans_embs[batch.rels]
        codes = self.single_operator_code
        if codes is None:
            codes = self.operator_codes[batch.rels]
        tail_query = relation_query(lhs, relation_vectors, codes, "tail")
        positives = (tail_query[0] * rhs).sum(-1) + tail_query[1]
        logits = [positives]
        if self.in_batch_negatives or self.global_negatives:
            head_query = relation_query(rhs, relation_vectors, codes, "head")
            logits.append(_in_batch_logits(lhs, rhs, batch.rels, tail_query, head_query,
                                           self.in_batch_negatives))
            logits.append(_global_logits(negative_lhs, negative_rhs, tail_query, head_query))
        logits = torch.cat(logits)
        return {"logits": logits, "probabilities": torch.sigmoid(logits)}


def sum_table_blocks(values: torch.Tensor, dim: int) -> torch.Tensor:
    """(N, D): the sum of the T column blocks of a pooled (N, T*D) lookup output."""
    blocks = values.split(dim, dim=1)
    x = blocks[0]
    for block in blocks[1:]:
        x = x + block
    return x


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


def global_negative_logits(lhs: torch.Tensor, rhs: torch.Tensor, negative_lhs: torch.Tensor,
                           negative_rhs: torch.Tensor, relation_vectors: torch.Tensor,
                           codes: torch.Tensor | int) -> torch.Tensor:
    """`2 * B * G` logits: each lhs against its G negative rhs, each rhs against G lhs."""
    if negative_lhs.shape[1] == 0:
        return lhs.new_zeros(0)
    return _global_logits(negative_lhs, negative_rhs,
                          relation_query(lhs, relation_vectors, codes, "tail"),
                          relation_query(rhs, relation_vectors, codes, "head"))


def _global_logits(negative_lhs: torch.Tensor, negative_rhs: torch.Tensor,
                   tail_query: Query, head_query: Query) -> torch.Tensor:
    if negative_lhs.shape[1] == 0:
        return negative_lhs.new_zeros(0)
    q, b = tail_query
    tails = torch.einsum("bd,bgd->bg", q, negative_rhs) + b.unsqueeze(1)
    q, b = head_query
    heads = torch.einsum("bd,bgd->bg", q, negative_lhs) + b.unsqueeze(1)
    return torch.cat([tails.reshape(-1), heads.reshape(-1)])


def in_batch_negative_logits(lhs: torch.Tensor, rhs: torch.Tensor, rels: torch.Tensor,
                             translations: torch.Tensor, n: int,
                             operator_codes: torch.Tensor | None = None) -> torch.Tensor:
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
    return _in_batch_logits(lhs, rhs, rels, relation_query(lhs, relation_vectors, codes, "tail"),
                            relation_query(rhs, relation_vectors, codes, "head"), n)


def _in_batch_logits(lhs: torch.Tensor, rhs: torch.Tensor, rels: torch.Tensor,
                     tail_query: Query, head_query: Query, n: int) -> torch.Tensor:
    if not n:
        return lhs.new_zeros(0)
    # Sampling touches index tensors only; the vectors are then gathered once per side and
    # scored with one matrix product against every relation's samples, of which each row
    # keeps its own relation's n columns. (Gathering per relation costs a zero-filled
    # gradient buffer of the whole batch per gather in backward: measured 2x slower.)
    present = torch.unique(rels)
    lhs_samples, rhs_samples = [], []
    for relation in present.tolist():
        rows = torch.nonzero(rels == relation).squeeze(1)
        count = rows.numel()
        repeats = math.ceil(n / count)
        lhs_samples.append(rows[torch.randperm(count, device=rows.device).repeat(repeats)[:n]])
        rhs_samples.append(rows[torch.randperm(count, device=rows.device).repeat(repeats)[:n]])
    columns = torch.searchsorted(present, rels).unsqueeze(1) * n + \
        torch.arange(n, device=rels.device).unsqueeze(0)                 # (B, n)
    q, b = tail_query
    tails = (q @ rhs[torch.cat(rhs_samples)].T).gather(1, columns) + b.unsqueeze(1)
    q, b = head_query
    heads = (q @ lhs[torch.cat(lhs_samples)].T).gather(1, columns) + b.unsqueeze(1)
    return torch.cat([tails.reshape(-1), heads.reshape(-1)])


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


# TorchRec's train pipeline traces the model with torch.fx to find the sharded lookups;
# these functions hold data-dependent shapes, so the tracer records them as calls.
torch.fx.wrap("in_batch_negative_logits")
torch.fx.wrap("labels_and_weights")
torch.fx.wrap("relation_query")
torch.fx.wrap("split_lookups")
torch.fx.wrap("sum_table_blocks")
torch.fx.wrap("global_negative_logits")
torch.fx.wrap("_in_batch_logits")
torch.fx.wrap("_global_logits")


def apply_optimizers(model: TwhinModel, model_config: TwhinModelConfig) -> TwhinModel:
    """Attach each table's optimizer to its weights (`tml.trainer.fused_tables`)."""
    apply_table_optimizers(model, model_config.embeddings.tables)
    return model


class TwhinModelAndLoss(nn.Module):
    """The model plus weighted binary cross-entropy; returns `(loss, outputs)`.

    Labels: the batch's labels (1) for positives, 0 for negatives. Weights: the batch's edge
    weights for positives; each negative weighs `B / num_negatives`, so negatives as a whole
    weigh as much as the positives.
    """

    def __init__(self, model: TwhinModel,
                 loss_fn: Callable[..., torch.Tensor] = nn.functional.binary_cross_entropy_with_logits,
                 data_config: TwhinDataConfig | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: EdgeBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        outputs = self.model(batch)
        labels, weights = labels_and_weights(outputs["logits"], batch.labels, batch.weights)
        loss = self.loss_fn(outputs["logits"], labels, weights)
        outputs.update({"loss": loss.detach(), "labels": labels, "weights": weights})
        return loss, outputs
