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


def local_dists_checks() -> dict:
    """In the worker: the same training steps through TorchRec's train pipeline with
    TorchRec's one-rank all-to-alls and with the local dists (`shard_model(local_dists=)`);
    which dists each ran, and how far apart the losses, tables and translations ended."""
    import torch
    from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from projects.twhin.data.config import TwhinDataConfig
    from projects.twhin.models.models import TwhinModel, TwhinModelAndLoss, apply_optimizers
    from projects.twhin.optimizer import build_optimizer
    from tests.distributed_checks import (
        BATCH,
        NEGATIVES,
        _edges,
        _full_tables,
        _model_config,
    )
    from tml.common.device import setup_and_get_device
    from tml.common.sharding import shard_model

    device = setup_and_get_device()
    config = _model_config()
    data_config = TwhinDataConfig(data_root="unused", per_replica_batch_size=BATCH,
                                  in_batch_negatives=NEGATIVES)
    runs = {}
    for local in (False, True):
        torch.manual_seed(0)
        model = TwhinModelAndLoss(apply_optimizers(TwhinModel(config, data_config), config))
        dmp = shard_model(model, device, local_dists=local)
        with torch.no_grad():
            dmp.module.model.all_trans_embs.copy_(
                torch.randn(dmp.module.model.all_trans_embs.shape,
                            generator=torch.Generator().manual_seed(7)))
        optimizer, _ = build_optimizer(dmp, config)
        pipeline = TrainPipelineSparseDist(dmp, optimizer, device)
        batches = iter([_edges(seed, config)[4] for seed in range(5)])
        losses = []
        for step in range(5):
            torch.manual_seed(100 + step)
            losses.append(pipeline.progress(batches)["loss"].detach().clone())
        evaluated = pipeline.detach()
        evaluated.eval()
        with torch.no_grad():
            torch.manual_seed(200)
            eval_loss = evaluated(_edges(9, config)[4])[0]
        ebcs = [m for m in dmp.modules() if isinstance(m, ShardedEmbeddingBagCollection)]
        runs[local] = {
            "losses": torch.stack(losses), "eval_loss": eval_loss,
            "tables": _full_tables(dmp),
            "translations": dmp.module.model.all_trans_embs.detach().clone(),
            "dists": sorted({type(d).__name__ for m in ebcs
                             for d in [*m._input_dists, *m._output_dists]})}
    torchrec, local = runs[False], runs[True]
    return {
        "dists": {"torchrec": torchrec["dists"], "local": local["dists"]},
        "losses": float((torchrec["losses"] - local["losses"]).abs().max()),
        "eval_loss": float((torchrec["eval_loss"] - local["eval_loss"]).abs()),
        "tables": max(float((torchrec["tables"][name] - local["tables"][name]).abs().max())
                      for name in torchrec["tables"]),
        "translations": float((torchrec["translations"] - local["translations"]).abs().max()),
        "trained": float((torchrec["losses"][0] - torchrec["losses"][-1]).abs()),
    }


@pytest.mark.slow
def test_one_worker_local_dists_train_exactly_as_torchrec_all_to_alls(monkeypatch):
    """Skipping TorchRec's one-rank all-to-alls changes no number: five pipelined steps and
    an evaluation forward give the same losses, tables and translations, bit for bit."""
    monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    results = launch_checks(local_dists_checks, 1)
    checks = results[0]
    assert checks["dists"]["torchrec"] == ["TwPooledEmbeddingDist", "TwSparseFeaturesDist"]
    assert checks["dists"]["local"] == ["LocalFeaturesDist", "LocalPooledEmbeddingDist"]
    assert checks["trained"] > 0, checks            # the steps changed the loss
    for key in ("losses", "eval_loss", "tables", "translations"):
        assert checks[key] == 0.0, (key, checks)
