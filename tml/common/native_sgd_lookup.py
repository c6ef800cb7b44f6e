"""One worker's lookups and SGD updates of fbgemm's CPU tables, in `embedding_sgd.c`.

Why: with one CPU worker, TwHIN's step spent ~36% in fbgemm's TBE: the Python around its
forward (input preparation, VBE metadata, a bounds check) and its exact-SGD backward, which
sorts the ids to sum each row's gradients before the update. For sum pooling and plain SGD
(no weight decay, clipping or max-norm; fp32 rows) the update is linear, so the C loops
read each looked-up row once forward and update it once backward, on fbgemm's own storage:
the same tables, checkpoints and optimizer state (there is none), the same learning rate
(the kernel's, which the LR schedule sets). Results equal fbgemm's to float rounding (a
row that repeats in a batch gets its gradients one at a time instead of summed first);
tests/tml/common/test_native_sgd_lookup.py trains both ways.

`native_sgd_layout(kernel)` says whether a kernel qualifies and how its tables are laid out;
`NativeSGDLookup` is the autograd function. Anything else (Adagrad, other poolings, weighted
ids, a GPU, no C compiler, `TML_NATIVE=0`) keeps fbgemm's kernel.
"""

from __future__ import annotations

import ctypes
import os
from typing import NamedTuple

import torch
from torch import nn

from tml.common import native

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "embedding_sgd.c")
_P, _I = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "tml_pooled_lookup": [_P, _I, _P, _P, _P, _I, _I, _I, _P, _P, _P],
    "tml_pooled_sgd": [_P, _I, _P, _P, _P, _I, _I, _I, _P, _P, _P, ctypes.c_float],
}


class TableLayout(NamedTuple):
    """Where each feature's table lives in a kernel's flat storage (see embedding_sgd.c)."""

    weight_offsets: torch.Tensor     # (F,) int64
    rows: torch.Tensor               # (F,) int64
    cols: torch.Tensor               # (F + 1,) int64
    total_dim: int


def library() -> ctypes.CDLL | None:
    """The compiled `embedding_sgd.c`, or None (fbgemm's kernel then)."""
    return native.load_functions(SOURCE, _SIGNATURES)


def native_sgd_layout(kernel: nn.Module) -> TableLayout | str:
    """The layout of an fbgemm `SplitTableBatchedEmbeddingBagsCodegen` whose lookups and
    updates `NativeSGDLookup` can do, else why not."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode

    if getattr(kernel, "optimizer", None) != EmbOptimType.EXACT_SGD:
        return f"optimizer {getattr(kernel, 'optimizer', None)}"
    if getattr(kernel, "pooling_mode", None) != PoolingMode.SUM:
        return f"pooling {getattr(kernel, 'pooling_mode', None)}"
    if getattr(kernel, "weights_precision", None) != SparseType.FP32:
        return f"weights {getattr(kernel, 'weights_precision', None)}"
    args = getattr(kernel, "optimizer_args", None)
    if args is None or args.gradient_clipping or args.weight_decay or args.max_norm \
            or args.weight_decay_mode or args.regularization_mode:
        return "weight decay, clipping, max-norm or regularisation"
    host = getattr(kernel, "weights_host", None)
    if not isinstance(host, torch.Tensor) or host.device.type != "cpu" or not host.numel() \
            or not host.is_contiguous() or not host.requires_grad:
        return "no contiguous CPU storage"
    tables = list(kernel.split_embedding_weights())
    features = list(kernel.feature_table_map)
    cols = kernel.D_offsets.to(torch.int64)
    offsets = kernel.weights_offsets.to(torch.int64)
    if len(cols) != len(features) + 1 or len(offsets) != len(features):
        return "unexpected layout"
    for feature, table in enumerate(features):
        weight = tables[table]
        start = weight.data_ptr() - host.data_ptr()
        if weight.dim() != 2 or start != int(offsets[feature]) * host.element_size() \
                or weight.shape[1] != int(cols[feature + 1] - cols[feature]) \
                or not weight.is_contiguous():
            return "unexpected layout"
    rows = torch.tensor([tables[t].shape[0] for t in features], dtype=torch.int64)
    return TableLayout(offsets.contiguous(), rows, cols.contiguous(), int(cols[-1]))


class NativeSGDLookup(torch.autograd.Function):
    """(batch, total_dim) sum-pooled rows of `kernel`'s tables; backward updates the rows
    with plain SGD at the kernel's learning rate, as fbgemm's fused kernel would, and
    returns no gradient for the storage."""

    @staticmethod
    def forward(ctx, host: torch.Tensor, indices: torch.Tensor,  # noqa: ANN001
                offsets: torch.Tensor, kernel: nn.Module, layout: TableLayout,
                lib: ctypes.CDLL) -> torch.Tensor:
        indices = indices.to(torch.int64).contiguous()
        offsets = offsets.to(torch.int64).contiguous()
        num_features = layout.rows.numel()
        batch = (offsets.numel() - 1) // max(1, num_features)
        if batch * num_features + 1 != offsets.numel():
            raise ValueError(f"{offsets.numel() - 1} bags for {num_features} features")
        out = host.new_empty(batch, layout.total_dim)
        _checked(lib.tml_pooled_lookup(
            host.data_ptr(), num_features, layout.weight_offsets.data_ptr(),
            layout.rows.data_ptr(), layout.cols.data_ptr(), layout.total_dim, batch,
            indices.numel(), indices.data_ptr(), offsets.data_ptr(), out.data_ptr()), indices)
        ctx.host, ctx.indices, ctx.offsets, ctx.kernel, ctx.layout, ctx.lib, ctx.batch = \
            host, indices, offsets, kernel, layout, lib, batch
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, ...]:  # noqa: ANN001
        layout = ctx.layout
        grad = grad.to(torch.float32).contiguous()
        with torch.no_grad():
            _checked(ctx.lib.tml_pooled_sgd(
                ctx.host.data_ptr(), layout.rows.numel(), layout.weight_offsets.data_ptr(),
                layout.rows.data_ptr(), layout.cols.data_ptr(), layout.total_dim, ctx.batch,
                ctx.indices.numel(), ctx.indices.data_ptr(), ctx.offsets.data_ptr(),
                grad.data_ptr(), float(ctx.kernel.get_learning_rate())), ctx.indices)
        return None, None, None, None, None, None


def _checked(status: int, indices: torch.Tensor) -> None:
    if status > 0:
        raise ValueError(f"embedding lookup: id {int(indices[status - 1])} (position "
                         f"{status - 1}) is outside its table")
    if status < 0:
        raise ValueError("embedding lookup: malformed offsets")
