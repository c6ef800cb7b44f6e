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
    """In the worker: the same training steps three ways: TorchRec's train pipeline with
    TorchRec's one-rank all-to-alls, the same pipeline with the local dists
    (`shard_model(local_dists=)`), and the one-worker step (`OneWorkerTrainPipeline`, whose
    lookups go straight to the kernel); which dists each ran, how many lookups went direct,
    and how far each ended from the first in losses, tables and translations."""
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
    from tml.core.one_worker_pipeline import OneWorkerTrainPipeline, train_pipeline

    device = setup_and_get_device()
    config = _model_config()
    data_config = TwhinDataConfig(data_root="unused", per_replica_batch_size=BATCH,
                                  in_batch_negatives=NEGATIVES)
    runs = {}
    for name, local, pipeline_class in (("torchrec", False, TrainPipelineSparseDist),
                                        ("local", True, TrainPipelineSparseDist),
                                        ("one_worker", True, OneWorkerTrainPipeline)):
        torch.manual_seed(0)
        model = TwhinModelAndLoss(apply_optimizers(TwhinModel(config, data_config), config))
        dmp = shard_model(model, device, local_dists=local)
        with torch.no_grad():
            dmp.module.model.all_trans_embs.copy_(
                torch.randn(dmp.module.model.all_trans_embs.shape,
                            generator=torch.Generator().manual_seed(7)))
        optimizer, _ = build_optimizer(dmp, config)
        pipeline = pipeline_class(dmp, optimizer, device)
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
        runs[name] = {
            "losses": torch.stack(losses), "eval_loss": eval_loss,
            "tables": _full_tables(dmp),
            "translations": dmp.module.model.all_trans_embs.detach().clone(),
            "direct_lookups": sum(getattr(m, "direct_lookups", 0) for m in ebcs),
            "dists": sorted({type(d).__name__ for m in ebcs
                             for d in [*m._input_dists, *m._output_dists]})}
    reference = runs["torchrec"]
    out: dict = {"trained": float((reference["losses"][0] - reference["losses"][-1]).abs()),
                 "chosen": type(train_pipeline(dmp, optimizer, device)).__name__}
    for name, run in runs.items():
        out[name] = {
            "dists": run["dists"], "direct_lookups": run["direct_lookups"],
            "losses": float((reference["losses"] - run["losses"]).abs().max()),
            "eval_loss": float((reference["eval_loss"] - run["eval_loss"]).abs()),
            "tables": max(float((reference["tables"][table] - run["tables"][table]).abs().max())
                          for table in reference["tables"]),
            "translations": float(
                (reference["translations"] - run["translations"]).abs().max())}
    return out


@pytest.mark.slow
def test_one_worker_local_dists_and_direct_lookups_train_exactly_as_torchrec(monkeypatch):
    """Skipping TorchRec's one-rank all-to-alls, then its train pipeline and lookup wrappers
    too, changes no number: five steps and an evaluation forward give the same losses,
    tables and translations, bit for bit; the one-worker step is what a CPU worker alone
    gets, and its lookups (training and evaluation) went straight to the kernel."""
    monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    results = launch_checks(local_dists_checks, 1)
    checks = results[0]
    assert checks["torchrec"]["dists"] == ["TwPooledEmbeddingDist", "TwSparseFeaturesDist"]
    assert checks["local"]["dists"] == ["LocalFeaturesDist", "LocalPooledEmbeddingDist"]
    assert checks["torchrec"]["direct_lookups"] == 0
    # TorchRec's pipeline rewrites the module's forward while attached: only the evaluation
    # after `detach` went direct.
    assert checks["local"]["direct_lookups"] == 1, checks
    assert checks["one_worker"]["direct_lookups"] == 6, checks   # 5 steps + 1 evaluation
    assert checks["chosen"] == "OneWorkerTrainPipeline"
    assert checks["trained"] > 0, checks            # the steps changed the loss
    for name in ("local", "one_worker"):
        for key in ("losses", "eval_loss", "tables", "translations"):
            assert checks[name][key] == 0.0, (name, key, checks)
