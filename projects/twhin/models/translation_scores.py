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

On CPU in float32 with a dim that is a multiple of 16, forward and backward are each one
call into `translation_kernel.c` (built by `tml.common.native`), which reads each edge's rows
once and keeps its block's candidates in L1: about half the torch ops' time at `make
bench`'s 4000 edges (docs/performance.md). Elsewhere (a GPU, other dtypes or dims, no C
compiler, `TML_NATIVE=0`) the torch ops below run.
"""

from __future__ import annotations

import ctypes
import os

import torch

from tml.common import native

# The kernel handles rows as 16-float vectors; other dims keep torch's path.
KERNEL_DIM_MULTIPLE = 16
KERNEL_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "translation_kernel.c")
_SIGNATURES = {
    "tml_translation_forward": [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                ctypes.c_void_p],
    "tml_translation_backward": [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                 ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                 ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                 ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                 ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p],
}


def translation_kernel() -> ctypes.CDLL | None:
    """The compiled `translation_kernel.c` (`tml.common.native`), or None: torch ops then."""
    return native.load_functions(KERNEL_SOURCE, _SIGNATURES)


def _uses_kernel(pair: torch.Tensor, vectors: torch.Tensor) -> ctypes.CDLL | None:
    if (pair.device.type != "cpu" or pair.dtype != torch.float32
            or vectors.dtype != torch.float32 or pair.shape[2] % KERNEL_DIM_MULTIPLE):
        return None
    return translation_kernel()


def _int64s(values: list[int]) -> ctypes.Array:
    return (ctypes.c_int64 * len(values))(*values)


def _checked(status: int, what: str) -> None:
    if status:
        raise ValueError(f"translation kernel's {what}: the batch's relation blocks or "
                         f"candidate rows are out of range (status {status})")


class TranslationScores(torch.autograd.Function):
    """(B + 2 B n,) logits from `pair` (B, 2, D: lhs, rhs of each edge) and `vectors` (R, D)."""

    @staticmethod
    def forward(ctx, pair: torch.Tensor, vectors: torch.Tensor,  # noqa: ANN001
                relations: list[int], counts: list[int], lhs_rows: torch.Tensor,
                rhs_rows: torch.Tensor, n: int) -> torch.Tensor:
        ctx.relations, ctx.counts, ctx.n = relations, counts, n
        kernel = _uses_kernel(pair, vectors)
        ctx.kernel = kernel
        if kernel is not None:
            return _kernel_forward(ctx, kernel, pair, vectors, lhs_rows, rhs_rows)
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
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
        if ctx.kernel is not None:
            return (*_kernel_backward(ctx, grad), None, None, None, None, None)
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


def _kernel_forward(ctx, kernel: ctypes.CDLL, pair: torch.Tensor, vectors: torch.Tensor,  # noqa: ANN001
                    lhs_rows: torch.Tensor, rhs_rows: torch.Tensor) -> torch.Tensor:
    """`TranslationScores.forward` in `translation_kernel.c`: the same logits, one call."""
    pair, vectors = pair.contiguous(), vectors.detach().contiguous()
    lhs_rows, rhs_rows = lhs_rows.to(torch.int64).contiguous(), rhs_rows.to(torch.int64).contiguous()
    num_edges, dim = pair.shape[0], pair.shape[2]
    n = ctx.n
    out = pair.new_empty(num_edges + 2 * num_edges * n)
    scratch = pair.new_empty(max(1, n))
    _checked(kernel.tml_translation_forward(
        pair.data_ptr(), num_edges, dim, vectors.data_ptr(), vectors.shape[0],
        len(ctx.counts), _int64s(ctx.relations), _int64s(ctx.counts), lhs_rows.data_ptr(),
        rhs_rows.data_ptr(), n, scratch.data_ptr(), out.data_ptr()), "forward")
    ctx.save_for_backward(pair, vectors, lhs_rows, rhs_rows)
    return out


def _kernel_backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """`TranslationScores.backward` in `translation_kernel.c`: d_pair (B, 2, D), d_vectors."""
    pair, vectors, lhs_rows, rhs_rows = ctx.saved_tensors
    grad = grad.to(torch.float32).contiguous()
    num_edges, dim = pair.shape[0], pair.shape[2]
    n = ctx.n
    d_pair = torch.empty_like(pair)
    d_vectors = torch.zeros_like(vectors)
    scratch = pair.new_empty(2 * n * dim + n + 1)
    _checked(ctx.kernel.tml_translation_backward(
        pair.data_ptr(), num_edges, dim, vectors.data_ptr(), vectors.shape[0],
        len(ctx.counts), _int64s(ctx.relations), _int64s(ctx.counts), lhs_rows.data_ptr(),
        rhs_rows.data_ptr(), n, grad.data_ptr(), scratch.data_ptr(), d_pair.data_ptr(),
        d_vectors.data_ptr()), "backward")
    return d_pair, d_vectors
