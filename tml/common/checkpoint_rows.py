"""Rows [start, end) of 2-D tensors in a DCP checkpoint, without reading the whole tensor.

Why: evaluating or exporting an embedding table must not need the whole table in one
process (a 100M-row table is tens of GiB). `load_rows` reads one row range, so a caller
streams a table in chunks (export) or takes its own share of it (evaluation on W workers),
and its memory is the range it asked for.

Any writer layout: DCP records each tensor as the chunks its writers held (table_wise: one
chunk, the whole table, in one rank's file; row_wise: row blocks; column_wise: column
blocks; any number of workers). `_RowRangePlanner`, a `DefaultLoadPlanner`, plans the one
chunk offsets (start, 0), sizes (end - start, D) into a plain tensor: DCP's own resharding
helper (`create_read_items_for_chunk_list`) turns it into reads of the overlapping parts of
the saved chunks, so it works with `no_dist=True` in any process, distributed or not.

Bytes read: DCP's `FileSystemReader` `torch.load`s every saved chunk whole before cutting
out the overlap, so one row of a table saved table_wise would cost the whole table.
`_RowRangeReader` reads only the overlapping rows instead: each saved chunk is a
`torch.save` zip archive whose storage record is stored uncompressed, so the rows are at a
known byte offset (found from the archive's directory and its small `data.pkl`, unpickled
with a restricted unpickler). Anything else (storage transforms such as compression, an
unexpected layout) falls back to DCP's whole-chunk read: correct, just not bounded.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.futures import Future

from tml.common.checkpoint_unpickle import restricted_load, storage_globals
from tml.common.checkpointing import SafeFileSystemReader, read_metadata, tml_failure
from tml.errors import CheckpointError


def tensor_shapes(checkpoint_dir: str) -> dict[str, tuple[int, ...]]:
    """Global shape of every tensor in the checkpoint (metadata only, nothing loaded)."""
    metadata = read_metadata(checkpoint_dir)
    return {key: tuple(entry.size) for key, entry in metadata.state_dict_metadata.items()
            if isinstance(entry, TensorStorageMetadata)}


def load_rows(checkpoint_dir: str, key: str, start: int, end: int,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rows [start, end) of the 2-D tensor `key`, as a plain (end - start, D) tensor.

    `dtype`: the result's dtype (default: the saved one). Raises CheckpointError naming the
    checkpoint and key for a missing key, a tensor that is not 2-D, or a range outside it.
    """
    return load_row_ranges(checkpoint_dir, {key: (start, end)}, dtype)[key]


def load_row_ranges(checkpoint_dir: str, ranges: Mapping[str, tuple[int, int]],
                    dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """`load_rows` of several keys (key -> (start, end)) with one read of the metadata."""
    metadata = read_metadata(checkpoint_dir)
    out: dict[str, torch.Tensor] = {}
    wanted: dict[str, tuple[int, int]] = {}
    for key, (start, end) in ranges.items():
        entry = metadata.state_dict_metadata.get(key)
        if not isinstance(entry, TensorStorageMetadata):
            raise CheckpointError(f"checkpoint {checkpoint_dir} has no tensor '{key}'")
        if len(entry.size) != 2:
            raise CheckpointError(f"checkpoint {checkpoint_dir}: '{key}' has shape "
                                  f"{list(entry.size)}; rows can be read from 2-D tensors only")
        rows, width = entry.size
        if not 0 <= start <= end <= rows:
            raise CheckpointError(f"checkpoint {checkpoint_dir}: rows [{start}, {end}) are "
                                  f"outside '{key}', which has {rows} rows")
        out[key] = torch.empty((end - start, width), dtype=entry.properties.dtype)
        if end > start:
            wanted[key] = (start, end)
    if wanted:
        state = {key: out[key] for key in wanted}
        try:
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
                warnings.simplefilter("ignore", UserWarning)
                dcp.load(state, storage_reader=_RowRangeReader(checkpoint_dir),
                         planner=_RowRangePlanner(wanted), no_dist=True)
        except (Exception, CheckpointException) as error:  # noqa: BLE001 (DCP wraps errors)
            ours = tml_failure(error)
            if ours is not None:   # a damaged file, named by the reader
                raise CheckpointError(str(ours)) from None
            message = " ".join(str(error).split())[:300]
            raise CheckpointError(f"cannot read rows of {', '.join(wanted)} from checkpoint "
                                  f"{checkpoint_dir}: {message}") from None
    if dtype is not None:
        out = {key: value.to(dtype) for key, value in out.items()}
    return out


class _RowRangePlanner(DefaultLoadPlanner):
    """Plans, for each key, the one chunk (start, 0) + (end - start, D) into a plain tensor.

    The default planner would ask for the whole tensor (a plain tensor is one chunk at
    offset 0 of its own size) and `lookup_tensor` would refuse a non-zero offset.
    """

    def __init__(self, ranges: Mapping[str, tuple[int, int]]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._ranges = dict(ranges)

    def create_local_plan(self) -> LoadPlan:
        assert self.metadata is not None
        items: list[ReadItem] = []
        for key, (start, end) in self._ranges.items():
            entry = self.metadata.state_dict_metadata[key]
            assert isinstance(entry, TensorStorageMetadata)
            chunk = ChunkStorageMetadata(offsets=torch.Size([start, 0]),
                                         sizes=torch.Size([end - start, entry.size[1]]))
            items += create_read_items_for_chunk_list(key, entry, [chunk])
        return LoadPlan(items)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        # Read items' dest_offsets are relative to the planned chunk, i.e. to this tensor.
        return self.state_dict[index.fqn]


class _RowRangeReader(SafeFileSystemReader):
    """A `SafeFileSystemReader` that reads only the requested rows of each saved chunk.

    Every file it reads is first checked against its checksum (`verify_plan`: the whole
    file is hashed in blocks, once per process), so a changed byte anywhere in it, not only
    in the rows asked for, is an error naming the file.
    """

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        self.verify_plan(plan)
        per_file: dict[str, list[ReadItem]] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path,
                                []).append(item)
        fallback: list[ReadItem] = []
        for relative_path, items in per_file.items():
            path = self.fs.concat_path(self.path, relative_path)
            with self.fs.create_stream(path, "rb") as stream:
                for item in items:
                    info = self.storage_data[item.storage_index]
                    region = None
                    if item.type == LoadItemType.TENSOR and not info.transform_descriptors:
                        region = _read_region(stream, info.offset, info.length,
                                              item.storage_offsets, item.lengths)
                    if region is None:
                        fallback.append(item)
                        continue
                    target = planner.resolve_tensor(item).detach()
                    if target.size() != region.size():
                        raise CheckpointError(f"{path}: read {list(region.size())} for a "
                                              f"{list(target.size())} request")
                    target.copy_(region)
                    planner.commit_tensor(item, target)
        if fallback:
            return super().read_data(LoadPlan(fallback), planner)
        done: Future[None] = Future()
        done.set_result(None)
        return done


class _Slice(io.RawIOBase):
    """Bytes [offset, offset + length) of a seekable binary stream, as a file of its own."""

    def __init__(self, stream: Any, offset: int, length: int) -> None:
        super().__init__()
        self._stream, self._offset, self._length, self._pos = stream, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._length}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        count = max(0, min(len(view), self._length - self._pos))
        self._stream.seek(self._offset + self._pos)
        done = 0
        while done < count:
            got = self._stream.readinto(view[done:count])
            if not got:
                break
            done += got
        self._pos += done
        return done


class _Storage:
    def __init__(self, key: str, dtype: torch.dtype) -> None:
        self.key, self.dtype = key, dtype


def _layout(storage: _Storage, storage_offset: int, size: Any, stride: Any,
            *_: Any) -> tuple[_Storage, int, tuple[int, ...], tuple[int, ...]]:
    return storage, int(storage_offset), tuple(size), tuple(stride)


# What a tensor record's `data.pkl` may name; `_rebuild_tensor_v2` is replaced by `_layout`,
# which only returns its arguments, so nothing is rebuilt from the file.
_RECORD_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _layout,
    ("collections", "OrderedDict"): OrderedDict,
    ("torch", "Size"): torch.Size,
    **storage_globals(),
}


def _storage_of(pid: Any) -> _Storage:
    """A tensor record's persistent id ('storage', torch.FloatStorage, key, location, n)."""
    if not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage":
        raise ValueError("unexpected persistent id")
    _, storage_type, key, _location, _numel = pid
    dtype = (storage_type if isinstance(storage_type, torch.dtype)
             else torch.uint8 if storage_type is torch.UntypedStorage
             else storage_type.dtype)
    return _Storage(str(key), dtype)


def _record_layout(data: bytes) -> tuple[_Storage, int, tuple[int, ...], tuple[int, ...]]:
    """(storage, offset, size, stride) of a tensor record's `data.pkl`; ValueError if other."""
    layout = restricted_load(data, _RECORD_GLOBALS, "a tensor record", _storage_of)
    if not (isinstance(layout, tuple) and len(layout) == 4 and isinstance(layout[0], _Storage)):
        raise ValueError("not a plain tensor record")
    return layout


def _read_region(stream: Any, offset: int, length: int, storage_offsets: Any,
                 lengths: Any) -> torch.Tensor | None:
    """The region (storage_offsets, lengths) of the 2-D tensor `torch.save`d at
    [offset, offset + length) of `stream`, reading only its rows; None if its layout is
    not the plain one (the caller then reads the chunk whole)."""
    if len(lengths) != 2:
        return None
    part = _Slice(stream, offset, length)
    try:
        with zipfile.ZipFile(part) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
            if len(pickles) != 1:
                return None
            prefix = pickles[0][:-len("data.pkl")]
            names = set(archive.namelist())
            if f"{prefix}byteorder" in names and \
                    archive.read(f"{prefix}byteorder") != b"little":
                return None
            storage, storage_offset, size, stride = _record_layout(archive.read(pickles[0]))
            record = archive.getinfo(f"{prefix}data/{storage.key}")
    except (zipfile.BadZipFile, KeyError, ValueError, TypeError, CheckpointError):
        return None
    if record.compress_type != zipfile.ZIP_STORED or len(size) != 2 or \
            (size[1] > 1 and stride[1] != 1) or stride[0] < size[1]:
        return None
    part.seek(record.header_offset)
    header = part.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        return None
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    data_start = record.header_offset + 30 + name_length + extra_length
    itemsize = storage.dtype.itemsize
    row0, col0 = int(storage_offsets[0]), int(storage_offsets[1])
    rows, cols = int(lengths[0]), int(lengths[1])
    if rows == 0 or cols == 0:
        return torch.empty((rows, cols), dtype=storage.dtype)
    first = storage_offset + row0 * stride[0]
    span = (rows - 1) * stride[0] + size[1]            # elements from first row to last
    if (first + span) * itemsize > record.file_size:
        return None
    buffer = bytearray(span * itemsize)
    part.seek(data_start + first * itemsize)
    if part.readinto(buffer) != len(buffer):
        return None
    flat = torch.frombuffer(buffer, dtype=storage.dtype)
    return flat.as_strided((rows, size[1]), (stride[0], 1))[:, col0:col0 + cols]
