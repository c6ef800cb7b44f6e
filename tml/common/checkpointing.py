"""Sharded checkpoints with torch.distributed.checkpoint (DCP): complete or absent.

Layout: `save_dir/<global_step>/` holds one DCP checkpoint (one `.distcp` file per rank plus
`.metadata`). A save writes into `save_dir/.tmp-<step>/`; only when it is complete does rank
0 rename it to `<step>`. A directory named by a number is therefore always complete: a
save killed half-way leaves a `.tmp-*` directory that `latest_checkpoint` ignores and that
the next training run removes (`Checkpointer.prepare`).

Why the rename is safe, for synchronous and asynchronous saves alike: DCP's save ends with
a collective "finish" step — every rank reports the result of writing its own file, and the
coordinator (rank 0) writes `.metadata` only after all of them succeeded; then the result
(or the first error) is sent back to every rank. So when `dcp.save` returns, or the future
of `dcp.async_save` resolves, on rank 0 without an error, every rank's file is written and
the metadata too. Rank 0 alone then renames (an atomic `os.replace` within one directory)
and applies retention; no other rank touches the directory afterwards, so no extra barrier
is needed. If any rank fails, every rank gets the error, rank 0 removes the temporary
directory, and the previous complete checkpoints stay as they were.

Asynchronous saves (`dcp.async_save`, thread executor): the state is first copied to
memory (staging, in the caller), then written by a background thread, so training goes on
while files are written. Never two in flight: `save` waits for the previous one first, and
`wait` (called at the end of training) waits for the last. The background thread runs DCP's
collectives on a process group of its own (a second gloo group), so they cannot interleave
with the training step's collectives on the default group. Rank 0 completes a finished save
(rename, retention) as soon as it notices (`poll`, every step); errors are raised only at
the points where every rank waits (`save`, `wait`), so all ranks stop together, and those
end with a barrier, so that after them every rank sees the complete checkpoint. Async
saving needs DTensor state (`shard_model(..., output_dtensor=True)`); ShardedTensor
state falls back to synchronous saves with a warning (DCP cannot stage ShardedTensors).

Only tensors are saved: each part's state dict is reduced to its tensor leaves
(hyper-parameters such as learning rates come from the config on load). What the parts are
is the caller's business: this module knows no training loop (the loop's own state, its
step and data position, is defined with the loop in tml.core.loop_state).

Untrusted checkpoints: every read goes through `SafeFileSystemReader` (DCP's own load
included, which is given it): `.metadata` is unpickled by the one restricted unpickler
(tml/common/checkpoint_unpickle.py: exact (module, name) pairs, no dotted names) and checked
for shape (`_check_metadata`); pickled byte entries are refused; every file is checked
against the sha256 recorded when it was saved (tml/common/checkpoint_integrity.py, written
by `_ChecksumWriter` on each rank and merged by rank 0 before the rename). A numbered
directory without `.metadata` (a torn copy) is skipped with a warning, and
`latest_checkpoint` returns the newest *intact* checkpoint, naming damaged newer ones.

Extra metadata: `save(..., extra=...)` writes a small JSON document (`extra.json`) into
the checkpoint directory, next to DCP's files and before the atomic rename, so it is part of
the same complete-or-absent checkpoint; `read_extra` reads it back. Tensors alone cannot say
how they were meant to be used (a TwHIN relation's operator changes no shape): a project
records such facts there and checks them when it loads (see projects/twhin/signature.py).

Resharding: DCP loads a checkpoint written by N workers into M workers and into another
sharding type; the global shape of every tensor is checked first, so a checkpoint of
another model (other table sizes) or optimizer state whose layout depends on the sharding
(row-wise Adagrad saved table_wise, loaded column_wise) fails with one clear line.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
)
from torch.distributed.checkpoint.storage import WriteResult
from torch.distributed.tensor import DTensor
from torch.futures import Future as TorchFuture

from tml.common.checkpoint_integrity import (
    finalize_checksums,
    read_checksums,
    record_rank_checksums,
    verify_file,
    warn_unverified,
)
from tml.common.checkpoint_unpickle import METADATA_GLOBALS, restricted_load
from tml.errors import CheckpointError, TmlError

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^\d+$")
TMP_PREFIX = ".tmp-"
# The optional JSON document a caller saves with a checkpoint (`save(..., extra=...)`).
EXTRA_FILE = "extra.json"
# What DCP raises: its CheckpointException (a BaseException carrying each rank's error) or
# an ordinary exception from a rank's own reader or writer.
_DCP_ERRORS = (Exception, CheckpointException)


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


# --- listing ----------------------------------------------------------------------------

_warned_torn: set[str] = set()


def checkpoint_steps(save_dir: str) -> list[int]:
    """Steps of the complete checkpoints in `save_dir`, ascending.

    A numbered directory without `.metadata` is not one (a save copied half-way, or cut
    short outside our temporary directory): it is skipped with a warning naming it.
    """
    if not os.path.isdir(save_dir):
        return []
    steps = []
    for name in os.listdir(save_dir):
        path = os.path.join(save_dir, name)
        if not _STEP_DIR.match(name) or not os.path.isdir(path):
            continue
        if os.path.isfile(os.path.join(path, ".metadata")):
            steps.append(int(name))
        elif path not in _warned_torn:
            _warned_torn.add(path)
            logger.warning("skipping %s: not a complete checkpoint (no .metadata file; a save "
                           "copied or cut short?)", path)
    return sorted(steps)


def latest_checkpoint(save_dir: str) -> str | None:
    """Path of the newest intact checkpoint in `save_dir`, or None if it holds none.

    Intact: complete, and every file matches the checksum recorded at save
    (`verify_checkpoint`, which reads the checkpoint once; the hashes are cached, so the
    load that follows does not hash again). A damaged newer checkpoint is skipped with a
    warning naming it. If every complete checkpoint is damaged, CheckpointError (starting
    over silently would lose the training they hold).
    """
    damaged: list[str] = []
    first_error: CheckpointError | None = None
    for step in reversed(checkpoint_steps(save_dir)):
        path = os.path.join(save_dir, str(step))
        try:
            verify_checkpoint(path)
        except CheckpointError as error:
            logger.warning("skipping the damaged checkpoint %s: %s", path, error)
            damaged.append(path)
            first_error = first_error or error
            continue
        if damaged:
            logger.warning("using %s, the newest intact checkpoint (damaged: %s)", path,
                           ", ".join(damaged))
        return path
    if first_error is not None:
        raise CheckpointError(f"no intact checkpoint in {save_dir}: {first_error}")
    return None


# --- small distributed helpers ----------------------------------------------------------

def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _rank0_error(error: str) -> str:
    """Rank 0's error message on every rank (only rank 0 touches the directories), so
    that all ranks raise the same error together."""
    if not dist.is_initialized():
        return error
    shared = [error]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def _one_line(error: BaseException) -> str:
    """The first line of the root error (DCP wraps each rank's error with its traceback)."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, cause = sorted(failures.items())[0]
        inner = cause[0] if isinstance(cause, tuple) else cause
        return f"rank {rank}: {_one_line(inner) if isinstance(inner, BaseException) else inner}"
    text = str(error).strip().splitlines()
    line = f"{type(error).__name__}: {text[0] if text else ''}".strip()
    return line if len(line) <= 200 else line[:197] + "..."


# --- tensor-only state ------------------------------------------------------------------

def _tensor_tree(value: Any) -> Any:
    """The tensor leaves of a nested dict (same objects), or None if it holds none."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping):
        tree = {str(k): t for k, t in ((k, _tensor_tree(v)) for k, v in value.items())
                if t is not None}
        return tree or None
    return None


def _merge(full: dict[str, Any], tree: Mapping[str, Any]) -> None:
    """Put the (loaded) tensor leaves of `tree` back into the state dict `full`."""
    for key in list(full):
        if str(key) not in tree:
            continue
        if isinstance(full[key], Mapping):
            _merge(full[key], tree[str(key)])  # type: ignore[arg-type]
        else:
            full[key] = tree[str(key)]


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """DCP's flat keys (`a.b.c`) of a nested tensor tree."""
    flat: dict[str, torch.Tensor] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _is_sharded_tensor(value: Any) -> bool:
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    return isinstance(value, ShardedTensor)


def _global_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(tensor.size())


# --- safe metadata, verified files --------------------------------------------------------

_METADATA = ".metadata"
# A file name DCP's FileSystemWriter gives a rank's data (`__0_0.distcp`): one component.
_DATA_FILE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}$")


def _is_size(value: Any) -> bool:
    return isinstance(value, torch.Size) and all(type(n) is int and n >= 0 for n in value)


def _check_metadata(file: str, metadata: Any) -> Metadata:
    """`metadata` if it has the shape of DCP metadata tml can read, else CheckpointError.

    Unpickling only built allowed classes; this checks they fit together, so that later
    code never trips over a missing attribute, a path outside the checkpoint (`../x`), or
    storage transforms (decompression) that tml never writes.
    """
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{file} is damaged or not a checkpoint file: {why}")

    if not isinstance(metadata, Metadata):
        raise bad("it holds no DCP metadata")
    entries = getattr(metadata, "state_dict_metadata", None)
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(entries, dict) or not isinstance(storage, dict):
        raise bad("its tensor or storage table is missing")
    for key, entry in entries.items():
        if not isinstance(key, str):
            raise bad(f"a tensor name is a {type(key).__name__}")
        if isinstance(entry, BytesStorageMetadata):
            continue
        properties = getattr(entry, "properties", None)
        size, chunks = getattr(entry, "size", None), getattr(entry, "chunks", None)
        if not isinstance(entry, TensorStorageMetadata) or not isinstance(
                getattr(properties, "dtype", None), torch.dtype) or not _is_size(size) \
                or not isinstance(chunks, list):
            raise bad(f"the entry of {key!r} is malformed")
        for chunk in chunks:
            offsets, sizes = getattr(chunk, "offsets", None), getattr(chunk, "sizes", None)
            if not isinstance(chunk, ChunkStorageMetadata) or not _is_size(offsets) \
                    or not _is_size(sizes) or not len(offsets) == len(sizes) == len(size) \
                    or any(o + n > total for o, n, total in zip(offsets, sizes, size)):
                raise bad(f"a chunk of {key!r} is malformed or outside the tensor")
    for index, info in storage.items():
        name = getattr(info, "relative_path", None)
        fqn, offset = getattr(index, "fqn", None), getattr(index, "offset", None)
        well_formed = (isinstance(index, MetadataIndex) and isinstance(fqn, str)
                       and (offset is None or isinstance(offset, torch.Size))
                       and isinstance(info, _StorageInfo) and isinstance(name, str))
        if not well_formed or not _DATA_FILE.match(name) or ".." in name:
            raise bad("a storage entry is malformed or names a file outside the checkpoint")
        if type(getattr(info, "offset", None)) is not int \
                or type(getattr(info, "length", None)) is not int \
                or info.offset < 0 or info.length < 0:
            raise bad(f"a storage entry of {name} has a bad byte range")
        if getattr(info, "transform_descriptors", None):
            raise bad(f"{name} is stored with transforms {info.transform_descriptors!r}, "
                      "which tml never writes")
    if not isinstance(getattr(metadata, "storage_meta", None), (StorageMeta, type(None))):
        raise bad("its storage_meta is malformed")
    return metadata


def _file_extents(metadata: Metadata) -> dict[str, int]:
    """Data file -> bytes it must have at least, from the storage table."""
    extents: dict[str, int] = {}
    for info in metadata.storage_data.values():
        end = info.offset + info.length
        extents[info.relative_path] = max(extents.get(info.relative_path, 0), end)
    return extents


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader for untrusted checkpoint directories.

    `.metadata` is checked against its recorded checksum and read with the restricted
    unpickler (tml.common.checkpoint_unpickle), never plain pickle; every data file is
    checked against its checksum before it is read; byte entries (which DCP's planner
    would unpickle with `torch.load`, weights_only off) are refused: tml saves tensors only.
    """

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        checkpoint = str(self.path)
        file = os.path.join(checkpoint, _METADATA)
        checksums = read_checksums(checkpoint)
        if checksums is not None:
            verify_file(checkpoint, _METADATA, checksums)
        try:
            with open(file, "rb") as handle:
                data = handle.read()
        except OSError as error:
            raise CheckpointError(f"cannot read {file}: {error.strerror or error}") from None
        metadata = _check_metadata(file, restricted_load(data, METADATA_GLOBALS, file))
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> TorchFuture[None]:
        self.verify_plan(plan)
        return super().read_data(plan, planner)

    def verify_plan(self, plan: LoadPlan) -> None:
        """Refuse byte entries and check every file `plan` reads against its checksum."""
        checkpoint = str(self.path)
        needed: dict[str, int] = {}
        for item in plan.items:
            info = self.storage_data.get(item.storage_index)
            if info is None:
                raise CheckpointError(f"{os.path.join(checkpoint, _METADATA)} is damaged: "
                                      f"no storage entry for '{item.storage_index.fqn}'")
            if item.type == LoadItemType.BYTE_IO:
                raise CheckpointError(f"checkpoint {checkpoint}: '{item.dest_index.fqn}' is "
                                      f"stored as pickled bytes in {info.relative_path}, which "
                                      "tml never writes and will not unpickle")
            end = info.offset + info.length
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
        checksums = read_checksums(checkpoint)
        if checksums is None and needed:
            warn_unverified(checkpoint)
        for name in sorted(needed):
            verify_file(checkpoint, name, checksums, needed[name])


class _ChecksumWriter(FileSystemWriter):
    """DCP's file writer that records the sha256 of each file this rank wrote.

    Runs in `write_data`, i.e. on every rank and, for asynchronous saves, in the
    background thread, before DCP's finish step (so before `.metadata` and the rename).
    """

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> TorchFuture[list[WriteResult]]:
        future = super().write_data(plan, planner)
        names = {result.storage_data.relative_path for result in future.wait()}
        record_rank_checksums(str(self.path), plan.storage_data.prefix, names)
        return future

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """The state copied once for an asynchronous save (the caller blocks on this).

        DCP's own staging deep-copies each CPU DTensor (its local shard included) and then
        copies the shard again into a fresh buffer: two copies of every table. Here each
        CPU tensor, a DTensor's local shard included, is cloned once; anything not on the
        CPU keeps DCP's staging (it moves the data to host memory).
        """
        if not _on_cpu(state_dict):
            return super().stage(state_dict)
        self.per_thread_copy_ahead = 0  # as DCP's stage: the staged state is in memory
        return _cpu_copy(state_dict)


def _on_cpu(value: Any) -> bool:
    """Whether every tensor in the tree `value` is a plain tensor or DTensor on the CPU."""
    if _is_sharded_tensor(value):
        return False
    if isinstance(value, torch.Tensor):
        return value.device.type == "cpu"
    if isinstance(value, Mapping):
        return all(_on_cpu(item) for item in value.values())
    return True


def _cpu_copy(value: Any) -> Any:
    """`value` with each (CPU) tensor replaced by a copy that shares no memory with it."""
    if isinstance(value, DTensor):
        return DTensor.from_local(value.to_local().detach().clone(), value.device_mesh,
                                  value.placements, run_check=False, shape=value.shape,
                                  stride=value.stride())
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, Mapping):
        return {key: _cpu_copy(item) for key, item in value.items()}
    return value


def read_metadata(path: str) -> Metadata:
    """DCP metadata of the checkpoint at `path` (checksum-verified, safely unpickled)."""
    if not os.path.isfile(os.path.join(path, _METADATA)):
        raise CheckpointError(f"{path} is not a complete checkpoint (no .metadata file)")
    return SafeFileSystemReader(path).read_metadata()


def verify_checkpoint(path: str) -> Metadata:
    """Check every file of the checkpoint at `path` (its whole bytes); its metadata.

    Raises CheckpointError naming the first damaged or missing file. A checkpoint without
    checksums (older than them) passes with a warning if its files exist and are long enough.
    """
    metadata = read_metadata(path)
    checksums = read_checksums(path)
    if checksums is None:
        warn_unverified(path)
    for name, size in sorted(_file_extents(metadata).items()):
        verify_file(path, name, checksums, size)
    if checksums is not None and EXTRA_FILE in checksums:
        verify_file(path, EXTRA_FILE, checksums)
    return metadata


def tml_failure(error: BaseException) -> TmlError | None:
    """The TmlError (one of our readers' own) inside an error DCP wrapped, if any."""
    if isinstance(error, TmlError):
        return error
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict):
        for _, cause in sorted(failures.items()):
            inner = cause[0] if isinstance(cause, tuple) else cause
            if isinstance(inner, BaseException) and tml_failure(inner) is not None:
                return tml_failure(inner)
    return None


# --- loading ----------------------------------------------------------------------------

def _check_compatible(path: str, metadata: Metadata, flat: Mapping[str, torch.Tensor]) -> None:
    """Every tensor to load exists in the checkpoint with the same global shape."""
    saved = metadata.state_dict_metadata
    for key, tensor in flat.items():
        entry = saved.get(key)
        if not isinstance(entry, TensorStorageMetadata):
            raise CheckpointError(f"checkpoint {path} has no tensor '{key}': it was saved by "
                                  "a different model or optimizer configuration")
        expected, found = _global_shape(tensor), tuple(entry.size)
        if expected == found:
            continue
        if key.startswith("optim.") and ".momentum" in key:
            raise CheckpointError(
                f"checkpoint {path}: optimizer state '{key}' has shape {list(found)} but "
                f"this model needs {list(expected)}: row-wise optimizer state (e.g. "
                "Adagrad's) differs between column_wise and table_wise/row_wise sharding "
                "and cannot be resharded; load with the sharding type it was saved with, "
                "or warm start the weights only (training.initial_checkpoint_dir)")
        raise CheckpointError(f"checkpoint {path}: '{key}' has shape {list(found)} but this "
                              f"model needs {list(expected)} (saved from a config with other "
                              "table sizes?)")


def grown_keys(metadata: Metadata, flat: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Key -> saved rows, of each 2-D tensor this model has with more rows than the
    checkpoint and the same columns (a table grown by new ids, relation vectors grown by new
    relations). Anything else that differs is left to `_check_compatible` to refuse."""
    grown = {}
    for key, tensor in flat.items():
        entry = metadata.state_dict_metadata.get(key)
        if not isinstance(entry, TensorStorageMetadata):
            continue
        expected, found = _global_shape(tensor), tuple(entry.size)
        if len(expected) == len(found) == 2 and expected[1] == found[1] \
                and found[0] < expected[0]:
            grown[key] = found[0]
    return grown


def _prune(tree: dict[str, Any], flat_key: str, prefix: str = "") -> None:
    """Remove the leaf of `tree` whose DCP flat key is `flat_key`."""
    for key in list(tree):
        name = f"{prefix}{key}"
        if name == flat_key:
            del tree[key]
        elif isinstance(tree[key], dict) and flat_key.startswith(name + "."):
            _prune(tree[key], flat_key, name + ".")


@torch.no_grad()
def _load_grown(path: str, key: str, tensor: Any, saved_rows: int) -> None:
    """Rows 0..saved_rows-1 of `key` into this worker's part of `tensor`, bit for bit;
    the rows after them are not touched (they keep their initial values)."""
    from tml.common.checkpoint_rows import load_rows
    from tml.common.modules.embedding.vectors import local_shards

    for shard, (row, column) in local_shards(tensor):
        end = min(row + shard.shape[0], saved_rows)
        if end <= row:
            continue
        block = load_rows(path, key, row, end)
        shard[:end - row].copy_(block[:, column:column + shard.shape[1]].to(shard.dtype))


def load_checkpoint(path: str, parts: Mapping[str, Stateful],
                    grow_rows: bool = False) -> dict[str, tuple[int, int]]:
    """Load the checkpoint at `path` into `parts` in place (collective).

    Works across world sizes and sharding types (DCP reshards); only tensors are read.
    Raises CheckpointError for a missing, damaged or incompatible checkpoint.

    `grow_rows` (a warm start into grown tables): a 2-D tensor with more rows here than in
    the checkpoint gets the saved rows bit for bit, and its other rows keep the values they
    have (their initialisation). Returns key -> (saved rows, rows now) of those tensors.
    """
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    full = {name: part.state_dict() for name, part in parts.items()}
    tree = {name: _tensor_tree(state) or {} for name, state in full.items()}
    metadata = read_metadata(path)
    flat = _flatten(tree)
    grown = grown_keys(metadata, flat) if grow_rows else {}
    for key in grown:
        _prune(tree, key)
    _check_compatible(path, metadata, _flatten(tree))
    try:
        for key, saved_rows in grown.items():
            _load_grown(path, key, flat[key], saved_rows)
        dcp.load(tree, storage_reader=SafeFileSystemReader(path))
    except _DCP_ERRORS as error:  # noqa: BLE001 (DCP wraps each rank's error)
        ours = tml_failure(error)
        if ours is not None:
            raise CheckpointError(str(ours)) from None
        raise CheckpointError(f"cannot load checkpoint {path}: a file is damaged or "
                              f"truncated ({_one_line(error)})") from None
    for name, part in parts.items():
        _merge(full[name], tree[name])
        part.load_state_dict(full[name])
    return {key: (rows, _global_shape(flat[key])[0]) for key, rows in grown.items()}


def read_tensors(path: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint whose flat key starts with `prefix`, unsharded.

    For inspection and tests in a plain process (no process group, no model): each tensor
    is assembled at its full global shape, whatever the world size that saved it.
    """
    metadata = read_metadata(path)
    tensors = {key: torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
               for key, entry in metadata.state_dict_metadata.items()
               if key.startswith(prefix) and isinstance(entry, TensorStorageMetadata)}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(tensors, storage_reader=SafeFileSystemReader(path), no_dist=True)
    except _DCP_ERRORS as error:  # noqa: BLE001
        ours = tml_failure(error)
        if ours is not None:
            raise CheckpointError(str(ours)) from None
        raise CheckpointError(f"cannot load checkpoint {path}: {_one_line(error)}") from None
    return tensors


# --- saving -----------------------------------------------------------------------------

class Checkpointer:
    """Saves checkpoints of `parts` into `save_dir`, synchronously or asynchronously.

    Every rank builds one with the same arguments (construction and `prepare` are
    collective). `save` returns the path the checkpoint will have once complete.
    """

    def __init__(self, save_dir: str, max_to_keep: int | None = None,
                 async_save: bool = False) -> None:
        self.save_dir = save_dir
        self.max_to_keep = max_to_keep
        self.async_save = async_save
        self._pending: _PendingSave | None = None
        # Steps retention never removes (the best checkpoint of early stopping).
        self.keep: set[int] = set()
        self._group = None
        self._warned_sync = False
        if async_save and dist.is_initialized():
            # DCP's collectives of a background save get a group of their own.
            self._group = dist.new_group(backend="gloo")

    def prepare(self) -> None:
        """Check that `save_dir` is writable and remove leftovers of interrupted saves.

        Called before training starts, so that a bad save_dir fails at once, not at the
        first checkpoint.
        """
        error = ""
        if _is_rank0():
            try:
                os.makedirs(self.save_dir, exist_ok=True)
                probe = os.path.join(self.save_dir, f"{TMP_PREFIX}probe")
                with open(probe, "w") as f:
                    f.write("ok")
                os.remove(probe)
                _remove_stale_tmp(self.save_dir)
            except OSError as err:
                error = f"{type(err).__name__}: {err.strerror or err}"
        error = _rank0_error(error)
        if error:
            raise CheckpointError(f"cannot write checkpoints to {self.save_dir}: {error}")

    def save(self, step: int, parts: Mapping[str, Stateful],
             extra: Mapping[str, Any] | None = None) -> str:
        """Save `parts` as `save_dir/<step>` (collective); returns that path.

        `extra`: a JSON-serialisable mapping written (by rank 0) as `EXTRA_FILE` into the
        checkpoint before it is renamed into place; read it back with `read_extra`.
        Waits for the previous asynchronous save first (raising its error, if any).
        """
        self.wait()
        final = os.path.join(self.save_dir, str(step))
        tmp = os.path.join(self.save_dir, f"{TMP_PREFIX}{step}")
        error = ""
        if _is_rank0():
            try:
                text = None if extra is None else json.dumps(dict(extra), indent=1,
                                                             sort_keys=True)
                if os.path.exists(tmp):
                    shutil.rmtree(tmp)
                os.makedirs(tmp)
                if text is not None:
                    with open(os.path.join(tmp, EXTRA_FILE), "w") as handle:
                        handle.write(text + "\n")
            except (TypeError, ValueError) as err:  # not JSON-serialisable
                error = f"extra is not JSON-serialisable: {err}"
            except OSError as err:
                error = f"{type(err).__name__}: {err.strerror or err}"
        error = _rank0_error(error)
        if error:
            raise CheckpointError(f"cannot write checkpoint {final}: {error}")
        state = {name: _tensor_tree(part.state_dict()) or {} for name, part in parts.items()}
        use_async = self.async_save and not self._has_sharded_tensors(state)
        started = time.perf_counter()
        if not use_async:
            try:
                dcp.save(state, checkpoint_id=tmp, storage_writer=_ChecksumWriter(tmp))
                failure = None
            except _DCP_ERRORS as err:  # noqa: BLE001 (DCP wraps each rank's OSError)
                failure = err
            _PendingSave(step, tmp, final, self, None, started).complete(failure)
            return final
        try:
            future = dcp.async_save(state, checkpoint_id=tmp, process_group=self._group,
                                    storage_writer=_ChecksumWriter(tmp))
        except _DCP_ERRORS as err:  # noqa: BLE001
            _PendingSave(step, tmp, final, self, None, started).complete(err)  # raises
            raise
        if not isinstance(future, Future):  # an AsyncSaveResponse (custom stagers only)
            future = future.upload_completion
        self._pending = _PendingSave(step, tmp, final, self, future, started)
        logger.info("checkpoint %s: state staged in %.2fs, writing in the background", final,
                    time.perf_counter() - started)
        return final

    def poll(self) -> None:
        """Complete a finished background save now (rank 0 renames); never raises."""
        if self._pending is not None and _is_rank0():
            self._pending.poll()

    def wait(self) -> str | None:
        """Wait for the background save in flight (collective); its path, or None."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        return pending.wait()

    def when_saved(self, step: int, callback: Callable[[], None]) -> None:
        """Call `callback` (on rank 0) once checkpoint `step` is complete on disk: now if it
        is, else when its background save is renamed into place; never if that save fails.

        Why: a marker naming a checkpoint (early stopping's best.json) written while the
        checkpoint is still being written would name a missing one if the process died in
        between; the marker must follow the data, not precede it.
        """
        pending = self._pending
        if pending is not None and pending.step == step and not pending.finalized:
            pending.on_final.append(callback)
        elif _is_rank0() and os.path.isfile(os.path.join(self.save_dir, str(step),
                                                         _METADATA)):
            callback()

    def _has_sharded_tensors(self, state: Mapping[str, Any]) -> bool:
        if not any(_is_sharded_tensor(t) for t in _flatten(state).values()):
            return False
        if not self._warned_sync:
            logger.warning("the model state holds ShardedTensors, which DCP cannot save "
                           "asynchronously: saving synchronously (shard the model with "
                           "output_dtensor=True for asynchronous checkpoints)")
            self._warned_sync = True
        return True

    def _retain(self) -> None:
        if self.max_to_keep:
            steps = [s for s in checkpoint_steps(self.save_dir) if s not in self.keep]
            for old in steps[:-self.max_to_keep]:
                shutil.rmtree(os.path.join(self.save_dir, str(old)), ignore_errors=True)
                logger.info("removed the old checkpoint %s (max_to_keep=%d)",
                            os.path.join(self.save_dir, str(old)), self.max_to_keep)


class _PendingSave:
    """One save: its future (None when synchronous) and the completion step."""

    def __init__(self, step: int, tmp: str, final: str, owner: Checkpointer,
                 future: Future | None, started: float) -> None:
        self.step, self.tmp, self.final, self.owner = step, tmp, final, owner
        self.future, self.started = future, started
        self.finalized = False
        self.on_final: list[Callable[[], None]] = []   # `Checkpointer.when_saved`

    def poll(self) -> None:
        if self.future is not None and self.future.done() and not self.finalized \
                and self.future.exception() is None:
            self._finalize()

    def wait(self) -> str:
        assert self.future is not None
        try:
            self.future.result()
            failure = None
        except _DCP_ERRORS as err:  # noqa: BLE001
            failure = err
        return self.complete(failure)

    def complete(self, failure: BaseException | None) -> str:
        if failure is not None:
            if _is_rank0():
                shutil.rmtree(self.tmp, ignore_errors=True)
            raise CheckpointError(f"saving checkpoint {self.final} failed ({_one_line(failure)}); "
                                  "the previous complete checkpoints are intact")
        if _is_rank0() and not self.finalized:
            self._finalize()
        if dist.is_initialized():
            # Once save/wait returns, every rank sees the complete checkpoint.
            dist.barrier()
        return self.final

    def _finalize(self) -> None:
        # Every rank recorded its files' checksums before DCP's finish; add .metadata and
        # extra.json and merge them into one record, all before the rename.
        finalize_checksums(self.tmp, also=(".metadata", EXTRA_FILE))
        if os.path.exists(self.final):
            shutil.rmtree(self.final)
        os.replace(self.tmp, self.final)
        self.finalized = True
        logger.info("saved checkpoint %s (%.2fs)", self.final,
                    time.perf_counter() - self.started)
        self.owner._retain()
        for callback in self.on_final:
            callback()


def _remove_stale_tmp(save_dir: str) -> None:
    for name in os.listdir(save_dir):
        if name.startswith(TMP_PREFIX):
            logger.warning("removing the incomplete checkpoint %s", os.path.join(save_dir, name))
            shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)


def save_checkpoint(save_dir: str, step: int, parts: Mapping[str, Stateful],
                    max_to_keep: int | None = None,
                    extra: Mapping[str, Any] | None = None) -> str:
    """Save `parts` synchronously as `save_dir/<step>` on every rank; returns the path.

    `extra`: see `Checkpointer.save`.
    """
    checkpointer = Checkpointer(save_dir, max_to_keep)
    checkpointer.prepare()
    return checkpointer.save(step, parts, extra)


def read_extra(path: str) -> dict[str, Any] | None:
    """The `extra` mapping saved with the checkpoint at `path`, or None if it has none.

    None (not an error) for checkpoints written without `extra` or before it existed: the
    caller decides whether that is acceptable. Raises CheckpointError for a missing
    checkpoint and for an `EXTRA_FILE` that is not a JSON object.
    """
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    file = os.path.join(path, EXTRA_FILE)
    checksums = read_checksums(path)
    if checksums is not None and EXTRA_FILE in checksums:
        verify_file(path, EXTRA_FILE, checksums)
    try:
        with open(file) as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {file}: {_one_line(error)}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object, found "
                              f"{type(data).__name__}")
    return data


# --- names that moved to the training loop -------------------------------------------------

# The loop's own state (step, data position, wall time, the LR schedule's position) is
# defined by the loop, in tml.core.loop_state; this module saves whatever state it is given.
# Old imports from here keep working, with a DeprecationWarning.
_MOVED = {"TrainState": "tml.core.loop_state", "SchedulerState": "tml.core.loop_state",
          "set_schedule_step": "tml.core.loop_state", "EVALUATION_FILE": "tml.core.loop_state"}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib

        warnings.warn(f"tml.common.checkpointing.{name} moved to {_MOVED[name]}.{name}",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
