"""The positives' and in-batch negatives' logits of translation relations, in one autograd
step from the (B, 2, D) lookups.

Why: with the translation operator and in-batch negatives (TwHIN's original model, `make
bench`'s), the generic path builds each side's query (`lhs` with the bias `(lhs * r).sum`,
`rhs + r`), each edge's relation vector (a one-hot product), splits the lookups into `lhs`
and `rhs`, and autograd then runs a backward for each of those (B, D) steps and stacks the
two sides' gradients back into one (B, 2, D) tensor for the embedding kernel. Here the
relation vector is constant within a relation's block of rows, so it enters each block as
a bias (a product of the block with one vector), and the backward writes both sides'
gradients straight into one (B, 2, D) tensor: the kernel's gradient, no stack.

For relation r's block S (rows [a, a + c) of the grouped batch) and its n candidates per
side (rhs rows `rhs_rows[k n:(k + 1) n]` for the tail side, lhs rows `lhs_rows[...]` for the
head side; `models._in_batch_sample`):

    positive_i  = <l_i, h_i> + <l_i, r>           (h: rhs; dot(lhs, rhs + r))
    tail_ij     = <l_i, t_j> + <l_i, r>           (t_j: the j-th rhs candidate)
    head_ij     = <h_i, s_j> + <s_j, r>           (s_j: the j-th lhs candidate; dot(rhs + r, s))

the same logits, in the same layout (B positives, then B x n tail, then B x n head), as
`models._BlockScores` given the translation queries, up to float rounding
(tests/projects/twhin/test_translation_scores.py).
"""

from __future__ import annotations

import torch


class TranslationScores(torch.autograd.Function):
    """(B + 2 B n,) logits from `pair` (B, 2, D: lhs, rhs of each edge) and `vectors` (R, D)."""

    @staticmethod
    def forward(ctx, pair: torch.Tensor, vectors: torch.Tensor,  # noqa: ANN001
                relations: list[int], counts: list[int], lhs_rows: torch.Tensor,
                rhs_rows: torch.Tensor, n: int) -> torch.Tensor:
        num_edges = pair.shape[0]
        lhs, rhs = pair[:, 0], pair[:, 1]
        tail_c, head_c = rhs.index_select(0, rhs_rows), lhs.index_select(0, lhs_rows)
        out = pair.new_empty(num_edges + 2 * num_edges * n)
        positives = out[:num_edges]
        torch.sum(lhs * rhs, dim=1, out=positives)
        blocks = out[num_edges:].view(2, num_edges, n)
        start = 0
        for block, (relation, count) in enumerate(zip(relations, counts)):
            rows, cols = slice(start, start + count), slice(block * n, (block + 1) * n)
            r = vectors[relation]
            bias = lhs[rows] @ r                                      # <l_i, r>
            positives[rows] += bias
            torch.addmm(bias.unsqueeze(1), lhs[rows], tail_c[cols].T,
                        out=blocks[0, rows])
            torch.addmm((head_c[cols] @ r).unsqueeze(0), rhs[rows], head_c[cols].T,
                        out=blocks[1, rows])
            start += count
        ctx.save_for_backward(pair, vectors, tail_c, head_c, lhs_rows, rhs_rows)
        ctx.relations, ctx.counts, ctx.n = relations, counts, n
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
        pair, vectors, tail_c, head_c, lhs_rows, rhs_rows = ctx.saved_tensors
        n, num_edges = ctx.n, pair.shape[0]
        lhs, rhs = pair[:, 0], pair[:, 1]
        g_pos = grad[:num_edges]
        g_tail, g_head = grad[num_edges:].view(2, num_edges, n).unbind(0)
        d_pair = torch.empty_like(pair, memory_format=torch.contiguous_format)
        d_lhs, d_rhs = d_pair[:, 0], d_pair[:, 1]
        d_tail_c = torch.empty_like(tail_c, memory_format=torch.contiguous_format)
        d_head_c = torch.empty_like(head_c, memory_format=torch.contiguous_format)
        d_vectors = torch.zeros_like(vectors)
        # Each row's coefficient of r in its lhs gradient: its positive's and its n tail
        # negatives' gradients.
        r_weight = g_pos + g_tail.sum(1)
        start = 0
        for block, (relation, count) in enumerate(zip(ctx.relations, ctx.counts)):
            rows, cols = slice(start, start + count), slice(block * n, (block + 1) * n)
            r = vectors[relation]
            torch.mm(g_tail[rows], tail_c[cols], out=d_lhs[rows])
            d_lhs[rows].addr_(r_weight[rows], r)
            torch.mm(g_head[rows], head_c[cols], out=d_rhs[rows])
            torch.mm(g_tail[rows].T, lhs[rows], out=d_tail_c[cols])
            head_weight = g_head[rows].sum(0)                          # (n,)
            torch.mm(g_head[rows].T, rhs[rows], out=d_head_c[cols])
            d_head_c[cols].addr_(head_weight, r)
            d_vectors[relation].addmv_(lhs[rows].T, r_weight[rows]) \
                .addmv_(head_c[cols].T, head_weight)
            start += count
        d_lhs.addcmul_(g_pos.unsqueeze(1), rhs)
        d_rhs.addcmul_(g_pos.unsqueeze(1), lhs)
        d_rhs.index_add_(0, rhs_rows, d_tail_c)
        d_lhs.index_add_(0, lhs_rows, d_head_c)
        return d_pair, d_vectors, None, None, None, None, None
