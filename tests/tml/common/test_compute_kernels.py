"""Compute kernels per table (`compute_kernel`, `cache_load_factor` in a table's config):
what the planner may choose on each device, the one-line refusals, and real sharding."""

from __future__ import annotations

import json
import subprocess
import sys

import pydantic
import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig as TorchrecTable
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from tests.conftest import REPO
from tests.launch_checks import launch_checks
from tml.common.modules.embedding.config import EmbeddingBagConfig
from tml.common.sharding import _constraints
from tml.errors import ConfigError


def _ebc(dim: int = 8) -> torch.nn.Module:
    tables = [TorchrecTable(name=name, embedding_dim=dim, num_embeddings=rows,
                            feature_names=[name]) for name, rows in (("user", 60),
                                                                      ("tweet", 40))]
    return EmbeddingBagCollection(tables=tables, device=torch.device("meta"))


def _table(**extra: object) -> dict[str, object]:
    return {"name": "user", "num_embeddings": 10, "embedding_dim": 4,
            "optimizer": {"sgd": {"lr": 0.1}}, **extra}


def test_the_kernel_and_cache_fields_are_validated() -> None:
    table = EmbeddingBagConfig.model_validate(
        _table(compute_kernel="fused_uvm_caching", cache_load_factor=0.1))
    assert table.compute_kernel.value == "fused_uvm_caching"
    assert table.cache_load_factor == 0.1
    with pytest.raises(pydantic.ValidationError, match="compute_kernel"):
        EmbeddingBagConfig.model_validate(_table(compute_kernel="uvm"))
    with pytest.raises(pydantic.ValidationError, match="only used with compute_kernel"):
        EmbeddingBagConfig.model_validate(_table(compute_kernel="fused",
                                                 cache_load_factor=0.5))
    for bad in (0, 1.5, -0.1):
        with pytest.raises(pydantic.ValidationError, match="cache_load_factor"):
            EmbeddingBagConfig.model_validate(
                _table(compute_kernel="fused_uvm_caching", cache_load_factor=bad))


def test_the_planner_is_offered_what_each_device_runs() -> None:
    cpu = _constraints(_ebc(), {}, 1, "cpu")
    assert {name: c.compute_kernels for name, c in cpu.items()} == \
        {"user": ["fused"], "tweet": ["fused"]}
    # On CUDA a table with no choice may fall back to the unified-memory cache when the
    # GPU's memory is short; a chosen kernel is the only one offered.
    cuda = _constraints(_ebc(), {}, 1, "cuda", {"user": "fused_uvm_caching"},
                        {"user": 0.25})
    assert cuda["tweet"].compute_kernels == ["fused", "fused_uvm_caching"]
    assert cuda["user"].compute_kernels == ["fused_uvm_caching"]
    assert cuda["user"].cache_params.load_factor == 0.25
    assert cuda["tweet"].cache_params is None


@pytest.mark.parametrize("kernel", ["fused_uvm", "fused_uvm_caching"])
def test_unified_memory_kernels_are_refused_on_cpu_in_one_line(kernel: str) -> None:
    with pytest.raises(ConfigError) as refused:
        _constraints(_ebc(), {}, 1, "cpu", {"user": kernel})
    message = str(refused.value)
    assert "\n" not in message
    assert f"table 'user': compute_kernel {kernel} needs CUDA" in message


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_dim_that_is_not_a_multiple_of_4_is_refused_in_one_line(device: str) -> None:
    """Not TorchRec's AssertionError from inside sharding: the table, its dim, a fix."""
    with pytest.raises(ConfigError) as refused:
        _constraints(_ebc(dim=6), {}, 1, device)
    assert str(refused.value) == ("table 'user': embedding_dim 6 is not a multiple of 4, "
                                  "which fbgemm's embedding kernels need (try 8)")
    assert _constraints(_ebc(dim=12), {}, 1, device)["user"].compute_kernels


@pytest.mark.slow
def test_a_table_sharded_with_the_chosen_kernel_trains_on_cpu() -> None:
    from tests.kernel_checks import planned_kernels

    result = launch_checks(planned_kernels, 1, "fused")[0]
    assert result["kernels"] == {"user": "fused", "tweet": "fused"}
    assert result["moved"] > 1e-4


@pytest.mark.gpu
@pytest.mark.slow
def test_a_table_in_the_unified_memory_cache_trains_on_cuda() -> None:
    """TorchRec's UVM caching kernel (rows in host memory, a GPU cache of 20%) is what the
    planner places for the user table, and a step trains it; the other table stays fused."""
    from tests.conftest import gpu_env

    code = ("import torch; assert torch.cuda.is_available(), 'torch without CUDA';"
            "from tml.common.run_training import launch_function;"
            "from tests.kernel_checks import planned_kernels;"
            "import json;"
            "print(json.dumps(launch_function(planned_kernels, 1, 'fused_uvm_caching', 0.2)[0]))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=gpu_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["kernels"] == {"user": "fused_uvm_caching", "tweet": "fused"}
    assert result["moved"] > 1e-4
