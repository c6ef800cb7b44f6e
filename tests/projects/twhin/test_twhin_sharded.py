"""A sharded TwHIN step on 2 gloo workers equals plain torch on the full tables.

All CPU checks share one launch (tests/distributed_checks.py:all_sharded_checks); the
reference computes every logit edge by edge, independently of the model's batched code.
"""

import os
import subprocess
import sys

import pytest

from tests.conftest import require
from tests.distributed_checks import OPERATOR_TYPES, PLAIN_TYPES
from tests.launch_checks import launch_checks
from tests.twhin_setup import REPO


@pytest.fixture(scope="module")
def sharded_results() -> dict:
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = REPO + os.pathsep + (previous or "")
    try:
        from tests.distributed_checks import all_sharded_checks

        return launch_checks(all_sharded_checks, 2)
    finally:
        if previous is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = previous


def _assert_matches(results: dict, part: str, types: list[str]) -> None:
    assert sorted(results) == [0, 1]
    for rank, per_part in results.items():
        for sharding_type in types:
            diffs = per_part[part][sharding_type]
            assert diffs["changed"] > 1e-3, (rank, sharding_type, diffs)  # the step did update
            for key, value in diffs.items():
                if key != "changed":
                    assert value < 1e-5, (rank, sharding_type, key, diffs)


@pytest.mark.slow
def test_forward_backward_and_update_match_reference_for_every_sharding_type(sharded_results):
    _assert_matches(sharded_results, "plain", PLAIN_TYPES)


@pytest.mark.slow
def test_global_negatives_and_operators_match_reference_when_sharded(sharded_results):
    """Global negative ids travel in the batch KJT through the sharded tables."""
    _assert_matches(sharded_results, "operators", OPERATOR_TYPES)


@pytest.mark.slow
def test_the_compiled_translation_scores_match_reference_when_sharded(sharded_results):
    """At dim 16, batches in relation order, the translation scores run in
    `translation_kernel.c` on tables sharded over 2 workers: the same loss and updates as
    the reference."""
    require(all(r["kernel_used"] for r in sharded_results.values()),
            "a C compiler for the translation kernel")
    _assert_matches(sharded_results, "kernel_dim", PLAIN_TYPES)


@pytest.mark.slow
def test_gathered_global_negatives_match_reference_when_sharded(sharded_results):
    """The same negatives scored from whole-table lookups (row-wise: each rank holds part
    of every table) give the reference's loss and updates."""
    _assert_matches(sharded_results, "gathered", OPERATOR_TYPES)


@pytest.mark.slow
def test_adam_on_the_tables_is_refused_on_cpu_by_table_name(sharded_results):
    for rank in (0, 1):
        assert sharded_results[rank]["adam"] == (
            "ConfigError: table 'user': adam is not available for embedding tables on CPU "
            "(fbgemm's CPU kernels fuse sgd and adagrad); use adagrad, or train on CUDA")


@pytest.mark.gpu
@pytest.mark.slow
def test_adam_on_the_tables_trains_on_cuda():
    """Where fbgemm's CUDA kernels fuse Adam, the same step updates the user table."""
    from tests.conftest import gpu_env

    code = ("import torch; assert torch.cuda.is_available(), 'torch without CUDA';"
            "from tml.common.run_training import launch_function;"
            "from tests.distributed_checks import adam_tables_train;"
            "print(launch_function(adam_tables_train, 1)[0])")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=gpu_env(),
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.strip().splitlines()[-1]) > 1e-3
