"""Shard a model's embedding tables across workers with TorchRec.

`shard_model` plans with TorchRec's planner on the real topology (world size, device,
memory of this host) and wraps the model in `DistributedModelParallel`. It always shards
(it needs a process group); `maybe_shard_model`, the original tml's name, is kept as a
deprecated alias that also keeps the original's "maybe": without a process group it
returns the model as it is.

The sharding type of each table is chosen by the caller (table_wise by default). TorchRec's
stock `EmbeddingBagCollectionSharder` offers row_wise only on CUDA, so on CPU the planner
fails for it; `AllShardingTypesSharder` lists table_wise, row_wise and column_wise on every
device (the CPU kernels run them correctly: the sharded-equals-unsharded tests check it).

With one worker, table-wise tables skip TorchRec's exchanges with itself (a gloo all-to-all
of the ids' splits, one of the ids, and one of the pooled rows forward and backward), each a
round trip through gloo's worker thread: `OneWorkerEmbeddingBagCollection` keeps TorchRec's
lookups, kernels and state and makes those dists local (`NoWait`). Same numbers, bit for bit
(tests/tml/common/test_one_worker.py).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding_sharding import USE_ONE_TBE_PER_TABLE
from torchrec.distributed.embeddingbag import (
    EmbeddingBagCollectionSharder,
    ShardedEmbeddingBagCollection,
)
from torchrec.distributed.model_parallel import DataParallelWrapper, DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import (
    Awaitable,
    CacheParams,
    NoWait,
    ParameterSharding,
    ShardingEnv,
    ShardingPlan,
    ShardingType,
)
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from tml.common.native_sgd_lookup import NativeSGDLookup, TableLayout, native_sgd_layout
from tml.common.native_sgd_lookup import library as native_sgd_library
from tml.common.topology import create_topology, host_memory_bytes
from tml.errors import ConfigError

logger = logging.getLogger(__name__)

SUPPORTED_SHARDING_TYPES = ("table_wise", "row_wise", "column_wise")

# The compute kernels tml offers per table (TorchRec's names), by device type. On CPU
# TorchRec's sharders list only the fused kernel for sharded tables
# (`EmbeddingBagCollectionSharder.compute_kernels`); the unified-memory kernels need CUDA.
COMPUTE_KERNELS = {
    "cpu": ("fused",),
    "cuda": ("fused", "fused_uvm", "fused_uvm_caching"),
}
# With no kernel chosen for a table: the planner keeps it in GPU memory (fused) when it
# fits and falls back to the unified-memory cache for what does not.
DEFAULT_KERNELS = {"cpu": ("fused",), "cuda": ("fused", "fused_uvm_caching")}


class LocalFeaturesDist(nn.Module):
    """The input dist of table-wise tables when there is one worker: the ids stay as they are.

    TorchRec sends them through a gloo all-to-all of the splits and one of the tensors even
    to a world of one; each is a round trip through gloo's worker thread that the main thread
    waits for (measured in docs/performance.md). TorchRec's pipeline takes an input dist
    that returns `NoWait` as a local one (`FusedKJTListSplitsAwaitable`).
    """

    def forward(self, features: KeyedJaggedTensor) -> Awaitable[Awaitable[KeyedJaggedTensor]]:
        return NoWait(NoWait(features))


class LocalPooledEmbeddingDist(nn.Module):
    """The output dist of table-wise tables when there is one worker: the pooled rows stay
    where they are (a one-rank all-to-all, forward and backward, otherwise)."""

    def forward(self, local_embs: torch.Tensor,
                sharding_ctx: object = None) -> Awaitable[torch.Tensor]:
        return NoWait(local_embs)


class OneWorkerEmbeddingBagCollection(ShardedEmbeddingBagCollection):
    """TorchRec's sharded EBC, its table-wise input and output dists local (one worker).

    Same lookups, kernels, parameters and state dict as `ShardedEmbeddingBagCollection`;
    only the one-rank exchanges are skipped, so a step gives the same numbers.

    Called directly (not through TorchRec's train pipeline, which rewrites `forward`), and
    when its tables are in CPU kernels of this worker (`direct_lookup`), `forward` hands the
    ids to those kernels itself: TorchRec's context, awaitables, KJT splits and lookup wrappers around it
    cost ~0.3 ms a step, as much as the lookup of 8000 rows (docs/performance.md). Kernels
    with plain SGD and sum pooling go further: their lookups and updates run in C on
    fbgemm's storage (`native_sgd_lookup`). The first such call checks its output against
    TorchRec's own path and keeps to TorchRec's path if they differ. `direct_lookups` counts
    the calls that took the direct path.
    """

    direct_lookups = 0
    _direct: DirectLookup | None | bool = False   # False: not decided yet; None: unusable

    def forward(self, features: KeyedJaggedTensor) -> object:  # noqa: D102
        if self._direct is False:
            found = direct_lookup(self, features)
            logger.debug("direct lookup of %s: %s", self._module_fqn,
                         "on" if isinstance(found, tuple) else f"off ({found})")
            self._direct = found if isinstance(found, DirectLookup) else None
            if self._direct is not None and not self._direct_matches(features):
                self._direct = None
        if self._direct is None or features.weights_or_none() is not None \
                or list(features.keys()) != self._direct.names:
            return super().forward(features)
        self.direct_lookups += 1
        return self._lookup_directly(features)

    def _lookup_directly(self, features: KeyedJaggedTensor) -> KeyedTensor:
        direct: DirectLookup = self._direct  # type: ignore[assignment]
        values, offsets = features.values(), features.offsets()
        if len(direct.kernels) == 1:
            out = _kernel_lookup(direct, 0, values, offsets)
        else:     # each kernel its run of keys: ids [offsets[a B], offsets[b B])
            stride, outs = features.stride(), []
            for index, (_, a, b, _, _) in enumerate(direct.kernels):
                ends = offsets[a * stride:b * stride + 1]
                first, last = int(ends[0]), int(ends[-1])
                outs.append(_kernel_lookup(direct, index, values[first:last], ends - first))
            out = torch.cat(outs, dim=1)
        return KeyedTensor(keys=direct.names, length_per_key=direct.dims, values=out,
                           key_dim=1)

    def _direct_matches(self, features: KeyedJaggedTensor) -> bool:
        with torch.no_grad():
            expected = super().forward(features).values()
            got = self._lookup_directly(features).values()
        if expected.shape == got.shape and bool(torch.equal(expected, got)):
            return True
        logger.warning("the direct lookup of %s differs from TorchRec's; using TorchRec's",
                       self._module_fqn or "the embedding tables")
        return False

    def _create_input_dist(self, input_feature_names: list[str]) -> None:
        super()._create_input_dist(input_feature_names)
        self._input_dists = [
            LocalFeaturesDist() if kind == ShardingType.TABLE_WISE.value else input_dist
            for input_dist, kind in zip(self._input_dists, self._sharding_types)]

    def _create_output_dist(self) -> None:
        super()._create_output_dist()
        self._output_dists = [
            LocalPooledEmbeddingDist() if kind == ShardingType.TABLE_WISE.value else output
            for output, kind in zip(self._output_dists, self._sharding_types)]


class DirectLookup(NamedTuple):
    """The kernels that hold a one-worker EBC's tables, and how to call them (see
    `direct_lookup`); `native` holds, per kernel, its `TableLayout` when its lookups and
    SGD updates run in `native_sgd_lookup` (else None), and `library` that code."""

    kernels: list[tuple[nn.Module, int, int, torch.dtype, torch.dtype]]   # keys [a, b)
    names: list[str]
    dims: list[int]
    native: list[TableLayout | None]
    library: object | None


def _kernel_lookup(direct: DirectLookup, index: int, values: torch.Tensor,
                   offsets: torch.Tensor) -> torch.Tensor:
    """Kernel `index`'s pooled rows for its keys' ids: in `native_sgd_lookup` where it
    qualifies, else through fbgemm's kernel."""
    kernel, _, _, index_type, offset_type = direct.kernels[index]
    layout = direct.native[index]
    if layout is not None:
        kernel.step += 1                      # as fbgemm's forward counts its calls
        return NativeSGDLookup.apply(kernel.weights_host, values, offsets, kernel, layout,
                                     direct.library)
    return kernel(indices=values.to(index_type), offsets=offsets.to(offset_type))


def direct_lookup(ebc: ShardedEmbeddingBagCollection,
                  features: KeyedJaggedTensor) -> DirectLookup | str:
    """The fused CPU kernels of this worker that hold every table of `ebc`, each a run of
    `features`' keys in order, else why not.

    Then each kernel's forward, given its keys' ids and offsets, is the lookup of those
    tables: no other worker, no permutation, no feature processor, and the kernels' outputs
    side by side are the tables' blocks in key order (what TorchRec's output dist hands back
    as a KeyedTensor). Tables whose optimizer settings differ are in different kernels.
    """
    if torch.fx._symbolic_trace.is_fx_tracing():
        return "traced by torch.fx"
    if len(ebc._lookups) != 1 or ebc._env.world_size != 1:
        return f"{len(ebc._lookups)} sharding types, {ebc._env.world_size} workers"
    if getattr(ebc, "_has_mean_pooling_callback", True):
        return "mean pooling"
    if features.variable_stride_per_key() or features.weights_or_none() is not None:
        return "variable batch sizes or weighted ids"
    lookup = ebc._lookups[0]
    modules = list(getattr(lookup, "_emb_modules", []))
    if not modules or getattr(lookup, "_feature_processor", None) is not None:
        return f"{len(modules)} kernels or a feature processor"
    names = list(ebc._embedding_names)
    kernels, covered = [], []
    for module in modules:
        config = getattr(module, "config", None)
        kernel = getattr(module, "emb_module", None)
        if config is None or kernel is None or config.has_feature_processor \
                or config.is_weighted:
            return f"kernel {type(module).__name__}"
        weights = list(kernel.split_embedding_weights())
        if not weights or any(w.device.type != "cpu" for w in weights):
            return "not on CPU"
        start = len(covered)
        covered += config.feature_names()
        kernels.append((kernel, start, len(covered), module._embedding_table_index_type,
                        module._embedding_table_offset_type))
    if covered != names or list(features.keys()) != names:
        return f"features {list(features.keys())}, kernels {covered}, output {names}"
    library = native_sgd_library()
    layouts = [native_sgd_layout(kernel) if library is not None else "no native code"
               for kernel, *_ in kernels]
    for (_, a, b, *_), layout in zip(kernels, layouts):
        logger.debug("lookups of %s: %s", names[a:b], "native SGD" if isinstance(
            layout, TableLayout) else f"fbgemm ({layout})")
    return DirectLookup(kernels, names, list(ebc._embedding_dims),
                        [layout if isinstance(layout, TableLayout) else None
                         for layout in layouts], library)


class AllShardingTypesSharder(EmbeddingBagCollectionSharder):
    """EBC sharder offering table_wise, row_wise and column_wise on CPU as well as CUDA.

    With `local_dists` and a world of one it shards into `OneWorkerEmbeddingBagCollection`.
    """

    def __init__(self, *args: object, local_dists: bool = False, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.local_dists = local_dists

    def sharding_types(self, compute_device_type: str) -> list[str]:
        return list(SUPPORTED_SHARDING_TYPES)

    def shard(self, module: EmbeddingBagCollection, params: dict[str, ParameterSharding],
              env: ShardingEnv, device: torch.device | None = None,
              module_fqn: str | None = None) -> ShardedEmbeddingBagCollection:
        if not (self.local_dists and env.world_size == 1):
            return super().shard(module, params, env, device, module_fqn)
        return OneWorkerEmbeddingBagCollection(
            module=module, table_name_to_parameter_sharding=params, env=env,
            fused_params=self.fused_params, device=device,
            qcomm_codecs_registry=self.qcomm_codecs_registry, module_fqn=module_fqn,
            sharded_module_order_overwrite=self._sharded_module_order_overwrite)


class NoDataParallel(DataParallelWrapper):
    """Leaves the dense part unwrapped: with one worker there are no gradients to average.

    DMP wraps the dense parameters in DistributedDataParallel by default; with one worker
    its forward hook and one-rank allreduce were ~8% of a CPU TwHIN step (profiled,
    docs/performance.md) and change nothing. DMP still allocates the parameters.
    """

    def wrap(self, dmp: DistributedModelParallel, env: ShardingEnv,
             device: torch.device) -> None:
        return None


def _embedding_bag_collections(model: nn.Module) -> list[EmbeddingBagCollection]:
    return [m for m in model.modules() if isinstance(m, EmbeddingBagCollection)]


def _kernels(table: str, device_type: str, chosen: str | None) -> list[str]:
    """The compute kernels the planner may pick for `table`, or one line saying why the
    chosen one cannot run here."""
    available = COMPUTE_KERNELS.get(device_type, COMPUTE_KERNELS["cpu"])
    if chosen is None:
        return list(DEFAULT_KERNELS.get(device_type, DEFAULT_KERNELS["cpu"]))
    if chosen not in COMPUTE_KERNELS["cuda"]:
        raise ConfigError(f"table '{table}': unknown compute_kernel '{chosen}' (use one of "
                          f"{', '.join(COMPUTE_KERNELS['cuda'])})")
    if chosen not in available:
        raise ConfigError(f"table '{table}': compute_kernel {chosen} needs CUDA; on "
                          f"{device_type} TorchRec runs only "
                          f"{', '.join(available)} for sharded tables")
    return [chosen]


def _constraints(model: nn.Module, sharding_types: Mapping[str, str],
                 world_size: int, device_type: str = "cpu",
                 compute_kernels: Mapping[str, str] | None = None,
                 cache_load_factors: Mapping[str, float] | None = None,
                 ) -> dict[str, ParameterConstraints]:
    constraints = {}
    compute_kernels = compute_kernels or {}
    cache_load_factors = cache_load_factors or {}
    for ebc in _embedding_bag_collections(model):
        for table in ebc.embedding_bag_configs():
            sharding_type = sharding_types.get(table.name, "table_wise")
            if table.embedding_dim % 4:
                # Else TorchRec asserts deep inside sharding (fbgemm's kernels read rows
                # in 4-float vectors on every device).
                raise ConfigError(
                    f"table '{table.name}': embedding_dim {table.embedding_dim} is not a "
                    f"multiple of 4, which fbgemm's embedding kernels need (try "
                    f"{-(-table.embedding_dim // 4) * 4})")
            if sharding_type not in SUPPORTED_SHARDING_TYPES:
                raise ValueError(f"table '{table.name}': unknown sharding type "
                                 f"'{sharding_type}' (use one of "
                                 f"{', '.join(SUPPORTED_SHARDING_TYPES)})")
            min_partition = None
            if sharding_type == "column_wise":
                # Shards of dim/world_size columns when that is a multiple of 4 (TBE needs
                # it), else the planner keeps whole tables.
                shard_dim = table.embedding_dim // world_size
                min_partition = shard_dim if shard_dim >= 4 and shard_dim % 4 == 0 \
                    else table.embedding_dim
            load_factor = cache_load_factors.get(table.name)
            constraints[table.name] = ParameterConstraints(
                sharding_types=[sharding_type],
                compute_kernels=_kernels(table.name, device_type,
                                         compute_kernels.get(table.name)),
                min_partition=min_partition,
                cache_params=None if load_factor is None
                else CacheParams(load_factor=load_factor))
    return constraints


def check_fused_optimizers(model: nn.Module, device: torch.device) -> None:
    """Refuse, by table name, optimizers that fbgemm's kernels lack on this device.

    fbgemm's CPU kernels fuse SGD and Adagrad but not Adam ("Optimizer adam is not
    supported in CPU mode", deep inside sharding otherwise).
    """
    if device.type != "cpu":
        return
    for ebc in _embedding_bag_collections(model):
        for name, bag in ebc.embedding_bags.items():
            for optimizer_class in getattr(bag.weight, "_optimizer_classes", []):
                if optimizer_class is torch.optim.Adam:
                    raise ConfigError(f"table '{name}': adam is not available for embedding "
                                      "tables on CPU (fbgemm's CPU kernels fuse sgd and "
                                      "adagrad); use adagrad, or train on CUDA")


def table_bytes(model: nn.Module) -> int:
    """Bytes of all embedding tables of `model` (unsharded)."""
    total = 0
    for ebc in _embedding_bag_collections(model):
        for table in ebc.embedding_bag_configs():
            width = 2 if table.data_type.name in ("FP16", "BF16") else 4
            total += table.num_embeddings * table.embedding_dim * width
    return total


def one_kernel_per_table(model: nn.Module) -> bool:
    """Whether each table gets its own fused kernel (TBE) instead of sharing one.

    Tables that share a TBE are views into one flat buffer, and DCP copies such a view whole
    when it saves: a 100M x 32 fp32 table (12 GiB) sharing a kernel was killed for memory at
    its checkpoint, while alone it saved in place (peak 1.04x its bytes). A kernel per table
    costs about 10% of the speed of small tables (measured, 2-core CPU), so it is used when
    the tables are large: over 5% of this host's memory, or as `TML_ONE_KERNEL_PER_TABLE`
    (1/0) says.
    """
    forced = os.environ.get("TML_ONE_KERNEL_PER_TABLE")
    if forced in ("0", "1"):
        return forced == "1"
    return table_bytes(model) > 0.05 * host_memory_bytes()


def describe_plan(plan: ShardingPlan) -> str:
    """One line per table: sharding type, kernel and where each shard lives."""
    lines = []
    for module_path, module_plan in plan.plan.items():
        for table, spec in module_plan.items():  # type: ignore[union-attr]
            shards = []
            if spec.sharding_spec is not None:
                for shard in spec.sharding_spec.shards:
                    rows, cols = shard.shard_sizes
                    shards.append(f"rank {shard.placement.rank()}: {rows}x{cols} "
                                  f"@{list(shard.shard_offsets)}")
            where = f"{module_path}." if module_path else ""
            lines.append(f"{where}{table}: {spec.sharding_type} ({spec.compute_kernel}); "
                         + "; ".join(shards))
    return "\n".join(lines)


def shard_model(model: nn.Module, device: torch.device,
                sharding_types: Mapping[str, str] | None = None,
                output_dtensor: bool = False,
                compute_kernels: Mapping[str, str] | None = None,
                cache_load_factors: Mapping[str, float] | None = None,
                local_dists: bool | None = None,
                ) -> DistributedModelParallel:
    """Wrap `model` in DistributedModelParallel with a plan for its embedding tables.

    Args:
      model: holds EmbeddingBagCollections built on the meta device, their parameters with
        optimizers applied in backward (`apply_optimizer_in_backward`) so TorchRec fuses
        them into the table kernels.
      device: this worker's device (`setup_and_get_device`).
      sharding_types: table name -> table_wise | row_wise | column_wise (default table_wise).
      output_dtensor: keep sharded state as DTensor (needed for asynchronous checkpoints).
      compute_kernels: table name -> fused | fused_uvm | fused_uvm_caching (`COMPUTE_KERNELS`
        says which run on this device; a table without one gets `DEFAULT_KERNELS`).
      cache_load_factors: table name -> fraction of rows cached in GPU memory
        (fused_uvm_caching tables).
      local_dists: skip TorchRec's one-rank exchanges of table-wise tables
        (`OneWorkerEmbeddingBagCollection`); default: when there is one worker.

    With one worker the dense part is not wrapped in DDP (`NoDataParallel`), and table-wise
    tables skip TorchRec's one-rank all-to-alls of ids and pooled rows. The default
    process group must be initialised. The plan is made collectively (every
    rank must call this) and logged on rank 0.
    """
    if not dist.is_initialized():
        raise RuntimeError("shard_model needs an initialised process group "
                           "(call tml.common.device.setup_and_get_device first)")
    check_fused_optimizers(model, device)
    world_size = dist.get_world_size()
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    sharder = AllShardingTypesSharder(
        fused_params={USE_ONE_TBE_PER_TABLE: one_kernel_per_table(model)},
        local_dists=world_size == 1 if local_dists is None else local_dists)
    planner = EmbeddingShardingPlanner(
        topology=create_topology(world_size, local_world_size, device),
        constraints=_constraints(model, sharding_types or {}, world_size, device.type,
                                 compute_kernels, cache_load_factors),
    )
    plan = planner.collective_plan(model, [sharder], dist.GroupMember.WORLD)
    logger.info("sharding plan (%d workers):\n%s", world_size, describe_plan(plan))
    env = ShardingEnv(world_size=world_size, rank=dist.get_rank(),
                      pg=dist.GroupMember.WORLD, output_dtensor=output_dtensor)
    return DistributedModelParallel(
        module=model, device=device, plan=plan, env=env,
        sharders=[sharder],  # type: ignore[list-item]
        data_parallel_wrapper=NoDataParallel() if world_size == 1 else None)


def maybe_shard_model(model: nn.Module, device: torch.device,
                      sharding_types: Mapping[str, str] | None = None,
                      output_dtensor: bool = False) -> nn.Module:
    """Deprecated: `shard_model` under the original tml's name (`tml.model`).

    As the original: without an initialised process group the model is returned as it is;
    with one it is sharded (`shard_model`). Warns (DeprecationWarning) once per call site.
    """
    warnings.warn("maybe_shard_model is deprecated: use tml.common.sharding.shard_model "
                  "(it always shards)", DeprecationWarning, stacklevel=2)
    if not dist.is_initialized():
        return model
    return shard_model(model, device, sharding_types, output_dtensor)
