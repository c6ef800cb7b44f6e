"""`native_sgd_lookup` against fbgemm's own CPU kernel: the same pooled rows forward, the same
SGD update backward (to float rounding), at the kernel's learning rate; kernels it cannot
stand in for are named, and ids outside their table are refused."""

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    ComputeDevice,
    SplitTableBatchedEmbeddingBagsCodegen,
)

from tests.conftest import require
from tml.common.native_sgd_lookup import NativeSGDLookup, TableLayout, library, native_sgd_layout

TABLES = [(50, 8), (30, 16)]
FEATURES = [0, 1, 1]              # the second table serves two features
BATCH = 6


def _kernel(optimizer: EmbOptimType = EmbOptimType.EXACT_SGD,
            pooling: PoolingMode = PoolingMode.SUM) -> SplitTableBatchedEmbeddingBagsCodegen:
    torch.manual_seed(0)
    kernel = SplitTableBatchedEmbeddingBagsCodegen(
        [(rows, dim, EmbeddingLocation.HOST, ComputeDevice.CPU) for rows, dim in TABLES],
        optimizer=optimizer, learning_rate=0.3, feature_table_map=FEATURES,
        pooling_mode=pooling)
    with torch.no_grad():
        kernel.weights_host.uniform_(-1, 1)
    return kernel


def _bags(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Bags of 0 to 3 ids per (feature, sample), ids repeating within and across bags."""
    lengths = torch.randint(0, 4, (len(FEATURES) * BATCH,), generator=generator)
    rows = [TABLES[FEATURES[bag // BATCH]][0] for bag in range(len(lengths))]
    ids = torch.cat([torch.randint(0, min(r, 5), (int(n),), generator=generator)
                     for r, n in zip(rows, lengths)])
    return ids, torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])


def test_lookups_and_updates_are_fbgemm_s():
    lib = library()
    require(lib is not None, "a C compiler for the native SGD lookups")
    fbgemm, native = _kernel(), _kernel()
    layout = native_sgd_layout(native)
    assert isinstance(layout, TableLayout), layout
    generator = torch.Generator().manual_seed(1)
    for step in range(4):
        ids, offsets = _bags(generator)
        want = fbgemm(indices=ids, offsets=offsets)
        got = NativeSGDLookup.apply(native.weights_host, ids, offsets, native, layout, lib)
        if step == 0:                              # the same tables: the same sums
            assert torch.equal(got, want.detach())
        torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-6)
        grad = torch.randn(want.shape, generator=generator)
        want.backward(grad)
        got.backward(grad)
        torch.testing.assert_close(native.weights_host.detach(), fbgemm.weights_host.detach(),
                                   rtol=1e-6, atol=1e-6)
        assert native.weights_host.grad is None
        for kernel in (fbgemm, native):               # a schedule's change reaches both
            kernel.set_learning_rate(kernel.get_learning_rate() * 0.5)
    moved = (native.weights_host.detach() - _kernel().weights_host.detach()).abs().max()
    assert moved > 1e-3


def test_kernels_it_cannot_stand_in_for_are_named():
    assert "optimizer" in native_sgd_layout(_kernel(EmbOptimType.EXACT_ADAGRAD))
    assert "pooling" in native_sgd_layout(_kernel(pooling=PoolingMode.MEAN))


def test_ids_outside_their_table_and_bad_offsets_are_refused():
    lib = library()
    require(lib is not None, "a C compiler for the native SGD lookups")
    kernel = _kernel()
    layout = native_sgd_layout(kernel)
    before = kernel.weights_host.detach().clone()
    offsets = torch.arange(len(FEATURES) * BATCH + 1)
    ids = torch.zeros(len(FEATURES) * BATCH, dtype=torch.int64)
    ids[BATCH + 2] = 30                    # feature 1's table has rows 0-29
    with pytest.raises(ValueError, match="id 30 .position 8. is outside its table"):
        NativeSGDLookup.apply(kernel.weights_host, ids, offsets, kernel, layout, lib)
    ids[BATCH + 2] = -1
    with pytest.raises(ValueError, match="outside its table"):
        NativeSGDLookup.apply(kernel.weights_host, ids, offsets, kernel, layout, lib)
    ids[BATCH + 2] = 0
    bad = offsets.clone()
    bad[3] = 100                           # past the ids
    with pytest.raises(ValueError, match="malformed offsets"):
        NativeSGDLookup.apply(kernel.weights_host, ids, bad, kernel, layout, lib)
    assert torch.equal(kernel.weights_host.detach(), before)
