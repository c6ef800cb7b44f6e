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


def _list_column(flat: np.ndarray, kind: pa.DataType) -> pa.Array:
    values = pa.array(flat, type=kind)
    return pa.LargeListArray.from_arrays(pa.array([0, len(values)], pa.int64()), values)


def _tensor_columns(name: str, tensor: torch.Tensor) -> dict[str, pa.Array]:
    if tensor.dtype not in _TO_ARROW:
        raise TypeError(f"batch field {name}: dtype {tensor.dtype} cannot be served")
    array = tensor.detach().cpu().contiguous().numpy()
    return {name: _list_column(array.reshape(-1), _TO_ARROW[tensor.dtype]),
            f"{name}.shape": _list_column(np.asarray(array.shape, np.int64), pa.int64())}


def encode(batch: Any) -> pa.RecordBatch:
    """One record batch holding every field of the dataclass `batch`."""
    columns: dict[str, pa.Array] = {}
    keys: dict[str, list[str]] = {}
    for field in dataclasses.fields(batch):
        value = getattr(batch, field.name)
        if isinstance(value, KeyedJaggedTensor):
            keys[field.name] = list(value.keys())
            columns.update(_tensor_columns(f"{field.name}.values", value.values()))
            columns.update(_tensor_columns(f"{field.name}.lengths", value.lengths()))
            if value.weights_or_none() is not None:
                columns.update(_tensor_columns(f"{field.name}.weights", value.weights()))
        elif isinstance(value, torch.Tensor):
            columns.update(_tensor_columns(field.name, value))
        else:
            raise TypeError(f"batch field {field.name}: {type(value).__name__} cannot be served")
    schema = pa.schema([pa.field(n, c.type) for n, c in columns.items()],
                       metadata={_META: json.dumps({"kjt_keys": keys}).encode()})
    return pa.RecordBatch.from_arrays(list(columns.values()), schema=schema)


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

    def _tensor(self, record: pa.RecordBatch, name: str) -> torch.Tensor:
        values = record.column(name)
        shape = record.column(f"{name}.shape")
        if len(values) != 1 or len(shape) != 1 or values.null_count or shape.null_count:
            raise self._fail(f"column '{name}' does not hold one tensor")
        flat = values.values.to_numpy(zero_copy_only=False)
        dims = [int(d) for d in shape.values.to_numpy(zero_copy_only=False)]
        if any(d < 0 for d in dims) or int(np.prod(dims, dtype=np.int64)) != len(flat):
            raise self._fail(f"column '{name}': shape {dims} does not fit its "
                             f"{len(flat)} values")
        # A copy: the Arrow buffer is read-only, and the batch must own its memory.
        return torch.from_numpy(np.array(flat).reshape(dims))

    def decode(self, record: pa.RecordBatch) -> Any:
        self._check_schema(record.schema)
        fields: dict[str, Any] = {}
        for field in dataclasses.fields(self.batch_type):
            if field.name in self._keys:
                lengths = self._tensor(record, f"{field.name}.lengths")
                values = self._tensor(record, f"{field.name}.values")
                weights = None
                if f"{field.name}.weights" in record.schema.names:
                    weights = self._tensor(record, f"{field.name}.weights")
                keys = self._keys[field.name]
                if lengths.dim() != 1 or int(lengths.sum()) != len(values) or (
                        keys and len(lengths) % len(keys)) or (lengths < 0).any():
                    raise self._fail(f"field '{field.name}': lengths do not fit the values")
                fields[field.name] = KeyedJaggedTensor(keys=keys, values=values,
                                                       lengths=lengths, weights=weights)
            else:
                fields[field.name] = self._tensor(record, field.name)
        return self.batch_type(**fields)
