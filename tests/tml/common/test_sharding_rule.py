"""The rule that picks the memory-safe layout (one fused kernel per table), tested on its
own so that tests/benchmarks/test_scale.py can force the layout instead of relying on the host's size."""

from __future__ import annotations

import pytest
import torch
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from tml.common import sharding

GIB = 2**30


def _model(*tables: tuple[int, int, DataType]) -> torch.nn.Module:
    """Tables of (rows, dim, data type) on the meta device: sized, never allocated."""
    configs = [EmbeddingBagConfig(name=f"t{i}", num_embeddings=rows, embedding_dim=dim,
                                  feature_names=[f"f{i}"], data_type=data_type)
               for i, (rows, dim, data_type) in enumerate(tables)]
    return torch.nn.Sequential(EmbeddingBagCollection(configs, device=torch.device("meta")))


@pytest.fixture
def host_24_gib(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TML_ONE_KERNEL_PER_TABLE", raising=False)
    monkeypatch.setattr(sharding, "host_memory_bytes", lambda: 24 * GIB)


def test_table_bytes_count_every_table_at_its_width() -> None:
    model = _model((1000, 32, DataType.FP32), (500, 16, DataType.FP16))
    assert sharding.table_bytes(model) == 1000 * 32 * 4 + 500 * 16 * 2


def test_tables_over_5_percent_of_host_memory_get_a_kernel_each(host_24_gib: None) -> None:
    limit = int(0.05 * 24 * GIB)                       # 1.2 GiB of the 24 GiB host
    rows = limit // (32 * 4)
    assert not sharding.one_kernel_per_table(_model((rows, 32, DataType.FP32)))
    assert sharding.one_kernel_per_table(_model((rows + 1, 32, DataType.FP32)))
    # fp16 rows weigh half: about twice the rows for the same bytes
    fp16_rows = limit // (32 * 2)
    assert fp16_rows > 2 * rows - 2
    assert not sharding.one_kernel_per_table(_model((fp16_rows, 32, DataType.FP16)))
    assert sharding.one_kernel_per_table(_model((fp16_rows + 1, 32, DataType.FP16)))
    # the sum of the tables counts, not the largest
    half = rows // 2 + 1
    assert sharding.one_kernel_per_table(_model((half, 32, DataType.FP32),
                                                (half, 32, DataType.FP32)))


@pytest.mark.parametrize("forced,expected", [("1", True), ("0", False)])
def test_the_environment_forces_either_layout(host_24_gib: None,
                                              monkeypatch: pytest.MonkeyPatch,
                                              forced: str, expected: bool) -> None:
    monkeypatch.setenv("TML_ONE_KERNEL_PER_TABLE", forced)
    assert sharding.one_kernel_per_table(_model((10, 4, DataType.FP32))) is expected
    assert sharding.one_kernel_per_table(_model((10**9, 32, DataType.FP32))) is expected


def test_other_values_of_the_variable_leave_the_rule_in_charge(
        host_24_gib: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TML_ONE_KERNEL_PER_TABLE", "yes")
    assert not sharding.one_kernel_per_table(_model((10, 4, DataType.FP32)))
    assert sharding.one_kernel_per_table(_model((10**9, 32, DataType.FP32)))
