"""A batch (a `DataclassBatch` of tensors and KeyedJaggedTensors) as one Arrow record batch.

Each record batch has one row; every tensor becomes a list column of its flattened values
plus a list column of its shape, every KeyedJaggedTensor its values, lengths and (optional)
weights columns, its keys going in the schema metadata. The columns are fixed by the batch
class, so a stream has one schema.

The receiving side decodes with the batch class *it* was given (never a class named by the
sender) and refuses a stream whose columns, types or keys do not match it: a reader is
another process, and what comes over a socket is data.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tml.errors import DataError

_TO_ARROW = {torch.int64: pa.int64(), torch.int32: pa.int32(), torch.float32: pa.float32(),
             torch.float64: pa.float64(), torch.bool: pa.bool_()}
_FROM_ARROW = {v: k for k, v in _TO_ARROW.items()}
_META = b"tml.batch"


def _list_column(parts: list[np.ndarray], kind: pa.DataType) -> pa.Array:
    """One list row per array of `parts` (flattened), as a LargeListArray."""
    offsets = np.zeros(len(parts) + 1, np.int64)
    np.cumsum([len(p) for p in parts], out=offsets[1:])
    flat = np.concatenate(parts) if len(parts) > 1 else parts[0]
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat, type=kind))


def _tensors(batch: Any) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """The batch's tensors by column name, and the keys of its KeyedJaggedTensors."""
    tensors: dict[str, torch.Tensor] = {}
    keys: dict[str, list[str]] = {}
    for field in dataclasses.fields(batch):
        value = getattr(batch, field.name)
        if isinstance(value, KeyedJaggedTensor):
            keys[field.name] = list(value.keys())
            tensors[f"{field.name}.values"] = value.values()
            tensors[f"{field.name}.lengths"] = value.lengths()
            if value.weights_or_none() is not None:
                tensors[f"{field.name}.weights"] = value.weights()
        elif isinstance(value, torch.Tensor):
            tensors[field.name] = value
        else:
            raise TypeError(f"batch field {field.name}: {type(value).__name__} cannot be served")
    return tensors, keys


def encode(batches: list[Any]) -> pa.RecordBatch:
    """One record batch with one row per batch of `batches` (same class, same fields).

    Several batches per message: the per-message cost (Arrow arrays, gRPC) is paid once.
    """
    columns: dict[str, list[np.ndarray]] = {}
    shapes: dict[str, list[np.ndarray]] = {}
    kinds: dict[str, pa.DataType] = {}
    keys: dict[str, list[str]] = {}
    for batch in batches:
        tensors, keys = _tensors(batch)
        for name, tensor in tensors.items():
            if tensor.dtype not in _TO_ARROW:
                raise TypeError(f"batch field {name}: dtype {tensor.dtype} cannot be served")
            array = tensor.detach().cpu().contiguous().numpy()
            kinds[name] = _TO_ARROW[tensor.dtype]
            columns.setdefault(name, []).append(array.reshape(-1))
            shapes.setdefault(name, []).append(np.asarray(array.shape, np.int64))
    arrays: dict[str, pa.Array] = {}
    for name, parts in columns.items():
        arrays[name] = _list_column(parts, kinds[name])
        arrays[f"{name}.shape"] = _list_column(shapes[name], pa.int64())
    schema = pa.schema([pa.field(n, c.type) for n, c in arrays.items()],
                       metadata={_META: json.dumps({"kjt_keys": keys}).encode()})
    return pa.RecordBatch.from_arrays(list(arrays.values()), schema=schema)


class Decoder:
    """Turns record batches back into `batch_type` instances, checking them on the way."""

    def __init__(self, batch_type: type, source: str) -> None:
        self.batch_type = batch_type
        self.source = source
        self._checked: pa.Schema | None = None
        self._keys: dict[str, list[str]] = {}

    def _fail(self, what: str) -> DataError:
        return DataError(f"{self.source}: {what}")

    def _check_schema(self, schema: pa.Schema) -> None:
        if self._checked is not None and schema.equals(self._checked):
            return
        try:
            meta = json.loads((schema.metadata or {}).get(_META, b"{}"))
            keys = meta.get("kjt_keys", {})
            if not isinstance(keys, dict) or not all(
                    isinstance(v, list) and all(isinstance(k, str) for k in v)
                    for v in keys.values()):
                raise ValueError("kjt_keys")
        except ValueError:
            raise self._fail("the stream's batch metadata is not valid") from None
        names = set(schema.names)
        allowed: set[str] = set()
        for field in dataclasses.fields(self.batch_type):
            if field.name in keys:
                parts = ["values", "lengths", "weights"]
                allowed |= {f"{field.name}.{p}{s}" for p in parts for s in ("", ".shape")}
            else:
                allowed |= {field.name, f"{field.name}.shape"}
                if field.name not in names:
                    raise self._fail(f"the stream has no column for batch field "
                                     f"'{field.name}'")
        unknown = sorted(names - allowed)
        if unknown:
            raise self._fail(f"the stream has column(s) {unknown[:3]} that "
                             f"{self.batch_type.__name__} does not have")
        unknown_fields = set(keys) - {f.name for f in dataclasses.fields(self.batch_type)}
        if unknown_fields:
            raise self._fail(f"the stream names unknown batch field(s) {sorted(unknown_fields)}")
        for field in schema:
            kind = field.type
            if not (pa.types.is_large_list(kind) and kind.value_type in _FROM_ARROW):
                raise self._fail(f"column '{field.name}' has type {kind}, not a list of "
                                 "numbers")
        self._checked, self._keys = schema, keys

    def _column(self, record: pa.RecordBatch, name: str) -> list[np.ndarray]:
        """Column `name` as one array per row, shaped by its `.shape` column (checked)."""
        values, shapes = record.column(name), record.column(f"{name}.shape")
        if values.null_count or shapes.null_count:
            raise self._fail(f"column '{name}' has nulls")
        # One copy per column: the Arrow buffer is read-only, torch wants writable memory.
        flat = np.array(values.values.to_numpy(zero_copy_only=False))
        offsets = values.offsets.to_numpy()
        dims_flat = shapes.values.to_numpy(zero_copy_only=False)
        dims_offsets = shapes.offsets.to_numpy()
        rows = []
        for row in range(len(values)):   # offsets index `.values`, also in a slice
            lo, hi = int(offsets[row]), int(offsets[row + 1])
            dims = [int(d) for d in dims_flat[dims_offsets[row]:dims_offsets[row + 1]]]
            if any(d < 0 for d in dims) or math.prod(dims) != hi - lo:
                raise self._fail(f"column '{name}': shape {dims} does not fit its "
                                 f"{hi - lo} values")
            rows.append(flat[lo:hi].reshape(dims))
        return rows

    def decode(self, record: pa.RecordBatch) -> list[Any]:
        """The batches of `record` (one per row), checked against the batch class."""
        self._check_schema(record.schema)
        names = record.schema.names
        columns = {name: self._column(record, name) for name in names
                   if not name.endswith(".shape")}
        batches = []
        for row in range(record.num_rows):
            fields: dict[str, Any] = {}
            for field in dataclasses.fields(self.batch_type):
                name = field.name
                if name not in self._keys:
                    fields[name] = torch.from_numpy(columns[name][row])
                    continue
                lengths = torch.from_numpy(columns[f"{name}.lengths"][row])
                values = torch.from_numpy(columns[f"{name}.values"][row])
                weights = None
                if f"{name}.weights" in columns:
                    weights = torch.from_numpy(columns[f"{name}.weights"][row])
                keys = self._keys[name]
                if lengths.dim() != 1 or values.dim() != 1 or (lengths < 0).any() or \
                        int(lengths.sum()) != len(values) or \
                        (keys and len(lengths) % len(keys)) or \
                        (weights is not None and weights.shape != values.shape):
                    raise self._fail(f"field '{name}': lengths do not fit the values")
                fields[name] = KeyedJaggedTensor(keys=keys, values=values, lengths=lengths,
                                                 weights=weights)
            batches.append(self.batch_type(**fields))
        return batches
