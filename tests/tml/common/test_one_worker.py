"""One worker trains without DDP around the dense part, and the step is still exact.

With one worker there is nothing to average, and DDP's forward hook and one-rank allreduce
cost ~8% of a CPU step in the profile (docs/performance.md); `shard_model` leaves the
dense part unwrapped then (`tml.common.sharding.NoDataParallel`). This checks in a real
worker that no DistributedDataParallel is left, and that one step (loss, updated tables,
updated translations) equals the edge-by-edge reference of tests/distributed_checks.py.
"""

import os

import pytest

from tests.conftest import require
from tests.launch_checks import launch_checks
from tests.twhin_setup import REPO
from tml.common.native_sgd_lookup import library as native_sgd_library


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
    import tml.common.sharding as sharding

    native_library = sharding.native_sgd_library
    runs = {}
    for name, local, pipeline_class in (("torchrec", False, TrainPipelineSparseDist),
                                        ("local", True, TrainPipelineSparseDist),
                                        ("one_worker", True, OneWorkerTrainPipeline),
                                        ("one_worker_fbgemm", True, OneWorkerTrainPipeline)):
        # The last run's direct lookups call fbgemm's kernel, not native_sgd_lookup.
        sharding.native_sgd_library = (lambda: None) if name.endswith("fbgemm") \
            else native_library
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
            "native_kernels": sum(layout is not None for m in ebcs
                                  for layout in getattr(getattr(m, "_direct", None),
                                                        "native", [])),
            "dists": sorted({type(d).__name__ for m in ebcs
                             for d in [*m._input_dists, *m._output_dists]})}
    reference = runs["torchrec"]
    out: dict = {"trained": float((reference["losses"][0] - reference["losses"][-1]).abs()),
                 "chosen": type(train_pipeline(dmp, optimizer, device)).__name__}
    for name, run in runs.items():
        out[name] = {
            "dists": run["dists"], "direct_lookups": run["direct_lookups"],
            "native_kernels": run["native_kernels"],
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
    gets, and its lookups (training and evaluation) went straight to the kernel. With the
    SGD tables' lookups and updates in `native_sgd_lookup` (the default where a compiler
    is), the same to float rounding: a row that repeats in a batch gets its gradients one
    at a time instead of summed first."""
    monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    results = launch_checks(local_dists_checks, 1)
    checks = results[0]
    assert checks["torchrec"]["dists"] == ["TwPooledEmbeddingDist", "TwSparseFeaturesDist"]
    assert checks["local"]["dists"] == ["LocalFeaturesDist", "LocalPooledEmbeddingDist"]
    assert checks["torchrec"]["direct_lookups"] == 0
    # TorchRec's pipeline rewrites the module's forward while attached: only the evaluation
    # after `detach` went direct.
    assert checks["local"]["direct_lookups"] == 1, checks
    for name in ("one_worker", "one_worker_fbgemm"):
        assert checks[name]["direct_lookups"] == 6, checks   # 5 steps + 1 evaluation
    assert checks["chosen"] == "OneWorkerTrainPipeline"
    assert checks["trained"] > 0, checks            # the steps changed the loss
    assert checks["one_worker_fbgemm"]["native_kernels"] == 0
    require(native_sgd_library() is not None, "a C compiler for the native SGD lookups")
    assert checks["one_worker"]["native_kernels"] == 2, checks    # two SGD tables, two lrs
    for name in ("local", "one_worker_fbgemm"):
        for key in ("losses", "eval_loss", "tables", "translations"):
            assert checks[name][key] == 0.0, (name, key, checks)
    for key in ("losses", "eval_loss", "tables", "translations"):
        assert checks["one_worker"][key] < 1e-6, (key, checks)


def _fused_parts(optimizer) -> list:
    """The tables' fused optimizers in a TorchRec combined optimizer, depth first."""
    parts = getattr(optimizer, "optimizers", None)
    if parts is None:
        return [optimizer] if hasattr(optimizer, "_emb_module") else []
    return [fused for _, part in parts for fused in _fused_parts(part)]


def direct_step_checks() -> dict:
    """In the worker: the same steps with the combined optimizer's `step()` and with
    `DirectStep`, the learning rates changed between steps as a schedule would; how far the
    two ended apart, and what the fused kernels' learning rate was after each."""
    import torch

    from projects.twhin.data.config import TwhinDataConfig
    from projects.twhin.models.models import TwhinModel, TwhinModelAndLoss, apply_optimizers
    from projects.twhin.optimizer import build_optimizer
    from tests.distributed_checks import BATCH, NEGATIVES, _edges, _full_tables, _model_config
    from tml.common.device import setup_and_get_device
    from tml.common.sharding import shard_model
    from tml.core.custom_training_loop import _AccumulatingOptimizer
    from tml.optimizers.direct_step import DirectStep, _is_plain_sgd

    device = setup_and_get_device()
    config = _model_config()
    data_config = TwhinDataConfig(data_root="unused", per_replica_batch_size=BATCH,
                                  in_batch_negatives=NEGATIVES)
    runs, out = {}, {}
    for name in ("combined", "direct"):
        torch.manual_seed(0)
        dmp = shard_model(TwhinModelAndLoss(apply_optimizers(TwhinModel(config, data_config),
                                                             config)), device)
        optimizer, _ = build_optimizer(dmp, config)
        stepper = DirectStep(optimizer) if name == "direct" else optimizer
        start_translations = dmp.module.model.all_trans_embs.detach().clone()
        kernels = [fused._emb_module for fused in _fused_parts(optimizer)]
        kernel_lrs = []
        for step in range(4):
            torch.manual_seed(100 + step)
            stepper.zero_grad()
            losses, _ = dmp(_edges(step, config)[4])
            torch.sum(losses, dim=0).backward()
            for group in optimizer.param_groups:    # a schedule's change, before the step
                group["lr"] *= 0.5
            stepper.step()
            kernel_lrs.append([k.get_learning_rate() for k in kernels])
        out[f"{name}_kernel_lrs"] = kernel_lrs
        out[f"{name}_table_lrs"] = [g["lr"] for g in optimizer.param_groups]
        runs[name] = {"tables": _full_tables(dmp),
                      "translations": dmp.module.model.all_trans_embs.detach().clone()}
        if name == "direct":
            out["direct"] = stepper.direct
            out["plain_sgd"] = [_is_plain_sgd(dense) for dense in stepper._dense]
            out["translations_moved"] = float(
                (dmp.module.model.all_trans_embs.detach() - start_translations).abs().max())
            out["accumulating_direct"] = DirectStep(_AccumulatingOptimizer(optimizer, 2)).direct
            handle = optimizer.register_step_pre_hook(lambda *args: None)
            out["hooked_direct"] = DirectStep(optimizer).direct
            handle.remove()
    out["tables"] = max(float((runs["combined"]["tables"][t] - runs["direct"]["tables"][t])
                              .abs().max()) for t in runs["combined"]["tables"])
    out["translations"] = float((runs["combined"]["translations"]
                                 - runs["direct"]["translations"]).abs().max())
    return out


@pytest.mark.slow
def test_direct_optimizer_step_is_the_combined_step_and_follows_the_schedule(monkeypatch):
    """`DirectStep` (the one-worker loop's optimizer step) changes the tables and the
    translations exactly as the combined optimizer's `step()`, with learning rates changed
    between steps, and passes each change on to the fused kernels; an optimizer it does not
    know through and through (gradient accumulation's wrapper, one with step hooks) is
    stepped as a whole."""
    monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    checks = launch_checks(direct_step_checks, 1)[0]
    assert checks["direct"] is True
    assert checks["plain_sgd"] == [True] and checks["translations_moved"] > 0, checks
    assert checks["accumulating_direct"] is False and checks["hooked_direct"] is False
    assert checks["tables"] == 0.0 and checks["translations"] == 0.0, checks
    assert checks["direct_kernel_lrs"] == checks["combined_kernel_lrs"], checks
    assert checks["direct_table_lrs"] == checks["combined_table_lrs"]
    halved = checks["direct_kernel_lrs"]
    assert halved[0] and all(later[0] == earlier[0] / 2
                             for earlier, later in zip(halved, halved[1:])), halved


def test_the_plain_sgd_shortcut_is_torch_s_step_and_only_taken_for_plain_sgd():
    """`direct_step._plain_sgd_step` gives the same parameters as `SGD.step()` bit for bit
    (a tensor without a gradient left alone), and declines momentum, weight decay and
    maximize, whose steps it does not do."""
    import torch

    from tml.optimizers.direct_step import _is_plain_sgd, _plain_sgd_step

    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(5, 3, generator=generator).requires_grad_() for _ in range(3)]
    copies = [p.detach().clone().requires_grad_() for p in params]
    before = [p.detach().clone() for p in params]
    for group in (params, copies):
        for p in group[:2]:
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()))
    torch.optim.SGD(params, lr=0.37).step()
    shortcut = torch.optim.SGD(copies, lr=0.37)
    assert _plain_sgd_step(shortcut)
    for p, q in zip(params, copies):
        assert torch.equal(p, q)
    assert [torch.equal(p, b) for p, b in zip(copies, before)] == [False, False, True]
    for kwargs in ({"momentum": 0.9}, {"weight_decay": 0.1}, {"maximize": True}):
        other = torch.optim.SGD(copies, lr=0.37, **kwargs)
        assert not _is_plain_sgd(other) and not _plain_sgd_step(other), kwargs
    assert not _is_plain_sgd(torch.optim.Adagrad(copies, lr=0.1))
