"""Worker functions for tests/test_compute_kernels.py: shard TwHIN's tables with a chosen
compute kernel and report what the planner placed and whether a step trained the table."""

from __future__ import annotations

from projects.twhin.models.models import TwhinModel, TwhinModelAndLoss, apply_optimizers
from projects.twhin.optimizer import build_optimizer
from tests.distributed_checks import BATCH, NEGATIVES, _edges, _full_tables, _model_config
from tml.common.device import setup_and_get_device
from tml.common.sharding import shard_model


def planned_kernels(user_kernel: str | None, load_factor: float | None = None,
                    ) -> dict[str, object]:
    """Shard with `user_kernel` for the user table, take one step; the planned kernel of
    every table and how far the user table moved."""
    from projects.twhin.data.config import TwhinDataConfig

    device = setup_and_get_device()
    config = _model_config()
    data_config = TwhinDataConfig(data_root="unused", per_replica_batch_size=BATCH,
                                  in_batch_negatives=NEGATIVES)
    model = TwhinModelAndLoss(apply_optimizers(TwhinModel(config, data_config), config))
    dmp = shard_model(
        model, device,
        compute_kernels={} if user_kernel is None else {"user": user_kernel},
        cache_load_factors={} if load_factor is None else {"user": load_factor})
    kernels = {table: option.compute_kernel
               for per_module in dmp.plan.plan.values()
               for table, option in per_module.items()}  # type: ignore[union-attr]
    optimizer, _ = build_optimizer(dmp, config)
    before = _full_tables(dmp)["user"]
    batch = _edges(0, config)[4].to(device)
    loss, _ = dmp(batch)
    loss.backward()
    optimizer.step()
    moved = float((_full_tables(dmp)["user"].cpu() - before.cpu()).abs().max())
    return {"kernels": kernels, "moved": moved, "device": device.type}
