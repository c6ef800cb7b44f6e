"""One worker trains without DDP around the dense part, and the step is still exact.

With one worker there is nothing to average, and DDP's forward hook and one-rank allreduce
cost ~8% of a CPU step in the profile (docs/performance.md); `shard_model` leaves the
dense part unwrapped then (`tml.common.sharding.NoDataParallel`). This checks in a real
worker that no DistributedDataParallel is left, and that one step (loss, updated tables,
updated translations) equals the edge-by-edge reference of tests/distributed_checks.py.
"""

import os

import pytest

from tests.launch_checks import launch_checks
from tests.twhin_setup import REPO


def one_worker_checks() -> dict:
    """In the worker: whether DDP wraps anything, and the step against the reference."""
    import torch

    from projects.twhin.data.config import TwhinDataConfig
    from projects.twhin.models.models import TwhinModel, TwhinModelAndLoss, apply_optimizers
    from tests.distributed_checks import BATCH, NEGATIVES, _model_config, sharded_matches_unsharded
    from tml.common.device import setup_and_get_device
    from tml.common.sharding import shard_model

    device = setup_and_get_device()
    config = _model_config()
    data_config = TwhinDataConfig(data_root="unused", per_replica_batch_size=BATCH,
                                  in_batch_negatives=NEGATIVES)
    dmp = shard_model(
        TwhinModelAndLoss(apply_optimizers(TwhinModel(config, data_config), config)), device)
    ddp = [type(m).__name__ for m in dmp.modules()
           if isinstance(m, torch.nn.parallel.DistributedDataParallel)]
    return {"ddp": ddp, "diffs": sharded_matches_unsharded(["table_wise", "row_wise"])}


@pytest.mark.slow
def test_one_worker_has_no_ddp_and_its_step_equals_the_reference(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    results = launch_checks(one_worker_checks, 1)
    assert list(results) == [0]
    assert results[0]["ddp"] == []
    for sharding_type, diffs in results[0]["diffs"].items():
        assert diffs["changed"] > 1e-3, (sharding_type, diffs)   # the step did update
        for key, value in diffs.items():
            if key != "changed":
                assert value < 1e-4, (sharding_type, key, value)
