"""Functions that run inside real worker processes (gloo) for tests/tml/common/test_checkpointing.py.

Each returns plain values (numbers, strings); the test process asserts on them.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal

import torch
import torch.distributed as dist

from projects.twhin.data.config import TwhinDataConfig
from projects.twhin.models.config import TwhinModelConfig
from projects.twhin.models.models import TwhinModel, TwhinModelAndLoss, apply_optimizers
from projects.twhin.optimizer import build_optimizer
from tests.distributed_checks import TABLES, _edges, _model_config
from tml.common.checkpointing import (
    Checkpointer,
    checkpoint_steps,
    latest_checkpoint,
    load_checkpoint,
    read_tensors,
)
from tml.common.device import setup_and_get_device
from tml.common.sharding import shard_model
from tml.core import custom_training_loop as ctl
from tml.errors import CheckpointError

WEIGHT = "model.model.large_embeddings.ebc.embedding_bags.{}.weight"


def _config(optimizer: str = "sgd", tables: dict[str, int] | None = None) -> TwhinModelConfig:
    data = _model_config().model_dump()
    for table in data["embeddings"]["tables"]:
        if tables:
            table["num_embeddings"] = tables[table["name"]]
        if optimizer == "rowwise_adagrad":  # one fused kernel: one schedule for both
            table["optimizer"] = {"sgd": {"lr": 0.1}}
    return TwhinModelConfig.model_validate(data)


def _build(sharding_type: str, optimizer: str = "sgd", tables: dict[str, int] | None = None):  # noqa: ANN202
    device = setup_and_get_device()
    config = _config(optimizer, tables)
    data_config = TwhinDataConfig(data_root="unused", per_replica_batch_size=24,
                                  in_batch_negatives=3)
    torch.manual_seed(0)
    twhin = TwhinModel(config, data_config)
    if optimizer == "rowwise_adagrad":
        # TorchRec's row-wise Adagrad (one state value per row), applied directly: its state
        # layout depends on the sharding type.
        from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
        from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

        apply_optimizer_in_backward(RowWiseAdagrad, twhin.large_embeddings.ebc.parameters(),
                                    {"lr": 0.1})
    else:
        apply_optimizers(twhin, config)
    model = TwhinModelAndLoss(twhin)
    dmp = shard_model(model, device, dict.fromkeys(TABLES, sharding_type),
                      output_dtensor=True)
    optimizer_, scheduler = build_optimizer(dmp, config)
    return dmp, optimizer_, scheduler, config


def _step(dmp, optimizer, config, seed: int) -> None:  # noqa: ANN001
    batch = _edges(seed * 10 + dist.get_rank(), config)[4]
    optimizer.zero_grad()
    loss, _ = dmp(batch)
    loss.backward()
    optimizer.step()


def _full(value: torch.Tensor) -> torch.Tensor:
    """The global tensor of a DTensor (TorchRec's shards wrapper included), on every rank."""
    if not hasattr(value, "to_local"):
        return value.detach().clone()
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local = value.to_local()
    if hasattr(local, "local_shards"):
        pieces = [(list(offset), shard.detach().clone())
                  for offset, shard in zip(local.local_offsets(), local.local_shards())]
    else:
        _, offset = compute_local_shape_and_global_offset(value.shape, value.device_mesh,
                                                          value.placements)
        pieces = [(list(offset), local.detach().clone())]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, pieces)
    full = torch.full(tuple(value.shape), float("nan"), dtype=value.dtype)
    for rank_pieces in gathered:
        for offset, tensor in rank_pieces:
            index = tuple(slice(o, o + n) for o, n in zip(offset, tensor.shape))
            full[index] = tensor
    return full


def _tables(dmp) -> dict[str, torch.Tensor]:  # noqa: ANN001
    state = dmp.state_dict()
    tables = {name: _full(state[f"model.large_embeddings.ebc.embedding_bags.{name}.weight"])
              for name in TABLES}
    tables["translations"] = _full(state["model.all_trans_embs"])
    return tables


def _max_diff(tables: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> float:
    diff = max(float((tables[name] - saved[WEIGHT.format(name)]).abs().max())
               for name in TABLES)
    return max(diff, float((tables["translations"] - saved["model.model.all_trans_embs"])
                           .abs().max()))


def _error(fn) -> str:  # noqa: ANN001
    try:
        fn()
    except CheckpointError as error:
        return str(error)
    return "no error"


def _parts(dmp, optimizer, **extra) -> dict:  # noqa: ANN001, ANN003
    return {"model": dmp, "optim": optimizer, **extra}


def save_load_reshard_and_failures(root: str) -> dict:
    """Everything checkpointing promises, on 2 workers; `root` is a shared directory."""
    setup_and_get_device()
    rank = dist.get_rank()
    out: dict = {}
    save_dir = os.path.join(root, "save")

    # 1. Async save: training goes on at once, the checkpoint holds the state of its step.
    dmp, optimizer, scheduler, config = _build("table_wise")
    checkpointer = Checkpointer(save_dir, max_to_keep=2, async_save=True)
    checkpointer.prepare()
    for step in range(1, 5):
        _step(dmp, optimizer, config, step)
        if step >= 2:
            if step == 3:
                at_step_3 = _tables(dmp)
            checkpointer.save(step, _parts(dmp, optimizer))
            _step(dmp, optimizer, config, 100 + step)  # changes the weights mid-write
        checkpointer.poll()
    checkpointer.wait()
    dist.barrier()
    out["steps_kept"] = checkpoint_steps(save_dir)  # retention: newest 2
    saved3 = read_tensors(os.path.join(save_dir, "3"))
    out["async_snapshot_diff"] = _max_diff(at_step_3, saved3)
    out["only_tensors"] = all(isinstance(v, torch.Tensor) for v in saved3.values())
    final_tables = _tables(dmp)

    # 2. Load into another sharding type, same 2 workers: table_wise -> row_wise/column_wise.
    for sharding_type in ("table_wise", "row_wise", "column_wise"):
        other, other_opt, _, _ = _build(sharding_type)
        load_checkpoint(os.path.join(save_dir, "3"), _parts(other, other_opt))
        out[f"reshard_{sharding_type}_diff"] = _max_diff(_tables(other), saved3)
        if sharding_type != "table_wise":   # every layout's .metadata, for the allow-list
            Checkpointer(os.path.join(root, "layouts", sharding_type)).save(
                1, _parts(other, other_opt))
    del final_tables

    # 3. Row-wise Adagrad state: table_wise -> row_wise works, -> column_wise is refused
    #    clearly.
    ada, ada_opt, _, ada_config = _build("table_wise", "rowwise_adagrad")
    _step(ada, ada_opt, ada_config, 1)
    ada_dir = os.path.join(root, "ada")
    Checkpointer(ada_dir).save(1, _parts(ada, ada_opt))
    dist.barrier()
    row, row_opt, _, _ = _build("row_wise", "rowwise_adagrad")
    load_checkpoint(os.path.join(ada_dir, "1"), _parts(row, row_opt))
    ada_saved = read_tensors(os.path.join(ada_dir, "1"))
    momentum = {k: v for k, v in ada_saved.items() if "momentum" in k}
    row_state = row_opt.state_dict()["state"]
    loaded = {f"optim.state.{p}.{n}": _full(t) for p, s in row_state.items()
              for n, t in s.items() if "momentum" in n}
    out["adagrad_row_wise_momentum_diff"] = max(
        float((loaded[k] - v).abs().max()) for k, v in momentum.items())
    out["adagrad_momentum_nonzero"] = max(float(v.abs().max()) for v in momentum.values())
    Checkpointer(os.path.join(root, "layouts", "adagrad-row_wise")).save(
        1, _parts(row, row_opt))
    col, col_opt, _, _ = _build("column_wise", "rowwise_adagrad")
    Checkpointer(os.path.join(root, "layouts", "adagrad-column_wise")).save(
        1, _parts(col, col_opt))
    out["momentum_shapes"] = {k: list(v.shape) for k, v in momentum.items()}
    out["adagrad_column_wise_error"] = _error(
        lambda: load_checkpoint(os.path.join(ada_dir, "1"), _parts(col, col_opt)))

    # 4. Other table shapes.
    big, big_opt, _, _ = _build("table_wise", tables={"user": 70, "tweet": 40})
    out["other_shapes_error"] = _error(
        lambda: load_checkpoint(os.path.join(save_dir, "4"), _parts(big, big_opt)))

    # 5. Damaged files (in copies): truncated data file, truncated metadata.
    for name, victim in (("data", "__1_0.distcp"), ("metadata", ".metadata")):
        copy = os.path.join(root, f"damaged-{name}", "4")
        if rank == 0:
            shutil.copytree(os.path.join(save_dir, "4"), copy)
            size = os.path.getsize(os.path.join(copy, victim))
            with open(os.path.join(copy, victim), "r+b") as f:
                f.truncate(size // 2)
        dist.barrier()
        out[f"damaged_{name}_error"] = _error(
            lambda copy=copy: load_checkpoint(copy, _parts(dmp, optimizer)))

    # 6. A writer failing mid-save (rank 1 cannot write more than 64 bytes: EFBIG, as a
    #    full disk would give ENOSPC), async and sync: both ranks get the error, the
    #    temporary directory is removed, the previous checkpoint stays the latest.
    for mode in ("async", "sync"):
        failing = Checkpointer(save_dir, max_to_keep=2, async_save=mode == "async")
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        if rank == 1:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (64, hard))
        try:
            def save_and_wait(failing=failing) -> None:  # noqa: ANN001
                failing.save(7, _parts(dmp, optimizer))
                failing.wait()
            out[f"{mode}_write_failure_error"] = _error(save_and_wait)
        finally:
            if rank == 1:
                resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        dist.barrier()
        out[f"{mode}_after_failure"] = sorted(os.listdir(save_dir))
        dist.barrier()  # both listed before the next save creates .tmp-7 again
    out["latest_after_failures"] = latest_checkpoint(save_dir)
    load_checkpoint(os.path.join(save_dir, "4"), _parts(dmp, optimizer))
    out["loadable_after_failures"] = _max_diff(_tables(dmp),
                                               read_tensors(os.path.join(save_dir, "4")))

    # 7. A save_dir that cannot be written (a path under a regular file; root ignores
    #    permissions).
    blocker = os.path.join(root, "blocker")
    if rank == 0:
        open(blocker, "w").close()
    dist.barrier()
    out["unwritable_error"] = _error(
        lambda: Checkpointer(os.path.join(blocker, "save")).prepare())

    # 8. A save killed half-way (a .tmp- directory) is ignored, then cleaned up.
    if rank == 0:
        os.makedirs(os.path.join(save_dir, ".tmp-99"))
        open(os.path.join(save_dir, ".tmp-99", "__0_0.distcp"), "wb").close()
    dist.barrier()
    out["latest_with_killed_save"] = latest_checkpoint(save_dir)
    Checkpointer(save_dir).prepare()
    dist.barrier()
    out["after_cleanup"] = sorted(os.listdir(save_dir))

    # 9. The training loop: async saves, then warm start (weights only, step 0).
    loop_dir = os.path.join(root, "loop")
    model, opt, sched, cfg = _build("table_wise")
    batches = [_edges(i * 10 + rank, cfg)[4] for i in range(6)]
    result = ctl.train(model, opt, torch.device("cpu"), loop_dir, logging_interval=2,
                       train_steps=6, checkpoint_frequency=2, dataset=batches,
                       global_batch_size=48, scheduler=sched, async_checkpoint=True, seed=5)
    out["loop_final_step"] = result.final_step
    out["loop_steps"] = checkpoint_steps(loop_dir)
    loop_saved = read_tensors(os.path.join(loop_dir, "6"))
    out["loop_train_state"] = {k.split(".")[-1]: float(v) for k, v in loop_saved.items()
                               if k.startswith(("train.", "scheduler."))}
    out["loop_final_diff"] = _max_diff(_tables(model), loop_saved)
    warm, warm_opt, warm_sched, _ = _build("table_wise")
    warm_result = ctl.train(warm, warm_opt, torch.device("cpu"), os.path.join(root, "warm"),
                            logging_interval=2, train_steps=0, checkpoint_frequency=2,
                            dataset=batches, global_batch_size=48, scheduler=warm_sched,
                            initial_checkpoint_dir=os.path.join(loop_dir, "6"))
    out["warm_start_step"] = warm_result.start_step
    out["warm_resumed_from"] = warm_result.resumed_from
    out["warm_weights_diff"] = _max_diff(_tables(warm), loop_saved)
    dist.barrier()
    out.update(_metadata_survey(root))
    return out


def _metadata_survey(root: str) -> dict:
    """The names every `.metadata` written above refers to (table/row/column-wise, SGD and
    row-wise Adagrad, sync and async, 2 ranks), and whether each checkpoint verifies."""

    from tml.common.checkpoint_integrity import CHECKSUMS_FILE
    from tml.common.checkpoint_unpickle import METADATA_GLOBALS, RestrictedUnpickler
    from tml.common.checkpointing import verify_checkpoint

    used: set[tuple[str, str]] = set()

    class Recording(RestrictedUnpickler):
        def find_class(self, module: str, name: str):  # noqa: ANN201
            used.add((module, name))
            return super().find_class(module, name)

    checked, data_files, unverified = 0, set(), []
    for base, _, files in os.walk(root):
        if ".metadata" not in files or "damaged" in base:
            continue
        with open(os.path.join(base, ".metadata"), "rb") as handle:
            Recording(handle, METADATA_GLOBALS).load()
        if CHECKSUMS_FILE not in files:
            unverified.append(base)
        verify_checkpoint(base)
        checked += 1
        data_files |= {f for f in files if f.endswith(".distcp")}
    return {"metadata_globals": sorted(".".join(n) for n in used),
            "metadata_checked": checked, "data_files_seen": sorted(data_files),
            "unverified": unverified}


def load_into_world(path: str, sharding_type: str) -> dict:
    """Load the 2-worker checkpoint at `path` into this world size and sharding type."""
    dmp, optimizer, _, _ = _build(sharding_type)
    load_checkpoint(path, _parts(dmp, optimizer))
    return {"world_size": dist.get_world_size(),
            "diff": _max_diff(_tables(dmp), read_tensors(path))}
